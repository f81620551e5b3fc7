"""Read-side queries for DICOM Query/Retrieve: the studies, series and objects GastroLens holds.

What is held: the current version of every received instance whose file is still
stored, and every output (SEG, SR, overlay, study SR) whose file is still stored. A
study matches on its own attributes (the study date range through
:class:`~gastrolens.db.filters.StudyFilter`, so the CLI, the API and C-FIND agree on it);
series and objects match on theirs. Patterns use the DICOM wildcards ``*`` and ``?``:
SQL narrows with LIKE, then :func:`dicom_match` decides, so SQLite and PostgreSQL give
the same answer (Patient ID and Accession Number case-sensitive; Patient's Name
case-insensitive and on the whole name or any one component group).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from functools import lru_cache
from typing import Any

from sqlalchemy import ColumnElement, Integer, Subquery, case, cast, func, literal, null, select, union_all
from sqlalchemy.orm import Session, aliased

from gastrolens.db.filters import StudyFilter
from gastrolens.db.queries_studies import study_match
from gastrolens.db.tables import Instance, Output, Series, Study
from gastrolens.findings import OutputKind

OUTPUT_MODALITY = {OutputKind.SEG: "SEG", OutputKind.SR: "SR", OutputKind.STUDY_SR: "SR"}
"""Modality of each output kind; an overlay keeps its source's (as the overlay writer does)."""


@dataclass(frozen=True, kw_only=True)
class ObjectQuery:
    """A Study Root query: None or empty fields match everything."""

    level: str
    """STUDY, SERIES or IMAGE."""
    study_uids: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()
    sop_uids: tuple[str, ...] = ()
    patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    date_from: date | None = None
    date_to: date | None = None
    modalities: tuple[str, ...] = ()
    sop_class_uid: str | None = None


@dataclass(frozen=True, kw_only=True)
class HeldStudy:
    study_uid: str
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    modalities: tuple[str, ...]
    series: int
    objects: int
    sample_file: str | None
    """A stored source file of the study (relative to the storage root): its header names the character set."""


@dataclass(frozen=True, kw_only=True)
class HeldSeries:
    study: HeldStudy
    series_uid: str
    modality: str | None
    series_number: int | None
    objects: int


@dataclass(frozen=True, kw_only=True)
class HeldObject:
    study: HeldStudy
    series_uid: str
    modality: str | None
    sop_uid: str
    sop_class_uid: str
    file_path: str
    """Relative to the storage root."""


def find_studies(session: Session, query: ObjectQuery) -> list[HeldStudy]:
    held = _held()
    studies = _studies(session, query, held)
    if query.modalities or query.sop_class_uid:
        having = {sid for (sid,) in session.execute(
            select(held.c.study_id)
            .where(held.c.study_id.in_(list(studies)), *_object_conditions(query, held)).distinct()
        )}
        return [s for sid, s in studies.items() if sid in having]
    return list(studies.values())


def find_series(session: Session, query: ObjectQuery) -> list[HeldSeries]:
    held = _held()
    studies = _studies(session, query, held)
    rows = session.execute(
        select(held.c.study_id, held.c.series_uid, func.max(held.c.modality), func.max(held.c.series_number),
               func.count())
        .where(held.c.study_id.in_(list(studies)), *_object_conditions(query, held))
        .group_by(held.c.study_id, held.c.series_uid)
        .order_by(held.c.study_id, held.c.series_uid)
    ).all()
    return [HeldSeries(study=studies[sid], series_uid=uid, modality=modality, series_number=number, objects=count)
            for sid, uid, modality, number, count in rows]


def find_objects(session: Session, query: ObjectQuery) -> list[HeldObject]:
    """Every held object at or below what ``query`` names (C-FIND at IMAGE level, and retrieves)."""
    held = _held()
    studies = _studies(session, query, held)
    rows = session.execute(
        select(held.c.study_id, held.c.series_uid, held.c.modality, held.c.sop_uid, held.c.sop_class_uid,
               held.c.file_path)
        .where(held.c.study_id.in_(list(studies)), *_object_conditions(query, held))
        .order_by(held.c.study_id, held.c.series_uid, held.c.is_output, held.c.sop_uid)
    ).all()
    return [HeldObject(study=studies[sid], series_uid=series, modality=modality, sop_uid=sop, sop_class_uid=cls,
                       file_path=path) for sid, series, modality, sop, cls, path in rows]


# -- matching ----------------------------------------------------------------------------------


def dicom_match(value: str | None, pattern: str | None, *, person_name: bool = False) -> bool:
    """DICOM single value or wildcard matching (``*`` any run, ``?`` one character).

    A person name matches case-insensitively, as a whole or on any one component group
    (alphabetic, ideographic, phonetic).
    """
    if pattern is None:
        return True
    if value is None:
        return False
    regex = _regex(pattern.strip(), person_name)
    value = value.strip()
    candidates = [value, *value.split("=")] if person_name else [value]
    return any(regex.fullmatch(c.strip()) for c in candidates)


@lru_cache(maxsize=256)
def _regex(pattern: str, insensitive: bool) -> re.Pattern[str]:
    body = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.compile(body, re.IGNORECASE | re.DOTALL if insensitive else re.DOTALL)


def _like(column: Any, pattern: str) -> ColumnElement[bool]:
    """A LIKE that never misses what :func:`dicom_match` accepts (case-insensitive, any group)."""
    escaped = pattern.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    escaped = escaped.replace("*", "%").replace("?", "_")
    return column.ilike(f"%{escaped}%", escape="\\")  # type: ignore[no-any-return]


def _studies(session: Session, query: ObjectQuery, held: Subquery) -> dict[int, HeldStudy]:
    """The matching studies by id, in id order, with their counts."""
    conditions: list[ColumnElement[bool]] = []
    if query.study_uids:
        conditions.append(Study.study_instance_uid.in_(query.study_uids))
    for column, pattern in ((Study.patient_id, query.patient_id), (Study.patient_name, query.patient_name),
                            (Study.accession_number, query.accession_number)):
        if pattern is not None:
            conditions.append(_like(column, pattern))
    if query.date_from or query.date_to:
        conditions.append(study_match(StudyFilter(date_from=query.date_from, date_to=query.date_to)))
    found = [
        s for s in session.scalars(select(Study).where(*conditions).order_by(Study.id))
        if dicom_match(s.patient_id, query.patient_id)
        and dicom_match(s.patient_name, query.patient_name, person_name=True)
        and dicom_match(s.accession_number, query.accession_number)
    ]
    ids = [s.id for s in found]
    if not ids:
        return {}
    counts = {sid: (series, objects) for sid, series, objects in session.execute(
        select(held.c.study_id, func.count(func.distinct(held.c.series_uid)), func.count())
        .where(held.c.study_id.in_(ids)).group_by(held.c.study_id)
    )}
    modalities: dict[int, list[str]] = {}
    for sid, modality in session.execute(
        select(held.c.study_id, held.c.modality).where(held.c.study_id.in_(ids), held.c.modality.is_not(None))
        .distinct().order_by(held.c.study_id, held.c.modality)
    ):
        modalities.setdefault(sid, []).append(modality)
    samples: dict[int, str] = dict(session.execute(
        select(held.c.study_id, func.min(held.c.file_path))
        .where(held.c.study_id.in_(ids), held.c.is_output == 0).group_by(held.c.study_id)
    ).all())
    return {
        s.id: HeldStudy(
            study_uid=s.study_instance_uid, patient_id=s.patient_id, patient_name=s.patient_name,
            accession_number=s.accession_number, study_date=s.study_date, study_description=s.study_description,
            modalities=tuple(modalities.get(s.id, ())), series=counts.get(s.id, (0, 0))[0],
            objects=counts.get(s.id, (0, 0))[1], sample_file=samples.get(s.id),
        )
        for s in found
        if s.id in counts  # a study whose every file retention removed is no longer held
    }


def _object_conditions(query: ObjectQuery, held: Subquery) -> Sequence[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if query.series_uids:
        conditions.append(held.c.series_uid.in_(query.series_uids))
    if query.sop_uids:
        conditions.append(held.c.sop_uid.in_(query.sop_uids))
    if query.modalities:
        conditions.append(held.c.modality.in_(query.modalities))
    if query.sop_class_uid:
        conditions.append(held.c.sop_class_uid == query.sop_class_uid)
    return conditions


def _held() -> Subquery:
    """Every held object: study_id, series_uid, modality, series_number, sop_uid, sop_class_uid,
    file_path, is_output."""
    sources = (
        select(
            Instance.study_id.label("study_id"),
            Series.series_instance_uid.label("series_uid"),
            Series.modality.label("modality"),
            Series.series_number.label("series_number"),
            Instance.sop_instance_uid.label("sop_uid"),
            Instance.sop_class_uid.label("sop_class_uid"),
            Instance.file_path.label("file_path"),
            literal(0).label("is_output"),
        )
        .join(Series, Instance.series_id == Series.id)
        .where(Instance.superseded.is_(False), Instance.removed_at.is_(None))
    )
    source, source_series = aliased(Instance), aliased(Series)
    modality = case(*((Output.kind == kind, value) for kind, value in OUTPUT_MODALITY.items()),
                     else_=func.coalesce(source_series.modality, "OT"))
    outputs = (
        select(
            Output.study_id,
            Output.series_instance_uid,
            modality,
            cast(null(), Integer),
            Output.sop_instance_uid,
            Output.sop_class_uid,
            Output.file_path,
            literal(1),
        )
        .outerjoin(source, Output.instance_id == source.id)
        .outerjoin(source_series, source.series_id == source_series.id)
        .where(Output.removed_at.is_(None))
    )
    return union_all(sources, outputs).subquery("held")
