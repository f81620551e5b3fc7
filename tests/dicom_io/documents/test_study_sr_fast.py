"""The fast study SR (study_sr_fast) writes what highdicom writes.

Each case writes the same study both ways and compares the whole attribute trees (times
of writing left out; the UIDs are deterministic, so they must match too); every
fast-path object must also pass dciodvfy.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from gastrolens.dicom_io.documents.outputs import Builder, PredecessorRef, write_study_sr
from gastrolens.findings import ImageFinding, LesionClass

from .conftest import assert_dciodvfy_clean
from .synthetic import MULTIFRAME_TRUE_COLOR_SC, SECONDARY_CAPTURE, UNTRAINED, VL_ENDOSCOPIC, scenario
from .test_fast_equivalence import tree

STUDY_UID = "1.2.826.0.1.3680043.8.498.5151"
CLASSES = (VL_ENDOSCOPIC, SECONDARY_CAPTURE, VL_ENDOSCOPIC, MULTIFRAME_TRUE_COLOR_SC, VL_ENDOSCOPIC)
LESIONS = (LesionClass.PU, None, LesionClass.EGC_HGIN, None, LesionClass.PU)
NAMES = {"ISO_IR 192": "Zhang^Liming=张黎明", "GB18030": "Ou^Yang=欧阳^娜娜"}

Study = list[tuple[Dataset, list[ImageFinding]]]


def make_study(
    count: int,
    *,
    lesions: bool = True,
    charset: str = "ISO_IR 192",
    second_model_from: int | None = None,
    sizes: tuple[tuple[int, int], ...] = ((33, 47),),
) -> Study:
    study: Study = []
    for i in range(count):
        sop_class = CLASSES[i % len(CLASSES)]
        rows, cols = sizes[i % len(sizes)]
        options: dict = {"frames": 3} if sop_class == MULTIFRAME_TRUE_COLOR_SC else {}
        if second_model_from is not None and i >= second_model_from:
            options["model"] = UNTRAINED
        source, findings = scenario(
            sop_class,
            lesion=LESIONS[i % len(LESIONS)] if lesions else None,
            rows=rows,
            cols=cols,
            study_uid=STUDY_UID,
            charset=charset,
            patient_name=NAMES[charset],
            **options,
        )
        if i % 4 == 3:  # a second series, interleaved
            source.SeriesInstanceUID = study[0][0].SeriesInstanceUID
        del source.PixelData  # completion reads headers only
        study.append((source, findings))
    return study


def both_ways(study: Study, tmp_path: Path, **options) -> tuple[Path, Path]:
    reference = write_study_sr(study, tmp_path / "highdicom", fsync=False, builder=Builder.HIGHDICOM, **options)
    fast = write_study_sr(study, tmp_path / "fast", fsync=False, **options)
    assert fast.conclusion == reference.conclusion
    assert fast.output.sop_instance_uid == reference.output.sop_instance_uid
    assert fast.output.series_instance_uid == reference.output.series_instance_uid
    return reference.output.path, fast.output.path


CASES = {
    "one model, lesions": {},
    "normal only": {"lesions": False},
    "two models": {"second_model_from": 5},
    "GB18030 name": {"charset": "GB18030"},
    "mixed image sizes": {"sizes": ((33, 47), (40, 52), (33, 47))},
}


@pytest.mark.parametrize("case", list(CASES))
def test_fast_study_sr_equals_the_reference(case: str, tmp_path: Path):
    study = make_study(12, **CASES[case])
    reference, fast = both_ways(study, tmp_path)
    assert tree(dcmread(fast)) == tree(dcmread(reference))
    assert_dciodvfy_clean(fast)


def test_a_revision_names_its_predecessor_the_same_way(tmp_path: Path):
    study = make_study(7)
    first = write_study_sr(study[:5], tmp_path / "first", fsync=False)
    predecessor = PredecessorRef(first.output.sop_instance_uid, first.output.series_instance_uid)
    reference, fast = both_ways(study, tmp_path, revision=2, predecessor=predecessor)
    written = dcmread(fast)
    assert written.InstanceNumber == 2
    assert (
        written.PredecessorDocumentsSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID
        == first.output.sop_instance_uid
    )
    assert tree(written) == tree(dcmread(reference))
    assert_dciodvfy_clean(fast)


def test_every_image_is_referenced(tmp_path: Path):
    """The spliced parts are really there: each source in the evidence and the image library,
    each lesion frame in its class group (a skeleton alone would name only representatives)."""
    study = make_study(20)
    _, fast = both_ways(study, tmp_path)
    written = dcmread(fast)
    evidence = [
        ref.ReferencedSOPInstanceUID
        for series in written.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    ]
    assert sorted(evidence) == sorted(source.SOPInstanceUID for source, _ in study)
    library = [
        entry
        for item in written.ContentSequence
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == "111028"
        for group in item.ContentSequence
        for entry in group.ContentSequence
    ]
    assert len(library) == len(study)


def test_a_source_with_a_frame_of_reference_is_written_by_the_reference_builder(tmp_path: Path):
    study = make_study(3)
    study[0][0].FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.99"
    reference, fast = both_ways(study, tmp_path)
    assert tree(dcmread(fast)) == tree(dcmread(reference))
