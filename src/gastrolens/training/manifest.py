"""The data set manifest: one CSV row per image, checked in full before any training.

Columns (header required; order free)::

    image       path of a PNG / JPEG image or a single-frame DICOM file
    class       normal | pu | egc_hgin | agc | smt
    lesion_id   the lesion the image shows (several images may show one lesion;
                normal images name a "lesion" too: the unit the study counted)
    patient_id  the patient the lesion belongs to (splits never separate a patient)
    mask        optional: PNG of the image's size, lesion = non-zero. Empty for a
                normal image means an all-zero mask; empty for a lesion image means
                "not outlined" (the segmenter neither trains nor is scored on it)
    split       optional: train | val | test, or empty for an automatic
                patient-level train / validation split

Relative paths are relative to the manifest's folder. Other columns are ignored (with a
warning). Every problem is reported with its CSV line number (the header is line 1), all
of them at once, in one :class:`DatasetError`.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gastrolens.errors import DatasetError
from gastrolens.findings import CLASS_ORDER, LesionClass
from gastrolens.training.datasets import ImageReadError, image_shape, mask_shape

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("image", "class", "lesion_id", "patient_id")
OPTIONAL_COLUMNS = ("mask", "split")
SPLITS = ("train", "val", "test")
MAX_REPORTED_PROBLEMS = 50
_CLASS_KEYS = ", ".join(c.value for c in CLASS_ORDER)


@dataclass(frozen=True)
class ManifestRow:
    """One validated image of the manifest."""

    line: int
    image: Path
    label: LesionClass
    lesion_id: str
    patient_id: str
    mask: Path | None
    split: str | None
    shape: tuple[int, int]
    """(rows, cols) of the image, read from its header at validation."""

    @property
    def has_mask_truth(self) -> bool:
        """True when the true mask is known: outlined, or a normal image (empty mask)."""
        return self.mask is not None or self.label is LesionClass.NORMAL


@dataclass(frozen=True)
class Manifest:
    """A validated manifest."""

    path: Path
    rows: tuple[ManifestRow, ...]
    sha256: str
    """sha256 of the manifest file's bytes (recorded in model cards and checkpoints)."""

    def select(self, split: str) -> list[ManifestRow]:
        """Rows whose ``split`` column says ``split``; ``all`` gives every row."""
        if split == "all":
            return list(self.rows)
        if split not in SPLITS:
            raise DatasetError(f"{self.path}: unknown split {split!r}; use all, {', '.join(SPLITS)}")
        return [row for row in self.rows if row.split == split]


def summarise(rows: Sequence[ManifestRow]) -> dict[str, object]:
    """Counts for model cards and reports: images, lesions and patients per class, masks."""
    images = Counter(row.label.value for row in rows)
    lesions = {row.lesion_id: row.label.value for row in rows}
    return {
        "images": len(rows),
        "lesions": len(lesions),
        "patients": len({row.patient_id for row in rows}),
        "images_per_class": {c.value: images.get(c.value, 0) for c in CLASS_ORDER},
        "lesions_per_class": {c.value: Counter(lesions.values()).get(c.value, 0) for c in CLASS_ORDER},
        "images_with_outline": sum(1 for row in rows if row.mask is not None),
    }


class _Problems:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: list[str] = []

    def add(self, line: int, message: str) -> None:
        self.items.append(f"line {line}: {message}")

    def raise_if_any(self) -> None:
        if not self.items:
            return
        shown = self.items[:MAX_REPORTED_PROBLEMS]
        more = len(self.items) - len(shown)
        tail = f"\n  ... and {more} more" if more else ""
        noun = "problem" if len(self.items) == 1 else "problems"
        raise DatasetError(f"{self.path}: {len(self.items)} {noun}:\n  " + "\n  ".join(shown) + tail)


def read_manifest(path: str | Path, *, check_files: bool = True) -> Manifest:
    """Parse and validate a manifest; raise :class:`DatasetError` listing every problem.

    With ``check_files`` (default) every image and mask is opened far enough to read its
    size (headers only: no pixels are decoded), so a missing, unreadable or mismatched
    file is found now, not hours into training.
    """
    manifest_path = Path(path)
    try:
        data = manifest_path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"manifest {manifest_path}: cannot read ({exc.strerror or exc})") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"manifest {manifest_path}: not UTF-8 text ({exc})") from exc
    reader = csv.DictReader(text.splitlines())
    header = [name.strip() for name in (reader.fieldnames or [])]
    reader.fieldnames = header
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise DatasetError(
            f"{manifest_path}: line 1: header lacks column(s) {', '.join(missing)}; "
            f"required: {', '.join(REQUIRED_COLUMNS)}; optional: {', '.join(OPTIONAL_COLUMNS)}"
        )
    extra = [name for name in header if name not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if extra:
        logger.warning("%s: ignoring column(s) %s", manifest_path, ", ".join(extra))
    problems = _Problems(manifest_path)
    base = manifest_path.parent
    rows: list[ManifestRow] = []
    for record in reader:
        line = reader.line_num
        row = _parse_row(record, line, base, problems, check_files)
        if row is not None:
            rows.append(row)
    if not rows and not problems.items:
        raise DatasetError(f"{manifest_path}: no rows after the header")
    _check_consistency(rows, problems)
    problems.raise_if_any()
    logger.info(
        "manifest %s: %d images, %d lesions, %d patients",
        manifest_path,
        len(rows),
        len({r.lesion_id for r in rows}),
        len({r.patient_id for r in rows}),
    )
    return Manifest(manifest_path, tuple(rows), hashlib.sha256(data).hexdigest())


def _parse_row(
    record: dict[str, str | None], line: int, base: Path, problems: _Problems, check_files: bool
) -> ManifestRow | None:
    if None in record:  # more cells than header columns
        problems.add(line, f"{len(record) - 1 + len(record[None] or [])} cells but the header has {len(record) - 1}")  # type: ignore[index]
        return None
    values = {key: (value or "").strip() for key, value in record.items()}
    ok = True
    for name in REQUIRED_COLUMNS:
        if not values.get(name):
            problems.add(line, f"empty {name}")
            ok = False
    label: LesionClass | None = None
    if values.get("class"):
        try:
            label = LesionClass(values["class"])
        except ValueError:
            problems.add(line, f"unknown class {values['class']!r}; use one of {_CLASS_KEYS}")
            ok = False
    split = values.get("split") or None
    if split is not None and split not in SPLITS:
        problems.add(line, f"unknown split {split!r}; use {', '.join(SPLITS)} or leave it empty")
        ok = False
    image = base / values["image"] if values.get("image") else None
    mask = base / values["mask"] if values.get("mask") else None
    shape: tuple[int, int] | None = (0, 0)
    if image is not None and check_files:
        shape = _checked_shape(image, "image", line, problems)
    if mask is not None and check_files:
        if mask.suffix.lower() != ".png":
            problems.add(line, f"mask {mask} is not a PNG (masks must be lossless)")
            ok = False
        else:
            mshape = _checked_shape(mask, "mask", line, problems, reader=mask_shape)
            if mshape is not None and shape is not None and mshape != shape:
                problems.add(
                    line,
                    f"mask size mismatch: mask {mask} is {mshape[0]}x{mshape[1]} (rows x cols) "
                    f"but image {image} is {shape[0]}x{shape[1]}",
                )
                ok = False
            ok = ok and mshape is not None
    if not ok or shape is None or label is None or image is None:
        return None
    return ManifestRow(line, image, label, values["lesion_id"], values["patient_id"], mask, split, shape)


def _checked_shape(
    path: Path,
    what: str,
    line: int,
    problems: _Problems,
    reader: Callable[[Path], tuple[int, int]] = image_shape,
) -> tuple[int, int] | None:
    if not path.exists():
        problems.add(line, f"missing file: {what} {path} does not exist")
        return None
    if not path.is_file():
        problems.add(line, f"{what} {path} is not a file")
        return None
    try:
        return reader(path)
    except ImageReadError as exc:
        problems.add(line, f"{what} {path}: {exc}")
        return None


def _check_consistency(rows: Sequence[ManifestRow], problems: _Problems) -> None:
    """Duplicate images; a lesion with two classes or two patients; a patient in two splits."""
    first_image: dict[Path, int] = {}
    lesion_first: dict[str, ManifestRow] = {}
    patient_split: dict[str, ManifestRow] = {}
    for row in rows:
        key = row.image.resolve()
        if key in first_image:
            problems.add(row.line, f"image {row.image} is listed again (first on line {first_image[key]})")
        first_image.setdefault(key, row.line)
        first = lesion_first.setdefault(row.lesion_id, row)
        if first.label is not row.label:
            problems.add(
                row.line,
                f"lesion {row.lesion_id!r} is {row.label.value} here but {first.label.value} on line {first.line}",
            )
        if first.patient_id != row.patient_id:
            problems.add(
                row.line,
                f"lesion {row.lesion_id!r} belongs to patient {row.patient_id!r} here "
                f"but to {first.patient_id!r} on line {first.line}",
            )
        if row.split is not None:
            earlier = patient_split.setdefault(row.patient_id, row)
            if earlier.split != row.split:
                problems.add(
                    row.line,
                    f"patient {row.patient_id!r} is in both splits {earlier.split} (line {earlier.line}) "
                    f"and {row.split}: a patient's images must stay in one split",
                )
    for row in rows:
        if row.split is None and row.patient_id in patient_split:
            earlier = patient_split[row.patient_id]
            problems.add(
                row.line,
                f"patient {row.patient_id!r} has no split here but {earlier.split} on line {earlier.line}: "
                "give all of a patient's rows the same split",
            )


@dataclass(frozen=True)
class Split:
    """Training and validation rows, disjoint by patient."""

    train: tuple[ManifestRow, ...]
    val: tuple[ManifestRow, ...]

    def fingerprint(self) -> str:
        """sha256 of the sorted validation patient ids (to check a resumed run's split)."""
        ids = "\n".join(sorted({row.patient_id for row in self.val}))
        return hashlib.sha256(ids.encode("utf-8")).hexdigest()


def split_by_patient(rows: Iterable[ManifestRow], val_fraction: float, seed: int) -> Split:
    """Patient-level train / validation split; rows marked ``test`` are left out.

    Rows with an explicit split keep it. Patients without one are grouped by their most
    frequent class (so the validation set sees every class) and ``val_fraction`` of
    each group, chosen with ``seed``, goes to validation.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"validation fraction must be in [0, 1), got {val_fraction}")
    usable = [row for row in rows if row.split != "test"]
    by_patient: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in usable:
        by_patient[row.patient_id].append(row)
    val_patients = {p for p, rs in by_patient.items() if rs[0].split == "val"}
    automatic = sorted(p for p, rs in by_patient.items() if rs[0].split is None)
    groups: dict[str, list[str]] = defaultdict(list)
    for patient in automatic:
        labels = Counter(row.label.value for row in by_patient[patient])
        groups[min(labels, key=lambda k: (-labels[k], k))].append(patient)
    rng = np.random.default_rng(seed)
    for key in sorted(groups):
        members = groups[key]
        order = rng.permutation(len(members))
        take = math.floor(val_fraction * len(members) + 0.5) if len(members) > 1 else 0
        val_patients.update(members[i] for i in order[:take])
    train = tuple(row for row in usable if row.patient_id not in val_patients)
    val = tuple(row for row in usable if row.patient_id in val_patients)
    return Split(train, val)
