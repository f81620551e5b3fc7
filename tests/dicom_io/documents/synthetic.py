"""Synthetic endoscopy-like sources and findings for the dicom_io tests.

Frames look roughly like white-light gastroscopy: reddish mucosa with a soft gradient
and texture inside a dark octagonal field-of-view border, optionally with a pale,
ulcer-like lesion. Sources are built with pydicom as VL Endoscopic, Secondary Capture
and Multi-frame True Color Secondary Capture instances.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from gastrolens.findings import CLASS_ORDER, ImageFinding, LesionClass, ModelIdentity

VL_ENDOSCOPIC = "1.2.840.10008.5.1.4.1.1.77.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MULTIFRAME_TRUE_COLOR_SC = "1.2.840.10008.5.1.4.1.1.7.4"

CHINESE_NAME = "张黎明"
PINYIN_NAME = "Zhang^Liming"

TRAINED = ModelIdentity(
    name="GastroLens-R34",
    version="1.0.0",
    weights_sha256=hashlib.sha256(b"trained weights").hexdigest(),
    untrained=False,
)
UNTRAINED = ModelIdentity(
    name="GastroLens-R34",
    version="0.0.0-untrained",
    weights_sha256=hashlib.sha256(b"random init").hexdigest(),
    untrained=True,
)


def octagon_mask(rows: int, cols: int) -> np.ndarray:
    """The endoscope's field of view: a rectangle with cut corners."""
    r, c = np.mgrid[0:rows, 0:cols]
    cut = 0.22 * min(rows, cols)
    margin = 0.04 * min(rows, cols)
    inside = (r >= margin) & (r < rows - margin) & (c >= margin) & (c < cols - margin)
    for rr, cc in ((r, c), (rows - 1 - r, c), (r, cols - 1 - c), (rows - 1 - r, cols - 1 - c)):
        inside &= (rr + cc) >= cut + 2 * margin
    return inside


def lesion_mask(rows: int, cols: int, *, center: tuple[float, float] = (0.55, 0.45),
                radii: tuple[float, float] = (0.16, 0.2)) -> np.ndarray:
    r, c = np.mgrid[0:rows, 0:cols]
    cr, cc = center[0] * rows, center[1] * cols
    rr, rc = max(radii[0] * rows, 1.5), max(radii[1] * cols, 1.5)
    return ((r - cr) / rr) ** 2 + ((c - cc) / rc) ** 2 <= 1.0


def endoscopy_frame(rows: int, cols: int, *, seed: int = 0, lesion: np.ndarray | None = None) -> np.ndarray:
    """An RGB uint8 frame of reddish mucosa, dark border, and a pale lesion if given."""
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[0:rows, 0:cols].astype(np.float64)
    shade = 0.75 + 0.25 * np.cos((r / max(rows, 1) - 0.4) * 2.5) * np.cos((c / max(cols, 1) - 0.5) * 2.0)
    texture = rng.normal(0.0, 6.0, (rows, cols))
    frame = np.empty((rows, cols, 3), np.float64)
    frame[..., 0] = 190 * shade + texture
    frame[..., 1] = 85 * shade + texture * 0.5
    frame[..., 2] = 70 * shade + texture * 0.4
    if lesion is not None:
        frame[lesion] = (frame[lesion] * 0.35 + np.array([235.0, 225.0, 200.0]) * 0.65)
    frame[~octagon_mask(rows, cols)] = (8, 6, 6)
    return np.clip(frame, 0, 255).astype(np.uint8)


def make_source(
    frames: Sequence[np.ndarray],
    *,
    sop_class: str = VL_ENDOSCOPIC,
    charset: str | None = "ISO_IR 192",
    patient_name: str | None = f"{PINYIN_NAME}={CHINESE_NAME}",
    omit: Sequence[str] = (),
    study_uid: str | None = None,
    grayscale: bool = False,
) -> Dataset:
    """A valid source instance holding ``frames`` (RGB, or 2-D grayscale with ``grayscale``)."""
    multiframe = sop_class == MULTIFRAME_TRUE_COLOR_SC or len(frames) > 1
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = "GL-0001"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "M"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.StudyDate = "20240312"
    ds.StudyTime = "093000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "S1"
    ds.AccessionNumber = "ACC1"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.Laterality = ""  # Type 2C; dciodvfy errors when absent, warns when empty
    ds.Manufacturer = "Synthetic Endoscopy"
    ds.InstanceNumber = 3
    ds.PatientOrientation = ""
    ds.ContentDate = "20240312"
    ds.ContentTime = "093102"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    rows, cols = frames[0].shape[:2]
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if grayscale:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
    else:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    if sop_class == VL_ENDOSCOPIC:
        ds.Modality = "ES"
        ds.AcquisitionDateTime = "20240312093102"
        ds.AcquisitionContextSequence = []
        ds.LossyImageCompression = "00"
    else:
        ds.Modality = "ES"
        ds.ConversionType = "DI"
    if multiframe:
        ds.NumberOfFrames = len(frames)
        ds.FrameIncrementPointer = 0x00181063  # FrameTime
        ds.FrameTime = 100.0
        ds.BurnedInAnnotation = "NO"
    ds.PixelData = np.stack(list(frames)).tobytes() if multiframe else frames[0].tobytes()
    for keyword in omit:
        if keyword in ds:
            del ds[keyword]
    return ds


def make_finding(
    mask: np.ndarray,
    predicted: LesionClass = LesionClass.PU,
    *,
    confidence: float = 0.91,
    model: ModelIdentity = TRAINED,
) -> ImageFinding:
    """A finding for ``predicted`` with ``confidence``, the rest spread over other classes."""
    rest = (1.0 - confidence) / (len(CLASS_ORDER) - 1)
    probabilities = tuple(confidence if cls is predicted else rest for cls in CLASS_ORDER)
    lesion = predicted.is_lesion and bool(mask.any())
    if not lesion:
        mask = np.zeros_like(mask, dtype=bool)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    bbox = (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1) if lesion else None
    return ImageFinding(
        probabilities=probabilities,
        predicted=predicted,
        lesion_present=lesion,
        mask=mask.astype(bool),
        lesion_area_fraction=float(mask.mean()),
        bbox=bbox,
        model=model,
    )


def encode(ds: Dataset, transfer_syntax: str) -> Dataset:
    """Re-encode ``ds`` in place with ``transfer_syntax``; JPEG Baseline via Pillow (4:2:2)."""
    from pydicom.uid import JPEG2000, UID, JPEGBaseline8Bit

    if not UID(transfer_syntax).is_compressed:
        ds.file_meta.TransferSyntaxUID = transfer_syntax  # applied when the file is saved
        return ds
    if transfer_syntax in DCMCJPEG_OPTIONS:
        return _dcmcjpeg(ds, transfer_syntax)
    if transfer_syntax == JPEG2000:
        ds.compress(transfer_syntax, j2k_cr=[15])  # lossy
        ds.LossyImageCompression = "01"
        return ds
    if transfer_syntax != JPEGBaseline8Bit:
        ds.compress(transfer_syntax)
        return ds
    import io

    from PIL import Image
    from pydicom.encaps import encapsulate

    frames = int(ds.get("NumberOfFrames", 1))
    pixels = np.frombuffer(ds.PixelData, np.uint8).reshape(frames, ds.Rows, ds.Columns, -1)
    streams = []
    for frame in pixels:
        buffer = io.BytesIO()
        image = Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame)
        image.save(buffer, format="JPEG", quality=92, subsampling=1)  # 1: 4:2:2
        streams.append(buffer.getvalue())
    ds.PixelData = encapsulate(streams)
    ds["PixelData"].VR = "OB"
    if ds.SamplesPerPixel == 3:
        ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = "10"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return ds


DCMCJPEG = "/usr/bin/dcmcjpeg"
DCMCJPEG_OPTIONS = {
    "1.2.840.10008.1.2.4.57": "+el",  # JPEG Lossless, process 14, any predictor (DCMTK picks 1)
    "1.2.840.10008.1.2.4.70": "+e1",  # JPEG Lossless, process 14, selection value 1
}


def _dcmcjpeg(ds: Dataset, transfer_syntax: str) -> Dataset:
    """JPEG Lossless (process 14) by DCMTK: pydicom and pylibjpeg only decode it."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    import pytest
    from pydicom import dcmread

    if shutil.which(DCMCJPEG) is None:
        pytest.skip("dcmcjpeg (DCMTK) is not installed")
    with tempfile.TemporaryDirectory() as folder:
        plain, packed = Path(folder) / "plain.dcm", Path(folder) / "packed.dcm"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(plain, enforce_file_format=True)
        subprocess.run(
            [DCMCJPEG, DCMCJPEG_OPTIONS[transfer_syntax], plain, packed], check=True, capture_output=True, timeout=60
        )
        encoded = dcmread(packed)
    assert encoded.file_meta.TransferSyntaxUID == transfer_syntax
    ds.clear()
    ds.update(encoded)
    ds.file_meta = encoded.file_meta
    return ds


def scenario(
    sop_class: str = VL_ENDOSCOPIC,
    *,
    lesion: LesionClass | None = LesionClass.PU,
    rows: int = 33,
    cols: int = 47,
    frames: int = 1,
    model: ModelIdentity = TRAINED,
    **source_kwargs,
) -> tuple[Dataset, list[ImageFinding]]:
    """A source and its findings: frame i shows ``lesion`` at a different place, except
    that in multi-frame sources the middle frame is normal."""
    findings, pictures = [], []
    for index in range(frames):
        cls = lesion if lesion is not None else LesionClass.NORMAL
        if frames > 2 and index == frames // 2:
            cls = LesionClass.NORMAL
        mask = lesion_mask(rows, cols, center=(0.5, 0.3 + 0.4 * index / max(frames - 1, 1)))
        shown = mask if cls.is_lesion else None
        pictures.append(endoscopy_frame(rows, cols, seed=index, lesion=shown))
        findings.append(make_finding(mask, cls, model=model))
    source = make_source(pictures, sop_class=sop_class, **source_kwargs)
    return source, findings
