"""The template path writes what the reference path (highdicom) writes.

Every case writes image A with the template path (which compiles and caches the
templates for its structure), then image B of the same structure but with every
per-image value different (UIDs, patient, study, dates, probabilities, mask, pixels)
both ways, and compares the whole attribute trees (times excepted); every template-path
object must also pass dciodvfy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from gastrolens.config.schema import OutputSettings
from gastrolens.dicom_io.documents import fast
from gastrolens.dicom_io.documents.outputs import Builder, write_outputs
from gastrolens.dicom_io.documents.template import NESTED_TIME_KEYWORDS, TIME_KEYWORDS
from gastrolens.findings import LesionClass

from .conftest import assert_dciodvfy_clean, write_fast
from .synthetic import (
    CHINESE_NAME,
    MULTIFRAME_TRUE_COLOR_SC,
    SECONDARY_CAPTURE,
    UNTRAINED,
    VL_ENDOSCOPIC,
    encode,
    endoscopy_frame,
    lesion_mask,
    make_finding,
    make_source,
)

ROWS, COLS = 40, 52
NAMES = {
    "ISO_IR 192": ("Zhang^Liming=张黎明", "Li^Na=李娜"),
    "GB18030": ("Wang^Xiaoming=王小明", "Ou^Yang=欧阳^娜娜"),
}


def tree(ds: Dataset, top: bool = True) -> list:
    """The whole attribute tree, times of writing left out."""
    out: list = []
    for elem in ds:
        if (top and elem.keyword in TIME_KEYWORDS) or elem.keyword in NESTED_TIME_KEYWORDS:
            continue
        if elem.VR == "SQ":
            out.append((elem.tag, [tree(item, False) for item in elem.value]))
        else:
            value = elem.value
            out.append((elem.tag, elem.VR, str(value) if elem.VR == "PN" else value))
    return out


def image(sop_class: str, *, variant: int, lesion: LesionClass | None, frames: int = 1,
          charset: str = "ISO_IR 192", model=None, rows: int = ROWS, cols: int = COLS, **source_kwargs):
    """Image ``variant`` of a structure: same shape, every per-image value different."""
    pictures, findings = [], []
    for index in range(frames):
        cls = lesion or LesionClass.NORMAL
        if frames > 2 and index == frames // 2:
            cls = LesionClass.NORMAL
        center = (0.45 + 0.1 * variant, 0.3 + 0.4 * index / max(frames - 1, 1))
        mask = lesion_mask(rows, cols, center=center, radii=(0.15 + 0.05 * variant, 0.2))
        pictures.append(endoscopy_frame(rows, cols, seed=index + 10 * variant, lesion=mask if cls.is_lesion else None))
        kwargs = {"model": model} if model is not None else {}
        findings.append(make_finding(mask, cls, confidence=0.71 + 0.13 * variant + 0.01 * index, **kwargs))
    source = make_source(pictures, sop_class=sop_class, charset=charset,
                         patient_name=NAMES.get(charset, ("A^B", "C^D"))[variant], **source_kwargs)
    if variant:
        changes = {"PatientID": "GL-0002-B", "StudyDate": "20250101", "StudyTime": "101010",
                   "AccessionNumber": "ACC-22", "InstanceNumber": 17}
        for keyword, value in changes.items():
            if keyword in source:
                setattr(source, keyword, value)
    return source, findings


def stored(source: Dataset, folder: Path, syntax: str = ExplicitVRLittleEndian) -> Dataset:
    encode(source, syntax)
    path = folder / f"{source.SOPInstanceUID}.dcm"
    folder.mkdir(parents=True, exist_ok=True)
    source.save_as(path, enforce_file_format=True)
    return dcmread(path)


def assert_same_both_ways(tmp_path: Path, make, settings: OutputSettings | None = None,
                          syntax: str = ExplicitVRLittleEndian) -> list:
    fast.CACHE.clear()
    first, first_findings = make(0)
    first = stored(first, tmp_path / "src", syntax)
    misses = fast.CACHE.misses
    for output in write_fast(first, first_findings, tmp_path / "a", settings):
        assert_dciodvfy_clean(output.path)
    compiled = fast.CACHE.misses - misses
    assert compiled > 0, "image A's second sighting compiles the templates"
    second, findings = make(1)
    second = stored(second, tmp_path / "src", syntax)
    quick = write_outputs(second, findings, tmp_path / "fast", settings)
    assert fast.CACHE.misses - misses == compiled, "image B must reuse image A's templates"
    reference = write_outputs(second, findings, tmp_path / "ref", settings, builder=Builder.HIGHDICOM)
    assert [(w.kind, w.path.name, w.sop_instance_uid, w.series_instance_uid, w.sop_class_uid) for w in quick] == [
        (w.kind, w.path.name, w.sop_instance_uid, w.series_instance_uid, w.sop_class_uid) for w in reference
    ]
    for ours, theirs in zip(quick, reference, strict=True):
        assert_dciodvfy_clean(ours.path)
        a, b = dcmread(ours.path), dcmread(theirs.path)
        assert a.file_meta.MediaStorageSOPInstanceUID == b.file_meta.MediaStorageSOPInstanceUID
        assert a.file_meta.MediaStorageSOPClassUID == b.file_meta.MediaStorageSOPClassUID
        assert tree(a) == tree(b), f"{ours.kind.value} differs from the reference"
    return quick


@pytest.mark.parametrize("sop_class", [VL_ENDOSCOPIC, SECONDARY_CAPTURE, MULTIFRAME_TRUE_COLOR_SC],
                         ids=["VL", "SC", "MF-SC"])
@pytest.mark.parametrize("charset", ["ISO_IR 192", "GB18030"])
@pytest.mark.parametrize("lesion", [LesionClass.EGC_HGIN, None], ids=["lesion", "no-lesion"])
def test_sources(tmp_path: Path, sop_class, charset, lesion):
    frames = 3 if sop_class == MULTIFRAME_TRUE_COLOR_SC else 1
    written = assert_same_both_ways(
        tmp_path, lambda v: image(sop_class, variant=v, lesion=lesion, frames=frames, charset=charset)
    )
    assert len(written) == (3 if lesion else 2)
    for output in written:
        assert CHINESE_NAME not in str(dcmread(output.path).PatientName)  # image B's name, not A's


@pytest.mark.parametrize(
    "syntax",
    [ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit,
     JPEGLSLossless, JPEG2000Lossless, JPEG2000, RLELossless, JPEGLossless, JPEGLosslessSV1],
    ids=lambda uid: uid.keyword,
)
def test_every_accepted_transfer_syntax(tmp_path: Path, syntax):
    assert_same_both_ways(tmp_path, lambda v: image(SECONDARY_CAPTURE, variant=v, lesion=LesionClass.PU),
                          syntax=syntax)


def test_multi_frame_jpeg_baseline(tmp_path: Path):
    assert_same_both_ways(
        tmp_path, lambda v: image(MULTIFRAME_TRUE_COLOR_SC, variant=v, lesion=LesionClass.AGC, frames=2),
        syntax=JPEGBaseline8Bit,
    )


def test_untrained_model_and_missing_attributes(tmp_path: Path):
    omit = ("StudyDate", "StudyTime", "AccessionNumber", "SpecificCharacterSet")
    assert_same_both_ways(
        tmp_path,
        lambda v: image(VL_ENDOSCOPIC, variant=v, lesion=LesionClass.SMT, model=UNTRAINED, charset=None, omit=omit),
    )


def test_sr_without_seg(tmp_path: Path):
    written = assert_same_both_ways(tmp_path, lambda v: image(VL_ENDOSCOPIC, variant=v, lesion=LesionClass.PU),
                                    OutputSettings(seg=False))
    assert len(written) == 2


def test_template_path_is_deterministic(tmp_path: Path):
    source, findings = image(VL_ENDOSCOPIC, variant=0, lesion=LesionClass.PU)
    first = write_fast(source, findings, tmp_path / "a")
    fast.CACHE.clear()
    again = write_fast(source, findings, tmp_path / "b")
    for a, b in zip(first, again, strict=True):
        assert a.sop_instance_uid == b.sop_instance_uid
        assert tree(dcmread(a.path)) == tree(dcmread(b.path))


def test_odd_length_packed_bits_are_null_padded(tmp_path: Path):
    """9 x 8 pixels pack into 9 bytes: both paths pad with NULL (highdicom writes '0')."""
    written = assert_same_both_ways(
        tmp_path, lambda v: image(VL_ENDOSCOPIC, variant=v, lesion=LesionClass.PU, rows=9, cols=8)
    )
    seg = dcmread(written[0].path)
    assert len(seg.PixelData) == 10 and seg.PixelData[-1:] == b"\x00"


def test_seg_bits_are_packed_least_significant_first(tmp_path: Path):
    source, findings = image(SECONDARY_CAPTURE, variant=0, lesion=LesionClass.PU)
    (seg, *_) = write_fast(source, findings, tmp_path / "out")
    ds = dcmread(seg.path)
    bits = np.unpackbits(np.frombuffer(ds.PixelData, np.uint8), bitorder="little")[: ROWS * COLS]
    np.testing.assert_array_equal(bits.reshape(ROWS, COLS).astype(bool), findings[0].mask)


def _rich(source: Dataset, variant: int) -> Dataset:
    """Attributes real sources carry that the builders copy (or must not)."""
    from pydicom.dataset import Dataset as Item

    source.StudyDescription = ["Gastroscopy", "EGD with biopsy"][variant]
    source.ReferringPhysicianName = ["Li^Wei", "Chen^Jing"][variant]
    source.IssuerOfPatientID = "HOSPITAL-A"
    source.PatientAge = ["064Y", "031Y"][variant]
    source.PatientWeight = [71.5, 60][variant]
    source.OtherPatientIDs = ["X1", "Y22"][variant]
    code = Item()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "76009000", "SCT", "Esophagogastroduodenoscopy"
    source.ProcedureCodeSequence = [code]
    source.add_new(0x00091010, "LO", ["vendor private", "other private"][variant])
    source.add_new(0x00090010, "LO", "ACME 1.0")
    source.PixelSpacing = [0.1, 0.1]
    source.AcquisitionNumber = [3, 12][variant]
    return source


@pytest.mark.parametrize("sop_class", [VL_ENDOSCOPIC, SECONDARY_CAPTURE], ids=["VL", "SC"])
def test_rich_headers(tmp_path: Path, sop_class):
    def make(variant: int):
        source, findings = image(sop_class, variant=variant, lesion=LesionClass.PU)
        return _rich(source, variant), findings

    written = assert_same_both_ways(tmp_path, make)
    sr = dcmread(written[1].path)
    assert sr.StudyDescription == "EGD with biopsy" and sr.ReferringPhysicianName == "Chen^Jing"


def test_lossy_history_is_per_image(tmp_path: Path):
    """A source's own Lossy Image Compression Ratio and Method (copied into the SEG) are
    per-image values: image B's, not image A's; the overlay records its own JPEG ratio."""
    def make(variant: int):
        source, findings = image(VL_ENDOSCOPIC, variant=variant, lesion=LesionClass.PU)
        source.LossyImageCompression = "01"
        source.LossyImageCompressionRatio = ["12.5", "7.25"][variant]
        source.LossyImageCompressionMethod = ["ISO_10918_1", "ISO_15444_1"][variant]
        return source, findings

    seg, _, overlay = (dcmread(w.path) for w in assert_same_both_ways(tmp_path, make))
    assert (seg.LossyImageCompressionRatio, seg.LossyImageCompressionMethod) == (7.25, "ISO_15444_1")
    assert overlay.file_meta.TransferSyntaxUID == JPEGBaseline8Bit and overlay.LossyImageCompressionRatio != 7.25
