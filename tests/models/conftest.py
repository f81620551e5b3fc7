"""Shared fixtures: tiny untrained packages and synthetic endoscopy frames."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from gastrolens.models.package import ModelPackage, untrained_package

TINY_CLASSIFIER = 64
TINY_SEGMENTER = 65


@pytest.fixture(scope="session")
def _tiny_package() -> ModelPackage:
    return untrained_package(classifier_input_size=TINY_CLASSIFIER, segmenter_input_size=TINY_SEGMENTER)


@pytest.fixture
def tiny_package(_tiny_package: ModelPackage) -> ModelPackage:
    """A fresh copy (an engine takes ownership of its package's networks)."""
    return copy.deepcopy(_tiny_package)


@pytest.fixture
def make_frame() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """The :func:`bordered_frame` maker."""
    return bordered_frame


def bordered_frame(
    rows: int,
    cols: int,
    fov: tuple[int, int, int, int],
    *,
    octagon: bool = True,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A frame with a noisy black border, burned-in text at the left and a FOV at ``fov``.

    ``fov`` is (top, left, bottom, right), exclusive. Returns the frame and the FOV mask.
    The FOV holds a dark lumen in its centre, as real frames do.
    """
    top, left, bottom, right = fov
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 8, (rows, cols, 3), dtype=np.uint8)
    rr, cc = np.mgrid[0:rows, 0:cols]
    cy, cx = (top + bottom - 1) / 2, (left + right - 1) / 2
    ry, rx = (bottom - top) / 2, (right - left) / 2
    dy, dx = np.abs(rr - cy) / ry, np.abs(cc - cx) / rx
    if octagon:
        inside = (dy <= 1) & (dx <= 1) & (dy + dx <= 1.6)
    else:
        inside = dy**2 + dx**2 <= 1
    image[inside] = (180, 90, 70)
    image[(dy / 0.25) ** 2 + (dx / 0.25) ** 2 <= 1] = (5, 3, 2)
    text_rows = max(1, (top + bottom) // 2 // 40)
    for line in range(min(6, text_rows)):
        r0 = 6 + line * 40
        for ch in range(max(1, (left - 20) // 18)):
            c0 = 6 + ch * 18
            image[r0 : r0 + 20, c0 : c0 + 2] = 255
            image[r0 : r0 + 2, c0 : c0 + 10] = 255
    return image, inside


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a shared, busy CPU, torch's threads spin against each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
