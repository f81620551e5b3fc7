"""The DICOM UID check, in one place: pydicom's grammar (PS3.5 9.1), applied to the whole string.

Not ``UID(value).is_valid`` itself: pydicom matches its pattern with ``re.match`` and a
``$`` that also matches before a trailing newline, ``UID()`` drops trailing spaces
(so ``"1.2.3\\n"`` and ``"1.2.3 "`` pass), and constructing a ``UID`` from a bad value
emits a warning per call. The grammar itself is pydicom's ``RE_VALID_UID``.
"""

from __future__ import annotations

import re

from pydicom.uid import RE_VALID_UID

MAX_LENGTH = 64

_GRAMMAR = re.compile(RE_VALID_UID)


def is_dicom_uid(value: str) -> bool:
    """Digits and dots, no leading zeros, at most 64 characters; nothing before or after."""
    return len(value) <= MAX_LENGTH and _GRAMMAR.fullmatch(value) is not None
