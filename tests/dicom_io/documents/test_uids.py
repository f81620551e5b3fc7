import hashlib

import pytest
from pydicom.uid import UID

from gastrolens.dicom_io.documents.uids import (
    OutputKind,
    derived_uid,
    instance_uid,
    series_uid,
    study_sr_instance_uid,
    study_sr_series_uid,
)
from gastrolens.errors import OutputError

SRC = "1.2.826.0.1.3680043.8.498.1234567890"
STUDY = "1.2.826.0.1.3680043.8.498.42"
SHA_A = hashlib.sha256(b"a").hexdigest()
SHA_B = hashlib.sha256(b"b").hexdigest()
PER_IMAGE = (OutputKind.SEG, OutputKind.SR, OutputKind.OVERLAY)


def test_instance_uids_are_a_pure_function_of_source_sha_and_kind():
    for kind in PER_IMAGE:
        assert instance_uid(kind, SRC, SHA_A) == instance_uid(kind, SRC, SHA_A)
    uids = {instance_uid(kind, src, sha) for kind in PER_IMAGE for src in (SRC, SRC + "1") for sha in (SHA_A, SHA_B)}
    assert len(uids) == 12


def test_uids_are_valid_2_25_uids():
    for uid in (
        instance_uid(OutputKind.SEG, SRC, SHA_A),
        series_uid(OutputKind.SR, STUDY, SHA_A),
        study_sr_instance_uid(STUDY, SHA_A, 7),
        study_sr_series_uid(STUDY, SHA_A),
        derived_uid("x", "y"),
    ):
        assert isinstance(uid, UID) and uid.is_valid and uid.startswith("2.25.")
        assert int(uid.split(".")[2]) < 2**128


def test_series_uid_depends_on_study_kind_and_sha():
    assert series_uid(OutputKind.SEG, STUDY, SHA_A) == series_uid(OutputKind.SEG, STUDY, SHA_A)
    assert series_uid(OutputKind.SEG, STUDY, SHA_A) != series_uid(OutputKind.SR, STUDY, SHA_A)
    assert series_uid(OutputKind.SEG, STUDY, SHA_A) != series_uid(OutputKind.SEG, STUDY, SHA_B)
    assert series_uid(OutputKind.SEG, STUDY, SHA_A) != instance_uid(OutputKind.SEG, STUDY, SHA_A)


def test_study_sr_uid_changes_with_revision_but_its_series_does_not():
    first, second = (study_sr_instance_uid(STUDY, SHA_A, r) for r in (1, 2))
    assert first != second
    assert study_sr_instance_uid(STUDY, SHA_A, 2) == second
    assert study_sr_instance_uid(STUDY, SHA_B, 1) != first
    assert study_sr_series_uid(STUDY, SHA_A) != series_uid(OutputKind.SR, STUDY, SHA_A)


@pytest.mark.parametrize(
    "call",
    [
        lambda: instance_uid(OutputKind.SEG, SRC, "not-a-sha"),
        lambda: instance_uid(OutputKind.SEG, SRC, SHA_A.upper()),
        lambda: instance_uid(OutputKind.SEG, "1.02.3", SHA_A),
        lambda: instance_uid(OutputKind.SEG, "", SHA_A),
        lambda: instance_uid(OutputKind.SEG, SRC + "\n", SHA_A),
        lambda: instance_uid(OutputKind.SEG, SRC + " ", SHA_A),
        lambda: instance_uid(OutputKind.SEG, "1." + "2" * 63, SHA_A),
        lambda: instance_uid(OutputKind.STUDY_SR, SRC, SHA_A),
        lambda: study_sr_instance_uid(STUDY, SHA_A, 0),
        lambda: study_sr_instance_uid(STUDY, SHA_A, True),
    ],
)
def test_bad_inputs_are_refused(call):
    with pytest.raises(OutputError):
        call()
