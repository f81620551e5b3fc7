"""The batch inference engine: RGB frames in, one :class:`ImageFinding` per frame out.

The engine loads both networks once and keeps them on its device. ``infer`` splits the
frames into batches of ``batch_size`` and pipelines them: a background thread validates,
finds the field of view and crops the next batch while the current one runs through
the networks. On CUDA the networks run under autocast (bf16 where supported, else fp16)
in channels_last layout, crops travel from pinned host memory with non-blocking copies
and are resized on the GPU; on the CPU the whole pre-processing runs in the background
thread and ``cpu_threads`` sets torch's thread count (process-wide).

Every finding names the model (:attr:`Engine.identity`); ``finding.model.untrained``
tells the writers to print :data:`gastrolens.UNTRAINED_WARNING`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gastrolens import UNTRAINED_WARNING
from gastrolens.config.schema import ModelSettings
from gastrolens.errors import ModelError
from gastrolens.findings import ImageFinding, ModelIdentity
from gastrolens.models import networks
from gastrolens.models.decision import DecisionRule, decide
from gastrolens.models.package import ModelCard, ModelPackage, check_finite, load_package, untrained_package
from gastrolens.models.preprocess import CropBox, mask_to_source, probability_to_logit, to_float_tensor, validate_image

logger = logging.getLogger(__name__)


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> the first CUDA device when present, else the CPU; check explicit ones."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ModelError(f"device {spec!r} requested but CUDA is not available on this machine")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return device
    raise ModelError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N")


@dataclass
class _Prepared:
    """One batch after host-side pre-processing."""

    shapes: list[tuple[int, int]]
    boxes: list[CropBox]
    crops: list[torch.Tensor]
    classifier_input: torch.Tensor | None
    segmenter_input: torch.Tensor | None
    preprocess_s: float


class Engine:
    """Runs the classifier and the segmenter on batches of RGB frames.

    The engine takes ownership of the package's networks: it moves them to its device,
    sets eval mode and, with ``output_stride``, reconfigures the segmenter.
    ``fov_crop`` and ``decision`` default to the model card's.
    """

    def __init__(
        self,
        package: ModelPackage,
        *,
        device: str = "auto",
        batch_size: int = 16,
        cpu_threads: int = 0,
        fov_crop: bool | None = None,
        output_stride: int | None = None,
        decision: DecisionRule | None = None,
        amp: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ModelError(f"batch_size must be at least 1, got {batch_size}")
        if cpu_threads < 0:
            raise ModelError(f"cpu_threads must be 0 (torch default) or more, got {cpu_threads}")
        self._device = resolve_device(device)
        self._package = package
        card = package.card
        for name, module in (("classifier", package.classifier), ("segmenter", package.segmenter)):
            check_finite(module.state_dict(), f"model {card.name} {card.version}: {name}")
        if output_stride is not None:
            networks.set_output_stride(package.segmenter, output_stride)
        self._output_stride = networks.output_stride_of(package.segmenter)
        self.batch_size = batch_size
        self.fov_crop = card.preprocessing.fov_crop if fov_crop is None else fov_crop
        self.decision = card.decision if decision is None else decision
        self._classifier_preset = card.preset("classifier", fov_crop=self.fov_crop)
        self._segmenter_preset = card.preset("segmenter", fov_crop=self.fov_crop)
        self._cuda = self._device.type == "cuda"
        if cpu_threads and not self._cuda:
            torch.set_num_threads(cpu_threads)
        self._amp_dtype: torch.dtype | None = None
        if self._cuda and amp:
            self._amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            torch.backends.cudnn.benchmark = True
        memory_format = torch.channels_last if self._cuda else torch.contiguous_format
        self._classifier = package.classifier.to(self._device, memory_format=memory_format).eval()
        self._segmenter = package.segmenter.to(self._device, memory_format=memory_format).eval()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gastrolens-preprocess")
        self._lock = threading.Lock()
        logger.info(
            "model %s %s (weights sha256 %s) on %s, batch size %d, output stride %d, fov crop %s, amp %s",
            card.name,
            card.version,
            card.weights_sha256,
            self._device,
            batch_size,
            self._output_stride,
            self.fov_crop,
            self._amp_dtype,
        )
        if package.untrained:
            logger.warning(
                "model %s %s: untrained network(s) %s; every output is marked %r",
                card.name,
                card.version,
                ", ".join(card.untrained_networks),
                UNTRAINED_WARNING,
            )

    @classmethod
    def from_settings(cls, settings: ModelSettings) -> Engine:
        """The daemon's constructor: the configured package, or untrained weights when none."""
        if settings.package is None:
            logger.warning("no model package configured: using untrained weights (%s)", UNTRAINED_WARNING)
            package = untrained_package()
        else:
            package = load_package(settings.package)
        return cls(
            package,
            device=settings.device,
            batch_size=settings.batch_size,
            cpu_threads=settings.cpu_threads,
            fov_crop=settings.fov_crop,
        )

    @classmethod
    def from_path(cls, path: str | Path, **options: object) -> Engine:
        """Load a package folder and build an engine (options as for the constructor)."""
        return cls(load_package(path), **options)  # type: ignore[arg-type]

    @property
    def identity(self) -> ModelIdentity:
        return self._package.identity

    @property
    def card(self) -> ModelCard:
        return self._package.card

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def output_stride(self) -> int:
        return self._output_stride

    @property
    def untrained(self) -> bool:
        return self._package.untrained

    @property
    def untrained_networks(self) -> tuple[str, ...]:
        """Which networks were never trained ("classifier", "segmenter")."""
        return self._package.card.untrained_networks

    def infer(self, images: Sequence[np.ndarray]) -> list[ImageFinding]:
        """Findings for RGB uint8 frames of any sizes, in order.

        Every frame is checked before any work starts; a bad one raises
        :class:`ModelError` naming its index (use :func:`validate_image` per frame to
        set bad frames aside first).
        """
        if len(images) == 0:
            raise ModelError("empty batch: infer() needs at least one image")
        for index, image in enumerate(images):
            validate_image(image, index=index)
        chunks = [list(images[i : i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        with self._lock:
            return [finding for batch in self._pipeline(chunks, validated=True) for finding in batch]

    def infer_stream(self, batches: Iterable[Sequence[np.ndarray]]) -> Iterator[list[ImageFinding]]:
        """Findings per batch for a stream of batches, pre-processing batch n+1 during batch n."""
        return self._pipeline((list(batch) for batch in batches), validated=False)

    def classify_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, 5) for an already pre-processed batch (N, 3, S, S)."""
        with torch.inference_mode(), self._autocast():
            x = self._to_device_input(x)
            return torch.softmax(self._classifier(x).float(), dim=1)

    def segment_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Lesion logits (N, 1, S, S) for an already pre-processed batch (N, 3, S, S)."""
        with torch.inference_mode(), self._autocast():
            x = self._to_device_input(x)
            return self._segmenter(x)["out"].float()

    def close(self) -> None:
        """Stop the pre-processing thread."""
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- pipeline -------------------------------------------------------------------

    def _pipeline(self, chunks: Iterable[list[np.ndarray]], *, validated: bool) -> Iterator[list[ImageFinding]]:
        source = iter(chunks)
        batch = next(source, None)
        pending = self._pool.submit(self._prepare, batch, validated) if batch is not None else None
        while pending is not None:
            try:
                prepared = pending.result()
            except ModelError:
                raise
            except Exception as exc:  # anything else from the pre-processing thread
                raise ModelError(f"pre-processing failed: {exc.__class__.__name__}: {exc}") from exc
            batch = next(source, None)
            pending = self._pool.submit(self._prepare, batch, validated) if batch is not None else None
            yield self._run(prepared)

    def _prepare(self, images: list[np.ndarray], validated: bool) -> _Prepared:
        """Host side: check, find the field of view, crop; on CPU also resize and normalise."""
        start = time.perf_counter()
        if not images:
            raise ModelError("empty batch: infer() needs at least one image")
        if not validated:
            for index, image in enumerate(images):
                validate_image(image, index=index)
        boxes = [self._classifier_preset.crop_box(img) for img in images]
        crops = [self._host_tensor(box.crop(img)) for img, box in zip(images, boxes, strict=True)]
        classifier_input = segmenter_input = None
        if not self._cuda:
            classifier_input, segmenter_input = self._network_inputs(crops)
        shapes = [(int(img.shape[0]), int(img.shape[1])) for img in images]
        return _Prepared(shapes, boxes, crops, classifier_input, segmenter_input, time.perf_counter() - start)

    def _host_tensor(self, crop: np.ndarray) -> torch.Tensor:
        if not self._cuda:
            return torch.from_numpy(np.ascontiguousarray(crop))
        pinned = torch.empty(crop.shape, dtype=torch.uint8, pin_memory=True)
        pinned.numpy()[...] = crop
        return pinned

    def _network_inputs(self, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 crops -> the classifier's and the segmenter's normalised input batches."""
        classifier_inputs, segmenter_inputs = [], []
        for crop in crops:
            image = to_float_tensor(crop.to(self._device, non_blocking=True))
            classifier_inputs.append(self._classifier_preset.finish(image))
            segmenter_inputs.append(self._segmenter_preset.finish(image))
        return self._layout(torch.stack(classifier_inputs)), self._layout(torch.stack(segmenter_inputs))

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self._cuda else x

    def _to_device_input(self, x: torch.Tensor) -> torch.Tensor:
        return self._layout(x.to(self._device, non_blocking=True))

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self._amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self._amp_dtype)

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize(self._device)

    def _run(self, prepared: _Prepared) -> list[ImageFinding]:
        """Device side: networks, then masks at source resolution and the decision rule."""
        n = len(prepared.shapes)
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                probs, logits, timings = self._forward(prepared)
                if not np.isfinite(probs).all():
                    raise ModelError(f"the classifier produced non-finite probabilities for a batch of {n} images")
                findings = [self._finding(prepared, i, probs[i], logits[i, 0], timings) for i in range(n)]
        except RuntimeError as exc:  # torch: out of memory, device errors
            raise ModelError(f"inference failed on a batch of {n} images: {exc}") from exc
        logger.debug("inferred %d images in %.3f s on %s", n, time.perf_counter() - start, self._device)
        return findings

    def _forward(self, prepared: _Prepared) -> tuple[np.ndarray, torch.Tensor, dict[str, float]]:
        """Class probabilities (host, float64), lesion logits (device) and per-image timings."""
        n = len(prepared.shapes)
        start = time.perf_counter()
        if prepared.classifier_input is None or prepared.segmenter_input is None:
            prepared.classifier_input, prepared.segmenter_input = self._network_inputs(prepared.crops)
            self._sync()
        t0 = time.perf_counter()
        with self._autocast():
            probabilities = self._forward_split(self._classifier, prepared.classifier_input, classifier=True)
            self._sync()
            t1 = time.perf_counter()
            logits = self._forward_split(self._segmenter, prepared.segmenter_input, classifier=False)
            self._sync()
            t2 = time.perf_counter()
        timings = {
            "preprocess_s": (prepared.preprocess_s + t0 - start) / n,
            "classifier_s": (t1 - t0) / n,
            "segmenter_s": (t2 - t1) / n,
            "batch_images": float(n),
        }
        return probabilities.cpu().numpy().astype(np.float64), logits, timings

    def _finding(
        self, prepared: _Prepared, i: int, probs: np.ndarray, logits: torch.Tensor, timings: dict[str, float]
    ) -> ImageFinding:
        start = time.perf_counter()
        threshold = probability_to_logit(self.decision.mask_threshold)
        mask = mask_to_source(logits, prepared.boxes[i], prepared.shapes[i], threshold=threshold)
        probabilities = tuple(float(p) for p in probs)
        outcome = decide(probabilities, mask, self.decision)
        return ImageFinding(
            probabilities=probabilities,
            predicted=outcome.predicted,
            lesion_present=outcome.lesion_present,
            mask=outcome.mask,
            lesion_area_fraction=outcome.lesion_area_fraction,
            bbox=outcome.bbox,
            model=self.identity,
            timings={**timings, "postprocess_s": time.perf_counter() - start},
        )

    def _forward_split(self, module: torch.nn.Module, x: torch.Tensor, *, classifier: bool) -> torch.Tensor:
        """Forward a batch; on CUDA out-of-memory retry it in halves before giving up."""
        try:
            out = module(x)
            return torch.softmax(out.float(), dim=1) if classifier else out["out"].float()
        except torch.cuda.OutOfMemoryError:
            if x.shape[0] == 1:
                raise
            torch.cuda.empty_cache()
            half = x.shape[0] // 2
            logger.warning("CUDA out of memory on a batch of %d; retrying in halves", x.shape[0])
            return torch.cat(
                [
                    self._forward_split(module, x[:half], classifier=classifier),
                    self._forward_split(module, x[half:], classifier=classifier),
                ]
            )
