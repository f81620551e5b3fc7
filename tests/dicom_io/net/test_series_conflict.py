"""A Series Instance UID reused under a different Study Instance UID is refused, quarantined and audited.

Before, the second instance was attached to the first study's series row while the
instance itself pointed at the second study.
"""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import select

from gastrolens.db.states import AuditEventType
from gastrolens.db.tables import AuditEvent, Instance, Quarantined, Series, Study
from gastrolens.findings import LesionClass
from gastrolens.samples import SECONDARY_CAPTURE, as_dicom, endoscopy_frame

SC = "1.2.840.10008.5.1.4.1.1.7"


def c_store(port: int, path: Path) -> int:
    ae = AE(ae_title="ENDO_WS1")
    ae.add_requested_context(SC, [str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="GASTROLENS")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(dcmread(path)).Status)
    finally:
        assoc.release()


def instance(folder: Path, name: str, study_uid: str, series_uid: str, seed: int) -> Path:
    frame, _ = endoscopy_frame(32, 40, LesionClass.PU, seed=seed)
    path = folder / f"{name}.dcm"
    as_dicom(frame, sop_class=SECONDARY_CAPTURE, study_uid=study_uid, series_uid=series_uid).save_as(
        path, enforce_file_format=True
    )
    return path


def test_series_reused_under_another_study_is_refused(receiver, tmp_path):
    first_study, second_study, series = generate_uid(), generate_uid(), generate_uid()
    first = instance(tmp_path, "first", first_study, series, seed=1)
    second = instance(tmp_path, "second", second_study, series, seed=2)
    same_study = instance(tmp_path, "third", first_study, series, seed=3)

    assert c_store(receiver.port, first) == 0x0000
    assert c_store(receiver.port, second) == 0xA900
    assert c_store(receiver.port, same_study) == 0x0000, "the series still takes instances of its own study"

    with receiver.db.session() as s:
        rows = s.execute(
            select(Instance.sop_instance_uid, Study.study_instance_uid, Series.series_instance_uid)
            .join(Study, Instance.study_id == Study.id)
            .join(Series, Instance.series_id == Series.id)
        ).all()
        kept = s.scalars(select(Quarantined)).one()
        studies = s.scalars(select(Study.study_instance_uid)).all()
    assert {r.study_instance_uid for r in rows} == {first_study} and len(rows) == 2
    assert studies == [first_study], "no study row for the refused instance"
    assert kept.status == 0xA900 and kept.sop_instance_uid == str(dcmread(second).SOPInstanceUID)
    assert first_study in kept.reason and second_study in kept.reason and series in kept.reason
    with receiver.db.session() as s:
        audited = s.scalars(
            select(AuditEvent).where(AuditEvent.event_type == AuditEventType.INSTANCE_QUARANTINED)
        ).one()
    assert audited.study_uid == second_study and audited.series_uid == series
    assert "already belongs to study" in audited.detail
    assert not list((receiver.store.root / "instances" / second_study).rglob("*.dcm")), (
        "nothing stored under the second study"
    )
