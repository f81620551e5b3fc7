"""The overlay image: the source picture with the result burned in, for any viewer.

Like the study's figure 4, the lesion's outline is drawn in red; the predicted class and
its probability are written beside it (white on a dark box); the model's name, version
and weights hash prefix, and the untrained warning when it applies, along the bottom. The result is a
Secondary Capture (Multi-frame True Color SC for multi-frame sources), RGB, ImageType
DERIVED\\SECONDARY, Burned In Annotation YES, in the source's study, in a new series.
The overlay of a lossy source is stored as JPEG Baseline (:mod:`jpeg`), any other as
native RGB.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from gastrolens import UNTRAINED_WARNING
from gastrolens.dicom_io.documents import jpeg
from gastrolens.dicom_io.documents.common import (
    MANUFACTURER,
    SOFTWARE_VERSION,
    check_lo,
    copy_patient_study,
    model_comment,
    model_label,
    now,
    references_frames,
    series_description,
    source_was_lossy,
)
from gastrolens.dicom_io.documents.uids import instance_uid, series_uid
from gastrolens.errors import OutputError
from gastrolens.findings import ImageFinding, ModelIdentity, OutputKind

logger = logging.getLogger(__name__)

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MULTIFRAME_TRUE_COLOR_SC = "1.2.840.10008.5.1.4.1.1.7.4"
OVERLAY_SERIES_NUMBER = 9703
OUTLINE_RGB = (255, 0, 0)
LABEL_TEXT_RGB = (255, 255, 255)
WARNING_TEXT_RGB = (255, 220, 0)
BOX_RGBA = (0, 0, 0, 170)


@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def label_text(finding: ImageFinding) -> str:
    """'peptic ulcer 0.91': the predicted class and its probability."""
    return f"{finding.predicted.display_name} {finding.probability(finding.predicted):.2f}"


def outline(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Boolean image of the mask's boundary, about ``thickness`` pixels wide."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    size = 2 * max(1, thickness // 2) + 1
    grown = image.filter(ImageFilter.MaxFilter(size))
    shrunk = image.filter(ImageFilter.MinFilter(size))
    edge: np.ndarray = np.asarray(grown) != np.asarray(shrunk)
    return edge


def draw_overlay(frame: np.ndarray, finding: ImageFinding, model: ModelIdentity) -> np.ndarray:
    """One RGB frame with the outline, label, model line and warning drawn on it."""
    rows, cols = frame.shape[:2]
    short = min(rows, cols)
    picture = Image.fromarray(frame)
    if finding.lesion_present and finding.mask.any():
        edge = outline(finding.mask, max(2, round(short / 100)))
        picture.paste(OUTLINE_RGB, mask=Image.fromarray(edge.astype(np.uint8) * 255))

    layer = Image.new("RGBA", picture.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    pad = max(1, round(short / 120))
    label = label_text(finding)
    font = _fitted_font(draw, label, cols - 4 * pad, max(8, round(short / 20)))
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    width, height = right - left + 2 * pad, bottom - top + 2 * pad
    x, y = _label_position(finding, cols, rows, width, height, pad)
    draw.rectangle((x, y, x + width, y + height), fill=BOX_RGBA)
    draw.text((x + pad - left, y + pad - top), label, font=font, fill=LABEL_TEXT_RGB)

    lines = [(f"{model_label(model)}  sha256 {model.weights_sha256[:12]}", LABEL_TEXT_RGB)]
    if model.untrained:
        lines.insert(0, (UNTRAINED_WARNING, WARNING_TEXT_RGB))
    y = rows
    for text, colour in reversed(lines):
        font = _fitted_font(draw, text, cols - 4 * pad, max(8, round(short / 28)))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        height = bottom - top + 2 * pad
        y -= height
        draw.rectangle((0, y, right - left + 2 * pad, y + height), fill=BOX_RGBA)
        draw.text((pad - left, y + pad - top), text, font=font, fill=colour)

    picture = Image.alpha_composite(picture.convert("RGBA"), layer).convert("RGB")
    return np.asarray(picture, dtype=np.uint8)


def _fitted_font(
    draw: ImageDraw.ImageDraw, text: str, max_width: int, size: int
) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The largest font no bigger than ``size`` in which ``text`` fits ``max_width``."""
    while size > 6:
        font = _font(size)
        left, _, right, _ = draw.textbbox((0, 0), text, font=font)
        if right - left <= max_width:
            return font
        size -= 1
    return _font(6)


def _label_position(finding: ImageFinding, cols: int, rows: int, width: int, height: int, pad: int) -> tuple[int, int]:
    """Just above the lesion's box, else just below it, else the top-left corner."""
    if finding.lesion_present and finding.bbox is not None:
        row_min, col_min, row_max, _ = finding.bbox
        x = min(max(0, col_min), max(0, cols - width))
        if row_min - height - pad >= 0:
            return x, row_min - height - pad
        if row_max + pad + height <= rows:
            return x, row_max + pad
    return 2 * pad, 2 * pad


def build_overlay(
    header: Dataset,
    frames: Sequence[np.ndarray],
    findings: Sequence[ImageFinding],
    model: ModelIdentity,
) -> Dataset:
    """The overlay instance for one source instance (``frames``: its decoded RGB frames)."""
    rows, cols = int(header.Rows), int(header.Columns)
    if len(frames) != len(findings):
        raise OutputError(f"source instance {header.SOPInstanceUID}: {len(frames)} frames, {len(findings)} findings")
    for frame in frames:
        if frame.shape != (rows, cols, 3) or frame.dtype != np.uint8:
            raise OutputError(
                f"source instance {header.SOPInstanceUID}: decoded frame {frame.shape} {frame.dtype} "
                f"is not ({rows}, {cols}, 3) uint8"
            )
    drawn = [draw_overlay(frame, finding, model) for frame, finding in zip(frames, findings, strict=True)]
    multiframe = "NumberOfFrames" in header
    created = now()

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    copy_patient_study(header, ds)
    ds.SOPClassUID = MULTIFRAME_TRUE_COLOR_SC if multiframe else SECONDARY_CAPTURE
    ds.SOPInstanceUID = instance_uid(OutputKind.OVERLAY, header.SOPInstanceUID, model.weights_sha256)
    ds.InstanceCreationDate = created.strftime("%Y%m%d")
    ds.InstanceCreationTime = created.strftime("%H%M%S")

    # General Series
    ds.Modality = header.get("Modality") or "OT"
    ds.SeriesInstanceUID = series_uid(OutputKind.OVERLAY, header.StudyInstanceUID, model.weights_sha256)
    ds.SeriesNumber = OVERLAY_SERIES_NUMBER
    ds.SeriesDescription = series_description("overlay", model)
    ds.Laterality = header.get("Laterality", "")

    # General Equipment and SC Equipment
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = check_lo(model.name, "model name")
    ds.SoftwareVersions = [SOFTWARE_VERSION, model.version]
    ds.ConversionType = "WSD"  # workstation
    ds.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    ds.SecondaryCaptureDeviceManufacturerModelName = ds.ManufacturerModelName
    ds.SecondaryCaptureDeviceSoftwareVersions = [SOFTWARE_VERSION, model.version]

    # General Image, General Reference, SC Image
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.InstanceNumber = int(header.get("InstanceNumber") or 1)
    ds.ContentDate = created.strftime("%Y%m%d")
    ds.ContentTime = created.strftime("%H%M%S")
    ds.PatientOrientation = header.get("PatientOrientation", "")
    ds.BurnedInAnnotation = "YES"
    if "RecognizableVisualFeatures" in header:
        ds.RecognizableVisualFeatures = header.RecognizableVisualFeatures
    lossy = source_was_lossy(header)
    ds.LossyImageCompression = "01" if lossy else "00"
    ds.ImageComments = model_comment(model)
    ds.DerivationDescription = (
        f"{model_label(model)}: lesion outlined in red, predicted class and probability burned in"
    )
    source = Dataset()
    source.ReferencedSOPClassUID = header.SOPClassUID
    source.ReferencedSOPInstanceUID = header.SOPInstanceUID
    if references_frames(header):
        source.ReferencedFrameNumber = list(range(1, len(frames) + 1))
    ds.SourceImageSequence = [source]
    ds.DateOfSecondaryCapture = ds.ContentDate
    ds.TimeOfSecondaryCapture = ds.ContentTime

    # Image Pixel
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = jpeg.PHOTOMETRIC_INTERPRETATION if lossy else "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if multiframe:
        ds.NumberOfFrames = len(drawn)
        ds.FrameIncrementPointer = 0x00182002  # Frame Label Vector (SC Multi-frame Vector module)
        ds.FrameLabelVector = [f"frame {n}" for n in range(1, len(drawn) + 1)]
    if lossy:  # its picture is a lossy one already: JPEG Baseline, about ten times smaller (see jpeg.py)
        encoded = jpeg.encode_frames(drawn)
        ds.LossyImageCompressionRatio = encoded.ratio
        ds.LossyImageCompressionMethod = jpeg.METHOD
        ds.PixelData = encoded.pixel_data
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = jpeg.TRANSFER_SYNTAX
        return ds
    pixels = np.stack(drawn) if multiframe else drawn[0]
    data = pixels.tobytes()
    ds.PixelData = data + b"\0" * (len(data) % 2)
    return ds
