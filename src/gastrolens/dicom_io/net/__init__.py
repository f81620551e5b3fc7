"""DICOM networking: the C-STORE receiver, senders, TLS and the receive-side header check."""
