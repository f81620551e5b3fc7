"""Helpers for the read-side tests: a database filled through the receiver's writer and the ORM tables,
overlay files on disk, tokens, and the app under test.

The filled database holds three studies that cover the states a reader meets:

* ``complete``: four images (normal, normal, peptic ulcer, EGC/HGIN), every output sent,
  reported as egc_hgin;
* ``dead``: three images, one advanced gastric cancer, one delivery dead and the overlay
  file of another image removed from disk, reported as agc;
* ``queued``: one image waiting, one failed, from untrained weights.

Plus ``EXTRA_STUDIES`` plain studies (one normal image each) for pagination.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageDraw
from pydicom.uid import generate_uid
from sqlalchemy import select

from gastrolens.api.auth import Role, hash_token
from gastrolens.api.context import HealthProbe
from gastrolens.api.server import ApiServer
from gastrolens.config import Settings
from gastrolens.db import Database
from gastrolens.db.instances import VersionPlan, record_instance
from gastrolens.db.states import AuditEventType, DeliveryState, InstanceState
from gastrolens.db.tables import AuditEvent, Delivery, Instance, Output, Result, Study
from gastrolens.dicom_io.net.inspect import InstanceHeader
from gastrolens.findings import CLASS_ORDER, LesionClass, OutputKind
from gastrolens.samples import SECONDARY_CAPTURE, as_dicom, endoscopy_frame

VIEWER_TOKEN = "viewer-token-for-tests-0123456789"
AUDITOR_TOKEN = "auditor-token-for-tests-9876543210"
EXTRA_STUDIES = 5
MODEL_SHA = hashlib.sha256(b"GastroLens-R34 trained weights").hexdigest()
UNTRAINED_SHA = hashlib.sha256(b"random init").hexdigest()
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


@dataclass
class Filled:
    """What :func:`fill` put in the database, to look up in assertions."""

    complete: str
    dead: str
    queued: str
    extra: list[str] = field(default_factory=list)
    images: dict[str, list[str]] = field(default_factory=dict)
    """Study UID -> its images' SOP Instance UIDs, in order."""
    overlays: dict[str, str] = field(default_factory=dict)
    """Source SOP Instance UID -> overlay SOP Instance UID."""
    missing_overlay: str = ""
    """An overlay SOP Instance UID whose file was removed from disk."""
    failed_image: str = ""

    @property
    def study_count(self) -> int:
        return 3 + len(self.extra)


def settings_for(db_url: str, storage: Path, *, open_health: bool = True, open_metrics: bool = False,
                 patient_details: bool = False) -> Settings:
    return Settings.model_validate({
        "logging": {"patient_details": patient_details},
        "database": {"url": db_url},
        "storage": {"root": str(storage), "min_free_mb": 1},
        "api": {"enabled": True, "port": 0, "open_health": open_health, "open_metrics": open_metrics, "tokens": [
            {"name": "it-desk", "role": Role.VIEWER.value, "sha256": hash_token(VIEWER_TOKEN)},
            {"name": "auditor-anna", "role": Role.AUDITOR.value, "sha256": hash_token(AUDITOR_TOKEN)},
        ]},
    })


def _probabilities(cls: LesionClass, confidence: float) -> dict[str, float]:
    rest = (1.0 - confidence) / (len(CLASS_ORDER) - 1)
    return {f"p_{c.value}": (confidence if c is cls else rest) for c in CLASS_ORDER}


def _overlay_frame(cls: LesionClass, seed: int, confidence: float) -> np.ndarray:
    """An overlay like the pipeline writes: the image, the lesion outlined in red, the finding written on it."""
    frame, mask = endoscopy_frame(360, 480, cls, seed=seed)
    picture = Image.fromarray(frame)
    draw = ImageDraw.Draw(picture)
    if mask.any():
        rows, cols = np.nonzero(mask)
        draw.ellipse((cols.min() - 4, rows.min() - 4, cols.max() + 4, rows.max() + 4), outline=(255, 40, 40), width=3)
    draw.rectangle((0, 326, 480, 360), fill=(0, 0, 0))
    draw.text((10, 336), f"GastroLens: {cls.display_name} {confidence:.0%}", fill=(255, 255, 255))
    return np.asarray(picture)


class _Writer:
    def __init__(self, db: Database, storage: Path) -> None:
        self.db = db
        self.storage = storage
        self.seed = 0

    def study(self, *, patient_id: str, patient_name: str, accession: str, study_date: str,
              classes: list[LesionClass | None], states: list[InstanceState] | None = None,
              conclusion: str | None = None, delivery_states: list[DeliveryState] | None = None,
              untrained: bool = False, received_at: datetime | None = None) -> tuple[str, list[str], dict[str, str]]:
        """One study through the receiver's writer, then results, outputs and deliveries as the pipeline writes them."""
        study_uid, series_uid = generate_uid(), generate_uid()
        states = states or [InstanceState.DONE] * len(classes)
        sops: list[str] = []
        overlays: dict[str, str] = {}
        with self.db.session() as session:
            for n, (cls, state) in enumerate(zip(classes, states, strict=True)):
                sop = generate_uid()
                header = InstanceHeader(
                    study_uid=study_uid, series_uid=series_uid, sop_uid=sop,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.1", transfer_syntax_uid="1.2.840.10008.1.2.4.50",
                    sha256=hashlib.sha256(sop.encode()).hexdigest(), size_bytes=123_456, patient_id=patient_id,
                    patient_name=patient_name, accession_number=accession, study_date=study_date,
                    study_description="Gastroscopy", modality="ES", series_number=1)
                record_instance(session, header, VersionPlan(version=1), f"instances/{study_uid}/{sop}.dcm",
                                calling_ae="ENDOSCOPE1", peer_address="10.0.0.7", actor="test:receiver")
                instance = session.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).one()
                instance.state = state
                instance.attempts = 1 if state != InstanceState.RECEIVED else 0
                if state == InstanceState.FAILED:
                    instance.error = "DecodeError: cannot decode pixel data (transfer syntax 1.2.840.10008.1.2.4.50)"
                sops.append(sop)
                if cls is None or state != InstanceState.DONE:
                    continue
                instance.finished_at = datetime.now(timezone.utc)
                confidence = 0.62 + 0.07 * (n % 4)
                lesion = cls.is_lesion
                session.add(Result(
                    instance_id=instance.id, frame_number=1, predicted_class=cls.value, lesion_present=lesion,
                    lesion_area_fraction=0.043 + 0.01 * n if lesion else 0.0,
                    bbox=[120, 160, 210, 290] if lesion else None, model_name="GastroLens-R34",
                    model_version="0.0.0-untrained" if untrained else "1.0.0",
                    model_sha256=UNTRAINED_SHA if untrained else MODEL_SHA, untrained=untrained,
                    timings={"infer_ms": 12.5}, **_probabilities(cls, confidence)))
                overlays[sop] = self._outputs(session, instance, study_uid, cls, confidence, delivery_states, n)
            if conclusion is not None:
                self._study_report(session, study_uid, conclusion)
            if received_at is not None:
                study = session.query(Study).filter_by(study_instance_uid=study_uid).one()
                study.first_received_at = study.last_received_at = received_at
        return study_uid, sops, overlays

    def _outputs(self, session, instance: Instance, study_uid: str, cls: LesionClass, confidence: float,  # type: ignore[no-untyped-def]
                 delivery_states: list[DeliveryState] | None, n: int) -> str:
        overlay_uid = ""
        kinds = ((OutputKind.SEG, SEG), (OutputKind.SR, COMPREHENSIVE_SR), (OutputKind.OVERLAY, SECONDARY_CAPTURE))
        for kind, sop_class in kinds:
            sop = generate_uid()
            path = f"outputs/{study_uid}/{kind.value}-{sop}.dcm"
            if kind is OutputKind.OVERLAY:
                overlay_uid = sop
                self.seed += 1
                ds = as_dicom(
                    _overlay_frame(cls, self.seed, confidence),
                    sop_class=SECONDARY_CAPTURE,
                    study_uid=study_uid,
                    sop_uid=sop,
                    instance_number=n + 1,
                )
                (self.storage / path).parent.mkdir(parents=True, exist_ok=True)
                ds.save_as(self.storage / path, enforce_file_format=True)
            output = Output(
                kind=kind,
                study_id=instance.study_id,
                instance_id=instance.id,
                sop_instance_uid=sop,
                series_instance_uid=generate_uid(),
                sop_class_uid=sop_class,
                file_path=path,
                model_sha256=MODEL_SHA,
            )
            session.add(output)
            session.flush()
            state = (delivery_states or [DeliveryState.SENT])[n % len(delivery_states or [DeliveryState.SENT])]
            if kind is not OutputKind.OVERLAY:
                state = DeliveryState.SENT
            session.add(
                Delivery(
                    output_id=output.id,
                    destination="pacs",
                    state=state,
                    attempts=8 if state == DeliveryState.DEAD else 1,
                    last_status=0xA700 if state == DeliveryState.DEAD else 0,
                    last_error="C-STORE refused: 0xA700 out of resources" if state == DeliveryState.DEAD else None,
                    sent_at=datetime.now(timezone.utc) if state == DeliveryState.SENT else None,
                )
            )
        return overlay_uid

    def _study_report(self, session, study_uid: str, conclusion: str) -> None:  # type: ignore[no-untyped-def]
        study = session.query(Study).filter_by(study_instance_uid=study_uid).one()
        study.conclusion = conclusion
        study.report_revision = 1
        study.reported_at = datetime.now(timezone.utc)
        output = Output(
            kind=OutputKind.STUDY_SR,
            study_id=study.id,
            instance_id=None,
            sop_instance_uid=generate_uid(),
            series_instance_uid=generate_uid(),
            sop_class_uid=COMPREHENSIVE_SR,
            file_path=f"outputs/{study_uid}/study-sr.dcm",
            model_sha256=MODEL_SHA,
        )
        session.add(output)
        session.flush()
        session.add(
            Delivery(
                output_id=output.id,
                destination="pacs",
                state=DeliveryState.SENT,
                attempts=1,
                last_status=0,
                sent_at=datetime.now(timezone.utc),
            )
        )


def fill(db: Database, storage: Path) -> Filled:
    """Fill a migrated database (and overlay files under ``storage``) with the studies described above."""
    writer = _Writer(db, storage)
    base = datetime.now(timezone.utc) - timedelta(hours=2)
    extra = []
    for k in range(EXTRA_STUDIES):
        uid, _, _ = writer.study(
            patient_id=f"PID-1{k:03d}",
            patient_name=f"Extra^Patient{k}",
            accession=f"ACC20{k:02d}",
            study_date="20250228",
            classes=[LesionClass.NORMAL],
            conclusion="normal",
            received_at=base - timedelta(minutes=10 * (k + 1)),
        )
        extra.append(uid)
    complete, complete_imgs, complete_ov = writer.study(
        patient_id="PID-0001",
        patient_name="Zhang^Liming",
        accession="ACC1001",
        study_date="20250301",
        classes=[LesionClass.NORMAL, LesionClass.NORMAL, LesionClass.PU, LesionClass.EGC_HGIN],
        conclusion=LesionClass.EGC_HGIN.value,
        received_at=base,
    )
    dead, dead_imgs, dead_ov = writer.study(
        patient_id="PID-0002",
        patient_name="Müller^Anna",
        accession="ACC1002",
        study_date="20250302",
        classes=[LesionClass.AGC, LesionClass.NORMAL, LesionClass.SMT],
        conclusion=LesionClass.AGC.value,
        delivery_states=[DeliveryState.DEAD, DeliveryState.SENT, DeliveryState.SENT],
        received_at=base + timedelta(minutes=20),
    )
    missing = dead_ov[dead_imgs[1]]
    with db.session() as session:
        path = session.query(Output.file_path).filter_by(sop_instance_uid=missing).scalar()
    (storage / path).unlink()
    queued, queued_imgs, _ = writer.study(
        patient_id="PID-0003",
        patient_name="O'Brien^Sean",
        accession="ACC1003",
        study_date="",
        classes=[None, None],
        states=[InstanceState.RECEIVED, InstanceState.FAILED],
        untrained=True,
        # today in UTC even just after midnight: the API matches a study without a date by its arrival day
        received_at=max(base + timedelta(minutes=40),
                        datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)),
    )
    with db.session() as session:  # the untrained flag lives on results; give the queued study one
        failed = session.query(Instance).filter_by(sop_instance_uid=queued_imgs[1]).one()
        session.add(
            Result(
                instance_id=failed.id,
                frame_number=1,
                predicted_class="normal",
                lesion_present=False,
                lesion_area_fraction=0.0,
                bbox=None,
                model_name="GastroLens-R34",
                model_version="0.0.0-untrained",
                model_sha256=UNTRAINED_SHA,
                untrained=True,
                timings={},
                **_probabilities(LesionClass.NORMAL, 0.4),
            )
        )
    return Filled(
        complete=complete,
        dead=dead,
        queued=queued,
        extra=extra,
        images={complete: complete_imgs, dead: dead_imgs, queued: queued_imgs},
        overlays={**complete_ov, **dead_ov},
        missing_overlay=missing,
        failed_image=queued_imgs[1],
    )


@dataclass
class Node:
    """A filled database with its storage and settings."""

    db: Database
    storage: Path
    settings: Settings
    filled: Filled
    url: str


def make_node(url: str, storage: Path) -> Node:
    db = Database(url)
    db.upgrade()
    storage.mkdir(parents=True, exist_ok=True)
    return Node(db, storage, settings_for(url, storage), fill(db, storage), url)


@contextmanager
def serving(
    node: Node, *, health_probe: HealthProbe | None = None, **settings_overrides: bool
) -> Iterator[httpx.Client]:
    """The node's API on a real uvicorn socket (an ephemeral port); yields a client for it."""
    settings = settings_for(node.url, node.storage, **settings_overrides) if settings_overrides else node.settings
    server = ApiServer(settings, node.db, store_root=node.storage, health_probe=health_probe)
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            yield client
    finally:
        server.stop()


def query_events(node: Node, actor: str | None = None) -> list[AuditEvent]:
    """The QUERY audit events so far, oldest first."""
    with node.db.session() as session:
        stmt = select(AuditEvent).where(AuditEvent.event_type == AuditEventType.QUERY).order_by(AuditEvent.id)
        if actor is not None:
            stmt = stmt.where(AuditEvent.actor == actor)
        return list(session.scalars(stmt))


VIEWER = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
AUDITOR = {"Authorization": f"Bearer {AUDITOR_TOKEN}"}
