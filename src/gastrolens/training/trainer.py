"""The training loop: one network, one recipe, a model package at the end.

* Seeding: the network is initialised from ``recipe.seed``; every epoch reseeds the
  global generators and the data order from (seed, epoch). So a run gives the same
  weights every time on the same machine and software (bit for bit on the CPU; cuDNN
  may choose non-deterministic kernels on a GPU), and a resumed run gives the weights
  the uninterrupted run would have.
* Checkpoints: after every epoch, ``CHECKPOINT_DIR/<task>.pt`` (written atomically)
  holds the network, optimiser, schedule, loss scaler, history and a fingerprint of the
  recipe and data; ``resume=True`` continues from it and refuses a different recipe or
  manifest. Checkpoints are read with ``torch.load(weights_only=True)``.
* Mixed precision on CUDA (bf16 where the device runs it natively, else fp16 with a
  GradScaler; emulated bf16 is never chosen, see :mod:`gastrolens.models.precision`).
* Data loader workers sized to the cores (one per core but one, at most 16, when not
  given): the study's augmentations (ElasticTransform especially, about 250 ms per 512 px
  sample) run on the CPU in the workers, one torch thread each.
* A tqdm bar per epoch (stderr) and one INFO log line per epoch with its metrics.
* Memory: datasets stream from disk; peak memory is the batch's activations (see
  bench/training_memory.py for measured figures).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from gastrolens import __version__
from gastrolens.errors import DatasetError, ModelError
from gastrolens.findings import CLASS_ORDER
from gastrolens.models.engine import resolve_device
from gastrolens.models.networks import build_classifier, build_segmenter, load_imagenet_backbone
from gastrolens.models.package import ModelPackage
from gastrolens.models.precision import amp_dtype
from gastrolens.training import packaging
from gastrolens.training.augment import PairTransform, classifier_augmentation, segmenter_augmentation
from gastrolens.training.checkpoint import restore_checkpoint, save_checkpoint
from gastrolens.training.datasets import ClassificationDataset, SegmentationDataset
from gastrolens.training.manifest import Manifest, ManifestRow, Split, split_by_patient, summarise
from gastrolens.training.metrics import mask_overlap, summarise_segmentation
from gastrolens.training.recipe import Recipe

logger = logging.getLogger(__name__)

@dataclass
class TrainResult:
    """What :func:`train` produced."""

    package: ModelPackage
    history: list[dict[str, Any]]
    checkpoint: Path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % 2**63


def train(
    recipe: Recipe,
    manifest: Manifest,
    out_dir: str | Path,
    *,
    device: str = "auto",
    workers: int | None = 0,
    resume: bool = False,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    name: str | None = None,
    version: str | None = None,
) -> TrainResult:
    """Train ``recipe.task`` on ``manifest`` and write the package into ``out_dir``.

    ``workers``: data loader worker processes; None sizes them to the cores (:func:`loader_workers`).
    """
    workers = loader_workers(workers)
    out = Path(out_dir)
    checkpoints = Path(checkpoint_dir) if checkpoint_dir is not None else out / "checkpoints"
    checkpoint_path = checkpoints / f"{recipe.task}.pt"
    torch_device = resolve_device(device)
    base = packaging.base_package(out, recipe)
    split = _training_split(recipe, manifest)
    preprocessing = base.card.preprocessing
    size = recipe.input_size
    if recipe.task == "classifier":
        augmentation = classifier_augmentation(size, recipe.augmentation) if recipe.augment else None
        train_set: Dataset[Any] = ClassificationDataset(split.train, PairTransform(size, preprocessing, augmentation))
        val_set: Dataset[Any] = ClassificationDataset(split.val, PairTransform(size, preprocessing))
    else:
        augmentation = segmenter_augmentation(size, recipe.augmentation) if recipe.augment else None
        train_set = SegmentationDataset(split.train, PairTransform(size, preprocessing, augmentation))
        val_set = SegmentationDataset(split.val, PairTransform(size, preprocessing))

    seed_everything(recipe.seed)
    model, initialisation = _build(recipe)
    cuda = torch_device.type == "cuda"
    model.to(torch_device, memory_format=torch.channels_last if cuda else torch.contiguous_format)  # type: ignore[call-overload]
    optimizer = _optimizer(recipe, model)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule_factor(recipe))
    amp_dtype = None
    if cuda and recipe.amp:
        amp_dtype = amp_dtype_for(torch_device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)
    fingerprint = {
        "recipe": recipe.fingerprint(),
        "manifest_sha256": manifest.sha256,
        "split": split.fingerprint(),
    }
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resume:
        start_epoch, history = restore_checkpoint(
            checkpoint_path, fingerprint, recipe, model=model, optimizer=optimizer, schedule=schedule, scaler=scaler
        )
    elif checkpoint_path.exists():
        logger.warning("starting a new run: checkpoint %s will be overwritten (use --resume to continue it)",
                       checkpoint_path)

    logger.info(
        "training %s on %s: %d training / %d validation images, input %d px, batch %d, %d epochs, "
        "%s lr %g, device %s%s",
        recipe.task, manifest.path, len(train_set), len(val_set), size, recipe.batch_size, recipe.epochs,  # type: ignore[arg-type]
        recipe.optimizer, recipe.learning_rate, torch_device, f", amp {amp_dtype}" if amp_dtype else "",
    )
    loss_fn = _classifier_loss if recipe.task == "classifier" else _segmenter_loss
    for epoch in range(start_epoch, recipe.epochs):
        seed_everything(_epoch_seed(recipe.seed, epoch))
        started = time.perf_counter()
        learning_rate = optimizer.param_groups[0]["lr"]
        loader = _loader(train_set, recipe, epoch, workers, cuda, shuffle=True)
        bar = tqdm(loader, desc=f"{recipe.task} epoch {epoch + 1}/{recipe.epochs}", unit="batch",
                   disable=not progress, leave=False)
        total_loss, seen = _train_one_epoch(model, bar, loss_fn, optimizer, scaler, torch_device, amp_dtype)
        if not math.isfinite(total_loss):
            raise ModelError(f"{recipe.task} training diverged in epoch {epoch + 1}: the loss is {total_loss}")
        schedule.step()
        train_seconds = time.perf_counter() - started
        if recipe.precise_bn_batches:
            recalibrate_batchnorm(
                model, _loader(train_set, recipe, epoch, workers, cuda, shuffle=True),
                recipe.precise_bn_batches, torch_device, amp_dtype,
            )
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "learning_rate": learning_rate,
            "train_loss": total_loss / max(seen, 1),
            "train_images_per_second": seen / train_seconds if train_seconds else None,
        }
        if len(val_set):  # type: ignore[arg-type]
            record.update(validate(recipe, model, _loader(val_set, recipe, epoch, workers, cuda, shuffle=False),
                                   torch_device, amp_dtype))
        record["seconds"] = time.perf_counter() - started
        history.append(record)
        logger.info("%s epoch %d/%d: %s", recipe.task, epoch + 1, recipe.epochs, _format_record(record))
        save_checkpoint(
            checkpoint_path, recipe, epoch + 1, fingerprint, history,
            model=model, optimizer=optimizer, schedule=schedule, scaler=scaler,
        )

    model.to("cpu", memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]
    training_record = {
        "recipe": recipe.to_dict(),
        "data": {
            "manifest": manifest.path.name,
            "manifest_sha256": manifest.sha256,
            "train": summarise(split.train),
            "validation": summarise(split.val),
            "validation_patients_sha256": split.fingerprint(),
        },
        "epochs_run": len(history),
        "history": history,
        "device": str(torch_device),
        "amp": str(amp_dtype) if amp_dtype else None,
        "software": {"gastrolens": __version__, "torch": torch.__version__},
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    final = {k: v for k, v in (history[-1] if history else {}).items() if k.startswith("val_")}
    package = packaging.with_trained_network(
        base, recipe.task, model, recipe,
        initialisation=initialisation,
        training=training_record,
        metrics={"validation": final, "validation_images": len(val_set)},  # type: ignore[arg-type]
        name=name, version=version,
    )
    packaging.write(package, out)
    return TrainResult(package, history, checkpoint_path)


def _train_one_epoch(
    model: nn.Module,
    batches: tqdm,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> tuple[float, int]:
    """One pass over the training batches (a tqdm bar, maybe disabled); returns (summed loss, images seen)."""
    model.train()
    total_loss = 0.0
    seen = 0
    for inputs, targets in batches:
        inputs = _to_device(inputs, device)
        targets = targets.to(device, non_blocking=True)
        with _autocast(amp_dtype):
            loss = loss_fn(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        value = loss.item()
        if not math.isfinite(value):
            return value, seen
        total_loss += value * inputs.shape[0]
        seen += inputs.shape[0]
        batches.set_postfix(loss=f"{value:.4f}")
    batches.close()
    return total_loss, seen


def _training_split(recipe: Recipe, manifest: Manifest) -> Split:
    rows: list[ManifestRow] = list(manifest.rows)
    if recipe.task == "segmenter":
        rows = [row for row in rows if row.has_mask_truth]
        if not any(row.mask is not None for row in rows):
            raise DatasetError(f"{manifest.path}: no row has a mask; the segmenter needs outlined lesions")
    split = split_by_patient(rows, recipe.val_fraction, recipe.seed)
    if len(split.train) < 2:
        raise DatasetError(
            f"{manifest.path}: {len(split.train)} training image(s) for the {recipe.task}; need 2 or more")
    if recipe.task == "classifier":
        present = {row.label for row in split.train}
        missing = [c.value for c in CLASS_ORDER if c not in present]
        if missing:
            logger.warning("no training images of class(es) %s: the classifier cannot learn them", ", ".join(missing))
    if not split.val:
        logger.warning("no validation images: per-epoch validation metrics are skipped")
    return split


def _build(recipe: Recipe) -> tuple[nn.Module, str]:
    model = build_classifier() if recipe.task == "classifier" else build_segmenter(recipe.output_stride)
    if recipe.imagenet is None:
        return model, f"random(seed={recipe.seed})"
    load_imagenet_backbone(model, recipe.imagenet)
    return model, f"imagenet({Path(recipe.imagenet).name})"


def _optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=recipe.learning_rate, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )


def _schedule_factor(recipe: Recipe) -> Callable[[int], float]:
    """Learning-rate multiplier per epoch (LambdaLR steps once per epoch)."""
    epochs, step, gamma = recipe.epochs, recipe.step_epochs, recipe.step_gamma
    if recipe.schedule == "cosine":
        return lambda epoch: 0.5 * (1.0 + math.cos(math.pi * min(epoch, epochs) / epochs))
    if recipe.schedule == "step":
        return lambda epoch: gamma ** (epoch // step)
    return lambda epoch: 1.0


def loader_workers(setting: int | None, cpus: int | None = None) -> int:
    """Data loader workers: ``setting`` when given, else one per core but one (the training
    loop's own), at most 16; 0 on a single core (load in the main process)."""
    if setting is not None:
        return setting
    cores = cpus if cpus is not None else (os.cpu_count() or 1)
    return max(0, min(16, cores - 1))


def amp_dtype_for(device: torch.device) -> torch.dtype | None:
    """bf16 where ``device`` runs it natively, else fp16 (with a GradScaler); None off CUDA."""
    return amp_dtype("auto", device)


def _one_torch_thread(worker_id: int) -> None:
    """Each loader worker computes its augmentations on one thread: the workers are the parallelism."""
    torch.set_num_threads(1)


def _loader(
    dataset: Dataset[Any], recipe: Recipe, epoch: int, workers: int, cuda: bool, *, shuffle: bool
) -> DataLoader:
    size = len(dataset)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(_epoch_seed(recipe.seed, epoch) + (0 if shuffle else 1))
    return DataLoader(
        dataset,
        batch_size=recipe.batch_size,
        shuffle=shuffle,
        # BatchNorm cannot train on a batch of one: drop a last batch of one image.
        drop_last=shuffle and size % recipe.batch_size == 1,
        num_workers=workers,
        worker_init_fn=_one_torch_thread if workers else None,
        pin_memory=cuda,
        generator=generator,
        persistent_workers=False,
    )


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def _autocast(dtype: torch.dtype | None) -> torch.autocast:
    if dtype is None:
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cuda", dtype=dtype)


def _classifier_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(inputs).float(), targets)


def _segmenter_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return segmentation_loss(model(inputs)["out"].float(), targets)


def segmentation_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE plus soft Dice over the batch (our choice; the study names no loss)."""
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    probabilities = torch.sigmoid(logits)
    intersection = (probabilities * targets).sum()
    dice = 1.0 - (2.0 * intersection + 1.0) / (probabilities.sum() + targets.sum() + 1.0)
    return bce + dice


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, loader: DataLoader, batches: int, device: torch.device, amp_dtype: torch.dtype | None
) -> None:
    """Re-estimate BatchNorm running statistics with the current weights ("precise BN")."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not layers:
        return
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the batches below
    model.train()
    for index, (inputs, _) in enumerate(loader):
        if index >= batches:
            break
        if inputs.shape[0] < 2:
            continue
        with _autocast(amp_dtype):
            model(_to_device(inputs, device))
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum


@torch.no_grad()
def validate(
    recipe: Recipe, model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None
) -> dict[str, Any]:
    """Validation loss and the task's headline figures at network resolution.

    Classifier: top-1 accuracy and balanced accuracy over the five outputs (the decision
    rule and per-lesion counts are ``gastrolens evaluate``'s job). Segmenter: IoU of the
    mask at probability 0.5, mean over outlined images and pooled.
    """
    model.eval()
    losses, count = 0.0, 0
    truth: list[int] = []
    predicted: list[int] = []
    inter: list[int] = []
    union: list[int] = []
    area: list[int] = []
    for inputs, targets in loader:
        inputs = _to_device(inputs, device)
        targets = targets.to(device)
        with _autocast(amp_dtype):
            if recipe.task == "classifier":
                logits = model(inputs).float()
                loss = F.cross_entropy(logits, targets)
                truth.extend(targets.tolist())
                predicted.extend(logits.argmax(1).tolist())
            else:
                logits = model(inputs)["out"].float()
                loss = segmentation_loss(logits, targets)
                masks = (logits > 0).cpu().numpy()
                for m, t in zip(masks, targets.cpu().numpy() > 0.5, strict=True):
                    i, u = mask_overlap(m, t)
                    inter.append(i)
                    union.append(u)
                    area.append(int(t.sum()))
        losses += float(loss) * inputs.shape[0]
        count += inputs.shape[0]
    record: dict[str, Any] = {"val_loss": losses / max(count, 1)}
    if recipe.task == "classifier":
        t = np.asarray(truth)
        p = np.asarray(predicted)
        recalls = [float((p[t == k] == k).mean()) for k in range(len(CLASS_ORDER)) if (t == k).any()]
        record["val_accuracy"] = float((t == p).mean()) if t.size else None
        record["val_balanced_accuracy"] = float(np.mean(recalls)) if recalls else None
    else:
        summary = summarise_segmentation(inter, union, area)
        record["val_mean_iou"] = summary.mean_iou
        record["val_pooled_iou"] = summary.pooled_iou
    return record


def _format_record(record: dict[str, Any]) -> str:
    parts = []
    for key, value in record.items():
        if key == "epoch" or value is None:
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return ", ".join(parts)
