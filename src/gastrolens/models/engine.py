"""The batch inference engine: RGB frames in, one :class:`ImageFinding` per frame out.

The engine loads both networks once and keeps them on its device. ``infer`` splits the
frames into batches of ``batch_size`` and pipelines them: a background thread validates
and packs the next batch while the current one runs through the networks.

On CUDA a batch's frames travel in one non-blocking copy from pinned memory, and the
field of view, the crops, resizing, normalisation and the masks' measuring all run on
the GPU for the whole batch (:mod:`gastrolens.models.batching`). The networks run in
channels_last under autocast as ``[model] amp`` says (:mod:`gastrolens.models.precision`;
the package is validated in that precision when the engine starts). Results do not
depend on how images are batched: chunks are padded to one batch shape and cuDNN runs
deterministic algorithms without autotuning. On the CPU the pre-processing runs in the
background thread and ``cpu_threads`` sets torch's thread count (process-wide).

Failures: a CUDA out-of-memory error retries the batch in halves (outside the
``except`` block, so the failed attempt's activations are freed first); an error that
leaves the device unusable raises :class:`~gastrolens.errors.DeviceError` instead of
failing images one by one.

Every finding names the model (:attr:`Engine.identity`); ``finding.model.untrained``
tells the writers to print :data:`gastrolens.UNTRAINED_WARNING`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gastrolens import UNTRAINED_WARNING, metrics
from gastrolens.config.schema import ModelSettings
from gastrolens.errors import DeviceError, ModelError
from gastrolens.findings import ImageFinding, ModelIdentity
from gastrolens.models import networks
from gastrolens.models.batching import (
    MeasuredMask,
    Normaliser,
    Packed,
    Staging,
    fov_boxes,
    masks_to_host,
    network_inputs,
    pad_batch,
)
from gastrolens.models.decision import DecisionRule, decide
from gastrolens.models.package import (
    ModelCard,
    ModelPackage,
    check_finite,
    load_package,
    untrained_package,
)
from gastrolens.models.precision import amp_dtype, autocast, check_served_precision
from gastrolens.models.preprocess import CropBox, probability_to_logit, validate_image

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


_STICKY_MARKERS = (
    "cuda error",
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
    "cublas_status_execution_failed",
    "cublas_status_internal_error",
    "cudnn_status_execution_failed",
    "cudnn_status_internal_error",
    "uncorrectable ecc error",
    "misaligned address",
)


def is_sticky_device_error(exc: BaseException) -> bool:
    """True for errors after which the CUDA context is unusable (every later call fails too).

    Out of memory is not one of them: it passes once memory is freed.
    """
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(marker in message for marker in _STICKY_MARKERS)


def forward_in_halves(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``run(x)``; on CUDA out-of-memory, ``run`` on each half and join the results.

    The retry starts after the ``except`` block has ended: inside it the exception's
    traceback would keep the failed attempt's frames, and with them its activations, alive.
    """
    try:
        return run(x)
    except torch.cuda.OutOfMemoryError:
        if x.shape[0] == 1:
            raise
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        torch.cuda.empty_cache()
    half = x.shape[0] // 2
    logger.warning("CUDA out of memory on a batch of %d; retrying in halves", x.shape[0])
    first = forward_in_halves(run, x[:half])
    return torch.cat([first, forward_in_halves(run, x[half:])])


def use_deterministic_kernels() -> None:
    """cuDNN without autotuning and with deterministic algorithms (process-wide).

    Autotuning (``benchmark``) may pick a different algorithm per input shape and run,
    so the same image and weights could give different bits; output UIDs promise the
    same content for the same inputs and weights.
    """
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


@dataclass
class _Prepared:
    """One batch after host-side pre-processing."""

    shapes: list[tuple[int, int]]
    packed: Packed
    boxes: list[CropBox] | None
    inputs: list[torch.Tensor] | None
    preprocess_s: float


class Engine:
    """Runs the classifier and the segmenter on batches of RGB frames.

    The engine takes ownership of the package's networks: it moves them to its device,
    sets eval mode and, with ``output_stride``, reconfigures the segmenter.
    ``fov_crop`` and ``decision`` default to the model card's. ``amp`` is ``[model] amp``
    (``auto``, ``off``, ``fp16``, ``bf16``; ignored on the CPU). ``pad_batches`` pads
    every chunk to ``batch_size`` images (default: on CUDA, where kernels depend on shapes).
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
        amp: str | bool = "auto",
        pad_batches: bool | None = None,
    ) -> None:
        if batch_size < 1:
            raise ModelError(f"batch_size must be at least 1, got {batch_size}")
        if cpu_threads < 0:
            raise ModelError(f"cpu_threads must be 0 (torch default) or more, got {cpu_threads}")
        self._device = resolve_device(device)
        self._package = package
        card = package.card
        what = f"model {card.name} {card.version}"
        for name, module in (("classifier", package.classifier), ("segmenter", package.segmenter)):
            check_finite(module.state_dict(), f"{what}: {name}")
        if output_stride is not None:
            networks.set_output_stride(package.segmenter, output_stride)
        self._output_stride = networks.output_stride_of(package.segmenter)
        self.batch_size = batch_size
        self.fov_crop = card.preprocessing.fov_crop if fov_crop is None else fov_crop
        self.decision = card.decision if decision is None else decision
        self._classifier_preset = card.preset("classifier", fov_crop=self.fov_crop)
        self._segmenter_preset = card.preset("segmenter", fov_crop=self.fov_crop)
        self._cuda = self._device.type == "cuda"
        self.pad_batches = self._cuda if pad_batches is None else pad_batches
        if cpu_threads and not self._cuda:
            torch.set_num_threads(cpu_threads)
        use_deterministic_kernels()
        self.amp_dtype = amp_dtype(amp, self._device)
        memory_format = torch.channels_last if self._cuda else torch.contiguous_format
        self._classifier = package.classifier.to(self._device, memory_format=memory_format).eval()  # type: ignore[call-overload]
        self._segmenter = package.segmenter.to(self._device, memory_format=memory_format).eval()  # type: ignore[call-overload]
        if self.amp_dtype is not None:
            check_served_precision(
                self._classifier, self._segmenter, classifier_size=self._classifier_preset.size,
                segmenter_size=self._segmenter_preset.size, device=self._device, dtype=self.amp_dtype, what=what)
        self._normaliser = Normaliser(self._classifier_preset.normalisation, self._device)
        self._segmenter_normaliser = (
            self._normaliser if self._segmenter_preset.normalisation == self._classifier_preset.normalisation
            else Normaliser(self._segmenter_preset.normalisation, self._device))
        self._staging = Staging(self._device)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gastrolens-preprocess")
        self._lock = threading.Lock()
        logger.info(
            "model %s %s (weights sha256 %s) on %s, batch size %d%s, output stride %d, fov crop %s, amp %s",
            card.name,
            card.version,
            card.weights_sha256,
            self._device,
            batch_size,
            " (padded)" if self.pad_batches else "",
            self._output_stride,
            self.fov_crop,
            self.amp_dtype,
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
            amp=settings.amp,
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

    @property
    def host_copies(self) -> int:
        """Host-to-device copies of frames so far (one per batch on CUDA, none on the CPU)."""
        return self._staging.copies

    def infer(self, images: Sequence[np.ndarray]) -> list[ImageFinding]:
        """Findings for RGB uint8 frames of any sizes, in order.

        Every frame is checked before any work starts; a bad one raises
        :class:`ModelError` naming its index (use :func:`validate_image` per frame to
        set bad frames aside first). A device that failed for good raises
        :class:`~gastrolens.errors.DeviceError`.
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
        with torch.inference_mode(), autocast(self._device, self.amp_dtype):
            x = self._to_device_input(x)
            return torch.softmax(self._classifier(x).float(), dim=1)

    def segment_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Lesion logits (N, 1, S, S) for an already pre-processed batch (N, 3, S, S)."""
        with torch.inference_mode(), autocast(self._device, self.amp_dtype):
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
        """Host side: check and pack; on the CPU also find the field of view, crop, resize, normalise.

        Runs in the engine's own thread, so its CPU time is counted toward the ``infer`` stage here.
        """
        with metrics.stage_cpu(metrics.Stage.INFER):
            return self._prepare_batch(images, validated)

    def _prepare_batch(self, images: list[np.ndarray], validated: bool) -> _Prepared:
        start = time.perf_counter()
        if not images:
            raise ModelError("empty batch: infer() needs at least one image")
        if not validated:
            for index, image in enumerate(images):
                validate_image(image, index=index)
        packed = self._staging.pack(images)
        boxes = inputs = None
        if not self._cuda:
            boxes = [self._classifier_preset.crop_box(image) for image in images]
            inputs = self._network_inputs(self._staging.upload(packed), boxes)
        return _Prepared(packed.shapes, packed, boxes, inputs, time.perf_counter() - start)

    def _network_inputs(self, frames: Sequence[torch.Tensor], boxes: Sequence[CropBox]) -> list[torch.Tensor]:
        classifier, segmenter = self._classifier_preset, self._segmenter_preset
        if self._segmenter_normaliser is self._normaliser:
            inputs = network_inputs(frames, boxes, [classifier.size, segmenter.size], self._normaliser)
        else:
            inputs = [network_inputs(frames, boxes, [classifier.size], self._normaliser)[0],
                      network_inputs(frames, boxes, [segmenter.size], self._segmenter_normaliser)[0]]
        return [self._layout(x) for x in inputs]

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self._cuda else x

    def _to_device_input(self, x: torch.Tensor) -> torch.Tensor:
        return self._layout(x.to(self._device, non_blocking=True))

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize(self._device)

    def _run(self, prepared: _Prepared) -> list[ImageFinding]:
        """Device side: networks, then masks at source resolution and the decision rule."""
        n = len(prepared.shapes)
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                findings = self._run_batch(prepared)
        except ModelError:
            raise
        except RuntimeError as exc:  # torch: out of memory, device errors
            if is_sticky_device_error(exc):
                raise DeviceError(f"the device {self._device} failed on a batch of {n} images and must be "
                                  f"restarted: {exc}") from exc
            raise ModelError(f"inference failed on a batch of {n} images: {exc}") from exc
        logger.debug("inferred %d images in %.3f s on %s", n, time.perf_counter() - start, self._device)
        return findings

    def _run_batch(self, prepared: _Prepared) -> list[ImageFinding]:
        n = len(prepared.shapes)
        start = time.perf_counter()
        boxes, inputs = prepared.boxes, prepared.inputs
        if boxes is None or inputs is None:
            frames = self._staging.upload(prepared.packed)
            if self.fov_crop:
                boxes = fov_boxes(frames, threshold=self._classifier_preset.fov_threshold)
            else:
                boxes = [CropBox(0, 0, h, w) for h, w in prepared.shapes]
            inputs = self._network_inputs(frames, boxes)
            self._sync()
        t0 = time.perf_counter()
        rows = self.batch_size if self.pad_batches else n
        with autocast(self._device, self.amp_dtype):
            probabilities = self._forward(self._classifier, pad_batch(inputs[0], rows), classifier=True)[:n]
            self._sync()
            t1 = time.perf_counter()
            logits = self._forward(self._segmenter, pad_batch(inputs[1], rows), classifier=False)[:n]
            self._sync()
            t2 = time.perf_counter()
        probs = probabilities.cpu().numpy().astype(np.float64)
        if not np.isfinite(probs).all():
            raise ModelError(f"the classifier produced non-finite probabilities for a batch of {n} images")
        threshold = probability_to_logit(self.decision.mask_threshold)
        masks = masks_to_host(logits, boxes, prepared.shapes, threshold=threshold)
        t3 = time.perf_counter()
        timings = {
            "preprocess_s": (prepared.preprocess_s + t0 - start) / n,
            "classifier_s": (t1 - t0) / n,
            "segmenter_s": (t2 - t1) / n,
            "batch_images": float(n),
        }
        return [self._finding(probs[i], masks[i], timings, (t3 - t2) / n) for i in range(n)]

    def _finding(self, probs: np.ndarray, measured: MeasuredMask, timings: dict[str, float], masks_s: float
                 ) -> ImageFinding:
        start = time.perf_counter()
        probabilities = tuple(float(p) for p in probs)
        outcome = decide(probabilities, measured.mask, self.decision, measured=(measured.pixels, measured.bbox))
        return ImageFinding(
            probabilities=probabilities,
            predicted=outcome.predicted,
            lesion_present=outcome.lesion_present,
            mask=outcome.mask,
            lesion_area_fraction=outcome.lesion_area_fraction,
            bbox=outcome.bbox,
            model=self.identity,
            timings={**timings, "postprocess_s": masks_s + time.perf_counter() - start},
        )

    def _forward(self, module: torch.nn.Module, x: torch.Tensor, *, classifier: bool) -> torch.Tensor:
        """Class probabilities or lesion logits (float32) for a batch, in halves on out-of-memory."""

        def run(batch: torch.Tensor) -> torch.Tensor:
            out = module(batch)
            result: torch.Tensor = torch.softmax(out.float(), dim=1) if classifier else out["out"].float()
            return result

        return forward_in_halves(run, x)
