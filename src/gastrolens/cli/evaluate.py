"""``gastrolens evaluate``: score a model package on a manifest the way the study did."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "evaluate",
        help="run a model package over a manifest and write report.md, report.json and plots",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--manifest", required=True, help="data set manifest (CSV; see README)")
    parser.add_argument("--model", required=True, help="model package folder")
    parser.add_argument("--out", required=True, help="report folder (created)")
    parser.add_argument("--split", default="all", choices=("all", "train", "val", "test"),
                        help="rows of the manifest's split column to evaluate")
    parser.add_argument("--compare-paper", action="store_true", help="print and report the study's Table 2 beside ours")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--readers", type=int, default=2, help="threads reading images ahead of the networks")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from gastrolens import UNTRAINED_WARNING
    from gastrolens.training.evaluate import evaluate
    from gastrolens.training.manifest import read_manifest
    from gastrolens.training.report import comparison_markdown, write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    manifest = read_manifest(args.manifest)
    evaluation = evaluate(
        manifest, args.model, split=args.split, device=args.device, batch_size=args.batch_size, readers=args.readers
    )
    report = write_report(evaluation, args.out, compare_paper=args.compare_paper)
    if evaluation.untrained_networks:
        print(f"{UNTRAINED_WARNING}: never trained: {', '.join(evaluation.untrained_networks)}", file=sys.stderr)
    print(f"{report['model']['name']} {report['model']['version']} on {args.manifest} ({args.split}): "
          f"{report['speed']['images']} images, {report['speed']['images_per_second']:.1f} images/s")
    print("per lesion: " + "  ".join(
        f"{name} sens {_pct(figures['sensitivity'])} spec {_pct(figures['specificity'])}"
        for name, figures in report["classification"]["per_lesion"].items()
    ))
    seg = report["segmentation"]["segmenter"]
    print(f"IoU: mean {_pct_value(seg['mean_iou'])}, pooled {_pct_value(seg['pooled_iou'])}")
    if args.compare_paper:
        print()
        print(comparison_markdown(report))
    print(f"report: {args.out}/report.md")
    return 0


def _pct(proportion: dict[str, object]) -> str:
    value = proportion["value"]
    return "n/a" if value is None else f"{100 * float(value):.1f}%"  # type: ignore[arg-type]


def _pct_value(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
