"""The one entry point the pipeline calls: turn findings into SEG, SR and overlay files.

:func:`write_outputs` handles one source instance, :func:`write_study_sr` one study.
Everything is built and checked in memory first; files are then written one by one with
a temporary name and a rename, so a reader never sees half a file, and if a later file
of the same call fails the earlier ones are removed again. File names and UIDs are pure
functions of the inputs, so processing an image again replaces its outputs.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from gastrolens.config.schema import OutputSettings
from gastrolens.dicom_io.documents.common import check_findings, check_source, now, save, source_header
from gastrolens.dicom_io.documents.fast import TemplateRefused, build_fast
from gastrolens.dicom_io.documents.normalise import normalise_source
from gastrolens.dicom_io.documents.overlay import build_overlay
from gastrolens.dicom_io.documents.read import decode_rgb_frames, number_of_frames
from gastrolens.dicom_io.documents.seg import SegmentInfo, build_segmentation
from gastrolens.dicom_io.documents.sr import PredecessorRef, build_image_sr
from gastrolens.dicom_io.documents.study_sr import build_study_sr
from gastrolens.dicom_io.documents.study_sr_fast import FastStudyRefused, encode_study_sr
from gastrolens.errors import DecodeError, OutputError
from gastrolens.findings import ImageFinding, ModelIdentity, OutputKind
from gastrolens.storage.atomic import write_atomic

if TYPE_CHECKING:  # the models package imports torch: output workers must not
    from gastrolens.models.conclusion import StudyConclusion

logger = logging.getLogger(__name__)

__all__ = [
    "Builder",
    "OutputKind",
    "PredecessorRef",
    "WrittenOutput",
    "WrittenOutputs",
    "WrittenStudyReport",
    "output_path",
    "write_outputs",
    "write_study_sr",
]


@dataclass(frozen=True)
class WrittenOutput:
    """One file GastroLens wrote, with what delivery and the database need to know."""

    kind: OutputKind
    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str


class Builder(str, enum.Enum):
    """How output objects are built: from cached byte templates (fast), or from scratch
    by the reference builders (highdicom for SEG and SR), which define every object."""

    TEMPLATE = "template"
    HIGHDICOM = "highdicom"


class WrittenOutputs(list[WrittenOutput]):
    """The files :func:`write_outputs` wrote, plus what the caller records beside them.

    A list, so callers that only iterate need nothing new; it pickles with its fields,
    so it comes back from worker processes whole.
    """

    cpu_seconds: float
    """CPU time of the calling thread spent in :func:`write_outputs` (for
    ``metrics.add_stage_cpu(Stage.OUTPUTS, ...)`` in the daemon)."""
    quirks: tuple[str, ...]
    """What was wrong with the source and how it was read anyway (short strings)."""

    def __init__(self, written: Sequence[WrittenOutput] = (), *, cpu_seconds: float = 0.0,
                 quirks: Sequence[str] = ()) -> None:
        super().__init__(written)
        self.cpu_seconds = cpu_seconds
        self.quirks = tuple(quirks)


@dataclass(frozen=True)
class WrittenStudyReport:
    output: WrittenOutput
    conclusion: StudyConclusion


def output_path(out_dir: Path, kind: OutputKind, sop_instance_uid: str) -> Path:
    """Where an output is written: ``<out_dir>/<kind>_<SOP Instance UID>.dcm``."""
    return out_dir / f"{kind.value.lower()}_{sop_instance_uid}.dcm"


def write_outputs(
    source: Dataset,
    findings: Sequence[ImageFinding],
    out_dir: Path,
    settings: OutputSettings | None = None,
    *,
    frames: Sequence[np.ndarray] | None = None,
    fsync: bool = True,
    builder: Builder = Builder.TEMPLATE,
) -> WrittenOutputs:
    """Write the SEG, SR and overlay of one source instance (each as ``settings`` allow).

    ``source`` is the full stored dataset (with pixel data); ``findings`` holds one
    :class:`ImageFinding` per frame. ``frames`` may pass the RGB frames already decoded
    for inference so they are not decoded again. No SEG is written when no frame shows a
    lesion. Raises :class:`OutputError` for a bad source or findings, with nothing written.
    ``builder`` chooses the fast template path (default) or the reference builders; both
    write the same objects (tests/dicom_io/documents/test_fast_equivalence.py).

    A header the builders would refuse (no Modality, an unknown character set, frames in
    a single-frame IOD, misspelled defined terms, invalid dates) is repaired in a copy as
    the standard allows (:mod:`normalise`); each repair is returned in ``quirks``.
    """
    started = time.thread_time()
    settings = settings or OutputSettings()
    check_source(source)
    model = check_findings(source, findings)
    if settings.overlay and frames is None:
        try:
            frames = decode_rgb_frames(source)
        except DecodeError as exc:
            raise OutputError(f"cannot draw the overlay: {exc}") from exc
    normalised = normalise_source(source)
    header = normalised.header
    written: list[WrittenOutput] | None = None
    if builder is Builder.TEMPLATE:
        try:
            written = _write_fast(header, findings, model, settings, frames, out_dir, fsync=fsync)
        except TemplateRefused as exc:  # a structure seen for the first time, or refused
            logger.debug("no %s template for instance %s yet; building with the reference path",
                         exc, source.SOPInstanceUID)
    if written is None:
        written = _write_reference(header, findings, model, settings, frames, out_dir, fsync=fsync)
    logger.info(
        "wrote %d output(s) for instance %s: %s",
        len(written), source.SOPInstanceUID, ", ".join(w.kind.value for w in written) or "none",
    )
    return WrittenOutputs(written, cpu_seconds=time.thread_time() - started, quirks=normalised.quirks)


def _write_reference(
    source: Dataset,
    findings: Sequence[ImageFinding],
    model: ModelIdentity,
    settings: OutputSettings,
    frames: Sequence[np.ndarray] | None,
    out_dir: Path,
    *,
    fsync: bool,
) -> list[WrittenOutput]:
    header = source_header(source)
    built: list[tuple[OutputKind, Dataset]] = []
    seg: hd.seg.Segmentation | None = None
    segments: list[SegmentInfo] = []
    if settings.seg:
        result = build_segmentation(header, findings, model)
        if result is not None:
            seg, segments = result
            built.append((OutputKind.SEG, seg))
    if settings.sr:
        built.append((OutputKind.SR, build_image_sr(header, findings, model, seg, segments)))
    if settings.overlay:
        assert frames is not None
        built.append((OutputKind.OVERLAY, build_overlay(header, frames, findings, model)))
    return _write_all(built, out_dir, fsync=fsync)


def _write_fast(
    source: Dataset,
    findings: Sequence[ImageFinding],
    model: ModelIdentity,
    settings: OutputSettings,
    frames: Sequence[np.ndarray] | None,
    out_dir: Path,
    *,
    fsync: bool,
) -> list[WrittenOutput]:
    if frames is not None:
        rows, cols = int(source.Rows), int(source.Columns)
        for frame in frames:
            if frame.shape != (rows, cols, 3) or frame.dtype != np.uint8:
                raise OutputError(f"source instance {source.SOPInstanceUID}: decoded frame {frame.shape} "
                                  f"{frame.dtype} is not ({rows}, {cols}, 3) uint8")
        if len(frames) != len(findings):
            raise OutputError(
                f"source instance {source.SOPInstanceUID}: {len(frames)} frames, {len(findings)} findings"
            )
    objects = build_fast(source, findings, model, seg=settings.seg, sr=settings.sr, overlay=settings.overlay,
                         frames=frames, created=now())
    written: list[WrittenOutput] = []
    try:
        for obj in objects:
            path = output_path(out_dir, obj.kind, obj.sop_instance_uid)
            try:
                write_atomic(path, _writer(obj.parts), fsync=fsync)
            except OSError as exc:
                raise OutputError(f"could not write {path}: {exc}") from exc
            written.append(WrittenOutput(kind=obj.kind, path=path, sop_instance_uid=obj.sop_instance_uid,
                                         series_instance_uid=obj.series_instance_uid, sop_class_uid=obj.sop_class_uid))
    except BaseException:
        for output in written:
            output.path.unlink(missing_ok=True)
        raise
    return written


def _writer(parts: Sequence[bytes | memoryview]) -> Callable[[BinaryIO], None]:
    def write(fh: BinaryIO) -> None:
        fh.writelines(parts)

    return write


def write_study_sr(
    study: Sequence[tuple[Dataset, Sequence[ImageFinding]]],
    out_dir: Path,
    settings: OutputSettings | None = None,
    *,
    revision: int = 1,
    predecessor: PredecessorRef | None = None,
    min_images: int = 1,
    fsync: bool = True,
    builder: Builder = Builder.TEMPLATE,
    notes: Sequence[str] = (),
) -> WrittenStudyReport:
    """Write revision ``revision`` of a study's conclusion SR.

    ``notes`` say why the report is incomplete (an MPPS step DISCONTINUED, images it
    listed that never arrived): each becomes a TEXT Comment item and the SR is marked
    PARTIAL (Completion Flag) with the first note as its description.

    ``study`` pairs every source instance of the study (pixel data not needed) with its
    per-frame findings. The conclusion follows ``settings.study_priority`` and the
    per-lesion rule (:func:`conclusion.aggregate_study`, ``min_images``). A revision
    after the first should name the SR it replaces in ``predecessor``. Findings from
    several models give one SR that names them all (:mod:`study_sr`).
    """
    settings = settings or OutputSettings()
    if not study:
        raise OutputError("a study SR needs at least one source instance")
    headers: list[tuple[Dataset, Sequence[ImageFinding]]] = []
    models: dict[ModelIdentity, None] = {}  # every model, in order of first appearance
    for source, findings in study:
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not source.get(keyword):
                raise OutputError(f"source instance {source.get('SOPInstanceUID', '?')} lacks {keyword}")
        if len(findings) != number_of_frames(source):
            raise OutputError(
                f"source instance {source.SOPInstanceUID} has {number_of_frames(source)} frame(s) "
                f"but {len(findings)} finding(s)"
            )
        models.update(dict.fromkeys(f.model for f in findings))
        normalised = normalise_source(source)
        # highdicom copies patient and study attributes from the first source only; the
        # others are read for UIDs, size and modality, so they need no copy (50 deep copies
        # were a third of a study SR's cost).
        header = normalised.header if normalised.quirks else source_header(source) if not headers else source
        headers.append((header, findings))
    if not models:
        raise OutputError("the study has no findings")
    from gastrolens.models.conclusion import aggregate_study  # torch: only where study SRs are written

    try:
        conclusion = aggregate_study(
            [f for _, findings in headers for f in findings], settings.study_priority, min_images=min_images
        )
    except ValueError as exc:
        raise OutputError(f"study conclusion: {exc}") from exc
    if builder is Builder.TEMPLATE and not notes:
        try:
            encoded = encode_study_sr(headers, list(models), conclusion, revision=revision, predecessor=predecessor)
        except FastStudyRefused as exc:
            logger.debug("study SR from highdicom: %s", exc)
        else:
            path = output_path(out_dir, OutputKind.STUDY_SR, encoded.sop_instance_uid)
            try:
                write_atomic(path, _writer(encoded.parts), fsync=fsync)
            except OSError as exc:
                raise OutputError(f"could not write {path}: {exc}") from exc
            logger.info("wrote study SR revision %d for study %s: %s", revision, encoded.study_instance_uid,
                        conclusion.conclusion.value)
            return WrittenStudyReport(
                output=WrittenOutput(kind=OutputKind.STUDY_SR, path=path, sop_instance_uid=encoded.sop_instance_uid,
                                     series_instance_uid=encoded.series_instance_uid,
                                     sop_class_uid=encoded.sop_class_uid),
                conclusion=conclusion)
    sr = build_study_sr(headers, list(models), conclusion, revision=revision, predecessor=predecessor)
    if notes:
        _mark_partial(sr, notes)
    (written,) = _write_all([(OutputKind.STUDY_SR, sr)], out_dir, fsync=fsync)
    logger.info(
        "wrote study SR revision %d for study %s: %s", revision, sr.StudyInstanceUID, conclusion.conclusion.value
    )
    return WrittenStudyReport(output=written, conclusion=conclusion)


def _mark_partial(sr: Dataset, notes: Sequence[str]) -> None:
    """Append each note as a TEXT Comment (121106, DCM) to the root and flag the SR PARTIAL."""
    comment = hd.sr.CodedConcept("121106", "DCM", "Comment")
    for note in notes:
        sr.ContentSequence.append(
            hd.sr.TextContentItem(name=comment, value=note, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    sr.CompletionFlag = "PARTIAL"
    sr.CompletionFlagDescription = notes[0][:64]


def _write_all(built: Sequence[tuple[OutputKind, Dataset]], out_dir: Path, *, fsync: bool) -> list[WrittenOutput]:
    written: list[WrittenOutput] = []
    try:
        for kind, ds in built:
            path = save(ds, output_path(out_dir, kind, ds.SOPInstanceUID), fsync=fsync)
            written.append(
                WrittenOutput(
                    kind=kind,
                    path=path,
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    series_instance_uid=str(ds.SeriesInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                )
            )
    except BaseException:
        for output in written:
            output.path.unlink(missing_ok=True)
        raise
    return written
