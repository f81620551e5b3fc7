"""The Query/Retrieve SCP's :class:`~gastrolens.dicom_io.net.query_retrieve.Catalog`, wired to store and database.

Queries run in read-only sessions (``Database.read_session``), so a long C-FIND never
blocks a C-STORE; each request is then audited as a ``query`` event, as the CLI and the
HTTP API audit theirs: who asked (``dicom:<calling AE>@<address>``), which service,
level and keys, how many rows (C-FIND answers, or objects a C-MOVE / C-GET sends), the
status and, for a C-MOVE, the destination.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from gastrolens.db import Database, audit
from gastrolens.db.queries_qr import HeldStudy, ObjectQuery, find_objects, find_series, find_studies
from gastrolens.db.states import AuditEventType, Outcome
from gastrolens.dicom_io.net.qr_identifier import Level, Match, QueryKeys, stored_character_set
from gastrolens.dicom_io.net.query_retrieve import STATUS_CANCEL, STATUS_PENDING, QueryRecord, StoredObject
from gastrolens.errors import GastroLensError
from gastrolens.storage.store import Store

log = logging.getLogger(__name__)


class DatabaseCatalog:
    """What GastroLens holds, for C-FIND, C-MOVE and C-GET; one per receiver process."""

    def __init__(self, db: Database, store: Store, *, write_lock: AbstractContextManager[Any] | None = None) -> None:
        self.db = db
        self.store = store
        self._write_lock: AbstractContextManager[Any] = write_lock if write_lock is not None else nullcontext()

    def find(self, keys: QueryKeys, *, limit: int | None = None) -> Sequence[Match]:
        """The matches, cut to ``limit`` before the answers are built (each reads its study's character set)."""
        query = _object_query(keys)
        with self.db.read_session() as session:
            if keys.level is Level.STUDY:
                return [self._match(s) for s in find_studies(session, query)[:limit]]
            if keys.level is Level.SERIES:
                return [
                    self._match(s.study, series_uid=s.series_uid, modality=s.modality,
                                series_number=s.series_number, series_instances=s.objects)
                    for s in find_series(session, query)[:limit]
                ]
            return [
                self._match(o.study, series_uid=o.series_uid, modality=o.modality, sop_uid=o.sop_uid,
                            sop_class_uid=o.sop_class_uid)
                for o in find_objects(session, query)[:limit]
            ]

    def locate(self, keys: QueryKeys) -> Sequence[StoredObject]:
        with self.db.read_session() as session:
            held = find_objects(session, _object_query(keys))
        return [StoredObject(path=self.store.absolute(o.file_path), sop_class_uid=o.sop_class_uid, sop_uid=o.sop_uid)
                for o in held]

    def record(self, record: QueryRecord) -> None:
        keys = record.keys
        detail: dict[str, Any] = {
            "service": record.service,
            "filter": keys.described() if keys is not None else {},
            "rows": record.rows,
            "status": f"0x{record.status:04X}" if record.status is not None else None,
        }
        if record.reason:
            detail["reason"] = record.reason
        if record.destination is not None:
            detail["destination"] = record.destination
        if record.suboperations is not None:
            completed, warning, failed = record.suboperations
            detail |= {"completed": completed, "warning": warning, "failed": failed}
        status = record.status
        outcome = (Outcome.SUCCESS if status in (0x0000, STATUS_PENDING, STATUS_CANCEL)
                   else Outcome.WARNING if status is not None and status & 0xF000 == 0xB000 else Outcome.FAILURE)
        study_uid = keys.study_uids[0] if keys is not None and len(keys.study_uids) == 1 else None
        try:
            with self._write_lock, self.db.session() as session:
                audit.record(session, audit.Event(
                    type=AuditEventType.QUERY,
                    actor=record.actor,
                    outcome=outcome,
                    study_uid=study_uid,
                    detail=detail,
                ))
        except GastroLensError as exc:
            log.error("could not audit a %s from %s: %s", record.service, record.actor, exc)

    def _match(self, study: HeldStudy, **fields: Any) -> Match:
        return Match(
            study_uid=study.study_uid,
            patient_id=study.patient_id,
            patient_name=study.patient_name,
            accession_number=study.accession_number,
            study_date=study.study_date,
            study_description=study.study_description,
            modalities_in_study=study.modalities,
            study_series=study.series,
            study_instances=study.objects,
            character_set=self._character_set(study.sample_file),
            **fields,
        )

    def _character_set(self, sample: str | None) -> tuple[str, ...]:
        if sample is None:
            return ()
        try:
            return _stored_character_set(str(self.store.absolute(sample)))
        except GastroLensError:
            return ()


@lru_cache(maxsize=4096)
def _stored_character_set(path: str) -> tuple[str, ...]:
    """Received files never change under their name (a new version gets a new one): read each header once."""
    return stored_character_set(Path(path))


def _object_query(keys: QueryKeys) -> ObjectQuery:
    """The same keys for the read side (``tests/db/test_queries_qr.py`` holds the two field lists equal)."""
    values = {f.name: getattr(keys, f.name) for f in fields(ObjectQuery)}
    return ObjectQuery(**(values | {"level": keys.level.value}))
