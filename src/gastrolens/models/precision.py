"""Which precision the networks are served in, and proof that a package survives it.

``torch.cuda.is_bf16_supported()`` answers True where bf16 is only *emulated* (V100,
T4: compute capability 7.x), which is slow and hides the fp16 path; so the engine asks
about its own device without emulation. ``[model] amp`` decides:

* ``auto``: bf16 where the device runs it natively (compute capability >= 8.0), else fp16;
* ``fp16`` / ``bf16``: that dtype (bf16 on a device without native support is refused);
* ``off``: fp32.

On the CPU the networks always run in fp32 (autocast is a GPU feature here).

A package trained in fp32 may overflow in fp16 (activations above 65,504 become inf)
or lose its decisions to rounding. :func:`check_served_precision` runs a fixed probe
through both networks in fp32 and in the serving precision and refuses the package
when the served outputs are not finite or differ beyond a tolerance.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from gastrolens.errors import ModelError, ModelPackageError

logger = logging.getLogger(__name__)

AmpSetting = Literal["auto", "off", "fp16", "bf16"]
AMP_SETTINGS: tuple[str, ...] = ("auto", "off", "fp16", "bf16")

PROBE_TOLERANCE = 0.05
"""Largest difference of a class probability or a lesion sigmoid between fp32 and served."""


def native_bf16(device: torch.device) -> bool:
    """True when ``device`` computes bf16 in hardware (not emulated)."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(index):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # a torch without the keyword: ask the compute capability
            return torch.cuda.get_device_capability(index) >= (8, 0)


def amp_dtype(setting: str | bool, device: torch.device, *, bf16: Callable[[torch.device], bool] = native_bf16
              ) -> torch.dtype | None:
    """The autocast dtype for ``setting`` on ``device``; None means fp32.

    ``True``/``False`` are accepted as ``auto``/``off`` (the engine's old boolean).
    ``bf16`` answers whether the device runs bf16 natively (injectable for tests).
    """
    if setting is True:
        setting = "auto"
    elif setting is False:
        setting = "off"
    if setting not in AMP_SETTINGS:
        raise ModelError(f"amp {setting!r} is not one of {', '.join(AMP_SETTINGS)}")
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "fp16":
        return torch.float16
    native = bf16(device)
    if setting == "bf16":
        if not native:
            raise ModelError(f"amp 'bf16' requested but {device} has no native bf16 (compute capability < 8.0); "
                             "use 'fp16' or 'auto'")
        return torch.bfloat16
    return torch.bfloat16 if native else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[object]:
    """Autocast to ``dtype`` on ``device``'s type, or nothing for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def probe_batch(size: int, device: torch.device, *, seed: int = 0) -> torch.Tensor:
    """A fixed batch of two normalised-looking inputs (z-scores), the same on every machine."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((2, 3, size, size), generator=generator)
    x[1] *= 3.0  # one bright, high-contrast input as well
    return x.to(device)


def check_served_precision(
    classifier: nn.Module,
    segmenter: nn.Module,
    *,
    classifier_size: int,
    segmenter_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
    what: str,
    tolerance: float = PROBE_TOLERANCE,
) -> float:
    """Refuse a package whose networks misbehave in the precision they are served in.

    fp32 serving only checks that the probe's outputs are finite. Returns the largest
    difference seen (0.0 in fp32). Raises :class:`ModelPackageError` naming the network.
    """
    worst = 0.0
    probes = (("classifier", classifier, classifier_size), ("segmenter", segmenter, segmenter_size))
    with torch.inference_mode():
        for name, module, size in probes:
            x = probe_batch(size, device)
            reference = _squash(name, module(x))
            if not bool(torch.isfinite(reference).all()):
                raise ModelPackageError(f"{what}: the {name} gives non-finite outputs in fp32 on a probe input")
            if dtype is None:
                continue
            with autocast(device, dtype):
                served = _squash(name, module(x))
            if not bool(torch.isfinite(served).all()):
                raise ModelPackageError(
                    f"{what}: the {name} overflows in {_name(dtype)} (non-finite outputs on a probe input); "
                    "serve it with [model] amp = \"off\" or another precision")
            difference = float((served - reference).abs().max())
            if difference > tolerance:
                raise ModelPackageError(
                    f"{what}: the {name} differs by {difference:.3f} between fp32 and {_name(dtype)} on a probe "
                    f"input (tolerance {tolerance}); serve it with [model] amp = \"off\"")
            worst = max(worst, difference)
    logger.info("%s: validated in %s (largest difference from fp32 %.4f)", what, _name(dtype), worst)
    return worst


def _squash(name: str, output: object) -> torch.Tensor:
    """Probabilities in [0, 1] so that one tolerance fits both networks."""
    if name == "classifier":
        assert isinstance(output, torch.Tensor)
        return torch.softmax(output.float(), dim=1)
    assert isinstance(output, dict)
    return torch.sigmoid(output["out"].float())


def _name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
