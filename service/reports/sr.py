"""The Structured Report: one TID 1500 Measurement Report per analysed study.

Viewers that understand TID 1500 (OHIF and others) draw it as measurements on the
images; every other viewer still renders its text. Every measurement group is a
TID 1501 group whose numbers are inferred from SCOORDs on the source image (TID 300
via TID 320): the shape OHIF 3.13's Cornerstone3D adapters read back as tools, so
OHIF lists each lesion in its measurement panel and draws it with its own tools
(contour, axes). OHIF draws none of a report that mixes groups with and without
coordinates, so a report's groups either all carry them or none does. Its content,
in order:

* observer context: our node as the observing device (TID 1004);
* procedure reported, language, title (all from the template);
* per assessed frame with something to draw (:func:`region_outline`: the lesion the
  model outlined, or for a model that outlines none the Grad-CAM outline of a frame
  not called normal), the frames of the image that decides the study summary first
  (a viewer opens the report on the first group), then the others in the study's
  order: for a measured lesion an axes group, :data:`OHIF_BIDIRECTIONAL` (OHIF's
  bidirectional tool; a lone axis :data:`OHIF_LENGTH`): NUMs "Long Axis" and "Short
  Axis" in mm, each inferred from its line segment; then a contour group,
  :data:`OHIF_CONTOUR` (OHIF's freehand ROI): the lesion's area, then each class
  probability as a NUM (the predicted class first), the first of them inferred from
  the outline, a closed POLYLINE on the source image (and frame, for a cine loop).
  Both have the coded class as their Finding and the model identity as Algorithm
  Identification (TID 4019: name, version; sha256 and index version as parameters),
  and share the lesion's Tracking UID (OHIF's report view then labels them once);
  the contour group of the frame the heatmap objects show also references them
  (the heatmap SC and, when there is one, the overlay SEG). The first group carries
  the lesion's label (image, frame, class, probability, AI BI-RADS band) as a
  Comment (DCM 121106), which OHIF shows as the measurement's label in its panel;
  TID 1501 has no row for it (PixelMed warns, once per lesion), and OHIF reads a
  label from nowhere else that would be true;
* where nothing is drawn in the whole report, a group per assessed frame instead
  (its Finding, probabilities and image, "no lesion outlined"), and one per frame
  the domain guard flagged: "Not Evaluated" (SCT 373121007) as its Finding, the
  guard's score as a NUM inferred from the frame's image (and frame) and the card's
  threshold (DCM 122411 "Threshold Value"); no class, probability or region;
* a "Qualitative Evaluations" container, where no viewer expects coordinates, its
  items flat (TID 1500 allows CODE and TEXT there, nothing nested): the disclaimer,
  the study summary (the coded class, the AI-suggested BI-RADS likelihood band coded
  and in words, a readable line naming the deciding image, the rule, "Impression:
  Not Evaluated" and the out-of-distribution flag when no image was assessed), a
  line per frame the domain guard flagged (why: the score against the threshold), a
  line per frame with nothing drawn in a report where something is, and per lesion
  outlined without millimetres (why); a readable line per similar study (date,
  accession, label and its source, distance), and why an image was not analysed.

A study with no analysed image has nothing to point at; TID 1500 still needs a
measurement group, so it gets one saying so, without image reference.

The study's images and heatmap objects are the Current Requested Procedure
Evidence; the similar studies' instances go into the Pertinent Other Evidence
Sequence; a re-analysis references the earlier SR versions in the Predecessor
Documents Sequence. UIDs derive from (study, generation, SOP class), so building
again is idempotent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    ContainerContentItem,
    CoordinatesForMeasurement,
    DeviceObserverIdentifyingAttributes,
    GraphicTypeValues,
    ImageContentItem,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    SourceImageForMeasurement,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from highdicom.sr.templates import LanguageOfContentItemAndDescendants
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    SegmentationStorage,
)

from service.model.imaging import number_of_frames
from service.reports import derived_uid
from service.reports.birads import MALIGNANT, frame_band
from service.reports.construction import sr_document
from service.reports.heatmaps import outline
from service.reports.sr_content import FastContent, LibraryContent
from service.reports.template import SrTemplate
from service.results import NO_LESION, FrameResult, ImageResult, SimilarStudy, StudyResult

#: The SR SOP classes we can write, in the order the sender falls back along when a
#: destination refuses one: Comprehensive 3D -> Comprehensive -> Enhanced.
SR_CLASSES: tuple[str, ...] = (Comprehensive3DSRStorage, ComprehensiveSRStorage, EnhancedSRStorage)

_SR_TYPES: dict[str, type[hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR | hd.sr.EnhancedSR]] = {
    Comprehensive3DSRStorage: hd.sr.Comprehensive3DSR,
    ComprehensiveSRStorage: hd.sr.ComprehensiveSR,
    EnhancedSRStorage: hd.sr.EnhancedSR,
}

#: The tracking identifiers OHIF 3.13 rehydrates a group by: its Cornerstone3D
#: adapters (MeasurementReport.getAdapterForTrackingIdentifier) pick the tool that
#: reads a TID 1501 group from this text, and its SR extension lists the group in the
#: measurement panel only when one does. A lesion's contour is a freehand ROI, its
#: long and short axis one bidirectional measurement, a lone axis a length.
OHIF_CONTOUR = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"
OHIF_BIDIRECTIONAL = "Cornerstone3DTools@^0.1.0:Bidirectional"
OHIF_LENGTH = "Cornerstone3DTools@^0.1.0:Length"

SrDocument = hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR | hd.sr.EnhancedSR
#: A frame's heatmap, by (SOP Instance UID, frame number).
Heats = Mapping[tuple[str, int], np.ndarray]
#: Who makes the content items: highdicom's constructors, or (``fast``) copies of their prototypes.
_CONTENT = {False: LibraryContent(), True: FastContent()}


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
    heats: Heats,
    heatmaps: Mapping[str, Sequence[Dataset]] | None = None,
    predecessors: Sequence[Dataset] = (),
    fast: bool = False,
) -> SrDocument:
    """Build the study's SR in ``sop_class_uid`` (one of :data:`SR_CLASSES`).

    ``sources`` are the headers of the study's instances (the first one gives the
    patient and study attributes); ``heats`` every analysed frame's heatmap;
    ``heatmaps`` the heatmap objects (SC, SEG) of each analysed image by its SOP
    Instance UID, as references (their UIDs and SOP class); ``predecessors`` are
    earlier SR versions; ``fast``: the setting ``fast_reports``
    (:mod:`service.reports.construction`).
    """
    if sop_class_uid not in _SR_TYPES:
        raise ValueError(f"{sop_class_uid} is not an SR SOP class we write (one of {list(_SR_TYPES)})")
    heatmaps = heatmaps or {}
    content = _CONTENT[fast]
    headers = {ds.SOPInstanceUID: ds for ds in sources}
    drawn = drawn_outlines(result, heats)
    groups: list[MeasurementsAndQualitativeEvaluations] = [
        group
        for image in reading_order(result)
        for frame in assessed_frames(image)
        for group in _frame_groups(
            content, result, template, headers, image, frame, drawn, heatmaps.get(image.sop_instance_uid, ())
        )
    ]
    if not any(points is not None for points in drawn.values()):  # OHIF draws none of a report mixing both
        groups += [
            _not_assessed_group(content, result, template, headers, image, frame)
            for image in reading_order(result)
            for frame in image.frames
            if frame.out_of_distribution
        ]
    report = MeasurementReport(
        observation_context=_observation_context(content, template),
        procedure_reported=template.procedure_reported.code(),
        imaging_measurements=groups or [_unanalysed_study_group(content, result, template)],
        title=template.title.code(),
        language_of_content_item_and_descendants=content.once(
            ("language", template.language),
            lambda: LanguageOfContentItemAndDescendants(template.language.code()),
        ),
    )
    report[0].ContentSequence.append(_evaluations(content, result, template, headers, drawn))
    device = template.device
    objects = [ref for refs in heatmaps.values() for ref in refs]
    return sr_document(
        _SR_TYPES[sop_class_uid],
        report,
        fast,
        evidence=[*sources, *objects, *(_similar_evidence(s) for s in result.similar)],
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


def device_observer(template: SrTemplate) -> ObserverContext:
    """Our node as the observing device (TID 1004), in the SR and the key-image flag."""
    d = template.device
    return ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_uid(template),
            name=d.name,
            manufacturer_name=d.manufacturer,
            model_name=d.model_name,
            serial_number=d.serial_number,
        ),
    )


def _observation_context(content: LibraryContent, template: SrTemplate) -> ObservationContext:
    return content.once(
        ("observation context", template.device),
        lambda: ObservationContext(observer_device_context=device_observer(template)),
    )


def _algorithm(content: LibraryContent, result: StudyResult) -> AlgorithmIdentification:
    """TID 4019, made anew for each group (content items belong to one parent)."""
    return content.algorithm_identification(
        name=result.model.name,
        version=result.model.version,
        parameters=[f"model sha256 {result.model.sha256}", f"index version {result.index_version or 'none'}"],
    )


def _header(headers: dict[str, Dataset], sop_instance_uid: str) -> Dataset:
    header = headers.get(sop_instance_uid)
    if header is None:
        raise ValueError(f"analysed instance {sop_instance_uid} is not among the study's source instances")
    return header


def region_outline(frame: FrameResult, heat: np.ndarray) -> np.ndarray | None:
    """What a frame's group outlines on its image: the lesion the model outlined; for
    a model that outlines no lesion, the heatmap outline of a frame with a finding;
    nothing for a frame called normal or without a lesion above the threshold."""
    if frame.predicted == NO_LESION:
        return None
    if frame.lesion is not None:
        return np.asarray(frame.lesion.outline, np.float32)
    if frame.lesion_threshold is None:
        return outline(heat, frame.crop)
    return None


def _frame_numbers(header: Dataset, frame: FrameResult) -> list[int] | None:
    return [frame.frame_number] if number_of_frames(header) > 1 else None


def _coordinates(
    content: LibraryContent, header: Dataset, frame: FrameResult, points: np.ndarray
) -> CoordinatesForMeasurement:
    """An outline (closed) or a line segment on the frame's source image (and
    frame): the SCOORD a measurement is inferred from (TID 300 via TID 320), where
    OHIF's Cornerstone3D adapters read a tool's points."""
    return content.coordinates_for_measurement(
        graphic_type=GraphicTypeValues.POLYLINE,
        graphic_data=points,
        source_image=content.source_image(
            SourceImageForRegion,
            referenced_sop_class_uid=header.SOPClassUID,
            referenced_sop_instance_uid=header.SOPInstanceUID,
            referenced_frame_numbers=_frame_numbers(header, frame),
        ),
    )


def _measurement(
    content: LibraryContent, name: Code, value: float, unit: Code, region: CoordinatesForMeasurement | None = None
) -> Measurement:
    return content.measurement(name=name, value=value, unit=unit, referenced_coordinates=[region] if region else None)


def _probabilities(
    content: LibraryContent, template: SrTemplate, frame: FrameResult, region: CoordinatesForMeasurement | None = None
) -> list[Measurement]:
    """Every class probability in percent, the predicted class first (OHIF lists a
    group's numbers in order); ``region`` is what the first one is inferred from."""
    concepts = template.concepts
    order = sorted(frame.probabilities, key=lambda c: c != frame.predicted)
    return [
        _measurement(
            content,
            template.class_spec(c).probability.code(),
            frame.probabilities[c] * concepts.probability_scale,
            concepts.probability_unit.code(),
            region if n == 0 else None,
        )
        for n, c in enumerate(order)
    ]


def _heatmap_items(content: LibraryContent, template: SrTemplate, objects: Sequence[Dataset]) -> list[ImageContentItem]:
    """References to an image's heatmap SC and overlay SEG."""
    concepts = template.concepts
    return [
        content.image(
            name=(
                concepts.heatmap_segmentation if ref.SOPClassUID == SegmentationStorage else concepts.heatmap_image
            ).code(),
            referenced_sop_class_uid=ref.SOPClassUID,
            referenced_sop_instance_uid=ref.SOPInstanceUID,
        )
        for ref in objects
    ]


def _contour_measurements(
    content: LibraryContent, template: SrTemplate, frame: FrameResult, region: CoordinatesForMeasurement
) -> list[Measurement]:
    """The outlined lesion's area inferred from its contour, then the class
    probabilities; without an area (no calibration, or a heatmap outline) the
    predicted class's probability carries the contour. OHIF's freehand ROI takes its
    points from the first number's SCOORD."""
    concepts, lesion = template.concepts, frame.lesion
    if lesion is None or lesion.area_mm2 is None:
        return _probabilities(content, template, frame, region)
    area = _measurement(content, concepts.area.code(), lesion.area_mm2, concepts.area_unit.code(), region)
    return [area, *_probabilities(content, template, frame)]


def _axis_measurements(
    content: LibraryContent, template: SrTemplate, header: Dataset, frame: FrameResult
) -> tuple[str, list[Measurement]] | None:
    """A measured lesion's axes, each length inferred from its line segment, and the
    OHIF tool that reads them: both axes as one bidirectional measurement (which
    finds them by the code meanings "Long Axis" and "Short Axis"), a lone axis as a
    length. None for a lesion without millimetres."""
    lesion, concepts = frame.lesion, template.concepts
    if lesion is None:
        return None
    axes = [
        _measurement(
            content,
            name.code(),
            axis.length_mm,
            concepts.length_unit.code(),
            _coordinates(content, header, frame, np.array([axis.start, axis.end], np.float32)),
        )
        for name, axis in ((concepts.long_axis, lesion.long_axis), (concepts.short_axis, lesion.short_axis))
        if axis is not None
    ]
    if not axes:
        return None
    return (OHIF_BIDIRECTIONAL if len(axes) == 2 else OHIF_LENGTH), axes


Drawn = Mapping[tuple[str, int], np.ndarray | None]


def drawn_outlines(result: StudyResult, heats: Heats) -> dict[tuple[str, int], np.ndarray | None]:
    """What each assessed frame's group outlines (:func:`region_outline`), by (SOP
    Instance UID, frame number); None where nothing is drawn."""
    drawn = {}
    for image in result.images:
        for frame in assessed_frames(image):
            heat = heats.get((image.sop_instance_uid, frame.frame_number))
            if heat is None:
                raise ValueError(f"no heatmap given for frame {frame.frame_number} of {image.sop_instance_uid}")
            drawn[(image.sop_instance_uid, frame.frame_number)] = region_outline(frame, heat)
    return drawn


def lesion_label(template: SrTemplate, instance: str, frame: FrameResult) -> str:
    """The words OHIF labels a lesion's groups with (their Comment): image, frame,
    class, probability and the AI-suggested BI-RADS band."""
    band = frame_band(frame.probabilities, frame.predicted)
    return template.wording.image_group.format(
        instance=instance,
        frame=frame.frame_number,
        label=class_display(template, frame.predicted),
        probability=frame.probabilities[frame.predicted],
        band=template.wording.image_band.format(category=band.category) if band is not None else "",
    )


def _frame_groups(
    content: LibraryContent,
    result: StudyResult,
    template: SrTemplate,
    headers: dict[str, Dataset],
    image: ImageResult,
    frame: FrameResult,
    drawn: Drawn,
    heatmaps: Sequence[Dataset],
) -> list[MeasurementsAndQualitativeEvaluations]:
    """One assessed frame's groups (TID 1501), each with its finding (the coded
    class) and the frame's image.

    A frame with an outline (:func:`region_outline`) gets a measured lesion's axes
    group, read by OHIF as a bidirectional measurement (each axis's length inferred
    from its line segment), then a contour group, read as a freehand ROI: the area
    and the class probabilities, the first of them inferred from the outline (a
    closed POLYLINE on the source image and frame). Both track the same lesion, so
    they share its Tracking UID: OHIF's report view merges them into one label (the
    axes' lines first, as it shows five), instead of two drawn over each other. The
    first carries the lesion's label (:func:`lesion_label`) as its Comment. A frame with nothing to outline gets a
    group referencing its image, whose identifier says so, only in a report where
    nothing is drawn (the Qualitative Evaluations say it otherwise,
    :func:`_undrawn_lines`).
    """
    header = _header(headers, image.sop_instance_uid)
    points = drawn[(image.sop_instance_uid, frame.frame_number)]
    if points is None and any(p is not None for p in drawn.values()):
        return []
    instance = instance_label(headers, image.sop_instance_uid)

    def tracking(identifier: str) -> TrackingIdentifier:
        uid = derived_uid(result.study_uid, result.generation, "track", image.sop_instance_uid, frame.frame_number)
        return content.tracking_identifier(uid=uid, identifier=identifier[:64])

    def group(
        identifier: str,
        measurements: list[Measurement],
        source_images: list[SourceImageForMeasurementGroup] | None = None,
    ) -> MeasurementsAndQualitativeEvaluations:
        # content items belong to one parent: each group gets its own
        return content.measurements_and_qualitative_evaluations(
            tracking_identifier=tracking(identifier),
            algorithm_id=_algorithm(content, result),
            measurements=measurements,
            source_images=source_images,
            finding_type=template.class_spec(frame.predicted).finding.code(),
            finding_sites=[content.finding_site(template.finding_site.code())],
        )

    if points is None:
        source = content.source_image(
            SourceImageForMeasurementGroup,
            referenced_sop_class_uid=header.SOPClassUID,
            referenced_sop_instance_uid=header.SOPInstanceUID,
            referenced_frame_numbers=_frame_numbers(header, frame),
        )
        identifier = _frame_line(template, template.wording.image_group_no_lesion, instance, frame)
        return [group(identifier, _probabilities(content, template, frame), source_images=[source])]
    region = _coordinates(content, header, frame, points)
    contour = group(OHIF_CONTOUR, _contour_measurements(content, template, frame, region))
    if frame.frame_number == decisive_frame(image).frame_number:
        contour[0].ContentSequence.extend(_heatmap_items(content, template, heatmaps))
    groups = [contour]
    axes = _axis_measurements(content, template, header, frame)
    if axes is not None:  # the same lesion, so the same Tracking UID: first, as OHIF labels what it merges
        tool, measurements = axes
        groups.insert(0, group(tool, measurements))
    # OHIF's label of a measurement: a group-level Comment, a row TID 1501 lacks (PixelMed warns), so one
    # per lesion, on the row that lists its axes (else its contour's)
    groups[0][0].ContentSequence.append(
        content.text(name=template.concepts.comment.code(), value=lesion_label(template, instance, frame))
    )
    return groups


def _undrawn_lines(
    content: LibraryContent, template: SrTemplate, headers: dict[str, Dataset], result: StudyResult, drawn: Drawn
) -> list[TextContentItem]:
    """In a report where something is drawn, a line for each assessed frame with
    nothing to outline (it has no group there), and for each lesion outlined but not
    measured, why."""
    wording = template.wording
    anything = any(points is not None for points in drawn.values())
    texts = []
    for image in reading_order(result):
        instance = instance_label(headers, image.sop_instance_uid)
        for frame in assessed_frames(image):
            if anything and drawn[(image.sop_instance_uid, frame.frame_number)] is None:
                texts.append(_frame_line(template, wording.image_group_no_lesion, instance, frame))
            if frame.lesion is not None and frame.lesion.unmeasured:
                texts.append(
                    wording.unmeasured_line.format(
                        instance=instance, frame=frame.frame_number, reason=frame.lesion.unmeasured
                    )
                )
    return [content.text(name=template.concepts.comment.code(), value=text) for text in texts]


def _frame_line(template: SrTemplate, wording: str, instance: str, frame: FrameResult) -> str:
    """A frame's words: its image, frame, class and probability."""
    return wording.format(
        instance=instance,
        frame=frame.frame_number,
        label=class_display(template, frame.predicted),
        probability=frame.probabilities[frame.predicted],
    )


def _unanalysed_study_group(
    content: LibraryContent, result: StudyResult, template: SrTemplate
) -> MeasurementsAndQualitativeEvaluations:
    """The one measurement group TID 1500 needs when no image could be analysed. No
    region: there is nothing to point at."""
    return content.measurements_and_qualitative_evaluations(
        tracking_identifier=content.tracking_identifier(
            uid=derived_uid(result.study_uid, result.generation, "track", "summary"),
            identifier=template.wording.no_summary[:64],
        ),
        algorithm_id=_algorithm(content, result),
        finding_sites=[content.finding_site(template.finding_site.code())],
    )


def not_assessed_reason(template: SrTemplate, frame: FrameResult) -> str:
    """Why a frame was not assessed, in words: outside the training domain, and the
    guard's score against its threshold (when the result recorded the threshold)."""
    if frame.ood_threshold is None:
        return template.wording.ood
    score = template.wording.guard_score.format(score=frame.ood_distance, threshold=frame.ood_threshold)
    return f"{template.wording.ood} ({score})"


def _not_assessed_group(
    content: LibraryContent,
    result: StudyResult,
    template: SrTemplate,
    headers: dict[str, Dataset],
    image: ImageResult,
    frame: FrameResult,
) -> MeasurementsAndQualitativeEvaluations:
    """A frame the domain guard flagged, in a report where nothing is drawn (a TID
    1501 group without coordinates): "Not Evaluated" as its Finding, the guard's
    score inferred from the frame's image (and frame) and the card's threshold; no
    class, probability or region."""
    concepts = template.concepts
    header = _header(headers, image.sop_instance_uid)
    score = content.measurement(
        name=concepts.ood_score.code(),
        value=frame.ood_distance,
        unit=concepts.score_unit.code(),
        referenced_images=[
            content.source_image(
                SourceImageForMeasurement,
                referenced_sop_class_uid=header.SOPClassUID,
                referenced_sop_instance_uid=header.SOPInstanceUID,
                referenced_frame_numbers=_frame_numbers(header, frame),
            )
        ],
    )
    threshold = (
        []
        if frame.ood_threshold is None
        else [_measurement(content, concepts.ood_threshold.code(), frame.ood_threshold, concepts.score_unit.code())]
    )
    identifier = template.wording.not_assessed_group.format(
        instance=instance_label(headers, image.sop_instance_uid), frame=frame.frame_number
    )
    return content.measurements_and_qualitative_evaluations(
        tracking_identifier=content.tracking_identifier(
            uid=derived_uid(
                result.study_uid, result.generation, "track", image.sop_instance_uid, frame.frame_number, "ood"
            ),
            identifier=identifier[:64],
        ),
        algorithm_id=_algorithm(content, result),
        measurements=[score, *threshold],
        finding_type=concepts.not_assessed.code(),
        finding_sites=[content.finding_site(template.finding_site.code())],
    )


def _not_assessed_line(
    content: LibraryContent, template: SrTemplate, headers: dict[str, Dataset], image: ImageResult, frame: FrameResult
) -> TextContentItem:
    """A frame the domain guard flagged, in words: which, and why (the score against
    the threshold)."""
    line = template.wording.not_assessed_line.format(
        instance=instance_label(headers, image.sop_instance_uid),
        frame=frame.frame_number,
        reason=not_assessed_reason(template, frame),
    )
    return content.text(name=template.concepts.comment.code(), value=line)


def _summary(
    content: LibraryContent, result: StudyResult, template: SrTemplate, headers: dict[str, Dataset]
) -> list[Dataset]:
    """The study-level conclusion, in words and codes (no coordinates)."""
    concepts, wording, summary = template.concepts, template.wording, result.summary
    decisive = next((i for i in result.images if i.sop_instance_uid == summary.decisive_sop_instance_uid), None)
    items: list[Dataset] = []
    if summary.predicted is not None and decisive is not None and decisive.frames:
        frame = decisive_frame(decisive)
        items.append(
            content.code(
                name=concepts.classification.code(), value=template.class_spec(summary.predicted).finding.code()
            )
        )
        line = wording.study_summary.format(
            label=class_display(template, summary.predicted),
            probability=summary.probability if summary.probability is not None else 0.0,
            instance=instance_label(headers, decisive.sop_instance_uid),
            frame=frame.frame_number,
        )
        items += _band(content, template, headers, decisive, frame)
    elif summary.out_of_distribution:
        items.append(content.code(name=concepts.classification.code(), value=concepts.not_assessed.code()))
        line = wording.not_assessed_summary
    else:
        line = wording.no_summary
    items.append(content.text(name=concepts.study_summary.code(), value=line))
    items.append(content.text(name=concepts.summary_rule.code(), value=summary.rule))
    if summary.out_of_distribution:
        items.append(content.code(name=concepts.out_of_distribution.code(), value=concepts.yes.code()))
    return items


def _band(
    content: LibraryContent, template: SrTemplate, headers: dict[str, Dataset], image: ImageResult, frame: FrameResult
) -> list[Dataset]:
    """The BI-RADS likelihood band of the frame that decides the study, coded
    (PS3.16 CID 6026/6027) and in words that say it is the AI's suggestion."""
    band = frame_band(frame.probabilities, frame.predicted)
    if band is None:
        return []
    spec = template.birads[band.category]
    return [
        content.code(name=template.concepts.birads_band.code(), value=spec.code.code()),
        content.text(
            name=template.concepts.birads_band.code(),
            value=template.wording.birads_line.format(
                category=band.category,
                band=spec.display,
                probability=frame.probabilities[MALIGNANT],
                instance=instance_label(headers, image.sop_instance_uid),
                frame=frame.frame_number,
            ),
        ),
    ]


def _evaluations(
    content: LibraryContent, result: StudyResult, template: SrTemplate, headers: dict[str, Dataset], drawn: Drawn
) -> ContainerContentItem:
    """TID 1500's "Qualitative Evaluations": what a reader needs in words."""
    concepts, wording = template.concepts, template.wording
    container = content.container(name=concepts.qualitative_evaluations.code())
    items: list[Dataset] = [
        content.text(name=concepts.comment.code(), value=template.disclaimer),
        *_summary(content, result, template, headers),
        *(
            _not_assessed_line(content, template, headers, image, frame)
            for image in result.images
            for frame in image.frames
            if frame.out_of_distribution
        ),
        *_undrawn_lines(content, template, headers, result, drawn),
    ]
    for rank, similar in enumerate(result.similar, start=1):
        items.append(
            content.text(
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
            )
        )
    for image in result.images:
        if image.skipped:
            items.append(
                content.text(
                    name=concepts.not_analysed.code(),
                    value=wording.not_analysed_line.format(
                        instance=instance_label(headers, image.sop_instance_uid), reason=image.skipped
                    ),
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


def reading_order(result: StudyResult) -> list[ImageResult]:
    """The analysed images as the SR lists them: the one that decides the study
    summary first (a viewer opens the report on it), then the others in the study's
    order."""
    decisive = result.summary.decisive_sop_instance_uid
    analysed = [image for image in result.images if image.frames]
    return sorted(analysed, key=lambda image: image.sop_instance_uid != decisive)


def assessed_frames(image: ImageResult) -> list[FrameResult]:
    """The frames the SR gives a class, probabilities and a region: those the domain
    guard did not flag."""
    return [f for f in image.frames if not f.out_of_distribution]


def decisive_frame(image: ImageResult) -> FrameResult:
    """The frame that speaks for an image: the most probable assessed frame of the
    image's predicted class (the only frame of a single-frame image); for an image
    not assessed at all (every frame outside the training domain), its first frame."""
    if not image.frames:
        raise ValueError(f"image {image.sop_instance_uid} has no analysed frame")
    assessed = assessed_frames(image)
    if image.out_of_distribution or not assessed:
        return image.frames[0]
    label = image.predicted or assessed[0].predicted
    return max(assessed, key=lambda f: (f.predicted == label, f.probabilities.get(label, 0.0)))


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
