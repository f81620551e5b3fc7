"""A synthetic data set with a learnable signal, for tests, demos and quick checks.

Images come from :func:`gastrolens.samples.endoscopy_frame`: reddish mucosa in an
octagonal field of view and, for the four lesion classes, a blob whose colour and shape
depend on the class, with its exact outline as the mask. Each lesion is seen in
``images_per_lesion`` frames (different position, size and noise, as different views of
one lesion); each patient has one lesion. A ``test_fraction`` of the patients is marked
``split=test``; the others are left to the automatic train / validation split.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from gastrolens.findings import CLASS_ORDER, LesionClass
from gastrolens.samples import as_dicom, endoscopy_frame

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"


def write_dataset(
    folder: str | Path,
    *,
    lesions_per_class: int = 10,
    images_per_lesion: int = 2,
    rows: int = 96,
    cols: int = 112,
    test_fraction: float = 0.3,
    dicom_every: int = 0,
    seed: int = 0,
) -> Path:
    """Write images, masks and ``manifest.csv`` under ``folder``; return the manifest path.

    With ``dicom_every`` = k > 0, every k-th image is written as a DICOM file instead of
    a PNG (exercising the DICOM reader). Normal images get an empty mask cell (an all-zero
    mask is implied).
    """
    root = Path(folder)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    index = 0
    for cls in CLASS_ORDER:
        patients = [f"{cls.value}-p{n:03d}" for n in range(lesions_per_class)]
        test = set(rng.choice(patients, size=round(test_fraction * len(patients)), replace=False).tolist())
        for n, patient in enumerate(patients):
            lesion = f"{cls.value}-l{n:03d}"
            for view in range(images_per_lesion):
                frame_seed = seed * 1_000_003 + index
                rgb, mask = endoscopy_frame(rows, cols, cls, seed=frame_seed)
                stem = f"{lesion}-v{view}"
                if dicom_every and index % dicom_every == dicom_every - 1:
                    image = Path("images") / f"{stem}.dcm"
                    as_dicom(rgb, patient_id=patient, instance_number=view + 1).save_as(
                        root / image, enforce_file_format=True
                    )
                else:
                    image = Path("images") / f"{stem}.png"
                    Image.fromarray(rgb).save(root / image)
                mask_cell = ""
                if cls is not LesionClass.NORMAL:
                    mask_cell = f"masks/{stem}.png"
                    Image.fromarray(mask.astype(np.uint8) * 255).save(root / mask_cell)
                records.append(
                    {
                        "image": image.as_posix(),
                        "class": cls.value,
                        "lesion_id": lesion,
                        "patient_id": patient,
                        "mask": mask_cell,
                        "split": "test" if patient in test else "",
                    }
                )
                index += 1
    manifest = root / MANIFEST_NAME
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "class", "lesion_id", "patient_id", "mask", "split"])
        writer.writeheader()
        writer.writerows(records)
    logger.info("wrote a synthetic data set of %d images to %s", len(records), root)
    return manifest


def train_tiny_package(
    out_dir: str | Path,
    *,
    work_dir: str | Path | None = None,
    epochs: int = 1,
    image_size: int = 32,
    seed: int = 0,
) -> Path:
    """Train both networks briefly on a small synthetic set; return the package folder.

    For tests that need a *trained* package quickly (a few seconds per epoch on one CPU
    thread): 2 lesions per class, 32 px inputs, SGD at a learning rate high enough to
    move in one epoch. The networks are barely trained; only the card's ``trained``
    flags and the weights are real. ``work_dir`` (default: ``out_dir``/data) receives
    the data set; checkpoints go under ``out_dir``/checkpoints.
    """
    from gastrolens.training.manifest import read_manifest
    from gastrolens.training.recipe import Recipe
    from gastrolens.training.trainer import train

    out = Path(out_dir)
    data = Path(work_dir) if work_dir is not None else out / "data"
    manifest = read_manifest(write_dataset(data, lesions_per_class=2, rows=48, cols=56, test_fraction=0.0, seed=seed))
    for task, size in (("classifier", image_size), ("segmenter", image_size + 1)):
        recipe = Recipe(
            task=task,  # type: ignore[arg-type]
            epochs=epochs,
            batch_size=8,
            learning_rate=0.01,
            image_size=size,
            val_fraction=0.0,
            precise_bn_batches=2,
            seed=seed,
        )
        train(recipe, manifest, out, device="cpu", progress=False, version=f"tiny-seed{seed}")
    return out
