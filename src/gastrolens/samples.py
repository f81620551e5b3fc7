"""Synthetic endoscopy-like images wrapped as DICOM, for the demo, tests and benchmarks.

The pictures imitate white-light gastroscopy: reddish mucosa inside an octagonal field
of view on a black border with burned-in text, and optionally a lesion blob whose
colour and shape depend on the class. They carry no patient data.
"""

from __future__ import annotations

import io
from datetime import datetime

import numpy as np
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from gastrolens.findings import LesionClass

VL_ENDOSCOPIC = UID("1.2.840.10008.5.1.4.1.1.77.1.1")
SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")

# Lesion appearance per class: RGB colour and blob shape (ellipse aspect ratio).
_LESION_LOOK = {
    LesionClass.PU: ((235, 225, 200), 1.0),  # whitish ulcer base
    LesionClass.EGC_HGIN: ((200, 70, 60), 1.6),  # slightly redder, flat, elongated
    LesionClass.AGC: ((120, 40, 40), 1.2),  # dark, irregular mass
    LesionClass.SMT: ((225, 150, 130), 0.8),  # smooth pale bulge
}


def fov_octagon(rows: int, cols: int, margin: float = 0.06, corner: float = 0.22) -> list[tuple[float, float]]:
    """Corners (x, y) of the octagonal field of view inside a ``rows`` x ``cols`` frame."""
    x0, y0 = cols * margin * 2.2, rows * margin
    x1, y1 = cols - cols * margin * 0.6, rows - rows * margin
    cx, cy = (x1 - x0) * corner, (y1 - y0) * corner
    return [(x0 + cx, y0), (x1 - cx, y0), (x1, y0 + cy), (x1, y1 - cy),
            (x1 - cx, y1), (x0 + cx, y1), (x0, y1 - cy), (x0, y0 + cy)]


def endoscopy_frame(
    rows: int = 480, cols: int = 640, lesion: LesionClass | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 frame and its boolean lesion mask (empty for ``None``/``NORMAL``)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    shade = 1.0 - 0.45 * (((yy - rows / 2) / rows) ** 2 + ((xx - cols / 2) / cols) ** 2) * 2
    noise = rng.normal(0, 6, (rows, cols, 1)).astype(np.float32)
    mucosa = np.stack([200 * shade, 95 * shade, 75 * shade], axis=-1) + noise
    picture = Image.fromarray(np.clip(mucosa, 0, 255).astype(np.uint8))
    mask_img = Image.new("L", (cols, rows), 0)
    if lesion is not None and lesion is not LesionClass.NORMAL:
        colour, aspect = _LESION_LOOK[lesion]
        r = min(rows, cols) * rng.uniform(0.10, 0.16)
        cx = cols * rng.uniform(0.38, 0.62)
        cy = rows * rng.uniform(0.38, 0.62)
        box = (cx - r * aspect, cy - r, cx + r * aspect, cy + r)
        ImageDraw.Draw(picture).ellipse(box, fill=colour)
        ImageDraw.Draw(mask_img).ellipse(box, fill=1)
    fov = Image.new("L", (cols, rows), 0)
    ImageDraw.Draw(fov).polygon(fov_octagon(rows, cols), fill=1)
    frame = np.asarray(picture).copy()
    inside = np.asarray(fov).astype(bool)
    frame[~inside] = 0
    overlay = Image.fromarray(frame)
    ImageDraw.Draw(overlay).text((4, 4), "GASTROLENS SAMPLE", fill=(255, 255, 255))
    mask = np.asarray(mask_img).astype(bool) & inside
    return np.asarray(overlay).copy(), mask


def as_dicom(
    frame: np.ndarray,
    *,
    sop_class: UID = VL_ENDOSCOPIC,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_id: str = "GL-SAMPLE-1",
    patient_name: str = "Sample^Patient",
    accession_number: str = "GLS0001",
    instance_number: int = 1,
    jpeg_quality: int | None = None,
) -> Dataset:
    """Wrap an RGB frame as a VL Endoscopic or Secondary Capture instance.

    With ``jpeg_quality`` the pixels are JPEG baseline (YBR_FULL_422), as endoscopy
    processors usually send them; otherwise Explicit VR Little Endian RGB.
    """
    rows, cols = frame.shape[:2]
    now = datetime.now()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = accession_number
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.StudyDescription = "Gastroscopy"
    ds.Modality = "ES" if sop_class == VL_ENDOSCOPIC else "OT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.Manufacturer = "GastroLens samples"
    ds.PatientOrientation = ""
    if sop_class == SECONDARY_CAPTURE:
        ds.ConversionType = "DI"
        ds.Laterality = ""
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
        ds.LossyImageCompression = "01" if jpeg_quality else "00"
        ds.AnatomicRegionSequence = [_stomach()]
        ds.AcquisitionContextSequence = []
    ds.SamplesPerPixel = 3
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PlanarConfiguration = 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    if jpeg_quality:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=jpeg_quality)
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = f"{frame.nbytes / buffer.tell():.2f}"[:16]
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PhotometricInterpretation = "RGB"
        ds.PixelData = np.ascontiguousarray(frame).tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _stomach() -> Dataset:
    item = Dataset()
    item.CodeValue = "69695003"
    item.CodingSchemeDesignator = "SCT"
    item.CodeMeaning = "Stomach"
    return item
