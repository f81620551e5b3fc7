"""End-to-end helpers: real peers (Orthanc, DCMTK storescp), configurations, synthetic
studies, bounded waits and a read-only view of the daemon's database.

Every peer runs as a subprocess on free loopback ports; every wait is a bounded poll whose
failure message carries the daemon's (and the peer's) log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from gastrolens.daemon.completion import finding_from_result
from gastrolens.db import Database
from gastrolens.db.audit import verify_chain
from gastrolens.db.states import AuditEventType, DeliveryState, InstanceState
from gastrolens.db.tables import AuditEvent, Delivery, Instance, Output, Result, Study
from gastrolens.findings import ImageFinding, LesionClass, OutputKind
from gastrolens.samples import SECONDARY_CAPTURE, VL_ENDOSCOPIC, as_dicom, endoscopy_frame
from support import basic_config, dcmtk, free_port

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # Debian's orthanc-dicomweb
STORESCP = "/usr/bin/storescp"

TINY_CLASSIFIER = 64
TINY_SEGMENTER = 65


# -- waiting -------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], object], timeout: float, what: str, *,
             logs: Callable[[], str] = lambda: "", interval: float = 0.2) -> object:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` with ``logs()``."""
    started = time.monotonic()
    deadline = started + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (httpx.HTTPError, OSError) as exc:  # a peer restarting: try again
            value, last_error = None, exc
        if value:
            print(f"waited {time.monotonic() - started:5.1f} s for {what}")
            return value
        time.sleep(interval)
    detail = f" (last error: {last_error})" if last_error else ""
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{detail}\n--- logs ---\n{logs()}", pytrace=False)


# -- model and configuration --------------------------------------------------------------


def pipeline_config(tmp: Path, db_url: str, model: Path, *, destinations: str = "", port: int = 0,
                    batch_size: int = 8, lease_seconds: float = 300) -> str:
    """A daemon configuration for the end-to-end tests: tiny model, short intervals, fsync on
    (storage in ``tmp / "storage"``: daemons started with the same ``tmp`` share it)."""
    return basic_config(tmp, db_url, port=port, extra=f"""
[model]
package = "{model}"
device = "cpu"
batch_size = {batch_size}

[scheduler]
interval_seconds = 0.5
study_quiet_seconds = 2
lease_seconds = {lease_seconds}

[delivery]
backoff_seconds = 0.5
max_backoff_seconds = 2
max_attempts = 40

{destinations}
""")


def dicom_destination(name: str, ae_title: str, port: int) -> str:
    return f'[[destinations]]\nname = "{name}"\nae_title = "{ae_title}"\nhost = "127.0.0.1"\nport = {port}\n'


def folder_destination(name: str, folder: Path) -> str:
    return f'[[destinations]]\nname = "{name}"\nfolder = "{folder}"\n'


# -- synthetic studies --------------------------------------------------------------------


@dataclass
class SyntheticStudy:
    study_uid: str
    files: list[Path]
    sop_uids: list[str]


def make_study(folder: Path, looks: list[tuple[LesionClass | None, str]], *, rows: int = 240, cols: int = 320,
               seed: int = 0, patient_id: str = "GL-E2E-1") -> SyntheticStudy:
    """One study; ``looks`` gives each image's lesion and encoding ("jpeg": VL Endoscopic JPEG
    baseline, "sc": uncompressed Secondary Capture)."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid()
    series = {"jpeg": generate_uid(), "sc": generate_uid()}
    files, uids = [], []
    for i, (lesion, kind) in enumerate(looks):
        frame, _ = endoscopy_frame(rows, cols, lesion, seed=seed + i)
        ds = as_dicom(frame, sop_class=VL_ENDOSCOPIC if kind == "jpeg" else SECONDARY_CAPTURE,
                      study_uid=study_uid, series_uid=series[kind], patient_id=patient_id,
                      instance_number=i + 1, jpeg_quality=90 if kind == "jpeg" else None)
        path = folder / f"{i:03d}_{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        uids.append(str(ds.SOPInstanceUID))
    return SyntheticStudy(study_uid, files, uids)


# -- DCMTK storescp as a destination ---------------------------------------------------------


@dataclass
class StoreSCP:
    port: int
    folder: Path
    process: subprocess.Popen
    log_path: Path
    ae_title: str = "STORESCP"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def received(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_storescp(tmp: Path, *, unique_names: bool = False) -> StoreSCP:
    """storescp accepting every storage SOP class it knows (SEG, SR, SC), any transfer syntax it supports.

    ``unique_names``: a second copy of a SOP instance gets its own file instead of replacing the first.
    """
    folder = tmp / "storescp"
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = tmp / "storescp.log"
    args = [STORESCP, "-v", "+xa", "-aet", "STORESCP", "-od", str(folder), "-dhl"]
    if unique_names:
        args.append("+uf")
    log = open(log_path, "w")  # noqa: SIM115 - handed to the subprocess
    process = subprocess.Popen([*args, str(port)], stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "TCP_NODELAY": "1"})
    log.close()
    scp = StoreSCP(port, folder, process, log_path)
    wait_for(lambda: process.poll() is not None or
             dcmtk("echoscu", "-aec", "STORESCP", "127.0.0.1", str(port), timeout=10).returncode == 0,
             20, "storescp to answer C-ECHO", logs=lambda: scp.log)
    if process.poll() is not None:
        pytest.fail(f"storescp exited with {process.returncode}:\n{scp.log}", pytrace=False)
    return scp


# -- Orthanc -------------------------------------------------------------------------------


@dataclass
class Orthanc:
    """An Orthanc of our own (not the system service): storage, index and ports in tmp."""

    root: Path
    gastrolens_port: int
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    plugins: list[str] = field(default_factory=list)
    """Plugin .so paths to load (DICOMWEB_PLUGIN serves DICOMweb at <url>/dicom-web/)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def config_path(self) -> Path:
        return self.root / "orthanc.json"

    @property
    def log_path(self) -> Path:
        return self.root / "orthanc.log"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:] if self.log_path.exists() else ""

    def write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "GastroLens e2e",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            # Orthanc accepts every storage SOP class it knows (SEG, SR, SC among them);
            # unknown ones are refused unless this is on.
            "UnknownSopClassAccepted": True,
            "DicomModalities": {"gastrolens": ["GASTROLENS", "127.0.0.1", self.gastrolens_port]},
            "DicomScuTimeout": 30,
            "StableAge": 60,
            "SaveJobs": False,
            "Plugins": self.plugins,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        self.config_path.write_text(json.dumps(config, indent=2))

    def start(self, timeout: float = 60) -> None:
        if not self.config_path.exists():
            self.write_config()
        log = open(self.log_path, "a")  # noqa: SIM115 - handed to the subprocess
        self.process = subprocess.Popen([ORTHANC, str(self.config_path)], stdout=log, stderr=subprocess.STDOUT,
                                        cwd=self.root)
        log.close()
        wait_for(lambda: self.process.poll() is not None or self.get("/system").status_code == 200, timeout,
                 "Orthanc to answer GET /system", logs=lambda: self.log)
        if self.process.poll() is not None:
            pytest.fail(f"Orthanc exited with {self.process.returncode}:\n{self.log}", pytrace=False)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    # -- REST ------------------------------------------------------------------------------

    def get(self, path: str, timeout: float = 30) -> httpx.Response:
        return httpx.get(self.url + path, timeout=timeout)

    def json(self, path: str) -> object:
        response = self.get(path)
        response.raise_for_status()
        return response.json()

    def upload(self, path: Path) -> dict:
        response = httpx.post(self.url + "/instances", content=path.read_bytes(), timeout=60)
        response.raise_for_status()
        return response.json()

    def store_to_gastrolens(self, orthanc_ids: list[str]) -> dict:
        response = httpx.post(self.url + "/modalities/gastrolens/store",
                              json={"Resources": orthanc_ids, "Synchronous": True}, timeout=120)
        assert response.status_code == 200, f"C-STORE to GastroLens failed: {response.text}\n{self.log}"
        return response.json()

    def study_ids(self, study_uid: str) -> list[str]:
        """Orthanc's IDs of the studies with this Study Instance UID (one per Patient ID)."""
        response = httpx.post(self.url + "/tools/lookup", content=study_uid, timeout=30)
        response.raise_for_status()
        return [item["ID"] for item in response.json() if item["Type"] == "Study"]

    def study_instances(self, study_uid: str) -> list[dict]:
        """Each instance of the study (Orthanc's ID and main DICOM tags)."""
        return [instance for orthanc_id in self.study_ids(study_uid)
                for instance in self.json(f"/studies/{orthanc_id}/instances")]  # type: ignore[union-attr]

    def download(self, orthanc_instance_id: str) -> bytes:
        response = self.get(f"/instances/{orthanc_instance_id}/file")
        response.raise_for_status()
        return response.content


# -- the daemon's database, read-only ----------------------------------------------------------


class DatabaseView:
    """Short read transactions on the daemon's database, for polling and final checks."""

    def __init__(self, url: str) -> None:
        self.db = Database(url)

    def close(self) -> None:
        self.db.dispose()

    def instance_states(self) -> Counter:
        with self.db.session() as session:
            return Counter({InstanceState(state).value: n for state, n in session.execute(
                select(Instance.state, func.count()).group_by(Instance.state))})

    def delivery_states(self) -> Counter:
        with self.db.session() as session:
            return Counter({DeliveryState(state).value: n for state, n in session.execute(
                select(Delivery.state, func.count()).group_by(Delivery.state))})

    def all_done(self, instances: int) -> bool:
        return self.instance_states() == Counter({"done": instances})

    def reported_studies(self) -> int:
        with self.db.session() as session:
            return int(session.scalar(select(func.count()).select_from(Study).where(Study.report_revision > 0)) or 0)

    def everything_sent(self, instances: int, studies: int = 1) -> bool:
        """All instances done, every study reported, every delivery sent (and at least one)."""
        if not self.all_done(instances) or self.reported_studies() < studies:
            return False
        states = self.delivery_states()
        return bool(states) and set(states) == {"sent"}

    def findings_by_sop(self) -> dict[str, list[ImageFinding]]:
        """Each done instance's findings (frame order), keyed by SOP Instance UID."""
        with self.db.session() as session:
            rows = session.execute(
                select(Instance.sop_instance_uid, Result).join(Result, Result.instance_id == Instance.id)
                .where(Instance.superseded.is_(False)).order_by(Instance.received_at, Instance.id, Result.frame_number)
            ).all()
        found: dict[str, list[ImageFinding]] = {}
        for sop_uid, result in rows:
            found.setdefault(sop_uid, []).append(finding_from_result(result))
        return found

    def results_per_instance(self) -> dict[str, int]:
        with self.db.session() as session:
            return {sop: n for sop, n in session.execute(
                select(Instance.sop_instance_uid, func.count(Result.id))
                .outerjoin(Result, Result.instance_id == Instance.id).group_by(Instance.sop_instance_uid))}

    def outputs(self) -> list[Output]:
        with self.db.session() as session:
            return list(session.scalars(select(Output).order_by(Output.id)))

    def output_sources(self) -> dict[str, str | None]:
        """Output SOP Instance UID -> its source SOP Instance UID (None for a study SR)."""
        with self.db.session() as session:
            return {uid: source for uid, source in session.execute(
                select(Output.sop_instance_uid, Instance.sop_instance_uid)
                .outerjoin(Instance, Output.instance_id == Instance.id))}

    def deliveries(self) -> list[tuple[Delivery, Output]]:
        with self.db.session() as session:
            return [(d, o) for d, o in session.execute(
                select(Delivery, Output).join(Output, Delivery.output_id == Output.id).order_by(Delivery.id))]

    def events(self, *types: AuditEventType) -> list[AuditEvent]:
        with self.db.session() as session:
            stmt = select(AuditEvent).order_by(AuditEvent.id)
            if types:
                stmt = stmt.where(AuditEvent.event_type.in_(types))
            return list(session.scalars(stmt))

    def audit_intact(self) -> bool:
        """The audit hash chain verifies (what `gastrolens audit verify` checks, in-process)."""
        with self.db.session() as session:
            report = verify_chain(session)
        assert report.intact, f"audit chain broken at row {report.first_broken_id}: {report.reason}"
        return True

    def claimed(self) -> int:
        return self.instance_states().get("claimed", 0)


def detail(event: AuditEvent) -> dict:
    return json.loads(event.detail)


def output_kinds(outputs: list[Output]) -> Counter:
    return Counter(OutputKind(o.kind).value for o in outputs)
