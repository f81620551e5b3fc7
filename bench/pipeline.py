"""Pipeline benchmark: end-to-end images/s of a running daemon against its own engine.

Generates N endoscopy-sized (640 x 480) JPEG-baseline VL Endoscopic instances (studies of
50 images), starts DCMTK storescp as the destination and `gastrolens serve` as a
subprocess (durable defaults: fsync on, SQLite; inference batch size and device as
given, the full-size untrained networks unless --model-package), pushes every instance
with one storescu association and measures

  end to end: first C-STORE sent -> last output (SEG, SR, overlay, study SR) written AND
              delivered to storescp (the latest ``sent_at`` in the database, checked
              against the files storescp wrote);

then, with the daemon stopped, runs ``gastrolens.models.Engine`` in-process on the same
instances decoded beforehand (same package, batch size, device, settings; one warm-up
image first) and prints both rates and their ratio (target >= 0.85 on CPU), a breakdown
of where the daemon's time went, and the study's reference figure.

With ``--phases`` it also runs the daemon's inference step in-process on the same
instances (one batch of them all, clocks around each stage) and prints milliseconds per
image for decoding, the engine, each output writer, file writing and the database.

    .venv/bin/python bench/pipeline.py [--count 200] [--batch-size 16] [--device auto]
                                       [--model-package DIR] [--phases] [--keep]

Prints figures; never a test.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

BIN = Path(sys.executable).parent
GASTROLENS = [str(BIN / "gastrolens")] if (BIN / "gastrolens").exists() else [sys.executable, "-m", "gastrolens.cli"]
READY = re.compile(r"GastroLens ready: AE title (\S+) on (\S+):(\d+)")
BATCH_LINE = re.compile(r"batch: (\d+) instance\(s\), (\d+) done, (\d+) failed, ([\d.]+) s")
IMAGES_PER_STUDY = 50
DISTINCT_FRAMES = 16
STUDY_REFERENCE = (1091, 42.0)  # the study: 1,091 images in 42 s
RATIO_TARGET = 0.85


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200, help="instances to send (default 200)")
    parser.add_argument("--batch-size", type=int, default=16, help="[model] batch_size (default 16)")
    parser.add_argument("--device", default="auto", help="[model] device: auto, cpu, cuda, cuda:N (default auto)")
    parser.add_argument("--model-package", type=Path, help="a model package folder (default: full-size untrained)")
    parser.add_argument("--timeout", type=float, default=7200, help="give up after this many seconds (default 7200)")
    parser.add_argument("--phases", action="store_true", help="also time each stage of the inference step in-process")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="gastrolens-bench-pipeline-", dir=os.environ.get("GASTROLENS_BENCH_DIR")))
    try:
        files = work / "files"
        started = time.perf_counter()
        make_instances(files, args.count)
        print(f"generated {args.count} VL Endoscopic JPEG-baseline instances, 640x480, in "
              f"{time.perf_counter() - started:.1f} s; batch size {args.batch_size}, device {args.device}, "
              f"model {args.model_package or 'full-size untrained (512 / 513 px)'}")
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} before the run")
        e2e = run_daemon(work / "daemon", files, args)
        print(f"machine: load average {os.getloadavg()[0]:.2f} after the daemon run")
        engine_rate = run_engine(files, args)
        if args.phases:
            run_phases(work / "phases", files, args)
        ratio = e2e / engine_rate
        ref_count, ref_seconds = STUDY_REFERENCE
        print()
        print(f"end to end (C-STORE in -> outputs delivered): {e2e:8.2f} images/s")
        print(f"engine in-process (decoded frames):            {engine_rate:8.2f} images/s")
        print(f"ratio end to end / engine: {ratio:.2f} - target >= {RATIO_TARGET:.2f}: "
              f"{'met' if ratio >= RATIO_TARGET else 'NOT met'}")
        print(f"study's reference: {ref_count:,} images in {ref_seconds:.0f} s = {ref_count / ref_seconds:.0f} images/s "
              f"(GPU, classifier only)")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


# -- inputs -------------------------------------------------------------------------------


def make_instances(folder: Path, count: int) -> None:
    from pydicom.uid import generate_uid

    from gastrolens.findings import LesionClass
    from gastrolens.samples import VL_ENDOSCOPIC, as_dicom, endoscopy_frame

    folder.mkdir(parents=True)
    looks = [None, *LesionClass]
    frames = [endoscopy_frame(480, 640, looks[i % len(looks)], seed=i)[0] for i in range(min(count, DISTINCT_FRAMES))]
    study = series = patient = ""
    for i in range(count):
        if i % IMAGES_PER_STUDY == 0:
            study, series = generate_uid(), generate_uid()
            patient = f"BENCH-{i // IMAGES_PER_STUDY:04d}"
        ds = as_dicom(frames[i % len(frames)], sop_class=VL_ENDOSCOPIC, study_uid=study, series_uid=series,
                      patient_id=patient, patient_name=f"Bench^{patient}", accession_number=patient,
                      instance_number=i % IMAGES_PER_STUDY + 1, jpeg_quality=90)
        ds.save_as(folder / f"{i:05d}.dcm", enforce_file_format=True)


# -- the daemon, end to end ----------------------------------------------------------------------


def run_daemon(folder: Path, files: Path, args: argparse.Namespace) -> float:
    folder.mkdir()
    received = folder / "storescp"
    received.mkdir()
    scp_port = free_port()
    scp = subprocess.Popen(["/usr/bin/storescp", "+xa", "-dhl", "-aet", "STORESCP", "-od", str(received), str(scp_port)],
                           env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                           stderr=open(folder / "storescp.log", "w"))  # noqa: SIM115
    db_url = f"sqlite:///{folder / 'gastrolens.db'}"
    package = f'package = "{args.model_package.resolve()}"' if args.model_package else ""
    config = folder / "gastrolens.toml"
    # Durable defaults (fsync, SQLite); only the scheduler's tick and the study quiet time
    # are shortened so that the fixed waits do not dominate a short run.
    config.write_text(f"""
[dicom]
port = 0
[storage]
root = "{folder / 'storage'}"
[database]
url = "{db_url}"
[model]
{package}
device = "{args.device}"
batch_size = {args.batch_size}
[scheduler]
interval_seconds = 0.5
study_quiet_seconds = 1
[[destinations]]
name = "storescp"
ae_title = "STORESCP"
host = "127.0.0.1"
port = {scp_port}
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GASTROLENS_")}
    log_path = folder / "serve.log"
    daemon = subprocess.Popen([*GASTROLENS, "serve", "--config", str(config)], stdout=subprocess.PIPE,
                              stderr=open(log_path, "w"), text=True, env=env)  # noqa: SIM115
    try:
        port = ready_port(daemon, log_path)
        wait_listening(scp_port, scp)
        count = sum(1 for _ in files.iterdir())
        studies = -(-count // IMAGES_PER_STUDY)
        first_store = datetime.now(timezone.utc)
        started = time.perf_counter()
        sender = subprocess.Popen(["/usr/bin/storescu", "-aet", "BENCH", "-aec", "GASTROLENS", "-xy", "127.0.0.1",
                                   str(port), "+sd", str(files)], env={**os.environ, "TCP_NODELAY": "1"},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        snapshot = poll_until_delivered(db_url, count, studies, received, started, args.timeout, daemon, log_path)
        if sender.wait(timeout=60) != 0:
            raise SystemExit(f"storescu failed:\n{sender.stderr.read()[-3000:] if sender.stderr else ''}")
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=120)
        except subprocess.TimeoutExpired:
            daemon.kill()
        scp.terminate()
        scp.wait(timeout=30)
    elapsed = (snapshot["last_sent"] - first_store).total_seconds()
    rate = count / elapsed
    print(f"  daemon: {count} images, {snapshot['outputs']} outputs delivered ({snapshot['files']} files at storescp) "
          f"in {elapsed:.1f} s = {rate:.2f} images/s (observed by polling after {snapshot['observed']:.1f} s)")
    breakdown(db_url, log_path, first_store, count)
    return rate


def poll_until_delivered(db_url: str, count: int, studies: int, received: Path, started: float, timeout: float,
                         daemon: subprocess.Popen, log_path: Path) -> dict:
    """Wait until every instance is done, every study reported and every output sent and written."""
    from sqlalchemy import func, select

    from gastrolens.db import Database
    from gastrolens.db.states import DeliveryState, InstanceState
    from gastrolens.db.tables import Delivery, Instance, Study

    db = Database(db_url)
    try:
        while time.perf_counter() - started < timeout:
            if daemon.poll() is not None:
                raise SystemExit(f"gastrolens serve exited {daemon.returncode}; see {log_path}")
            time.sleep(0.5)
            with db.session() as session:
                done = session.scalar(select(func.count()).select_from(Instance)
                                      .where(Instance.state == InstanceState.DONE)) or 0
                reported = session.scalar(select(func.count()).select_from(Study)
                                          .where(Study.report_revision > 0)) or 0
                states = dict(session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all())
                last_sent = session.scalar(select(func.max(Delivery.sent_at)))
            outputs = sum(states.values())
            sent = states.get(DeliveryState.SENT, 0)
            if done < count or reported < studies or sent < outputs:
                continue
            written = sum(1 for _ in received.iterdir())
            if written < outputs:
                continue
            if last_sent.tzinfo is None:  # SQLite hands back naive UTC datetimes
                last_sent = last_sent.replace(tzinfo=timezone.utc)
            return {"outputs": outputs, "files": written, "last_sent": last_sent,
                    "observed": time.perf_counter() - started}
        raise SystemExit(f"not everything delivered after {timeout:.0f} s; see {log_path}")
    finally:
        db.dispose()


def breakdown(db_url: str, log_path: Path, first_store: datetime, count: int) -> None:
    """Where the daemon's time went: ingest, batches (and the gaps between them), the tail."""
    from sqlalchemy import func, select

    from gastrolens.db import Database
    from gastrolens.db.tables import Delivery, Instance, Result, Study

    def utc(value: datetime) -> datetime:
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)

    db = Database(db_url)
    with db.session() as session:
        last_received = utc(session.scalar(select(func.max(Instance.received_at))))
        first_done = utc(session.scalar(select(func.min(Instance.finished_at))))
        last_done = utc(session.scalar(select(func.max(Instance.finished_at))))
        reported = utc(session.scalar(select(func.max(Study.reported_at))))
        last_sent = utc(session.scalar(select(func.max(Delivery.sent_at))))
        timings = [r for (r,) in session.execute(select(Result.timings))]
    db.dispose()
    batches = [(int(m.group(1)), float(m.group(4))) for m in BATCH_LINE.finditer(log_path.read_text())]
    batch_seconds = sum(s for _, s in batches)
    per_image = {key: statistics.mean(t[key] for t in timings) for key in
                 ("preprocess_s", "classifier_s", "segmenter_s", "postprocess_s")}
    engine_seconds = sum(per_image.values()) * count

    def since(at: datetime) -> float:
        return (at - first_store).total_seconds()

    print(f"  breakdown (seconds since the first C-STORE): last instance stored {since(last_received):.1f}, "
          f"first done {since(first_done):.1f}, last done {since(last_done):.1f}, "
          f"last study SR {since(reported):.1f}, last delivery {since(last_sent):.1f}")
    print(f"  batches: {len(batches)} (sizes {sorted({n for n, _ in batches})}), {batch_seconds:.1f} s in batches "
          f"(decode + infer + write + commit); engine share per image: "
          + ", ".join(f"{k[:-2]} {v * 1000:.0f} ms" for k, v in per_image.items())
          + f" = {engine_seconds:.1f} s for {count} images")
    print(f"  outside the engine inside batches: {batch_seconds - engine_seconds:.1f} s "
          f"(decode, outputs, database); outside batches: {since(last_sent) - batch_seconds:.1f} s "
          f"(waiting for the first batch, ticks, study quiet time, delivery)")


# -- the engine, in-process -------------------------------------------------------------------


def run_engine(files: Path, args: argparse.Namespace) -> float:
    from gastrolens.config.schema import ModelSettings
    from gastrolens.dicom_io.documents.read import decode_rgb_frames
    from gastrolens.models import Engine

    frames = [frame for path in sorted(files.iterdir()) for frame in decode_rgb_frames(path)]
    settings = ModelSettings(package=args.model_package, device=args.device, batch_size=args.batch_size)
    with Engine.from_settings(settings) as engine:
        engine.infer(frames[:1])  # warm-up
        started = time.perf_counter()
        findings = engine.infer(frames)
        if engine.device.type == "cuda":
            import torch

            torch.cuda.synchronize(engine.device)
        elapsed = time.perf_counter() - started
    assert len(findings) == len(frames)
    rate = len(frames) / elapsed
    print(f"  engine: {len(frames)} decoded frames in {elapsed:.1f} s = {rate:.2f} images/s "
          f"(batch size {args.batch_size}, {engine.device})")
    return rate


# -- the inference step, stage by stage ---------------------------------------------------------


def run_phases(folder: Path, files: Path, args: argparse.Namespace) -> None:
    """One in-process batch of every instance through the daemon's InferenceStep, each stage clocked."""
    import functools
    from collections import defaultdict

    import gastrolens.daemon.pipeline as pipeline_module
    import gastrolens.dicom_io.documents.outputs as outputs_module
    from gastrolens.config import Settings
    from gastrolens.daemon.service import Service

    spent: dict[str, float] = defaultdict(float)

    def clock(owner: object, name: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*a: object, **k: object) -> object:
            started = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                spent[name] += time.perf_counter() - started

        setattr(owner, name, timed)

    for name in ("build_segmentation", "build_image_sr", "build_overlay", "_write_all"):
        clock(outputs_module, name)
    for name in ("read_dataset", "decode_rgb_frames", "write_outputs"):
        clock(pipeline_module, name)
    count = sum(1 for _ in files.iterdir())
    settings = Settings.model_validate({
        "dicom": {"port": 0}, "storage": {"root": str(folder / "storage")},
        "database": {"url": f"sqlite:///{folder / 'gastrolens.db'}"},
        "model": {"package": args.model_package, "device": args.device, "batch_size": count + 1},
        "scheduler": {"interval_seconds": 3600},
        "destinations": [{"name": "folder", "folder": str(folder / "out")}]})
    service = Service(settings)
    service.start()
    try:
        clock(service.engine, "infer")
        subprocess.run(["/usr/bin/storescu", "-aec", "GASTROLENS", "-xy", "127.0.0.1", str(service.receiver.port),
                        "+sd", str(files)], env={**os.environ, "TCP_NODELAY": "1"}, check=True, capture_output=True)
        assert service.inference is not None
        started = time.perf_counter()
        report = service.inference.run_once()
        total = time.perf_counter() - started
    finally:
        service.stop()
    assert report is not None and report.done == count, report
    writers = spent["build_segmentation"] + spent["build_image_sr"] + spent["build_overlay"] + spent["_write_all"]
    rows = [("decode (2 threads, wall)", spent["decode_rgb_frames"] / settings.scheduler.decode_threads),
            ("engine.infer", spent["infer"]),
            ("SEG build (highdicom)", spent["build_segmentation"]),
            ("image SR build (highdicom)", spent["build_image_sr"]),
            ("overlay build", spent["build_overlay"]),
            ("write files (dcmwrite + fsync)", spent["_write_all"]),
            ("write_outputs, rest", spent["write_outputs"] - writers)]
    accounted = sum(seconds for _, seconds in rows)
    rows.append(("database + audit + other", total - accounted))
    print(f"  inference step in-process: {count} images in one batch, {total:.1f} s = {count / total:.2f} images/s")
    for what, seconds in rows:
        print(f"    {what:<32} {seconds * 1000 / count:7.0f} ms/image  {100 * seconds / total:5.1f} %")


# -- helpers ------------------------------------------------------------------------------------


def ready_port(process: subprocess.Popen[str], log_path: Path, timeout: float = 300) -> int:
    found: list[int] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if match := READY.search(line):
                found.append(int(match.group(3)))
                break
        for _ in process.stdout:  # keep draining so the daemon never blocks on a full pipe
            pass

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    if not found:
        process.kill()
        raise SystemExit(f"gastrolens serve did not print its ready line; see {log_path}")
    return found[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"storescp exited {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("storescp did not start listening")


if __name__ == "__main__":
    sys.exit(main())
