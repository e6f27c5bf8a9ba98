"""The heatmap overlay: an image's Grad-CAM map as a DICOM Segmentation (highdicom
``seg``) that a viewer lays over the source image and can switch off.

Why a Segmentation, of binary segments, and not a Parametric Map or a fractional
segment (all measured with OHIF 3.13.2 and highdicom 0.28):

* a Parametric Map is the natural home of a float map, but OHIF shows one only as a
  fusion over a reconstructed volume ("stack viewport PMAP is not supported yet"),
  and highdicom cannot write one for a 2-D ultrasound image without a frame of
  reference;
* OHIF refuses fractional segmentations ("Fractional segmentations are not yet
  supported") unless every value is 0 or the maximum;
* so the map is cut into levels of its peak (:data:`service.reports.heatmaps.BAND_LEVELS`),
  each level a binary segment coloured as on the heatmap SC (jet): the overlay reads
  like the burned-in heatmap, and the full-resolution map stays in the SC.

The segmentation is of the image's decisive frame (the frame the SC shows). highdicom
writes one for a single-frame source only when it has no frame of reference (the
usual case for ultrasound), so cine loops get none: their SC and the SR's regions
(each on its frame) still show the heatmap. OHIF also needs the pixel spacing and the
plane orientation in the shared functional groups: the spacing comes from the source
(Pixel Spacing, else its B-mode region's calibration in cm), so an uncalibrated
image gets no overlay either; the orientation, which highdicom leaves out for images
without a frame of reference, is the identity of the source's own pixel grid.
"""

from __future__ import annotations

from collections.abc import Hashable

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from service.common.colour import jet
from service.model.imaging import DATA_TYPE_TISSUE, SPATIAL_FORMAT_2D, number_of_frames
from service.reports import Placement
from service.reports.construction import (
    Prototype,
    Prototypes,
    acquisition_equipment,
    binary_pixels,
    filled_copy,
    image_roles,
    library_equipment,
    prototype_of,
    replaced,
    source_key,
)
from service.reports.heatmaps import BAND_LEVELS, bands
from service.reports.sr import decisive_frame
from service.reports.template import SrTemplate
from service.results import ImageResult, StudyResult

#: Physical Units X/Y Direction "cm" (PS3.3 C.8.5.5.1.15).
UNITS_CM = 0x0003
#: The source's own pixel grid: rows run along x, columns along y.
IDENTITY_ORIENTATION = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
#: The source attributes highdicom's Segmentation reads that no fast build fills in
#: (highdicom 0.28: character set, image size, frames, frame of reference, lossy
#: compression and its method): part of a prototype's key (:func:`_prototype_key`).
#: The compression ratio, which differs from image to image, is filled in.
SOURCE_KEYWORDS = (
    "SpecificCharacterSet",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "LossyImageCompression",
    "LossyImageCompressionMethod",
)
_RATIO = "LossyImageCompressionRatio"
#: Heatmap overlays built by highdicom, by :func:`_prototype_key` (setting ``fast_reports``).
_PROTOTYPES = Prototypes()


def pixel_spacing(source: Dataset) -> tuple[float, float] | None:
    """Row and column spacing in mm: Pixel Spacing, else the physical deltas of the
    largest B-mode region when they are in cm; None for an uncalibrated image."""
    if source.get("PixelSpacing"):
        rows, columns = (float(v) for v in source.PixelSpacing)
        return rows, columns
    best: tuple[int, float, float] | None = None
    for item in source.get("SequenceOfUltrasoundRegions") or []:
        if item.get("RegionSpatialFormat") != SPATIAL_FORMAT_2D or item.get("RegionDataType") != DATA_TYPE_TISSUE:
            continue
        try:
            area = (int(item.RegionLocationMaxX1) - int(item.RegionLocationMinX0)) * (
                int(item.RegionLocationMaxY1) - int(item.RegionLocationMinY0)
            )
            units = (item.PhysicalUnitsXDirection, item.PhysicalUnitsYDirection)
            delta_x, delta_y = float(item.PhysicalDeltaX), float(item.PhysicalDeltaY)
        except (AttributeError, TypeError, ValueError):
            continue  # a region without usable calibration calibrates nothing
        if units == (UNITS_CM, UNITS_CM) and delta_x > 0 and delta_y > 0 and (best is None or area > best[0]):
            best = (area, delta_y * 10.0, delta_x * 10.0)
    return None if best is None else (best[1], best[2])


def seg_skip_reason(source: Dataset, heat: np.ndarray) -> str | None:
    """Why an image gets no heatmap overlay (see module doc), or None."""
    if number_of_frames(source) > 1:
        return "a cine loop: highdicom writes a segmentation of one frame only for a single-frame image"
    if pixel_spacing(source) is None:
        return "the image is not calibrated (no Pixel Spacing, no B-mode region in cm)"
    if float(heat.max()) <= 0.0:
        return "the heatmap is empty"
    return None


def _segments(result: StudyResult, template: SrTemplate) -> list[hd.seg.SegmentDescription]:
    algorithm = hd.AlgorithmIdentificationSequence(
        name=result.model.name,
        family=codes.DCM.ArtificialIntelligence,
        version=result.model.version,
        parameters={"model sha256": result.model.sha256},
    )
    tops = (*BAND_LEVELS[1:], 1.0)
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=template.wording.segment_label.format(low=low, high=high)[:64],
            segmented_property_category=template.concepts.segment_category.code(),
            segmented_property_type=template.concepts.segment_type.code(),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*(int(c) for c in jet(np.array((low + high) / 2)))),
        )
        for number, (low, high) in enumerate(zip(BAND_LEVELS, tops, strict=True), start=1)
    ]


def build_heatmap_seg(
    result: StudyResult,
    template: SrTemplate,
    image: ImageResult,
    source: Dataset,
    heat: np.ndarray,
    placement: Placement,
    fast: bool = False,
) -> Dataset:
    """The heatmap overlay of one analysed image (``source``: its header; ``heat``:
    its decisive frame's heatmap). :func:`seg_skip_reason` must be None for it.
    ``fast`` (setting ``fast_reports``): highdicom builds the first overlay of a
    :func:`_prototype_key` and the others are filled copies of it (element for
    element the library's; :func:`service.reports.construction.filled_copy`)."""
    reason = seg_skip_reason(source, heat)
    if reason is not None:
        raise ValueError(f"no heatmap segmentation for {image.sop_instance_uid}: {reason}")
    labels = bands(heat, decisive_frame(image).crop, int(source.Rows), int(source.Columns))
    if not fast:
        return _segmentation(result, template, source, labels, placement)
    masks = labels[None] == np.arange(1, len(BAND_LEVELS) + 1, dtype=np.uint8)[:, None, None]
    present = tuple(int(n) for n in np.flatnonzero(masks.any(axis=(1, 2))) + 1)
    if not present:  # highdicom keeps every frame then (none can be: the peak is in the top band)
        return _segmentation(result, template, source, labels, placement)

    def build() -> Prototype:
        seg = _segmentation(result, template, source, labels, placement)
        return prototype_of(seg, image_roles(source, placement.series_uid, placement.sop_uid), source)

    prototype = _PROTOTYPES.get(_prototype_key(result, template, source, present), build)
    values = {
        "InstanceNumber": placement.instance_number,
        "SoftwareVersions": list(placement.software_versions),
        "PatientOrientation": source.get("PatientOrientation", ""),
        "ContributingEquipmentSequence": [*acquisition_equipment(source), library_equipment(prototype)],
        "SharedFunctionalGroupsSequence": [
            replaced(
                prototype.dataset.SharedFunctionalGroupsSequence[0],
                {"PixelMeasuresSequence": _pixel_measures(source)},
            )
        ],
        "PixelData": binary_pixels(masks[[n - 1 for n in present]]),  # the non-empty segments' frames
    }
    if _RATIO in prototype.dataset:
        values[_RATIO] = source[_RATIO].value
    return filled_copy(
        prototype,
        image_roles(source, placement.series_uid, placement.sop_uid),
        source,
        values,
    )


def _prototype_key(result: StudyResult, template: SrTemplate, source: Dataset, present: tuple[int, ...]) -> Hashable:
    """What an overlay's content depends on besides the values a filled copy takes
    from its image (UIDs, numbers, the source's patient and study attributes, its
    equipment, the clock, the pixels): the source's SOP class, the copied attributes
    it has and the other attributes highdicom reads (:data:`SOURCE_KEYWORDS`), and
    whether it has a compression ratio (filled in); which segments have pixels (one
    frame and per-frame item each); the model (the segments' algorithm); and the
    template's values the overlay holds. The pixel spacing, which differs with the
    scanner's depth, is filled in (the shared functional groups)."""
    return (
        source_key(source, SOURCE_KEYWORDS, copies=True),
        _RATIO in source,
        present,
        (result.model.name, result.model.version, result.model.sha256),
        template.wording.segment_label,
        template.concepts.segment_category,
        template.concepts.segment_type,
        template.device,
        template.seg_series,
        template.disclaimer,
    )


def _pixel_measures(source: Dataset) -> hd.PixelMeasuresSequence:
    return hd.PixelMeasuresSequence(pixel_spacing=pixel_spacing(source), slice_thickness=None)


def _segmentation(
    result: StudyResult, template: SrTemplate, source: Dataset, labels: np.ndarray, placement: Placement
) -> hd.seg.Segmentation:
    """The overlay of ``labels`` (:func:`service.reports.heatmaps.bands` on the source's grid), by highdicom."""
    device = template.device
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=labels[None],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segments(result, template),
        series_instance_uid=placement.series_uid,
        series_number=template.seg_series.number,
        sop_instance_uid=placement.sop_uid,
        instance_number=placement.instance_number,
        manufacturer=device.manufacturer,
        manufacturer_model_name=device.model_name,
        software_versions=list(placement.software_versions),
        device_serial_number=device.serial_number,
        pixel_measures=_pixel_measures(source),
        content_label="HEATMAP",
        content_description=template.concepts.segment_type.meaning,
        series_description=template.seg_series.description,
    )
    orientation = Dataset()
    orientation.ImageOrientationPatient = IDENTITY_ORIENTATION
    seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence = [orientation]
    seg.PatientOrientation = source.get("PatientOrientation", "")  # General Image, Type 2C
    seg.ContentCreatorName = ""  # Type 2; no person made it
    seg.ImageComments = template.disclaimer
    return seg
