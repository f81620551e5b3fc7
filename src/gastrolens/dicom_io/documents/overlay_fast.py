"""The overlay drawing of :func:`overlay.draw_overlay`, pixel for pixel, at a fraction of the cost.

The reference draws on the whole frame: it filters the whole mask for the outline, and
converts and composites the whole picture in RGBA to blend a few text boxes. Here the
outline is filtered only around the lesion (with a margin wider than the filter, so every
pixel sees the same neighbourhood), the boxes are drawn and blended only where they are
(boxes that touch are drawn into one layer, as the reference does, so no pixel is blended
twice), and text measurements are cached. The same Pillow operations run on the same
pixels, so the result is identical; tests/dicom_io/documents/test_overlay.py checks that.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import cast

import numpy as np
from PIL import Image, ImageDraw

from gastrolens import UNTRAINED_WARNING
from gastrolens.dicom_io.documents.common import model_label
from gastrolens.dicom_io.documents.overlay import (
    BOX_RGBA,
    LABEL_TEXT_RGB,
    OUTLINE_RGB,
    WARNING_TEXT_RGB,
    _font,
    _label_position,
    label_text,
)
from gastrolens.findings import ImageFinding, ModelIdentity

_MEASURE = ImageDraw.Draw(Image.new("RGBA", (1, 1)))


@dataclass(frozen=True, kw_only=True)
class _Box:
    """A filled box with text, in frame coordinates (inclusive corners, as ImageDraw)."""

    x0: int
    y0: int
    x1: int
    y1: int
    text: str
    text_xy: tuple[int, int]
    size: int
    colour: tuple[int, int, int]


@functools.lru_cache(maxsize=4096)
def _fitted(text: str, max_width: int, size: int) -> tuple[int, tuple[int, int, int, int]]:
    """Font size and text box, as :func:`overlay._fitted_font` chooses them."""
    while size > 6:
        box = _int_box(_MEASURE.textbbox((0, 0), text, font=_font(size)))
        if box[2] - box[0] <= max_width:
            return size, box
        size -= 1
    return 6, _int_box(_MEASURE.textbbox((0, 0), text, font=_font(6)))


def _int_box(box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """textbbox gives whole pixels for Pillow's fonts (typed as floats); kept as they
    are, since the reference uses them as they are."""
    return cast(tuple[int, int, int, int], box)


def _boxes(finding: ImageFinding, model: ModelIdentity, rows: int, cols: int) -> list[_Box]:
    short = min(rows, cols)
    pad = max(1, round(short / 120))
    label = label_text(finding)
    size, (left, top, right, bottom) = _fitted(label, cols - 4 * pad, max(8, round(short / 20)))
    width, height = right - left + 2 * pad, bottom - top + 2 * pad
    x, y = _label_position(finding, cols, rows, width, height, pad)
    boxes = [_Box(x0=x, y0=y, x1=x + width, y1=y + height, text=label,
                  text_xy=(x + pad - left, y + pad - top), size=size, colour=LABEL_TEXT_RGB)]
    lines = [(f"{model_label(model)}  sha256 {model.weights_sha256[:12]}", LABEL_TEXT_RGB)]
    if model.untrained:
        lines.insert(0, (UNTRAINED_WARNING, WARNING_TEXT_RGB))
    y = rows
    for text, colour in reversed(lines):
        size, (left, top, right, bottom) = _fitted(text, cols - 4 * pad, max(8, round(short / 28)))
        height = bottom - top + 2 * pad
        y -= height
        boxes.append(_Box(x0=0, y0=y, x1=right - left + 2 * pad, y1=y + height, text=text,
                          text_xy=(pad - left, y + pad - top), size=size, colour=colour))
    return boxes


def _touch(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def _groups(boxes: list[_Box]) -> list[list[_Box]]:
    """Boxes that touch, in drawing order within each group (one layer per group)."""
    groups: list[tuple[tuple[int, int, int, int], list[_Box]]] = []
    for box in boxes:
        bounds = (box.x0, box.y0, box.x1, box.y1)
        merged = [g for g in groups if _touch(g[0], bounds)]
        members = [b for g in merged for b in g[1]] + [box]
        members.sort(key=boxes.index)
        groups = [g for g in groups if g not in merged]
        union = (min(b.x0 for b in members), min(b.y0 for b in members),
                 max(b.x1 for b in members), max(b.y1 for b in members))
        groups.append((union, members))
    return [members for _, members in groups]


def _blend(out: np.ndarray, members: Iterable[_Box]) -> None:
    members = list(members)
    rows, cols = out.shape[:2]
    x0, y0 = max(0, min(b.x0 for b in members)), max(0, min(b.y0 for b in members))
    x1, y1 = min(cols, max(b.x1 for b in members) + 1), min(rows, max(b.y1 for b in members) + 1)
    if x1 <= x0 or y1 <= y0:
        return
    shifted = tuple(
        replace(b, x0=b.x0 - x0, y0=b.y0 - y0, x1=b.x1 - x0, y1=b.y1 - y0,
                text_xy=(b.text_xy[0] - x0, b.text_xy[1] - y0))
        for b in members
    )
    crop = Image.fromarray(out[y0:y1, x0:x1]).convert("RGBA")
    out[y0:y1, x0:x1] = np.asarray(Image.alpha_composite(crop, _layer(shifted, x1 - x0, y1 - y0)).convert("RGB"))


@functools.lru_cache(maxsize=1024)
def _layer(boxes: tuple[_Box, ...], width: int, height: int) -> Image.Image:
    """The boxes and their text on a transparent layer (labels repeat: cached)."""
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for box in boxes:
        draw.rectangle((box.x0, box.y0, box.x1, box.y1), fill=BOX_RGBA)
        draw.text(box.text_xy, box.text, font=_font(box.size), fill=box.colour)
    return layer


def outline_fast(mask: np.ndarray, thickness: int) -> np.ndarray:
    """:func:`overlay.outline` in numpy: Pillow's square Max/Min filters over an image
    whose edges are repeated outwards, as ``RankFilter`` expands it."""
    radius = max(1, thickness // 2)
    padded = np.pad(np.asarray(mask, dtype=bool), radius, mode="edge")
    edge: np.ndarray = _square(padded, radius, np.logical_or) != _square(padded, radius, np.logical_and)
    return edge


def _square(padded: np.ndarray, radius: int, op: np.ufunc) -> np.ndarray:
    width = 2 * radius
    rows, cols = padded.shape[0] - width, padded.shape[1] - width
    across = padded[:, 0:cols].copy()
    for shift in range(1, width + 1):
        op(across, padded[:, shift : shift + cols], out=across)
    out = across[0:rows].copy()
    for shift in range(1, width + 1):
        op(out, across[shift : shift + rows], out=out)
    return out


def draw_overlay_fast(frame: np.ndarray, finding: ImageFinding, model: ModelIdentity) -> np.ndarray:
    """What :func:`overlay.draw_overlay` returns for the same arguments."""
    rows, cols = frame.shape[:2]
    out = np.array(frame, dtype=np.uint8, copy=True)
    if finding.lesion_present and finding.mask.any():
        thickness = max(2, round(min(rows, cols) / 100))
        margin = 2 * max(1, thickness // 2) + 2
        hit_rows = np.flatnonzero(finding.mask.any(axis=1))
        hit_cols = np.flatnonzero(finding.mask.any(axis=0))
        r0, r1 = max(0, int(hit_rows[0]) - margin), min(rows, int(hit_rows[-1]) + 1 + margin)
        c0, c1 = max(0, int(hit_cols[0]) - margin), min(cols, int(hit_cols[-1]) + 1 + margin)
        edge = outline_fast(finding.mask[r0:r1, c0:c1], thickness)
        out[r0:r1, c0:c1][edge] = OUTLINE_RGB
    for members in _groups(_boxes(finding, model, rows, cols)):
        _blend(out, members)
    return out
