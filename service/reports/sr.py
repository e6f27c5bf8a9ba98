"""The Structured Report: one TID 1500 Measurement Report per analysed study.

Viewers that understand TID 1500 (OHIF and others) show it as measurements; every
other viewer still renders its text. Its content, in order:

* observer context: our node as the observing device (TID 1004);
* procedure reported, language, title (all from the template);
* a study-summary measurement group (TID 1501) with the summary class, its
  probability, the out-of-distribution flag when raised and the rule that made it;
* one group per analysed frame (frame 1 for single-frame images) that references
  its source image (and frame): the finding as a coded qualitative evaluation, each
  class probability as a numeric measurement, the out-of-distribution flag when
  raised, and the model identity as Algorithm Identification (TID 4019: name,
  version, sha256 and index version as parameters);
* a "Qualitative Evaluations" container with the disclaimer, a readable line per
  similar study (date, accession, label and its source, distance) that points to
  the matching image, and why an image was not analysed.

The similar studies' instances also go into the Pertinent Other Evidence Sequence;
a re-analysis references the earlier SR versions in the Predecessor Documents
Sequence. UIDs derive from (study, generation, SOP class), so building again is
idempotent.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    ImageContentItem,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from highdicom.sr.templates import LanguageOfContentItemAndDescendants
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
)

from service.model.imaging import number_of_frames
from service.reports import derived_uid
from service.reports.template import SrTemplate
from service.results import FrameResult, ImageResult, SimilarStudy, StudyResult

#: The SR SOP classes we can write, in the order the sender falls back along when a
#: destination refuses one: Comprehensive 3D -> Comprehensive -> Enhanced.
SR_CLASSES: tuple[str, ...] = (Comprehensive3DSRStorage, ComprehensiveSRStorage, EnhancedSRStorage)

_SR_TYPES: dict[str, type[hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR | hd.sr.EnhancedSR]] = {
    Comprehensive3DSRStorage: hd.sr.Comprehensive3DSR,
    ComprehensiveSRStorage: hd.sr.ComprehensiveSR,
    EnhancedSRStorage: hd.sr.EnhancedSR,
}

SrDocument = hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR | hd.sr.EnhancedSR


def sr_series_uid(study_uid: str, generation: int) -> str:
    return derived_uid(study_uid, generation, "sr-series")


def sr_instance_uid(study_uid: str, generation: int, sop_class_uid: str) -> str:
    return derived_uid(study_uid, generation, "sr", sop_class_uid)


def device_uid(template: SrTemplate) -> str:
    """Our node's Device Observer UID: stable for one device identity."""
    d = template.device
    return derived_uid("device", d.manufacturer, d.model_name, d.serial_number)


def build_sr(
    result: StudyResult,
    template: SrTemplate,
    sources: Sequence[Dataset],
    sop_class_uid: str,
    software_version: str,
    predecessors: Sequence[Dataset] = (),
) -> SrDocument:
    """Build the study's SR in ``sop_class_uid`` (one of :data:`SR_CLASSES`).

    ``sources`` are the headers of the study's instances (the first one gives the
    patient and study attributes); ``predecessors`` are earlier SR versions.
    """
    if sop_class_uid not in _SR_TYPES:
        raise ValueError(f"{sop_class_uid} is not an SR SOP class we write (one of {list(_SR_TYPES)})")
    headers = {ds.SOPInstanceUID: ds for ds in sources}
    groups = [_summary_group(result, template, headers)]
    for image in result.images:
        groups += [_frame_group(result, template, headers, image, frame) for frame in image.frames]
    report = MeasurementReport(
        observation_context=_observation_context(template),
        procedure_reported=template.procedure_reported.code(),
        imaging_measurements=groups,
        title=template.title.code(),
        language_of_content_item_and_descendants=LanguageOfContentItemAndDescendants(template.language.code()),
    )
    report[0].ContentSequence.append(_evaluations(result, template, headers))
    device = template.device
    return _SR_TYPES[sop_class_uid](
        evidence=[*sources, *(_similar_evidence(s) for s in result.similar)],
        content=report,
        series_instance_uid=sr_series_uid(result.study_uid, result.generation),
        series_number=template.sr_series.number,
        sop_instance_uid=sr_instance_uid(result.study_uid, result.generation, sop_class_uid),
        instance_number=1,
        manufacturer=device.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=list(predecessors) or None,
        series_description=template.sr_series.description,
        manufacturer_model_name=device.model_name,
        software_versions=software_versions(software_version, result),
        device_serial_number=device.serial_number,
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=s.designator, name=s.name, responsible_organization=s.responsible_organization
            )
            for s in template.coding_schemes
        ],
    )


def software_versions(software_version: str, result: StudyResult) -> list[str]:
    """Software Versions (LO, 64 characters each): our node and the model."""
    return [f"sonocase {software_version}"[:64], f"{result.model.name} {result.model.version}"[:64]]


def _observation_context(template: SrTemplate) -> ObservationContext:
    d = template.device
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=device_uid(template),
                name=d.name,
                manufacturer_name=d.manufacturer,
                model_name=d.model_name,
                serial_number=d.serial_number,
            ),
        )
    )


def _algorithm(result: StudyResult) -> AlgorithmIdentification:
    """TID 4019, made anew for each group (content items belong to one parent)."""
    return AlgorithmIdentification(
        name=result.model.name,
        version=result.model.version,
        parameters=[f"model sha256 {result.model.sha256}", f"index version {result.index_version or 'none'}"],
    )


def _source_image(
    headers: dict[str, Dataset], sop_instance_uid: str, frame_number: int
) -> SourceImageForMeasurementGroup:
    header = headers.get(sop_instance_uid)
    if header is None:
        raise ValueError(f"analysed instance {sop_instance_uid} is not among the study's source instances")
    multi_frame = number_of_frames(header) > 1
    return SourceImageForMeasurementGroup(
        referenced_sop_class_uid=header.SOPClassUID,
        referenced_sop_instance_uid=sop_instance_uid,
        referenced_frame_numbers=[frame_number] if multi_frame else None,
    )


def _finding(template: SrTemplate, label: str, out_of_distribution: bool) -> list[QualitativeEvaluation]:
    concepts = template.concepts
    found = [QualitativeEvaluation(concepts.classification.code(), template.class_spec(label).finding.code())]
    if out_of_distribution:
        found.append(QualitativeEvaluation(concepts.out_of_distribution.code(), concepts.yes.code()))
    return found


def _probability(template: SrTemplate, label: str, value: float) -> Measurement:
    return Measurement(
        name=template.class_spec(label).probability.code(),
        value=value,
        unit=template.concepts.probability_unit.code(),
    )


def _frame_group(
    result: StudyResult,
    template: SrTemplate,
    headers: dict[str, Dataset],
    image: ImageResult,
    frame: FrameResult,
) -> MeasurementsAndQualitativeEvaluations:
    label = template.wording.image_group.format(
        instance=instance_label(headers, image.sop_instance_uid), frame=frame.frame_number
    )
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derived_uid(result.study_uid, result.generation, "track", image.sop_instance_uid, frame.frame_number),
            identifier=label,
        ),
        algorithm_id=_algorithm(result),
        finding_sites=[FindingSite(template.finding_site.code())],
        measurements=[_probability(template, c, p) for c, p in frame.probabilities.items()],
        qualitative_evaluations=_finding(template, frame.predicted, frame.out_of_distribution),
        source_images=[_source_image(headers, image.sop_instance_uid, frame.frame_number)],
    )


def _summary_group(
    result: StudyResult,
    template: SrTemplate,
    headers: dict[str, Dataset],
) -> MeasurementsAndQualitativeEvaluations:
    summary = result.summary
    analysed = summary.predicted is not None and summary.decisive_sop_instance_uid is not None
    decisive = next((i for i in result.images if i.sop_instance_uid == summary.decisive_sop_instance_uid), None)
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derived_uid(result.study_uid, result.generation, "track", "summary"),
            identifier=template.wording.study_summary,
        ),
        algorithm_id=_algorithm(result),
        finding_sites=[FindingSite(template.finding_site.code())],
        measurements=(
            [_probability(template, summary.predicted, summary.probability)]
            if analysed and summary.probability is not None
            else None
        ),
        qualitative_evaluations=_finding(template, summary.predicted, summary.out_of_distribution)
        if analysed
        else None,
        source_images=(
            [_source_image(headers, decisive.sop_instance_uid, decisive_frame(decisive).frame_number)]
            if decisive is not None and decisive.frames
            else None
        ),
    )
    group[0].ContentSequence.append(
        TextContentItem(
            name=template.concepts.summary_rule.code(),
            value=summary.rule,
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
    )
    return group


def _evaluations(result: StudyResult, template: SrTemplate, headers: dict[str, Dataset]) -> ContainerContentItem:
    """TID 1500's "Qualitative Evaluations": what a reader needs in words."""
    concepts, wording = template.concepts, template.wording
    container = ContainerContentItem(
        name=concepts.qualitative_evaluations.code(), relationship_type=RelationshipTypeValues.CONTAINS
    )
    items: list[Dataset] = [
        TextContentItem(
            name=concepts.comment.code(), value=template.disclaimer, relationship_type=RelationshipTypeValues.CONTAINS
        )
    ]
    for rank, similar in enumerate(result.similar, start=1):
        line = TextContentItem(
            name=concepts.similar_study.code(),
            value=wording.similar_line.format(
                rank=rank,
                study_date=readable_date(similar.study_date),
                accession=similar.accession_number or "-",
                label=class_display(template, similar.label),
                label_source=similar.label_source,
                distance=similar.distance,
                similarity=similar.similarity,
            ),
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
        line.ContentSequence = [
            ImageContentItem(
                name=concepts.similar_image.code(),
                referenced_sop_class_uid=similar.sop_class_uid,
                referenced_sop_instance_uid=similar.sop_instance_uid,
                relationship_type=RelationshipTypeValues.INFERRED_FROM,
            )
        ]
        items.append(line)
    for image in result.images:
        if image.skipped:
            items.append(
                TextContentItem(
                    name=concepts.not_analysed.code(),
                    value=wording.not_analysed_line.format(
                        instance=instance_label(headers, image.sop_instance_uid), reason=image.skipped
                    ),
                    relationship_type=RelationshipTypeValues.CONTAINS,
                )
            )
    container.ContentSequence = items
    return container


def _similar_evidence(similar: SimilarStudy) -> Dataset:
    """The UIDs highdicom needs to list a similar study's image as evidence."""
    ds = Dataset()
    ds.StudyInstanceUID = similar.study_uid
    ds.SeriesInstanceUID = similar.series_uid
    ds.SOPInstanceUID = similar.sop_instance_uid
    ds.SOPClassUID = similar.sop_class_uid
    return ds


def decisive_frame(image: ImageResult) -> FrameResult:
    """The frame that speaks for an image: the most probable frame of the image's
    predicted class (the only frame of a single-frame image)."""
    if not image.frames:
        raise ValueError(f"image {image.sop_instance_uid} has no analysed frame")
    label = image.predicted or image.frames[0].predicted
    return max(image.frames, key=lambda f: (f.predicted == label, f.probabilities.get(label, 0.0)))


def instance_label(headers: dict[str, Dataset], sop_instance_uid: str) -> str:
    """How people find an image in the study: its Instance Number, else its UID."""
    header = headers.get(sop_instance_uid)
    number = header.get("InstanceNumber") if header is not None else None
    return str(number) if number not in (None, "") else sop_instance_uid


def class_display(template: SrTemplate, label: str) -> str:
    """The template's word for a class; labels the template does not know (a
    reference index built with other classes) are shown as they are."""
    spec = template.classes.get(label)
    return spec.display if spec is not None else label


def readable_date(dicom_date: str) -> str:
    """``YYYYMMDD`` as ``YYYY-MM-DD``; anything else unchanged, empty as "-"."""
    if len(dicom_date) == 8 and dicom_date.isdigit():
        return f"{dicom_date[:4]}-{dicom_date[4:6]}-{dicom_date[6:]}"
    return dicom_date or "-"
