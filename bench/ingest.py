"""Ingest benchmark: GastroLens's durable C-STORE against pynetdicom's bare storescp.

Generates N endoscopy-like 640x480 JPEG-baseline Secondary Capture instances once,
then pushes them with DCMTK storescu into

  (a) `gastrolens serve` with its durable defaults (fsync on, SQLite database; files,
      database and storage in a temporary folder on the same disk; one receiver
      process per CPU), once over ONE association and once over --associations
      concurrent ones (the files split between them), and
  (b) pynetdicom's storescp app (writes each data set to a folder, no fsync) over ONE
      association,

and prints instances/s for each and the ratios, against the targets: one association
>= 0.8 x storescp, N associations >= 0.8 x N x one association (1.6 for 2).
After each run it checks that every instance arrived. Prints figures; never a test.

    .venv/bin/python bench/ingest.py [--count 500] [--associations 2] [--receiver-processes P]
                                     [--rounds 1] [--keep] [--with-inference]

The daemon runs as a receiver (no model, no inference) unless --with-inference is given.
"""

from __future__ import annotations

import argparse
import json
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GASTROLENS = [str(BIN / "gastrolens")] if (BIN / "gastrolens").exists() else [sys.executable, "-m", "gastrolens.cli"]
READY = re.compile(r"GastroLens ready: AE title (\S+) on (\S+):(\d+)")
IMAGES_PER_STUDY = 50
DISTINCT_FRAMES = 16


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500, help="instances to send (default 500)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat both runs, alternating their order, and report medians (default 1)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    parser.add_argument(
        "--associations",
        type=int,
        default=2,
        help="concurrent storescu associations for the scaling run (default 2; 1 skips it)",
    )
    parser.add_argument(
        "--receiver-processes",
        type=int,
        default=None,
        help="dicom.receiver_processes for the daemon (default: its own, one per CPU)",
    )
    parser.add_argument(
        "--with-inference",
        action="store_true",
        help="let the daemon run inference while it receives (default: deferred, to measure ingest alone)",
    )
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="gastrolens-bench-", dir=os.environ.get("GASTROLENS_BENCH_DIR")))
    try:
        files = work / "files"
        started = time.perf_counter()
        n = max(1, args.associations)
        size = make_instances(files, args.count, parts=n)
        print(
            f"generated {args.count} JPEG-baseline Secondary Capture instances, 640x480, "
            f"{size / args.count / 1024:.1f} KiB each, in {time.perf_counter() - started:.1f} s ({files})"
        )
        print(
            f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
            f"storescu: -xy (JPEG baseline proposed), TCP_NODELAY=1"
        )
        one_rates: list[float] = []
        many_rates: list[float] = []
        storescp_rates: list[float] = []
        runs = ["gastrolens-1", *(["gastrolens-n"] if n > 1 else []), "storescp"]
        for round_no in range(1, args.rounds + 1):
            # Alternate the order, so a drift in machine load is shared.
            for kind in runs if round_no % 2 else runs[::-1]:
                folder = work / f"{kind}-{round_no}"
                if kind == "gastrolens-1":
                    one_rates.append(
                        run_gastrolens(folder, files, args.count, 1, args.receiver_processes, args.with_inference)
                    )
                elif kind == "gastrolens-n":
                    many_rates.append(
                        run_gastrolens(folder, files, args.count, n, args.receiver_processes, args.with_inference)
                    )
                else:
                    storescp_rates.append(run_storescp(folder, files, args.count))
        note = f" (median of {args.rounds} rounds)" if args.rounds > 1 else ""
        g1, s = statistics.median(one_rates), statistics.median(storescp_rates)
        ratio = statistics.median(a / b for a, b in zip(one_rates, storescp_rates, strict=True))
        label = f"GastroLens (fsync, SQLite, audit{', inference on' if args.with_inference else ''})"
        print(f"{label}, 1 association:  {g1:7.1f} instances/s{note}")
        if many_rates:
            print(f"{label}, {n} associations: {statistics.median(many_rates):7.1f} instances/s{note}")
        print(f"pynetdicom storescp (no fsync), 1 association: {s:7.1f} instances/s{note}")
        print(
            f"ratio GastroLens 1 association / storescp: {ratio:.2f} - target >= 0.80: "
            f"{'met' if ratio >= 0.8 else 'NOT met'}"
        )
        if many_rates:
            scale = statistics.median(a / b for a, b in zip(many_rates, one_rates, strict=True))
            target = 0.8 * n
            print(
                f"ratio GastroLens {n} associations / 1 association: {scale:.2f} - target >= {target:.2f}: "
                f"{'met' if scale >= target else 'NOT met'}"
            )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def make_instances(folder: Path, count: int, parts: int = 1) -> int:
    """Write ``count`` instances (studies of 50 images) into ``parts`` sub-folders of ``folder``,
    one per association of the scaling run; return their total size."""
    from pydicom.uid import generate_uid

    from gastrolens.findings import LesionClass
    from gastrolens.samples import SECONDARY_CAPTURE, as_dicom, endoscopy_frame

    folder.mkdir(parents=True)
    looks = [None, *LesionClass]
    frames = [endoscopy_frame(480, 640, looks[i % len(looks)], seed=i)[0] for i in range(DISTINCT_FRAMES)]
    total = 0
    study = series = ""
    for i in range(count):
        if i % IMAGES_PER_STUDY == 0:
            study, series = generate_uid(), generate_uid()
            patient = f"BENCH-{i // IMAGES_PER_STUDY:04d}"
        ds = as_dicom(
            frames[i % DISTINCT_FRAMES],
            sop_class=SECONDARY_CAPTURE,
            study_uid=study,
            series_uid=series,
            patient_id=patient,
            patient_name=f"Bench^{patient}",
            accession_number=patient,
            instance_number=i % IMAGES_PER_STUDY + 1,
            jpeg_quality=90,
        )
        part = folder / f"part-{(i // IMAGES_PER_STUDY) % parts}"
        part.mkdir(exist_ok=True)
        path = part / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


def storescu(port: int, ae_title: str, files: Path, associations: int = 1) -> float:
    """Send every file under ``files``: over one association, or over ``associations``
    concurrent ones (one per ``part-*`` folder); return the wall time in seconds."""
    folders = sorted(files.glob("part-*")) if associations > 1 else [files]
    commands = [
        [
            "/usr/bin/storescu",
            "-aet",
            "BENCH",
            "-aec",
            ae_title,
            "-xy",
            "-R",
            "127.0.0.1",
            str(port),
            "+sd",
            "+r",
            str(folder),
        ]
        for folder in folders
    ]
    env = {**os.environ, "TCP_NODELAY": "1"}
    started = time.perf_counter()
    senders = [
        subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in commands
    ]
    failures = []
    for sender in senders:
        _, stderr = sender.communicate(timeout=3600)
        if sender.returncode != 0:
            failures.append(f"storescu failed ({sender.returncode}):\n{stderr[-3000:]}")
    elapsed = time.perf_counter() - started
    if failures:
        raise SystemExit("\n".join(failures))
    return elapsed


def run_gastrolens(
    folder: Path, files: Path, count: int, associations: int, processes: int | None, with_inference: bool
) -> float:
    folder.mkdir()
    config = folder / "gastrolens.toml"
    # Ingest alone (the receiver role: no model, no inference) unless inference is asked
    # for; everything else at its default: fsync on, SQLite with synchronous=FULL,
    # min_free_mb 1024, max_pdu_bytes 0, INFO logging. (A huge batch_size used to defer
    # inference instead; a full batch of 512 then woke it, and its CPU batch took 24 GB.)
    deferred = "" if with_inference else '[daemon]\nrole = "receiver"\n'
    config.write_text(f"""
[dicom]
port = 0
{f"receiver_processes = {processes}" if processes else ""}
[storage]
root = "{folder / "storage"}"
[database]
url = "sqlite:///{folder / "gastrolens.db"}"
{deferred}""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GASTROLENS_")}
    with open(folder / "serve.stderr", "w") as stderr:
        daemon = subprocess.Popen(
            [*GASTROLENS, "serve", "--config", str(config)], stdout=subprocess.PIPE, stderr=stderr, text=True, env=env
        )
    try:
        port = _ready_port(daemon)
        cpu_before = _cpu_seconds(daemon.pid)
        elapsed = storescu(port, "GASTROLENS", files, associations)
        cpu_after = _cpu_seconds(daemon.pid)
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=120)
    if code != 0:
        raise SystemExit(f"gastrolens serve exited {code}; see {folder / 'serve.stderr'}")
    status = json.loads(
        subprocess.run(
            [*GASTROLENS, "status", "--json", "--config", str(config)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
    )
    stored = sum(1 for _ in (folder / "storage" / "instances").rglob("*.dcm"))
    received = sum(status["instances"].values())  # received, or already claimed/done with inference on
    if received != count or stored != count or status["quarantined"]:
        raise SystemExit(
            f"GastroLens: expected {count}, database says {received} received "
            f"({status['quarantined']} quarantined), {stored} files stored"
        )
    rate = count / elapsed
    cpu = {name: (cpu_after.get(name, 0.0) - cpu_before.get(name, 0.0)) * 1000 / count for name in cpu_after}
    print(
        f"  GastroLens, {associations} association(s): CPU ms per instance: "
        + ", ".join(f"{name} {ms:.1f}" for name, ms in sorted(cpu.items()))
    )
    print(
        f"  GastroLens, {associations} association(s): {count} in {elapsed:.2f} s = {rate:.1f} instances/s; "
        f"status --json: received {received}, files {stored}"
    )
    return rate


def run_storescp(folder: Path, files: Path, count: int) -> float:
    output = folder / "received"
    output.mkdir(parents=True)
    port = _free_port()
    # -pdu 0: unlimited, as GastroLens's default dicom.max_pdu_bytes, so only the handlers differ.
    command = [
        sys.executable,
        "-m",
        "pynetdicom",
        "storescp",
        str(port),
        "--output-directory",
        str(output),
        "--max-pdu",
        "0",
        "--ae-title",
        "STORESCP",
    ]
    with open(folder / "storescp.stderr", "w") as stderr:
        scp = subprocess.Popen(command, stdout=stderr, stderr=stderr)
    try:
        _wait_listening(port, scp)
        elapsed = storescu(port, "STORESCP", files)
    finally:
        scp.send_signal(signal.SIGINT)
        try:
            scp.wait(timeout=30)
        except subprocess.TimeoutExpired:
            scp.kill()
            scp.wait()
    stored = sum(1 for _ in output.iterdir())
    if stored != count:
        raise SystemExit(f"storescp: expected {count} files, found {stored}")
    rate = count / elapsed
    print(f"  storescp:   {count} in {elapsed:.2f} s = {rate:.1f} instances/s; files {stored}")
    return rate


def _cpu_seconds(daemon_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of the daemon process and of its children, by name
    (the receiver processes call themselves gl-receiver)."""
    tick = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        pid, ppid = int(stat.parent.name), int(fields[1])
        if pid == daemon_pid:
            name = "daemon"
        elif ppid != daemon_pid:
            continue
        totals[name] = totals.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return totals


def _ready_port(process: subprocess.Popen[str], timeout: float = 120) -> int:
    found: list[int] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if match := READY.search(line):
                found.append(int(match.group(3)))
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not found:
        process.kill()
        raise SystemExit("gastrolens serve did not print its ready line")
    return found[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
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
