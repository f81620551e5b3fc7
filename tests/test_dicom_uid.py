"""The one UID check: pydicom's grammar on the whole string (no trailing newline or space slips through)."""

from __future__ import annotations

import pytest

from gastrolens.dicom_uid import is_dicom_uid


@pytest.mark.parametrize("value", ["0", "1.2.3", "1.2.840.10008.5.1.4.1.1.7", "1." + "2" * 62])
def test_valid(value: str) -> None:
    assert is_dicom_uid(value)


@pytest.mark.parametrize("value", ["", "1.2.03", "1..2", ".1", "1.2.", "1.2.3\n", "1.2.3 ", " 1.2", "1.2.a",
                                   "1." + "2" * 63, "1.2\x00", "１.２"])
def test_invalid(value: str) -> None:
    assert not is_dicom_uid(value)
