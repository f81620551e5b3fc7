"""How long building the outputs of one image takes, per kind and per path, on one core.

    .venv/bin/python bench/outputs.py [--count 200] [--rows 480 --cols 640] [--frames 1]
        [--sop-class vl|sc] [--no-lesion] [--lossy] [--fsync] [--study-images 50] [--study-count 5]

Builds a synthetic 640x480 VL Endoscopic source with a lesion (tests/dicom_io/documents/
synthetic.py), its frames already decoded as the daemon passes them, and calls
``write_outputs`` in this one process, first with the template path (the default), then
with the reference path (``builder=highdicom``). The kinds are timed by switching them on
one after another: SEG alone, then SEG + SR (the SR difference), then all three (the
overlay difference). Reported: CPU ms per image of the calling thread (what one core
spends) and wall ms, and images/s per core = 1000 / CPU ms for all three together. fsync
is off unless ``--fsync``. Every image gets new UIDs and values, so the template path
compiles its templates once (not timed: two warm-up images, as a structure is compiled
on its second sighting) and then only fills them. ``--lossy`` stores the source as JPEG
Baseline (as endoscopes send it), which gives it a JPEG Baseline overlay
(documents/jpeg.py); the overlay's size on disk is printed either way.

Then the study SR (``write_study_sr``, what study completion writes): a study of
``--study-images`` headers (pixel data left out, as completion reads them) with a lesion
class in some images, written ``--study-count`` times per path; reported as CPU ms per
study SR and per image of the study.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dicom_io" / "documents"))

from synthetic import MULTIFRAME_TRUE_COLOR_SC, SECONDARY_CAPTURE, VL_ENDOSCOPIC, encode, scenario  # noqa: E402

from gastrolens.config.schema import OutputSettings  # noqa: E402
from gastrolens.dicom_io.documents.outputs import Builder, write_outputs, write_study_sr  # noqa: E402
from gastrolens.dicom_io.documents.read import decode_rgb_frames  # noqa: E402
from gastrolens.findings import LesionClass  # noqa: E402

STEPS = (
    ("seg", OutputSettings(seg=True, sr=False, overlay=False)),
    ("seg+sr", OutputSettings(seg=True, sr=True, overlay=False)),
    ("all", OutputSettings(seg=True, sr=True, overlay=True)),
)


def _measure(images, settings: OutputSettings, builder: Builder, out: Path, fsync: bool) -> tuple[float, float]:
    source, findings, frames = images[0]
    for _ in range(2):  # warm-up: a structure's second sighting compiles its templates
        write_outputs(source, findings, out, settings, frames=frames, fsync=fsync, builder=builder)
    cpu = wall = 0.0
    for source, findings, frames in images:
        start_wall, start_cpu = time.perf_counter(), time.thread_time()
        write_outputs(source, findings, out, settings, frames=frames, fsync=fsync, builder=builder)
        cpu += time.thread_time() - start_cpu
        wall += time.perf_counter() - start_wall
    return 1000 * cpu / len(images), 1000 * wall / len(images)


def _study(images: int) -> list:
    study_uid = "1.2.826.0.1.3680043.8.498.1717"
    lesions = (LesionClass.PU, None, None, LesionClass.EGC_HGIN, None)
    study = []
    for i in range(images):
        source, findings = scenario(VL_ENDOSCOPIC, lesion=lesions[i % len(lesions)], study_uid=study_uid)
        del source.PixelData
        study.append((source, findings))
    return study


def _measure_study(study: list, builder: Builder, count: int, out: Path, fsync: bool) -> tuple[float, float]:
    write_study_sr(study, out, fsync=fsync, builder=builder)  # warm-up (imports, descriptor cache)
    start_wall, start_cpu = time.perf_counter(), time.thread_time()
    for revision in range(1, count + 1):
        write_study_sr(study, out, fsync=fsync, builder=builder, revision=revision)
    return 1000 * (time.thread_time() - start_cpu) / count, 1000 * (time.perf_counter() - start_wall) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="images per measurement (template path)")
    parser.add_argument("--reference-count", type=int, default=10, help="images per measurement (highdicom path)")
    parser.add_argument("--rows", type=int, default=480)
    parser.add_argument("--cols", type=int, default=640)
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--sop-class", choices=("vl", "sc"), default="vl")
    parser.add_argument("--no-lesion", action="store_true")
    parser.add_argument("--lossy", action="store_true", help="JPEG Baseline source (gets a JPEG Baseline overlay)")
    parser.add_argument("--fsync", action="store_true")
    parser.add_argument("--study-images", type=int, default=50, help="images in the study of the study SR")
    parser.add_argument("--study-count", type=int, default=5, help="study SRs per path (0: skip)")
    args = parser.parse_args()

    sop_class = {"vl": VL_ENDOSCOPIC, "sc": SECONDARY_CAPTURE}[args.sop_class]
    if args.frames > 1:
        sop_class = MULTIFRAME_TRUE_COLOR_SC
    lesion = None if args.no_lesion else LesionClass.PU
    pool = []
    for _ in range(min(args.count, 8)):
        source, findings = scenario(sop_class, lesion=lesion, rows=args.rows, cols=args.cols, frames=args.frames)
        if args.lossy:
            encode(source, "1.2.840.10008.1.2.4.50")
        pool.append((source, findings, decode_rgb_frames(source)))
    load = os.getloadavg()[0]
    print(f"outputs for one {args.cols}x{args.rows} {args.sop_class.upper()} image, {args.frames} frame(s), "
          f"{'lesion' if lesion else 'no lesion'}, {'JPEG Baseline' if args.lossy else 'native'} source, "
          f"fsync {'on' if args.fsync else 'off'}, one process; "
          f"load average {load:.2f} on {os.cpu_count()} CPUs"
          + ("  (BUSY MACHINE: figures are pessimistic)" if load >= 1 else ""))
    print(f"{'path':<10} {'kind':<8} {'CPU ms/image':>13} {'wall ms/image':>14}")
    with tempfile.TemporaryDirectory() as folder:
        for builder, count in ((Builder.TEMPLATE, args.count), (Builder.HIGHDICOM, args.reference_count)):
            images = [pool[i % len(pool)] for i in range(count)]
            previous = (0.0, 0.0)
            totals = (0.0, 0.0)
            for name, settings in STEPS:
                totals = _measure(images, settings, builder, Path(folder) / builder.value / name, args.fsync)
                kind = {"seg": "SEG", "seg+sr": "SR", "all": "overlay"}[name]
                print(f"{builder.value:<10} {kind:<8} {totals[0] - previous[0]:13.2f} {totals[1] - previous[1]:14.2f}")
                previous = totals
            print(f"{builder.value:<10} {'all':<8} {totals[0]:13.2f} {totals[1]:14.2f}   "
                  f"-> {1000 / totals[0]:.0f} images/s per core")
            sizes = [p.stat().st_size for p in (Path(folder) / builder.value / "all").glob("overlay_*.dcm")]
            print(f"{builder.value:<10} overlay file: {sum(sizes) / max(1, len(sizes)) / 1024:.0f} KiB")
        if args.study_count > 0:
            study = _study(args.study_images)
            print(f"study SR of {args.study_images} images: {'path':<10} {'CPU ms/study':>13} {'wall ms/study':>14} "
                  f"{'CPU ms/image':>13}")
            for builder in (Builder.TEMPLATE, Builder.HIGHDICOM):
                cpu, wall = _measure_study(study, builder, args.study_count, Path(folder) / "study" / builder.value,
                                           args.fsync)
                print(f"{'':<26}{builder.value:<10} {cpu:13.1f} {wall:14.1f} {cpu / args.study_images:13.2f}")


if __name__ == "__main__":
    main()
