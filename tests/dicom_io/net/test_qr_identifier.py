"""Study Root identifiers: levels, unique keys, matching keys, date ranges, answers and their character set."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from gastrolens.dicom_io.net.qr_identifier import (
    STATUS_IDENTIFIER_MISMATCH,
    STATUS_UNABLE_TO_PROCESS,
    IdentifierError,
    Level,
    Match,
    QueryKeys,
    answer,
    parse_identifier,
    response_character_set,
    stored_character_set,
    unsupported_keys,
)


def identifier(**keys: object) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def test_study_keys_with_wildcards_ranges_and_universal_matching() -> None:
    keys = parse_identifier(identifier(QueryRetrieveLevel="study", PatientName="Wang*", PatientID="*",
                                       StudyDate="20250101-20250131", AccessionNumber="",
                                       ModalitiesInStudy=["ES", "SR"], StudyInstanceUID=""), retrieve=False)
    assert keys == QueryKeys(level=Level.STUDY, patient_name="Wang*", date_from=date(2025, 1, 1),
                             date_to=date(2025, 1, 31), modalities=("ES", "SR"))


@pytest.mark.parametrize(("value", "bounds"), [
    ("20250102", (date(2025, 1, 2), date(2025, 1, 2))),
    ("-20250102", (None, date(2025, 1, 2))),
    ("20250102-", (date(2025, 1, 2), None)),
])
def test_study_date_forms(value: str, bounds: tuple[date | None, date | None]) -> None:
    keys = parse_identifier(identifier(QueryRetrieveLevel="STUDY", StudyDate=value), retrieve=False)
    assert (keys.date_from, keys.date_to) == bounds


@pytest.mark.parametrize(("keys", "status"), [
    ({}, STATUS_IDENTIFIER_MISMATCH),
    ({"QueryRetrieveLevel": "PATIENT"}, STATUS_IDENTIFIER_MISMATCH),
    ({"QueryRetrieveLevel": "FRAME"}, STATUS_IDENTIFIER_MISMATCH),
    ({"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": "1.2.3"}, STATUS_IDENTIFIER_MISMATCH),
    ({"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": ["1.2.3", "1.2.4"]}, STATUS_IDENTIFIER_MISMATCH),
    ({"QueryRetrieveLevel": "STUDY", "StudyDate": "20250230"}, STATUS_UNABLE_TO_PROCESS),
    ({"QueryRetrieveLevel": "STUDY", "StudyDate": "20250301-20250201"}, STATUS_UNABLE_TO_PROCESS),
    ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.abc"}, STATUS_UNABLE_TO_PROCESS),
    ({"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.3",
      "SOPClassUID": "not-a-uid"}, STATUS_UNABLE_TO_PROCESS),
], ids=["no-level", "patient", "unknown-level", "image-without-series", "two-studies-above-series",
        "not-a-day", "reversed-range", "bad-uid", "bad-sop-class"])
def test_bad_identifiers(keys: dict[str, object], status: int) -> None:
    with pytest.raises(IdentifierError) as caught:
        parse_identifier(identifier(**keys), retrieve=False)
    assert caught.value.status == status


def test_a_retrieve_needs_the_unique_key_of_its_level_and_takes_a_list() -> None:
    with pytest.raises(IdentifierError) as caught:
        parse_identifier(identifier(QueryRetrieveLevel="STUDY"), retrieve=True)
    assert caught.value.status == STATUS_IDENTIFIER_MISMATCH
    keys = parse_identifier(identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=["1.2.3", "1.2.4"]), retrieve=True)
    assert keys.study_uids == ("1.2.3", "1.2.4")


def test_the_answer_holds_the_requested_keys_in_the_stored_character_set() -> None:
    request = identifier(SpecificCharacterSet="ISO_IR 192", QueryRetrieveLevel="STUDY", PatientName="王*",
                         StudyInstanceUID="", PatientBirthDate="", NumberOfStudyRelatedInstances="")
    keys = parse_identifier(request, retrieve=False)
    match = Match(study_uid="1.2.3", patient_name="Wang^XiaoDong=王^小东", study_instances=7,
                  character_set=("GB18030",))
    response = answer(match, keys, request, "GASTROLENS")
    assert response.SpecificCharacterSet == "GB18030"
    assert str(response.PatientName) == "Wang^XiaoDong=王^小东"
    assert response.NumberOfStudyRelatedInstances == 7
    assert response["PatientBirthDate"].is_empty, "a key GastroLens does not keep comes back empty"
    assert "AccessionNumber" not in response, "only what was asked"
    assert (response.QueryRetrieveLevel, response.RetrieveAETitle) == ("STUDY", "GASTROLENS")


@pytest.mark.parametrize(("stored", "text", "expected"), [
    ((), ["Smith^John"], ()),
    (("GB18030",), ["王^小东"], ("GB18030",)),
    (("ISO_IR 100",), ["王^小东"], ("ISO_IR 192",)),  # Latin-1 cannot hold it: UTF-8
    ((), ["王^小东"], ("ISO_IR 192",)),
    (("ISO_IR 100",), ["Müller^Jörg"], ("ISO_IR 100",)),
])
def test_response_character_set(stored: tuple[str, ...], text: list[str], expected: tuple[str, ...]) -> None:
    assert response_character_set(stored, text) == expected


def test_stored_character_set_is_read_from_the_file(tmp_path: Path) -> None:
    ds = identifier(SpecificCharacterSet="GB18030", PatientName="王^小东")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    assert stored_character_set(tmp_path / "a.dcm") == ("GB18030",)
    assert stored_character_set(tmp_path / "missing.dcm") == ()


@pytest.mark.parametrize(("level", "keys", "expected"), [
    ("STUDY", {"StudyInstanceUID": "", "PatientName": "Wang*", "StudyDate": "20250101-", "StudyDescription": "",
               "NumberOfStudyRelatedInstances": ""}, []),
    ("STUDY", {"PatientName": "", "PatientBirthDate": "", "StudyTime": ""}, ["StudyTime", "PatientBirthDate"]),
    ("STUDY", {"StudyDescription": "colon*"}, ["StudyDescription"]),  # returned, but not matched on
    ("STUDY", {"StudyDescription": "*", "ReferringPhysicianName": "*"}, ["ReferringPhysicianName"]),
    ("STUDY", {"SeriesNumber": ""}, ["SeriesNumber"]),  # a series key is not returned at STUDY level
    ("SERIES", {"StudyInstanceUID": "1.2", "SeriesInstanceUID": "", "Modality": "SR", "SeriesNumber": ""}, []),
    ("IMAGE", {"StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.3", "SOPInstanceUID": "", "SOPClassUID": "",
               "InstanceNumber": ""}, ["InstanceNumber"]),
], ids=["all-kept", "not-kept", "not-matched", "universal", "lower-level", "series", "image"])
def test_unsupported_optional_keys_give_the_pending_warning(level: str, keys: dict[str, object],
                                                            expected: list[str]) -> None:
    request = identifier(SpecificCharacterSet="ISO_IR 192", QueryRetrieveLevel=level, **keys)
    assert unsupported_keys(request, Level(level)) == expected
