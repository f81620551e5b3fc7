"""Evaluation reports: report.json, report.md and PNG plots, optionally beside the study's Table 2.

report.json holds every number with its n/N counts and 95% Wilson interval; report.md
presents the same for people; plots: ``confusion_matrix.png``, ``roc_curves.png``,
``iou_histogram.png``. When a network of the package was never trained, every figure
resting on it is marked UNTRAINED in all three.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from gastrolens import UNTRAINED_WARNING, __version__
from gastrolens.findings import CLASS_ORDER
from gastrolens.training.evaluate import Evaluation
from gastrolens.training.metrics import STAT_NAMES, BinaryCounts, Proportion

logger = logging.getLogger(__name__)

# The study's Table 2 (test set, counted per lesion), as digested in shared/paper.md:
# Zhang L. et al., "Deep convolutional neural network for the diagnosis of gastric lesions
# on routine white-light endoscopic images", DOI 10.3760/cma.j.cn321463-20200611-00280.
# (k, n) per figure; the paper does not say how each row's n/N was formed.
STUDY_TABLE_2: dict[str, dict[str, Any]] = {
    "normal": {"lesions": 34, "accuracy": (30, 34), "sensitivity": (23, 25), "specificity": (7, 9),
               "ppv": (23, 25), "npv": (7, 9)},
    "pu": {"lesions": 52, "accuracy": (47, 52), "sensitivity": (38, 41), "specificity": (9, 11),
           "ppv": (38, 40), "npv": (9, 12)},
    "egc_hgin": {"lesions": 42, "accuracy": (33, 42), "sensitivity": (27, 32), "specificity": (6, 10),
                 "ppv": (27, 31), "npv": (6, 11)},
    "agc": {"lesions": 59, "accuracy": (52, 59), "sensitivity": (45, 49), "specificity": (7, 10),
            "ppv": (45, 48), "npv": (7, 11)},
    "smt": {"lesions": 50, "accuracy": (43, 50), "sensitivity": (35, 39), "specificity": (8, 11),
            "ppv": (35, 38), "npv": (8, 12)},
}
STUDY_IOU = 0.758
"""Segmentation IoU over the study's 1,091 test images."""
STUDY_TEST_IMAGES = 1091
STUDY_TEST_SECONDS = 42.0
"""All 1,091 test images in 42 s (about 26 images/s; hardware not given)."""

_LABELS = {"accuracy": "accuracy", "sensitivity": "sensitivity", "specificity": "specificity",
           "ppv": "PPV", "npv": "NPV"}


def build_report(evaluation: Evaluation, *, compare_paper: bool = False) -> dict[str, Any]:
    """Every figure of the evaluation as a JSON-ready dict."""
    classes = [c.value for c in CLASS_ORDER]
    per_image = evaluation.per_image()
    per_lesion = evaluation.per_lesion()
    seg = evaluation.segmentation()
    delivered = evaluation.segmentation(delivered=True)
    matrix = evaluation.confusion()
    card = evaluation.card
    report: dict[str, Any] = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "gastrolens": __version__,
        "model": {
            "path": str(evaluation.model_path),
            "name": card.name,
            "version": card.version,
            "weights_sha256": card.weights_sha256,
            "untrained_networks": list(evaluation.untrained_networks),
        },
        "data": {"manifest": str(evaluation.manifest.path), "manifest_sha256": evaluation.manifest.sha256,
                 "split": evaluation.split, **evaluation.data},
        "classification": {
            "untrained": "classifier" in evaluation.untrained_networks,
            "decision_rule": card.decision.model_dump(),
            "overall_accuracy": Proportion(int(np.trace(matrix)), int(matrix.sum())).to_dict(),
            "confusion_matrix": {"classes": classes, "rows_are": "truth", "matrix": matrix.tolist()},
            "per_image": {c: counts.to_dict() for c, counts in zip(classes, per_image, strict=True)},
            "per_lesion": {c: counts.to_dict() for c, counts in zip(classes, per_lesion, strict=True)},
            "lesions_per_class": dict(zip(classes, evaluation.lesions_per_class(), strict=True)),
            "roc_auc": dict(zip(classes, evaluation.auc(), strict=True)),
        },
        "segmentation": {
            "untrained": "segmenter" in evaluation.untrained_networks,
            "segmenter": seg.to_dict(),
            "delivered": delivered.to_dict(),
            "empty_mask_baseline": {"mean_iou": 0.0 if seg.images_with_lesion else None,
                                    "pooled_iou": 0.0 if seg.images_with_lesion else None},
        },
        "speed": {"images": len(evaluation.results), "seconds": evaluation.seconds,
                  "images_per_second": evaluation.images_per_second, "device": evaluation.device},
    }
    if compare_paper:
        report["study_comparison"] = compare_with_study(per_lesion, seg, evaluation.images_per_second)
    return report


def compare_with_study(per_lesion: list[BinaryCounts], seg: Any, images_per_second: float) -> dict[str, Any]:
    """The study's Table 2 beside our per-lesion figures, class by class."""
    rows: dict[str, Any] = {}
    for cls, counts in zip(CLASS_ORDER, per_lesion, strict=True):
        study = STUDY_TABLE_2[cls.value]
        ours = counts.stats()
        rows[cls.value] = {
            name: {"study": Proportion(*study[name]).to_dict(), "ours": ours[name].to_dict()} for name in STAT_NAMES
        }
        rows[cls.value]["lesions"] = {"study": study["lesions"], "ours": counts.tp + counts.fn}
    return {
        "source": "Zhang et al., DOI 10.3760/cma.j.cn321463-20200611-00280, Table 2 (shared/paper.md)",
        "note": "The study's n/N per row split the class's own lesions in a way it does not explain; "
        "ours are one-vs-rest per lesion (recognised when any image of the lesion is).",
        "classes": rows,
        "iou": {"study": STUDY_IOU, "ours_mean": seg.mean_iou, "ours_pooled": seg.pooled_iou},
        "images_per_second": {"study": STUDY_TEST_IMAGES / STUDY_TEST_SECONDS, "ours": images_per_second},
    }


def write_report(evaluation: Evaluation, out_dir: str | Path, *, compare_paper: bool = False) -> dict[str, Any]:
    """Write report.json, report.md and the plots into ``out_dir``; return the report dict."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    report = build_report(evaluation, compare_paper=compare_paper)
    report["plots"] = _plots(evaluation, folder)
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n", encoding="utf-8")
    (folder / "report.md").write_text(render_markdown(report), encoding="utf-8")
    logger.info("wrote evaluation report to %s", folder)
    return report


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _fmt(p: dict[str, Any] | None, *, ci: bool = True) -> str:
    if p is None:
        return "n/a"
    return Proportion(p["k"], p["n"]).format(ci=ci)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def untrained_banner(report: dict[str, Any]) -> str | None:
    untrained = report["model"]["untrained_networks"]
    if not untrained:
        return None
    return f"**{UNTRAINED_WARNING}**: never trained: {', '.join(untrained)}. Figures resting on it are random."


def render_markdown(report: dict[str, Any]) -> str:
    model, data = report["model"], report["data"]
    cls, seg = report["classification"], report["segmentation"]
    lines = [f"# GastroLens evaluation: {model['name']} {model['version']}", ""]
    banner = untrained_banner(report)
    if banner:
        lines += [banner, ""]
    lines += [
        f"- model: `{model['path']}` (weights sha256 `{model['weights_sha256']}`)",
        f"- data: `{data['manifest']}` split `{data['split']}`: {data['images']} images, {data['lesions']} lesions, "
        f"{data['patients']} patients",
        f"- speed: {report['speed']['images_per_second']:.1f} images/s on {report['speed']['device']} "
        f"(reading, pre-processing, both networks, decision rule)",
        "",
        "Percentages are followed by (n/N) and the 95% Wilson interval.",
        "",
    ]
    tag = " (UNTRAINED classifier)" if cls["untrained"] else ""
    lines += [f"Overall 5-class accuracy per image{tag}: {_fmt(cls['overall_accuracy'])}", ""]
    levels = (("per_image", "per image"), ("per_lesion", "per lesion (recognised when any of its images is)"))
    for level, title in levels:
        with_auc = level == "per_image"
        lines += [f"## Classification, {title}{tag}", "",
                  "| class | " + " | ".join(_LABELS[n] for n in STAT_NAMES) + (" | ROC AUC |" if with_auc else " |"),
                  "|---" * (len(STAT_NAMES) + 1 + with_auc) + "|"]
        for name, counts in cls[level].items():
            auc = cls["roc_auc"][name]
            cells = [_fmt(counts[n]) for n in STAT_NAMES]
            if with_auc:
                cells.append("n/a" if auc is None else f"{auc:.3f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    matrix = cls["confusion_matrix"]
    lines += [f"## Confusion matrix (rows: truth, columns: predicted; images){tag}", "",
              "| truth \\ predicted | " + " | ".join(matrix["classes"]) + " |",
              "|---" * (len(matrix["classes"]) + 1) + "|"]
    for name, row in zip(matrix["classes"], matrix["matrix"], strict=True):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    seg_tag = " (UNTRAINED segmenter)" if seg["untrained"] else ""
    s, d = seg["segmenter"], seg["delivered"]
    lines += ["", f"## Segmentation IoU{seg_tag}", "",
              "| mask | images with a lesion | mean IoU | pooled IoU | false-positive masks |", "|---|---|---|---|---|",
              f"| segmenter | {s['images_with_lesion']} of {s['images']} | {_pct(s['mean_iou'])} | "
              f"{_pct(s['pooled_iou'])} "
              f"| {s['false_positive_masks']} |",
              f"| delivered (cleared on frames called normal) | {d['images_with_lesion']} of {d['images']} | "
              f"{_pct(d['mean_iou'])} | {_pct(d['pooled_iou'])} | {d['false_positive_masks']} |",
              "", "An empty mask scores 0% on both.", ""]
    if "study_comparison" in report:
        lines += [comparison_markdown(report), ""]
    lines += ["## Plots", ""] + [f"![{name}]({name})" for name in report.get("plots", [])]
    return "\n".join(lines) + "\n"


def comparison_markdown(report: dict[str, Any]) -> str:
    """The study's Table 2 beside ours, as a markdown section (also printed by --compare-paper)."""
    comparison = report["study_comparison"]
    cls_tag = " (UNTRAINED classifier)" if report["classification"]["untrained"] else ""
    lines = [f"## The study's Table 2 beside ours{cls_tag}", "", comparison["note"], "",
             "| class | measure | study | ours (per lesion) |", "|---|---|---|---|"]
    for name, figures in comparison["classes"].items():
        lines.append(f"| {name} | lesions | {figures['lesions']['study']} | {figures['lesions']['ours']} |")
        for measure in STAT_NAMES:
            lines.append(f"| {name} | {_LABELS[measure]} | {_fmt(figures[measure]['study'], ci=False)} "
                         f"| {_fmt(figures[measure]['ours'])} |")
    iou, speed = comparison["iou"], comparison["images_per_second"]
    seg_tag = " (UNTRAINED segmenter)" if report["segmentation"]["untrained"] else ""
    lines += [f"| all | IoU{seg_tag} | {_pct(iou['study'])} | {_pct(iou['ours_mean'])} mean, "
              f"{_pct(iou['ours_pooled'])} pooled |",
              f"| all | images/s | {speed['study']:.1f} (hardware not given) | {speed['ours']:.1f} |",
              "", f"Source: {comparison['source']}."]
    return "\n".join(lines)


def _plots(evaluation: Evaluation, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gastrolens.training.metrics import roc_curve

    classes = [c.value for c in CLASS_ORDER]
    untrained = evaluation.untrained_networks
    cls_note = "\nUNTRAINED classifier" if "classifier" in untrained else ""
    seg_note = "\nUNTRAINED segmenter" if "segmenter" in untrained else ""
    written = []

    matrix = evaluation.confusion()
    fig, ax = plt.subplots(figsize=(5.5, 4.8), dpi=100)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    top = matrix.max() if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > top / 2 else "black")
    ax.set_title(f"Confusion matrix (images){cls_note}")
    written.append(_save(fig, folder / "confusion_matrix.png", plt))

    scores = np.array([r.probabilities for r in evaluation.results]).reshape(-1, len(classes))
    truth = np.array([r.truth for r in evaluation.results])
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=100)
    for k, (name, auc) in enumerate(zip(classes, evaluation.auc(), strict=True)):
        if auc is None:
            continue
        fpr, tpr = roc_curve(scores[:, k], truth == k)
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"ROC, one class vs rest (images){cls_note}")
    ax.legend(loc="lower right", fontsize="small")
    written.append(_save(fig, folder / "roc_curves.png", plt))

    seg = evaluation.segmentation()
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=100)
    ax.hist(seg.per_image, bins=np.linspace(0, 1, 21), color="tab:red", edgecolor="white")  # type: ignore[arg-type]
    if seg.mean_iou is not None:
        ax.axvline(seg.mean_iou, color="black", linestyle="--", label=f"mean {100 * seg.mean_iou:.1f}%")
    ax.axvline(STUDY_IOU, color="grey", linestyle=":", label=f"study {100 * STUDY_IOU:.1f}%")
    ax.set_xlabel("IoU per image (images with a lesion outline)")
    ax.set_ylabel("images")
    ax.set_title(f"Segmentation IoU{seg_note}")
    ax.legend(fontsize="small")
    written.append(_save(fig, folder / "iou_histogram.png", plt))
    return written


def _save(fig: Any, path: Path, plt: Any) -> str:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name
