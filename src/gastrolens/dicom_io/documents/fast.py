"""The fast path: SEG, image SR and overlay from byte templates built by the reference path.

The reference builders (:mod:`seg`, :mod:`sr`, :mod:`overlay`; highdicom for SEG and
SR) stay the definition of every object. For each *structure* (what changes the shape
of the object: the model, the source's SOP class, size, frames, character set, which
attributes it carries, and per frame the predicted class and whether it has a segment)
they build one object from sentinel inputs (:mod:`template`), which is compiled once and
kept in an LRU cache. Each image then only computes its own values (UIDs, probabilities,
copied source attributes, packed mask bits, drawn pixels) and joins bytes.

tests/dicom_io/documents/test_fast_equivalence.py builds every object both ways over a
matrix of sources and compares the whole attribute trees.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from gastrolens.dicom_io.documents import jpeg
from gastrolens.dicom_io.documents.common import source_header, source_was_lossy
from gastrolens.dicom_io.documents.overlay import build_overlay
from gastrolens.dicom_io.documents.overlay_fast import draw_overlay_fast
from gastrolens.dicom_io.documents.seg import (
    build_segmentation,
    dimension_organization_uid,
    lesion_frames,
    segment_tracking_uid,
)
from gastrolens.dicom_io.documents.sr import build_image_sr
from gastrolens.dicom_io.documents.template import (
    PIXELS,
    Template,
    TemplateError,
    compile_template,
    render,
)
from gastrolens.dicom_io.documents.uids import derived_uid, instance_uid, series_uid
from gastrolens.findings import CLASS_ORDER, ImageFinding, LesionClass, ModelIdentity, OutputKind

logger = logging.getLogger(__name__)

CACHE_SIZE = 128
_SENTINEL_VRS = frozenset({"UI", "PN", "LO", "SH", "LT", "ST", "UT", "DA", "TM", "DT"})
_STRUCTURAL_IS = frozenset({"NumberOfFrames", "RepresentativeFrameNumber"})
_SENTINEL_NUMBERS = frozenset({"PatientAge", "PatientWeight", "PatientSize", "LossyImageCompressionRatio"})
"""AS and DS values that differ per image (in the key they would make every image a new structure)."""
_NEVER_SENTINEL = frozenset({"SOPClassUID", "SpecificCharacterSet"})
_NOT_IN_KEY = frozenset({"PixelData", "FloatPixelData", "DoubleFloatPixelData"})
OVERLAY_RATIO = "overlay:lossy-ratio"
"""The slot of a JPEG overlay's own compression ratio (computed when its frames are encoded)."""


@dataclass(frozen=True, kw_only=True)
class BuiltObject:
    """One encoded output, ready to be written."""

    kind: OutputKind
    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    parts: tuple[bytes | memoryview, ...]
    """The file's bytes, to be written in order."""


class _Cache:
    """Compiled templates by structure; None marks a structure the template path refused.

    A structure is compiled the *second* time it is seen: compiling costs about three
    reference builds, which pays off after a few images but not for a structure seen
    once (a long multi-frame clip whose per-frame classes never repeat). The first
    sighting is built by the reference path. Thread-safe (the daemon may build outputs
    in threads when it has no worker processes); two threads missing the same key both
    compile it, which is harmless.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[tuple[Any, ...], Template | None] = OrderedDict()
        self._seen: OrderedDict[tuple[Any, ...], None] = OrderedDict()
        self._lock = threading.Lock()
        self.misses = 0
        """How many templates were compiled (or refused while compiling)."""

    def get(self, key: tuple[Any, ...], make: Callable[[], Template | None]) -> Template | None | NotYet:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            if key not in self._seen:
                self._seen[key] = None
                while len(self._seen) > 16 * self._size:
                    self._seen.popitem(last=False)
                return NOT_YET
            self.misses += 1
        value = make()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._seen.clear()


class NotYet(enum.Enum):
    """A structure seen for the first time: no template yet."""

    NOT_YET = "not yet"


NOT_YET = NotYet.NOT_YET


CACHE = _Cache(CACHE_SIZE)


def _sentinel_able(elem: DataElement) -> bool:
    if elem.tag.is_private or elem.keyword in _NEVER_SENTINEL or elem.VM != 1:
        return False
    if elem.VR == "IS":  # instance, series, acquisition numbers... but frames shape the objects
        return elem.keyword not in _STRUCTURAL_IS and elem.value not in (None, "")
    if elem.VR in ("AS", "DS"):
        return elem.keyword in _SENTINEL_NUMBERS and elem.value not in (None, "")
    return elem.VR in _SENTINEL_VRS and str(elem.value) != ""


def source_signature(source: Dataset) -> tuple[Any, ...]:
    """Everything about the source header that may change an output's structure."""
    items: list[tuple[int, str, Any]] = []
    for elem in source:
        if elem.tag.is_private or elem.keyword in _NOT_IN_KEY:
            continue
        value = elem.value
        if _sentinel_able(elem):
            token: Any = "S"
        elif elem.VR == "SQ":
            token = hashlib.sha1(repr(value).encode("utf-8", "replace")).hexdigest()
        elif isinstance(value, (bytes, bytearray)):
            token = hashlib.sha1(value).hexdigest()
        elif isinstance(value, MultiValue):
            token = tuple(str(v) for v in value)
        else:
            token = str(value) if value is not None else None
        items.append((int(elem.tag), elem.VR, token))
    return tuple(items), source_was_lossy(source)


def _structure(findings: Sequence[ImageFinding]) -> tuple[tuple[LesionClass, bool], ...]:
    return tuple((f.predicted, bool(f.lesion_present and f.mask.any())) for f in findings)


def _sentinel_value(vr: str, n: int) -> Any:
    if vr == "UI":
        return f"1.2.826.0.1.3680043.10.1177.{10000 + n}"
    if vr == "PN":
        return f"SNTL{n:05d}^PN"
    if vr == "IS":
        return str(70000 + n)
    if vr == "AS":
        return f"{n % 1000:03d}W"
    if vr == "DS":
        return f"{8000 + n}.625"
    day = datetime.date(1901, 1, 1) + datetime.timedelta(days=n)
    clock = datetime.time((n // 60) % 24, n % 60, 7)
    if vr == "DA":
        return day.strftime("%Y%m%d")
    if vr == "TM":
        return clock.strftime("%H%M%S")
    if vr == "DT":
        return day.strftime("%Y%m%d") + clock.strftime("%H%M%S")
    return f"SNTL{n:05d}X"


def _sentinel_probability(frame: int, index: int) -> float:
    return round(0.2 + (frame * 8 + index) * 1e-6 + 1.3e-7, 9)


def catalog(header: Dataset, findings: Sequence[ImageFinding], model: ModelIdentity) -> dict[str, Any]:
    """The values an output computes from its inputs, by slot name."""
    sha = model.weights_sha256
    uid = str(header.SOPInstanceUID)
    study = str(header.StudyInstanceUID)
    values: dict[str, Any] = {}
    if header.get("InstanceNumber") not in (None, ""):
        values["instance_number"] = int(header.InstanceNumber)
    values["dimension-organization"] = str(dimension_organization_uid(uid, sha))
    for kind in (OutputKind.SEG, OutputKind.SR, OutputKind.OVERLAY):
        values[f"uid:{kind.value}"] = str(instance_uid(kind, uid, sha))
        values[f"series:{kind.value}"] = str(series_uid(kind, study, sha))
    for frame, finding in enumerate(findings, start=1):
        values[f"seg-track:{frame}"] = str(segment_tracking_uid(uid, sha, frame))
        values[f"sr-finding:{frame}"] = str(derived_uid("sr-finding", uid, sha, str(frame)))
        for index, cls in enumerate(CLASS_ORDER):
            values[f"sr-class:{frame}:{cls.value}"] = str(derived_uid("sr-class", uid, sha, str(frame), cls.value))
            values[f"p:{frame}:{index}"] = float(finding.probabilities[index])
        values[f"area:{frame}"] = float(finding.lesion_area_fraction)
    return values


def _sentinel_inputs(
    source: Dataset, findings: Sequence[ImageFinding], model: ModelIdentity
) -> tuple[Dataset, list[ImageFinding], dict[str, str]]:
    header = source_header(source)
    names: dict[str, str] = {}
    for n, elem in enumerate(list(header)):
        if _sentinel_able(elem):
            value = _sentinel_value(elem.VR, n)
            header[elem.tag] = DataElement(elem.tag, elem.VR, value)
            names[str(value)] = f"src:{elem.keyword}"
    fake = [
        replace(
            finding,
            probabilities=tuple(_sentinel_probability(frame, i) for i in range(len(CLASS_ORDER))),
            lesion_area_fraction=_sentinel_probability(frame, len(CLASS_ORDER)),
        )
        for frame, finding in enumerate(findings, start=1)
    ]
    from pydicom.valuerep import DS

    for name, value in catalog(header, fake, model).items():
        if isinstance(value, float):
            names[str(DS(value, auto_format=True))] = name
            names[f"fd:{value!r}"] = name
        else:
            names[str(value)] = name
    return header, fake, names


def _compile(kind: OutputKind, build: Callable[[Dataset, list[ImageFinding]], Dataset | None],
             source: Dataset, findings: Sequence[ImageFinding], model: ModelIdentity,
             computed: dict[str, str] | None = None) -> Template | None:
    header, fake, names = _sentinel_inputs(source, findings, model)
    try:
        ds = build(header, fake)
    except Exception as exc:  # the reference path reports it, with the real values
        logger.info("no %s template for this kind of source: the reference builder refused it (%s)", kind.value, exc)
        return None
    if ds is None:
        return None
    try:
        return compile_template(ds, names, computed)
    except TemplateError as exc:
        logger.warning("no %s template for this kind of source (%s); using the reference builder", kind.value, exc)
        return None


class TemplateRefused(Exception):
    """This structure cannot be templated; the caller builds it with the reference path."""


def build_fast(
    source: Dataset,
    findings: Sequence[ImageFinding],
    model: ModelIdentity,
    *,
    seg: bool,
    sr: bool,
    overlay: bool,
    frames: Sequence[np.ndarray] | None,
    created: datetime.datetime,
) -> list[BuiltObject]:
    """The encoded outputs of one checked source (see :func:`outputs.write_outputs`)."""
    signature = source_signature(source)
    structure = _structure(findings)
    values = catalog(source, findings, model)

    def value_of(name: str) -> Any:
        if name in values:
            return values[name]
        if name.startswith("src:"):
            return source[name[4:]].value
        raise KeyError(name)

    segs = [f for f, (_, has) in enumerate(structure, start=1) if has] if seg else []
    rows, cols = int(source.Rows), int(source.Columns)
    wanted: list[tuple[OutputKind, Template | None | NotYet]] = []
    # Every kind is looked up before any is built, so one image registers all of them.
    if segs:
        wanted.append((OutputKind.SEG, CACHE.get(
            (OutputKind.SEG, signature, structure, model),
            lambda: _compile(OutputKind.SEG, lambda h, f: _seg(h, f, model), source, findings, model))))
    if sr:
        wanted.append((OutputKind.SR, CACHE.get(
            (OutputKind.SR, signature, structure, model, bool(segs)),
            lambda: _compile(OutputKind.SR, lambda h, f: _sr(h, f, model, bool(segs)), source, findings, model))))
    if overlay:
        wanted.append((OutputKind.OVERLAY, CACHE.get(
            (OutputKind.OVERLAY, signature, len(findings), model),
            lambda: _compile(OutputKind.OVERLAY,
                             lambda h, f: build_overlay(h, [np.zeros((rows, cols, 3), np.uint8)] * len(f), f, model),
                             source, findings, model, {"LossyImageCompressionRatio": OVERLAY_RATIO}))))
    missing = [kind.value for kind, template in wanted if not isinstance(template, Template)]
    if missing:
        raise TemplateRefused(", ".join(missing))

    memo: dict[tuple[int, str, str], bytes] = {}
    built: list[BuiltObject] = []
    for kind, template in wanted:
        assert isinstance(template, Template)
        if kind is OutputKind.SEG:
            values[PIXELS] = _pack_masks([findings[f - 1].mask for f in lesion_frames(findings)])
        elif kind is OutputKind.OVERLAY:
            assert frames is not None
            drawn = [draw_overlay_fast(frame, finding, model) for frame, finding in zip(frames, findings, strict=True)]
            if template.transfer_syntax_uid == jpeg.TRANSFER_SYNTAX:  # a lossy source's overlay (overlay.py)
                encoded = jpeg.encode_frames(drawn)
                values[PIXELS], values[OVERLAY_RATIO] = encoded.pixel_data, encoded.ratio
            else:
                pixels = drawn[0] if len(drawn) == 1 else np.stack(drawn)
                values[PIXELS] = pixels.data.cast("B")  # the drawn array itself, not a copy
        built.append(_object(kind, template, values, value_of, created, memo))
    return built


def _seg(header: Dataset, findings: list[ImageFinding], model: ModelIdentity) -> Dataset | None:
    result = build_segmentation(header, findings, model)
    return None if result is None else result[0]


def _sr(header: Dataset, findings: list[ImageFinding], model: ModelIdentity, with_seg: bool) -> Dataset:
    seg, segments = build_segmentation(header, findings, model) or (None, []) if with_seg else (None, [])
    return build_image_sr(header, findings, model, seg, segments)


def _object(kind: OutputKind, template: Template, values: dict[str, Any],
            value_of: Callable[[str], Any], created: datetime.datetime,
            memo: dict[tuple[int, str, str], bytes]) -> BuiltObject:
    uid = values[f"uid:{kind.value}"]
    return BuiltObject(
        kind=kind,
        sop_instance_uid=uid,
        series_instance_uid=values[f"series:{kind.value}"],
        sop_class_uid=template.sop_class_uid,
        parts=tuple(render(template, uid, value_of, created, memo)),
    )


def _pack_masks(masks: Sequence[np.ndarray]) -> bytes:
    """BINARY SEG frames, bit-packed one after another, least significant bit first (PS3.5 8.1.1)."""
    bits = np.concatenate([np.ascontiguousarray(mask, dtype=bool).ravel() for mask in masks])
    return np.packbits(bits, bitorder="little").tobytes()
