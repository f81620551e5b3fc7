"""The study-level SR (``OutputKind.STUDY_SR``): the study's conclusion and the classes behind it.

One TID 1501 group per reported class (the images that show it and its highest
probability) and an image-less "study conclusion" group whose Conclusion names the class
chosen by :func:`conclusion.aggregate_study`. A revision names its predecessor in
Predecessor Documents Sequence.

A study whose images were judged by several models (a model was replaced while the
study was open) gets one SR that names every model: each class group is split per model
and carries that model's TID 4019 Algorithm Identification; the conclusion group, the
observer and the Series Description name all of them; the UIDs are keyed by all their
weights hashes. With one model the SR is exactly what it always was.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import highdicom as hd
from pydicom.dataset import Dataset

from gastrolens import __version__
from gastrolens.dicom_io.documents import codes
from gastrolens.dicom_io.documents.common import MANUFACTURER, now, series_description
from gastrolens.dicom_io.documents.sr import (
    STUDY_SR_SERIES_NUMBER,
    PredecessorRef,
    _algorithm,
    _finish,
    _measured_in,
    _probability,
    _report,
)
from gastrolens.dicom_io.documents.uids import derived_uid, study_sr_instance_uid, study_sr_series_uid
from gastrolens.errors import OutputError
from gastrolens.findings import ImageFinding, ModelIdentity

if TYPE_CHECKING:  # the models package imports torch: output workers must not
    from gastrolens.models.conclusion import StudyConclusion


def combined_identity(models: Sequence[ModelIdentity]) -> ModelIdentity:
    """One model as it is; several as one identity: names and versions joined, and a
    weights hash that is the sha256 of their sorted hashes joined with '+' (UIDs)."""
    if len(models) == 1:
        return models[0]
    shas = sorted({m.weights_sha256 for m in models})
    return ModelIdentity(
        name="+".join(dict.fromkeys(m.name for m in models))[:64],
        version="+".join(dict.fromkeys(m.version for m in models))[:64],
        weights_sha256=hashlib.sha256("+".join(shas).encode()).hexdigest(),
        untrained=any(m.untrained for m in models),
    )


def _conclusion_algorithm(models: Sequence[ModelIdentity]) -> hd.sr.AlgorithmIdentification:
    if len(models) == 1:
        return _algorithm(models[0])
    parameters = [f"weights_sha256={m.weights_sha256}" for m in models]
    parameters += [f"untrained={m.weights_sha256}" for m in models if m.untrained]
    return hd.sr.AlgorithmIdentification(name="GastroLens study conclusion", version=__version__,
                                         parameters=parameters)


def build_study_sr(
    study: Sequence[tuple[Dataset, Sequence[ImageFinding]]],
    models: ModelIdentity | Sequence[ModelIdentity],
    conclusion: StudyConclusion,
    *,
    revision: int = 1,
    predecessor: PredecessorRef | None = None,
) -> hd.sr.ComprehensiveSR:
    """The study-level SR. ``study`` pairs each source header with its per-frame findings,
    in the order whose flattened findings ``conclusion`` was computed from; ``models``
    lists every model behind those findings (first appearance first)."""
    return build_study_skeleton(study, models, conclusion, revision=revision, predecessor=predecessor,
                                skeleton=False).sr


@dataclass(frozen=True, kw_only=True)
class StudySkeleton:
    """What :func:`build_study_skeleton` built, and which images each part stands for.

    With ``skeleton=True`` every class group references only its first image and the
    image library and evidence only representatives (the first header, the first of
    each SOP class, the first image of each group): :mod:`study_sr_fast` writes the
    rest from ``images`` and ``group_sources``.
    """

    sr: hd.sr.ComprehensiveSR
    headers: list[Dataset]
    images: list[tuple[Dataset, int, ImageFinding]]
    group_sources: list[list[int]]
    """Per class group, in order: the indices into ``images`` of its source frames."""


def build_study_skeleton(
    study: Sequence[tuple[Dataset, Sequence[ImageFinding]]],
    models: ModelIdentity | Sequence[ModelIdentity],
    conclusion: StudyConclusion,
    *,
    revision: int = 1,
    predecessor: PredecessorRef | None = None,
    skeleton: bool,
) -> StudySkeleton:
    """The study SR with highdicom, whole or as a skeleton (see :class:`StudySkeleton`)."""
    models = [models] if isinstance(models, ModelIdentity) else list(dict.fromkeys(models))
    if not models:
        raise OutputError("a study SR needs at least one model")
    if not study:
        raise OutputError("a study SR needs at least one source instance")
    study_uids = {header.StudyInstanceUID for header, _ in study}
    if len(study_uids) != 1:
        raise OutputError(f"a study SR covers one study, got {len(study_uids)}")
    study_uid = study_uids.pop()
    images: list[tuple[Dataset, int, ImageFinding]] = [
        (header, frame, finding) for header, findings in study for frame, finding in enumerate(findings, start=1)
    ]
    if len(images) != conclusion.image_count:
        raise OutputError(f"conclusion covers {conclusion.image_count} images, the study has {len(images)}")
    unknown = {finding.model for _, _, finding in images} - set(models)
    if unknown:
        raise OutputError(f"findings come from model(s) not named: {sorted(m.name for m in unknown)}")
    observer = combined_identity(models)
    sha = observer.weights_sha256
    site = hd.sr.FindingSite(anatomic_location=codes.STOMACH)
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    group_sources: list[list[int]] = []
    for evidence in conclusion.reported:
        for model in models:
            indices = [i for i in evidence.image_indices if images[i][2].model == model]
            if not indices:
                continue
            best = (evidence.max_probability if len(models) == 1
                    else max(images[i][2].probability(evidence.lesion_class) for i in indices))
            parts = [evidence.lesion_class.value] + ([model.weights_sha256] if len(models) > 1 else [])
            tracking = derived_uid("study-class", study_uid, sha, *parts)
            group_sources.append(indices)
            shown = indices[:1] if skeleton else indices
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=tracking, identifier=f"study {evidence.lesion_class.value}"
                    ),
                    finding_type=codes.class_code(evidence.lesion_class),
                    finding_sites=[site],
                    algorithm_id=_algorithm(model),
                    measurements=[_probability(best)],
                    source_images=[_measured_in(images[i][0], images[i][1]) for i in shown],
                )
            )
    groups.append(
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid("study-conclusion", study_uid, sha), identifier="study conclusion"
            ),
            finding_sites=[site],
            algorithm_id=_conclusion_algorithm(models),
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(codes.CONCLUSION, codes.class_code(conclusion.conclusion))
            ],
        )
    )
    evidence_headers = [header for header, _ in study]
    library = evidence_headers
    if skeleton:
        firsts: dict[str, Dataset] = {}
        for header in evidence_headers:
            firsts.setdefault(header.SOPClassUID, header)
        library = list(firsts.values())
        shown_headers = [evidence_headers[0], *library, *(images[i[0]][0] for i in group_sources)]
        evidence_headers = list({id(h): h for h in shown_headers}.values())
    previous = None
    if predecessor is not None:
        pre = Dataset()
        pre.SOPClassUID = predecessor.sop_class_uid
        pre.SOPInstanceUID = predecessor.sop_instance_uid
        pre.StudyInstanceUID = study_uid
        pre.SeriesInstanceUID = predecessor.series_instance_uid
        previous = [pre]
    created = now()
    try:
        sr = hd.sr.ComprehensiveSR(
            evidence=evidence_headers,
            content=_report(observer, groups, library),
            series_instance_uid=study_sr_series_uid(study_uid, sha),
            series_number=STUDY_SR_SERIES_NUMBER,
            sop_instance_uid=study_sr_instance_uid(study_uid, sha, revision),
            instance_number=revision,
            manufacturer=MANUFACTURER,
            is_complete=True,
            previous_versions=previous,
            series_description=series_description("study SR", observer),
            content_date=created.date(),
            content_time=created.time(),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"study {study_uid}: highdicom refused the study SR: {exc}") from exc
    return StudySkeleton(sr=_finish(sr), headers=[header for header, _ in study], images=images,
                         group_sources=group_sources)
