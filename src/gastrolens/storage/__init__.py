"""Durable files that are not DICOM-specific: atomic writes and the store with its quarantine."""
