"""A node that receives STOW-RS: the API under uvicorn on a real socket with the C-STORE ingest, and request helpers."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from pydicom.dataset import Dataset
from sqlalchemy import func, select

from gastrolens.api.auth import Role, hash_token
from gastrolens.api.server import ApiServer
from gastrolens.config import Settings
from gastrolens.daemon.ingest import DatabaseIngest
from gastrolens.db import Database
from gastrolens.db.tables import AuditEvent, Instance, Quarantined
from gastrolens.samples import as_dicom, endoscopy_frame
from gastrolens.storage.store import Store

SENDER_TOKEN = "sender-token-for-tests-5555555555"
VIEWER_TOKEN = "viewer-token-for-tests-0123456789"
AUDITOR_TOKEN = "auditor-token-for-tests-9876543210"
SENDER = {"Authorization": f"Bearer {SENDER_TOKEN}"}
VIEWER = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
AUDITOR = {"Authorization": f"Bearer {AUDITOR_TOKEN}"}
SENDER_ACTOR = "dicomweb:endo-gateway@127.0.0.1"
MAX_BODY = 2 * 2**20
MAX_PARTS = 12
DICOM = 'multipart/related; type="application/dicom"'

# PS3.18 Store Instances Response Module tags, as DICOM JSON keys.
FAILED_SOP_SEQUENCE, REFERENCED_SOP_SEQUENCE = "00081198", "00081199"
SOP_CLASS, SOP_INSTANCE, FAILURE_REASON = "00081150", "00081155", "00081197"


def stow_settings(url: str, storage: Path, **api: object) -> Settings:
    return Settings.model_validate({
        "database": {"url": url},
        "storage": {"root": str(storage), "min_free_mb": 1},
        "api": {"enabled": True, "port": 0, "stow_max_body_bytes": MAX_BODY, "stow_max_parts": MAX_PARTS, **api,
                "tokens": [
                    {"name": "endo-gateway", "role": Role.SENDER.value, "sha256": hash_token(SENDER_TOKEN)},
                    {"name": "it-desk", "role": Role.VIEWER.value, "sha256": hash_token(VIEWER_TOKEN)},
                    {"name": "auditor-anna", "role": Role.AUDITOR.value, "sha256": hash_token(AUDITOR_TOKEN)},
                ]},
    })


@dataclass
class StowNode:
    settings: Settings
    db: Database
    store: Store
    server: ApiServer

    @property
    def url(self) -> str:
        return self.server.url

    def post(self, parts: Sequence[bytes], *, study: str | None = None, headers: dict[str, str] | None = None,
             content_type: str | None = None, **kwargs: object) -> httpx.Response:
        body, boundary = multipart(parts)
        target = f"{self.url}/dicomweb/studies" + (f"/{study}" if study else "")
        sent = {"Content-Type": content_type or f"{DICOM}; boundary={boundary}", **(SENDER if headers is None
                                                                                      else headers)}
        return httpx.post(target, content=body, headers=sent, timeout=60, **kwargs)  # type: ignore[arg-type]

    def instances(self) -> list[Instance]:
        with self.db.read_session() as session:
            return list(session.scalars(select(Instance).order_by(Instance.id)))

    def quarantined(self) -> list[Quarantined]:
        with self.db.read_session() as session:
            return list(session.scalars(select(Quarantined).order_by(Quarantined.id)))

    def events(self, event_type: str | None = None) -> list[AuditEvent]:
        with self.db.read_session() as session:
            query = select(AuditEvent).order_by(AuditEvent.id)
            if event_type:
                query = query.where(AuditEvent.event_type == event_type)
            return list(session.scalars(query))

    def count(self) -> tuple[int, int]:
        """(instance rows, quarantine rows)."""
        with self.db.read_session() as session:
            return (session.scalar(select(func.count()).select_from(Instance)) or 0,
                    session.scalar(select(func.count()).select_from(Quarantined)) or 0)


@contextmanager
def stow_node(url: str, storage: Path, *, min_free_mb: int = 1, **api: object) -> Iterator[StowNode]:
    settings = stow_settings(url, storage, **api)
    db = Database(url)
    db.upgrade()
    store = Store(storage, fsync=True, min_free_mb=min_free_mb)
    ingest = DatabaseIngest(store, db, write_lock=threading.Lock() if url.startswith("sqlite") else None)
    server = ApiServer(settings, db, store_root=storage, ingest=ingest)
    server.start()
    try:
        yield StowNode(settings, db, store, server)
    finally:
        server.stop()
        ingest.close()
        db.dispose()


def instance(study_uid: str, *, series_uid: str | None = None, number: int = 1, seed: int = 0,
             size: tuple[int, int] = (48, 64), jpeg_quality: int | None = None) -> Dataset:
    frame, _ = endoscopy_frame(size[0], size[1], None, seed=seed)
    return as_dicom(frame, study_uid=study_uid, series_uid=series_uid, instance_number=number,
                    jpeg_quality=jpeg_quality)


def part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def multipart(parts: Sequence[bytes], content_type: str = "application/dicom") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: " + content_type.encode() + b"\r\n\r\n" + part
                    + b"\r\n" for part in parts)
    return body + b"--" + boundary.encode() + b"--\r\n", boundary


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sequence(answer: httpx.Response, tag: str) -> list[dict[str, object]]:
    items: list[dict[str, object]] = answer.json().get(tag, {}).get("Value", [])
    return items


def value(item: dict[str, object], tag: str) -> object:
    element = item.get(tag)
    return element["Value"][0] if isinstance(element, dict) and element.get("Value") else None


def detail(event: AuditEvent) -> dict[str, object]:
    loaded: dict[str, object] = json.loads(event.detail)
    return loaded
