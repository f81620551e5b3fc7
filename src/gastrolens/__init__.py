"""GastroLens: a DICOM node for gastric-endoscopy AI (see README.md)."""

__version__ = "0.1.0"

UNTRAINED_WARNING = "UNTRAINED MODEL - NOT FOR DIAGNOSTIC USE"
"""Written on every output made with weights that were never trained."""
