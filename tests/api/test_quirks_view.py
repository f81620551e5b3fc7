"""A study's detail shows the quirks its images were read with (``instances.quirks``), none as []."""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import generate_uid

from gastrolens.db import Database
from gastrolens.db.queries_studies import get_study
from gastrolens.db.states import InstanceState
from gastrolens.db.tables import Instance, Series, Study


def test_study_detail_names_each_images_quirks(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'gastrolens.db'}")
    db.upgrade()
    study_uid = generate_uid()
    quirks = ["Modality missing: read as OT", "Specific Character Set 'ISO_fR 100' read as the default repertoire"]
    try:
        with db.session() as s:
            study = Study(study_instance_uid=study_uid)
            s.add(study)
            s.flush()
            series = Series(series_instance_uid=generate_uid(), study_id=study.id)
            s.add(series)
            s.flush()
            for number, kept in enumerate((quirks, None)):
                s.add(Instance(sop_instance_uid=generate_uid(), series_id=series.id, study_id=study.id,
                               sop_class_uid="1.2.840.10008.5.1.4.1.1.7", transfer_syntax_uid="1.2.840.10008.1.2.1",
                               state=InstanceState.DONE, file_path=f"instances/{number}.dcm", sha256="0" * 64,
                               size_bytes=1, quirks=kept))
        with db.read_session() as s:
            detail = get_study(s, study_uid)
        assert detail is not None
        assert [i.quirks for i in detail.instances] == [quirks, []]
    finally:
        db.dispose()
