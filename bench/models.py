"""Throughput and peak memory of the study's networks: GastroLens's engine vs bare torchvision.

Prints figures; it is not a test. Rows:

* ``classifier``, ``segmenter-os16``, ``segmenter-os8``: one network's forward pass on
  pre-processed input batches at the study's sizes (512 / 513), run the way the engine
  runs it (``Engine.classify_tensor`` / ``segment_tensor``: inference_mode, plus autocast
  as ``--amp`` says and channels_last on CUDA) against the bare torchvision module (fp32,
  ``no_grad``). Both start from the same host batch and copy it to the device inside
  the timed call (pinned memory on CUDA for both; ``--pageable`` for both otherwise).
* ``copy``: the host-to-device copy of one classifier batch alone, pageable (engine
  column) against pinned (bare column), each timed to its completion.
* ``both-os16``: the whole engine, from uint8 frames with a black border and burned-in
  text (field-of-view crop, resize, both networks, masks at source resolution, decision)
  against the bare forward of both networks on ready-made inputs (two batches per
  timed run, so pre-processing of the second overlaps inference of the first).

Engine and bare runs alternate and each figure is the fastest of ``--repeats`` runs, so
that other load on a shared machine disturbs both alike. ``ratio`` is engine images/s
over bare images/s. Memory is the peak of ``torch.cuda.max_memory_allocated`` on CUDA
and the peak resident-set growth on CPU (freed heap is returned to the OS first), both
*above the memory in use when the block starts* (weights and inputs already there are
the baseline, subtracted).

Examples::

    python bench/models.py                                   # defaults for the device
    python bench/models.py --device cpu --batch-sizes 1,8 --repeats 2
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from gastrolens.models.engine import Engine, resolve_device
from gastrolens.models.networks import build_classifier, build_segmenter
from gastrolens.models.package import ModelPackage, untrained_package


@dataclass
class Row:
    what: str
    batch: int
    engine_ips: float
    bare_ips: float
    engine_mem_mb: float
    bare_mem_mb: float


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or resident-set growth sampled every 2 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_memory()
            self._base = _rss()
            self._peak = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _rss())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = (max(self._peak, _rss()) - self._base) / 2**20


def _release_free_memory() -> None:
    """Hand freed heap back to the OS so the resident-set growth of the next block is its own."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _compare(
    engine_run: Callable[[], object],
    bare_run: Callable[[], object],
    device: torch.device,
    args: argparse.Namespace,
) -> tuple[float, float, float, float]:
    """Seconds per call (engine, bare) and peak MB (engine, bare).

    The two alternate, so that load from other processes hits both alike; the figure is
    the fastest of ``repeats`` calls, the one least disturbed. Memory comes from one
    extra call of each.
    """
    for _ in range(args.warmup):
        engine_run()
        bare_run()
    with PeakMemory(device) as engine_memory:
        engine_run()
    with PeakMemory(device) as bare_memory:
        bare_run()
    engine_times, bare_times = [], []
    for _ in range(args.repeats):
        for run, times in ((engine_run, engine_times), (bare_run, bare_times)):
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            times.append(time.perf_counter() - start)
    return min(engine_times), min(bare_times), engine_memory.peak_mb, bare_memory.peak_mb


def _frames(batch: int, rows: int, cols: int) -> list[np.ndarray]:
    """Synthetic endoscopy frames: black border, text at the left, an octagonal field of view."""
    rng = np.random.default_rng(0)
    rr, cc = np.mgrid[0:rows, 0:cols]
    top, left, bottom, right = rows // 25, cols // 3, rows - rows // 25, cols - cols // 50
    dy = np.abs(rr - (top + bottom) / 2) / ((bottom - top) / 2)
    dx = np.abs(cc - (left + right) / 2) / ((right - left) / 2)
    inside = (dy <= 1) & (dx <= 1) & (dy + dx <= 1.6)
    frames = []
    for _ in range(batch):
        frame = rng.integers(0, 8, (rows, cols, 3), dtype=np.uint8)
        frame[inside] = rng.integers(60, 220, (int(inside.sum()), 3), dtype=np.uint8)
        frame[20:40, 20 : cols // 4] = 255
        frames.append(frame)
    return frames


def _bare(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    return module.to(device).eval()


def bench_network(
    what: str,
    engine: Engine,
    bare: torch.nn.Module,
    size: int,
    batch: int,
    args: argparse.Namespace,
    device: torch.device,
) -> Row:
    x = _host_batch(batch, size, device, pinned=not args.pageable)
    run = engine.classify_tensor if what == "classifier" else engine.segment_tensor

    def bare_run() -> object:
        with torch.no_grad():
            return bare(x.to(device, non_blocking=True))

    engine_s, bare_s, engine_mb, bare_mb = _compare(lambda: run(x), bare_run, device, args)
    return Row(what, batch, batch / engine_s, batch / bare_s, engine_mb, bare_mb)


def _host_batch(batch: int, size: int, device: torch.device, *, pinned: bool) -> torch.Tensor:
    x = torch.randn(batch, 3, size, size)
    return x.pin_memory() if pinned and device.type == "cuda" else x


def bench_copy(batch: int, size: int, args: argparse.Namespace, device: torch.device) -> Row:
    """One batch host -> device: pageable ("engine" column) against pinned ("bare" column)."""
    pageable = _host_batch(batch, size, device, pinned=False)
    pinned = _host_batch(batch, size, device, pinned=True)
    engine_s, bare_s, engine_mb, bare_mb = _compare(lambda: pageable.to(device, non_blocking=True),
                                                    lambda: pinned.to(device, non_blocking=True), device, args)
    return Row("copy pageable/pinned", batch, batch / engine_s, batch / bare_s, engine_mb, bare_mb)


def bench_both(
    engine: Engine,
    bare_classifier: torch.nn.Module,
    bare_segmenter: torch.nn.Module,
    batch: int,
    args: argparse.Namespace,
    device: torch.device,
) -> Row:
    """Two pipelined batches per engine call (pre-processing of the second overlaps the first)."""
    frames = _frames(batch, *args.frame)
    xc = torch.randn(batch, 3, args.classifier_size, args.classifier_size, device=device)
    xs = torch.randn(batch, 3, args.segmenter_size, args.segmenter_size, device=device)

    def engine_run() -> object:
        return list(engine.infer_stream([frames, frames]))

    def bare_run() -> object:
        with torch.no_grad():
            return [(bare_classifier(xc), bare_segmenter(xs)) for _ in range(2)]

    engine_s, bare_s, engine_mb, bare_mb = _compare(engine_run, bare_run, device, args)
    return Row("both-os16", batch, 2 * batch / engine_s, 2 * batch / bare_s, engine_mb, bare_mb)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default: 1,8,32 on CUDA, 1,8 on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default: 10 CUDA, 2 CPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    parser.add_argument(
        "--only",
        default="classifier,segmenter-os16,segmenter-os8,both-os16",
        help="rows to run (default: the four network rows; add copy for the host-to-device copy)",
    )
    parser.add_argument("--classifier-size", type=int, default=512)
    parser.add_argument("--segmenter-size", type=int, default=513)
    parser.add_argument("--frame", default="1080x1350", help="source frame ROWSxCOLS for both-os16 (default 1080x1350)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    parser.add_argument("--amp", default="auto", choices=["auto", "off", "fp16", "bf16"],
                        help="the engine's [model] amp (default auto)")
    parser.add_argument("--pageable", action="store_true", help="network rows start from pageable, not pinned, memory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the engine warns per instance that the weights are untrained
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,8,32" if cuda else "1,8")).split(",")]
    args.repeats = args.repeats or (10 if cuda else 2)
    args.frame = tuple(int(v) for v in args.frame.lower().split("x"))
    rows_wanted = [r.strip() for r in args.only.split(",") if r.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)

    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"device: {device} ({name}); torch {torch.__version__}; weights: gastrolens-untrained (random); "
          f"engine amp {args.amp}; network inputs from {'pageable' if args.pageable else 'pinned'} memory")
    print(
        f"batch sizes {batch_sizes}, warm-up {args.warmup}, repeats {args.repeats}, input "
        f"{args.classifier_size}/{args.segmenter_size}, frames {args.frame[0]}x{args.frame[1]}, rows {rows_wanted}"
    )
    package = untrained_package(classifier_input_size=args.classifier_size, segmenter_input_size=args.segmenter_size)

    def engine_for(stride: int, batch: int) -> Engine:
        pkg: ModelPackage = copy.deepcopy(package)
        return Engine(pkg, device=str(device), batch_size=batch, output_stride=stride, amp=args.amp)

    results: list[Row] = []
    bare_classifier = _bare(build_classifier(), device)
    bare_segmenters = {16: _bare(build_segmenter(16), device), 8: _bare(build_segmenter(8), device)}
    for batch in batch_sizes:
        for what in rows_wanted:
            stride = 8 if what.endswith("os8") else 16
            with engine_for(stride, batch) as engine:
                if what == "classifier":
                    row = bench_network(what, engine, bare_classifier, args.classifier_size, batch, args, device)
                elif what.startswith("segmenter"):
                    row = bench_network(
                        what, engine, bare_segmenters[stride], args.segmenter_size, batch, args, device
                    )
                elif what == "both-os16":
                    row = bench_both(engine, bare_classifier, bare_segmenters[16], batch, args, device)
                elif what == "copy":
                    row = bench_copy(batch, args.classifier_size, args, device)
                else:
                    parser.error(f"unknown row {what!r}")
            results.append(row)
            print(_format(row), flush=True)
    print()
    print(_header())
    for row in results:
        print(_format(row))
    return 0


def _header() -> str:
    return (f"{'what':<22}{'batch':>6}{'engine img/s':>14}{'bare img/s':>12}{'ratio':>7}"
            f"{'engine +MB':>11}{'bare +MB':>9}")


def _format(row: Row) -> str:
    return (
        f"{row.what:<22}{row.batch:>6}{row.engine_ips:>14.2f}{row.bare_ips:>12.2f}"
        f"{row.engine_ips / row.bare_ips:>7.2f}{row.engine_mem_mb:>11.0f}{row.bare_mem_mb:>9.0f}"
    )


if __name__ == "__main__":
    sys.exit(main())
