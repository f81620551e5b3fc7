"""Query/Retrieve read side over SQLite and PostgreSQL: what is held, and DICOM matching."""

from __future__ import annotations

from dataclasses import fields
from datetime import date, datetime, timezone

import pytest

from gastrolens.db import Database
from gastrolens.db.queries_qr import ObjectQuery, dicom_match, find_objects, find_series, find_studies
from gastrolens.db.tables import Instance, Output, Series, Study
from gastrolens.dicom_io.net.qr_identifier import QueryKeys
from gastrolens.findings import OutputKind

SC = "1.2.840.10008.5.1.4.1.1.7"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR = "1.2.840.10008.5.1.4.1.1.88.33"


@pytest.mark.parametrize(("value", "pattern", "person", "expected"), [
    ("GL-1", "GL-1", False, True),
    ("GL-1", "gl-1", False, False),  # IDs are case-sensitive
    ("GL-1", "GL-?", False, True),
    ("GL-12", "GL-?", False, False),
    ("a%b_c", "a%b_c", False, True),  # SQL wildcards are plain characters in DICOM
    ("axb_c", "a%b_c", False, False),
    ("Wang^XiaoDong=王^小东", "王^小东", True, True),  # one component group
    ("Wang^XiaoDong=王^小东", "wang*", True, True),  # names case-insensitively
    ("Wang^XiaoDong=王^小东", "王", True, False),
    (None, "*x", False, False),
    (None, None, False, True),
])
def test_dicom_match(value: str | None, pattern: str | None, person: bool, expected: bool) -> None:
    assert dicom_match(value, pattern, person_name=person) is expected


@pytest.fixture
def db(db_url: str) -> Database:
    database = Database(db_url)
    database.upgrade()
    now = datetime.now(timezone.utc)
    with database.session() as session:
        for n, (name, study_date) in enumerate([("Wang^XiaoDong=王^小东", "20250110"), ("Smith^Anna", "20250301")]):
            study = Study(study_instance_uid=f"1.2.{n}", patient_id=f"P{n}", patient_name=name,
                          accession_number=f"A{n}", study_date=study_date, first_received_at=now,
                          last_received_at=now)
            session.add(study)
            session.flush()
            series = Series(series_instance_uid=f"1.2.{n}.1", study_id=study.id, modality="ES", series_number=1)
            session.add(series)
            session.flush()
            for i in range(2):
                instance = Instance(sop_instance_uid=f"1.2.{n}.1.{i}", series_id=series.id, study_id=study.id,
                                    sop_class_uid=SC, transfer_syntax_uid="1.2.840.10008.1.2.1",
                                    file_path=f"instances/{n}/{i}.dcm", sha256="0" * 64, size_bytes=1)
                session.add(instance)
                session.flush()
                for kind, cls in ((OutputKind.SEG, SEG), (OutputKind.OVERLAY, SC)):
                    session.add(Output(kind=kind, study_id=study.id, instance_id=instance.id,
                                       sop_instance_uid=f"1.2.{n}.{kind.value}.{i}".replace("seg", "8").replace(
                                           "overlay", "9"),
                                       series_instance_uid=f"1.2.{n}.{2 if kind is OutputKind.SEG else 3}",
                                       sop_class_uid=cls, file_path=f"outputs/{n}/{kind.value}{i}.dcm",
                                       model_sha256="0" * 64))
            session.add(Output(kind=OutputKind.STUDY_SR, study_id=study.id, instance_id=None,
                               sop_instance_uid=f"1.2.{n}.4.1", series_instance_uid=f"1.2.{n}.4",
                               sop_class_uid=SR, file_path=f"outputs/{n}/study.dcm", model_sha256="0" * 64))
        gone = Instance(sop_instance_uid="1.2.0.1.9", series_id=1, study_id=1, sop_class_uid=SC,
                        transfer_syntax_uid="1.2.840.10008.1.2.1", file_path="instances/0/9.dcm", sha256="0" * 64,
                        size_bytes=1, removed_at=now)
        session.add(gone)
    yield database
    database.dispose()


def test_studies_by_name_group_with_counts_and_modalities(db: Database) -> None:
    with db.read_session() as session:
        studies = find_studies(session, ObjectQuery(level="STUDY", patient_name="王^小东"))
    assert [s.study_uid for s in studies] == ["1.2.0"]
    study = studies[0]
    assert (study.series, study.objects) == (4, 7), "2 sources, 2 SEG, 2 overlays, 1 study SR; not the removed file"
    assert study.modalities == ("ES", "SEG", "SR"), "an overlay keeps its source's modality"
    assert study.sample_file == "instances/0/0.dcm"


def test_studies_by_date_range_accession_and_sop_class(db: Database) -> None:
    with db.read_session() as session:
        in_march = find_studies(session, ObjectQuery(level="STUDY", date_from=date(2025, 3, 1)))
        by_accession = find_studies(session, ObjectQuery(level="STUDY", accession_number="A?"))
        with_seg = find_studies(session, ObjectQuery(level="STUDY", sop_class_uid=SEG, patient_id="P1"))
        none = find_studies(session, ObjectQuery(level="STUDY", sop_class_uid="1.2.9", patient_id="P1"))
    assert [s.study_uid for s in in_march] == ["1.2.1"]
    assert [s.study_uid for s in by_accession] == ["1.2.0", "1.2.1"]
    assert [s.study_uid for s in with_seg] == ["1.2.1"]
    assert none == []


def test_series_and_objects(db: Database) -> None:
    with db.read_session() as session:
        series = find_series(session, ObjectQuery(level="SERIES", study_uids=("1.2.1",)))
        segs = find_objects(session, ObjectQuery(level="IMAGE", study_uids=("1.2.1",), series_uids=("1.2.1.2",)))
        everything = find_objects(session, ObjectQuery(level="STUDY", study_uids=("1.2.0", "1.2.1")))
    assert [(s.series_uid, s.modality, s.objects) for s in series] == [
        ("1.2.1.1", "ES", 2), ("1.2.1.2", "SEG", 2), ("1.2.1.3", "ES", 2), ("1.2.1.4", "SR", 1)]
    assert [(o.sop_class_uid, o.file_path) for o in segs] == [(SEG, "outputs/1/seg0.dcm"), (SEG, "outputs/1/seg1.dcm")]
    assert len(everything) == 14
    assert "instances/0/9.dcm" not in {o.file_path for o in everything}, "a removed file is not held"


def test_the_read_side_takes_every_key_the_scp_parses() -> None:
    """``daemon.query_retrieve`` copies QueryKeys into ObjectQuery field by name: a key added on one side only
    would be dropped without a word."""
    assert [f.name for f in fields(QueryKeys)] == [f.name for f in fields(ObjectQuery)]
