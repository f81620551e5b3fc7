"""HL7 v2 results: the study conclusion as an ORU^R01 (v2.5.1), sent over MLLP.

:mod:`oru` builds the message with hl7apy from a study SR's content; :mod:`mllp` sends
it with python-hl7's MLLP client and reads the peer's ACK into a typed send result.
"""
