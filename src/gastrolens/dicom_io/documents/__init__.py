"""DICOM documents: decoding to RGB frames, SEG / SR / overlay writers, codes and output UIDs."""
