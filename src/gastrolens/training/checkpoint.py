"""Per-epoch training checkpoints: written atomically, read without unpickling code.

A checkpoint holds the network, optimiser, learning-rate schedule and loss-scaler
states, the per-epoch history, the number of epochs completed and a fingerprint (the
recipe without ``epochs``, the manifest's sha256 and the validation split's). Resuming
refuses a checkpoint whose fingerprint differs: a run continued with other data or
another recipe would be neither run.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gastrolens.errors import ModelError
from gastrolens.training.recipe import Recipe

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "gastrolens-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(
    path: Path,
    recipe: Recipe,
    epochs_done: int,
    fingerprint: dict[str, Any],
    history: list[dict[str, Any]],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> None:
    """Write the state after ``epochs_done`` epochs to ``path`` (temporary file + rename)."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "task": recipe.task,
        "epochs_done": epochs_done,
        "epochs_planned": recipe.epochs,
        "fingerprint": fingerprint,
        "history": history,
        "model": {k: v.detach().to("cpu") for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "scaler": scaler.state_dict(),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(state, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise ModelError(f"cannot write checkpoint {path}: {exc}") from exc
    logger.debug("checkpoint %s: %d epoch(s) done", path, epochs_done)


def restore_checkpoint(
    path: Path,
    fingerprint: dict[str, Any],
    recipe: Recipe,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> tuple[int, list[dict[str, Any]]]:
    """Load ``path`` into the given objects; return (epochs done, history)."""
    if not path.is_file():
        raise ModelError(f"cannot resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad or unsafe file
        raise ModelError(f"cannot resume: {path} is not a readable checkpoint ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"cannot resume: {path} is not a GastroLens checkpoint")
    if state.get("format_version") != CHECKPOINT_VERSION:
        raise ModelError(f"cannot resume: {path} has checkpoint format {state.get('format_version')!r}")
    if state["task"] != recipe.task:
        raise ModelError(f"cannot resume: {path} trains the {state['task']}, not the {recipe.task}")
    differences = _differences(state["fingerprint"], fingerprint)
    if differences:
        raise ModelError(
            f"cannot resume from {path}: the run differs in {', '.join(differences)} "
            "(resume with the same manifest and options; only --epochs may change)"
        )
    if state["epochs_planned"] != recipe.epochs:
        logger.warning(
            "resuming with %d epochs instead of %d: the learning-rate schedule changes from here on",
            recipe.epochs,
            state["epochs_planned"],
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    scaler.load_state_dict(state["scaler"])
    done = int(state["epochs_done"])
    logger.info("resuming %s from %s after epoch %d", recipe.task, path, done)
    return done, list(state["history"])


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    names = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names.extend(_differences(a, b, f"{prefix}{key}."))
        elif _normal(a) != _normal(b):
            names.append(f"{prefix}{key}")
    return names


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
