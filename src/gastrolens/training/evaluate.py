"""Run a model package over a manifest the way the daemon runs it, and score it as the study did.

Images go through :class:`gastrolens.models.Engine` (same pre-processing, networks,
precision and decision rule as ``gastrolens serve``), read from disk batch by batch
while the previous batch runs. Only per-image numbers are kept (probabilities, the
predicted class, mask overlap counts), so memory does not grow with the test set.

Two masks are scored: the segmenter's own (the decision rule's thresholds, but not
cleared when the classifier calls the image normal: the study's IoU compares the
network's outline with the physician's) and the delivered one (what a SEG carries,
cleared on frames reported as normal).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gastrolens.errors import DatasetError
from gastrolens.findings import CLASS_ORDER
from gastrolens.models.engine import Engine
from gastrolens.models.package import ModelCard, read_card
from gastrolens.training.datasets import read_mask, read_rgb
from gastrolens.training.manifest import Manifest, ManifestRow, summarise
from gastrolens.training.metrics import (
    BinaryCounts,
    SegmentationSummary,
    confusion_matrix,
    lesion_counts,
    lesion_outcomes,
    mask_overlap,
    per_class,
    roc_auc,
    summarise_segmentation,
)

logger = logging.getLogger(__name__)


@dataclass
class ImageResult:
    """What evaluation keeps of one image."""

    line: int
    lesion_id: str
    truth: int
    predicted: int
    probabilities: tuple[float, ...]
    overlap: tuple[int, int] | None = None
    """(intersection, union) of the segmenter's mask with the truth; None without a known mask."""
    delivered_overlap: tuple[int, int] | None = None
    truth_area: int = 0


@dataclass
class Evaluation:
    """Per-image results plus what is needed to report them."""

    card: ModelCard
    model_path: Path
    manifest: Manifest
    split: str
    results: list[ImageResult]
    seconds: float
    device: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def untrained_networks(self) -> tuple[str, ...]:
        return self.card.untrained_networks

    @property
    def images_per_second(self) -> float:
        return len(self.results) / self.seconds if self.seconds else float("nan")

    def confusion(self) -> np.ndarray:
        return confusion_matrix([r.truth for r in self.results], [r.predicted for r in self.results], len(CLASS_ORDER))

    def per_image(self) -> list[BinaryCounts]:
        return per_class(self.confusion())

    def per_lesion(self) -> list[BinaryCounts]:
        outcomes = lesion_outcomes(
            [r.lesion_id for r in self.results], [r.truth for r in self.results], [r.predicted for r in self.results]
        )
        return lesion_counts(outcomes, len(CLASS_ORDER))

    def lesions_per_class(self) -> list[int]:
        truth = {r.lesion_id: r.truth for r in self.results}
        return [sum(1 for t in truth.values() if t == k) for k in range(len(CLASS_ORDER))]

    def auc(self) -> list[float | None]:
        scores = np.array([r.probabilities for r in self.results], dtype=np.float64).reshape(-1, len(CLASS_ORDER))
        truth = np.array([r.truth for r in self.results])
        return [roc_auc(scores[:, k], truth == k) for k in range(len(CLASS_ORDER))]

    def segmentation(self, *, delivered: bool = False) -> SegmentationSummary:
        known = [r for r in self.results if r.overlap is not None and r.delivered_overlap is not None]
        overlaps = [r.delivered_overlap if delivered else r.overlap for r in known]
        return summarise_segmentation(
            [o[0] for o in overlaps if o is not None],
            [o[1] for o in overlaps if o is not None],
            [r.truth_area for r in known],
        )


def evaluate(
    manifest: Manifest,
    model_dir: str | Path,
    *,
    split: str = "all",
    device: str = "auto",
    batch_size: int = 16,
    readers: int = 2,
) -> Evaluation:
    """Run the package in ``model_dir`` over the manifest's ``split`` rows."""
    rows = manifest.select(split)
    if not rows:
        raise DatasetError(f"{manifest.path}: no rows in split {split!r}")
    card = read_card(model_dir)
    # The segmenter's own mask is scored, so the rule must not clear it on "normal" frames;
    # the delivered mask is rebuilt below with the card's own rule.
    scoring_rule = card.decision.model_copy(update={"mask_only_when_present": False})
    clear_when_normal = card.decision.mask_only_when_present
    results: list[ImageResult] = []
    started = time.perf_counter()
    with Engine.from_path(model_dir, device=device, batch_size=batch_size, decision=scoring_rule) as engine, \
            ThreadPoolExecutor(max_workers=max(1, readers), thread_name_prefix="gastrolens-eval-read") as pool:
        truth_masks: list[list[np.ndarray | None]] = []  # FIFO: the engine reads one batch ahead

        def images() -> Iterator[list[np.ndarray]]:
            for batch_images, batch_masks in _prefetch(rows, batch_size, pool):
                truth_masks.append(batch_masks)
                yield batch_images

        for findings in engine.infer_stream(images()):
            masks = truth_masks.pop(0)
            batch_rows = rows[len(results) : len(results) + len(findings)]
            for row, finding, truth_mask in zip(batch_rows, findings, masks, strict=True):
                result = ImageResult(
                    line=row.line,
                    lesion_id=row.lesion_id,
                    truth=CLASS_ORDER.index(row.label),
                    predicted=CLASS_ORDER.index(finding.predicted),
                    probabilities=tuple(finding.probabilities),
                )
                if truth_mask is not None:
                    result.overlap = mask_overlap(finding.mask, truth_mask)
                    delivered = finding.mask if (finding.lesion_present or not clear_when_normal) else None
                    result.delivered_overlap = (
                        mask_overlap(delivered, truth_mask) if delivered is not None else (0, int(truth_mask.sum()))
                    )
                    result.truth_area = int(truth_mask.sum())
                results.append(result)
        device_name = str(engine.device)
    seconds = time.perf_counter() - started
    logger.info("evaluated %d images in %.1f s (%.1f images/s) on %s", len(results), seconds,
                len(results) / seconds if seconds else 0.0, device_name)
    return Evaluation(card, Path(model_dir), manifest, split, results, seconds, device_name, data=summarise(rows))


Batch = tuple[list[np.ndarray], list[np.ndarray | None]]


def _load(row: ManifestRow) -> tuple[np.ndarray, np.ndarray | None]:
    rgb = read_rgb(row.image)
    return rgb, (read_mask(row.mask, rgb.shape[:2]) if row.has_mask_truth else None)


def _prefetch(rows: Sequence[ManifestRow], batch_size: int, pool: ThreadPoolExecutor) -> Iterator[Batch]:
    """Batches of (images, truth masks), the next one read while the current one is used."""
    chunks = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]

    def submit(chunk: Sequence[ManifestRow]) -> list[Future[tuple[np.ndarray, np.ndarray | None]]]:
        return [pool.submit(_load, row) for row in chunk]

    pending = submit(chunks[0]) if chunks else []
    for index in range(len(chunks)):
        loaded = [future.result() for future in pending]
        pending = submit(chunks[index + 1]) if index + 1 < len(chunks) else []
        yield [image for image, _ in loaded], [mask for _, mask in loaded]

