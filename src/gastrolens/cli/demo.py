"""``gastrolens demo``: push sample endoscopy images to the running daemon and show its findings.

A newcomer's one-minute tour: it writes a handful of synthetic images as one DICOM
study, sends them by C-STORE, waits for the results in the database and prints them
with the output files. With untrained weights the table says so.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import select

from gastrolens import UNTRAINED_WARNING
from gastrolens.cli.common import add_config_option, settings_from
from gastrolens.db import Database
from gastrolens.db.states import InstanceState
from gastrolens.db.tables import Instance, Output, Result, Study
from gastrolens.errors import GastroLensError
from gastrolens.findings import LesionClass, OutputKind
from gastrolens.samples import VL_ENDOSCOPIC, as_dicom, endoscopy_frame

DEMO_CLASSES = (LesionClass.NORMAL, LesionClass.PU, LesionClass.EGC_HGIN, LesionClass.AGC, LesionClass.SMT)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="send sample images to the running daemon and print its findings")
    add_config_option(parser)
    parser.add_argument("--host", default=None, help="daemon address (default: dicom.bind from the config)")
    parser.add_argument("--port", type=int, default=None, help="daemon port (default: dicom.port from the config)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for results (default 300)")
    parser.add_argument("--no-wait-study", action="store_true", help="do not wait for the study-level SR")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # the table below is the output
    settings = settings_from(args)
    host = args.host or ("127.0.0.1" if settings.dicom.bind in ("0.0.0.0", "::") else settings.dicom.bind)
    port = args.port or settings.dicom.port
    study_uid = generate_uid()
    with tempfile.TemporaryDirectory(prefix="gastrolens-demo-") as folder:
        files = _write_samples(Path(folder), study_uid)
        _send(files, host, port, settings.dicom.ae_title)
    print(
        f"sent {len(files)} sample images (study {study_uid}) to {settings.dicom.ae_title}@{host}:{port}; "
        "waiting for results..."
    )
    db = Database(settings.database.url)
    deadline = time.monotonic() + args.timeout
    while not _all_finished(db, study_uid, len(files)):
        if time.monotonic() > deadline:
            raise GastroLensError(
                f"no results after {args.timeout:.0f} s: is `gastrolens serve` running with this config?"
            )
        time.sleep(1)
    _print_findings(db, study_uid, settings.storage.root)
    if not args.no_wait_study and settings.outputs.sr:
        print(
            "\nwaiting for the study SR "
            f"(written {settings.scheduler.study_quiet_seconds:.0f} s after the last image)..."
        )
        while (conclusion := _study_conclusion(db, study_uid)) is None:
            if time.monotonic() > deadline:
                raise GastroLensError("the study SR did not arrive in time")
            time.sleep(1)
        print(f"study conclusion: {LesionClass(conclusion[0]).display_name}  ({settings.storage.root / conclusion[1]})")
    return 0


def _write_samples(folder: Path, study_uid: str) -> list[Path]:
    series_uid = generate_uid()
    files = []
    for number, lesion in enumerate(DEMO_CLASSES, start=1):
        frame, _ = endoscopy_frame(480, 640, lesion, seed=number)
        ds = as_dicom(
            frame,
            study_uid=study_uid,
            series_uid=series_uid,
            instance_number=number,
            patient_id="GL-DEMO",
            patient_name="Demo^Patient",
            accession_number="DEMO1",
            jpeg_quality=90,
        )
        ds.ImageComments = f"synthetic sample drawn as {lesion.value}"
        path = folder / f"demo-{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def _send(files: list[Path], host: str, port: int, called_ae: str) -> None:
    ae = AE(ae_title="GASTROLENS_DEMO")
    ae.add_requested_context(VL_ENDOSCOPIC, "1.2.840.10008.1.2.4.50")
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise GastroLensError(
            f"cannot open an association with {called_ae}@{host}:{port}: is `gastrolens serve` running?"
        )
    try:
        for path in files:
            status = assoc.send_c_store(path)
            if not status or status.Status != 0x0000:
                raise GastroLensError(f"{path.name}: the daemon answered {status.Status if status else 'nothing'}")
    finally:
        assoc.release()


def _all_finished(db: Database, study_uid: str, count: int) -> bool:
    with db.read_session() as session:
        states = session.scalars(select(Instance.state).join(Study).where(Study.study_instance_uid == study_uid)).all()
    return len(states) >= count and all(s in (InstanceState.DONE, InstanceState.FAILED) for s in states)


def _print_findings(db: Database, study_uid: str, root: Path) -> None:
    with db.read_session() as session:
        rows = session.execute(
            select(Instance, Result)
            .join(Study)
            .outerjoin(Result, Result.instance_id == Instance.id)
            .where(Study.study_instance_uid == study_uid)
            .order_by(Instance.id)
        ).all()
        outputs = {
            i.id: [o for o in session.scalars(select(Output).where(Output.instance_id == i.id))] for i, _ in rows
        }
    if any(r and r.untrained for _, r in rows):
        print(f"\n*** {UNTRAINED_WARNING}: the findings below come from random weights ***")
    print(f"\n{'#':>2}  {'DRAWN AS':<10} {'PREDICTED':<30} {'PROB':>5}  {'LESION AREA':>11}  OUTPUTS")
    for number, (instance, result) in enumerate(rows, start=1):
        drawn = DEMO_CLASSES[number - 1].value if number <= len(DEMO_CLASSES) else "?"
        if result is None:
            print(f"{number:>2}  {drawn:<10} FAILED: {instance.error}")
            continue
        cls = LesionClass(result.predicted_class)
        probability = getattr(result, f"p_{cls.value}")
        kinds = ", ".join(sorted(o.kind.value for o in outputs[instance.id]))
        print(
            f"{number:>2}  {drawn:<10} {cls.display_name:<30} {probability:>5.2f}  "
            f"{result.lesion_area_fraction:>10.1%}  {kinds}"
        )
    print(f"\noutput files: {root / 'outputs' / study_uid}/")


def _study_conclusion(db: Database, study_uid: str) -> tuple[str, str] | None:
    with db.read_session() as session:
        row = session.execute(
            select(Study.conclusion, Output.file_path)
            .join(Output, Output.study_id == Study.id)
            .where(Study.study_instance_uid == study_uid, Output.kind == OutputKind.STUDY_SR)
            .order_by(Output.revision.desc())
        ).first()
    return (row[0], row[1]) if row and row[0] else None
