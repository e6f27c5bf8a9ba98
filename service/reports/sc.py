"""Secondary Captures: what the radiologist sees without any SR support.

* One heatmap image per analysed image: the source frame in grayscale exactly as
  the model saw it (service.model.imaging), the Grad-CAM heatmap blended in over the
  analysed region with a colour legend, the predicted class and probability and the
  disclaimer burned in, sized like the source and referencing it. An image the
  domain guard flagged gets the frame with "not assessed" and the reason (score
  against threshold) instead: no class, no probability, no heatmap. A cine loop gets
  one image, of its decisive frame (the frame that speaks for the image, see
  :func:`service.reports.sr.decisive_frame`): the SR carries every analysed frame's
  numbers, and eight near-identical heatmaps per loop would bury the report.
* One "similar cases" montage per study: the analysed region of the study's
  decisive image beside the reference images of the similar studies, each cut to
  its B-mode region and captioned with label, label source and distance. No names,
  IDs, dates or accession numbers of other patients are drawn (and the cut keeps
  scanners' burned-in text bands out); the montage references those instances.

Colours: a "jet" colour map, blended with opacity 0.5 x heat, so regions the
model ignored stay unchanged and the hottest regions are half covered.
"""

from __future__ import annotations

import functools
import logging
import math
import textwrap
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

import numpy as np
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from service.common.colour import jet
from service.model.imaging import PixelError, crop_box, number_of_frames, to_grayscale
from service.reports import Placement
from service.reports.construction import (
    Prototype,
    Prototypes,
    acquisition_equipment,
    encoded_pixels,
    filled_copy,
    image_roles,
    library_equipment,
    patient_and_study,
    prototype_of,
    source_key,
)
from service.reports.sr import class_display, decisive_frame, not_assessed_reason
from service.reports.template import SrTemplate
from service.results import FrameResult, ImageResult, SimilarStudy, StudyResult

LOG = logging.getLogger(__name__)

#: settings.sc_transfer_syntax -> (Transfer Syntax UID, Photometric Interpretation)
TRANSFER_SYNTAXES: dict[str, tuple[str, str]] = {
    "explicit-little-endian": (ExplicitVRLittleEndian, "RGB"),
    "jpeg-baseline": (JPEGBaseline8Bit, "YBR_FULL_422"),
}
#: "Source image for image processing operation" (CID 7202).
_SOURCE_PURPOSE = ("121322", "DCM", "Source image for image processing operation")
MAX_OPACITY = 0.5
TILE = 256

#: Heatmap SCs built by highdicom, by :func:`_prototype_key` (setting ``fast_reports``).
_PROTOTYPES = Prototypes()
#: Where the montage finds a similar study's stored reference image.
ReferenceImages = Callable[[str], Path | None]


def frame_gray(ds: Dataset, frame_number: int = 1) -> np.ndarray:
    """One frame as the model saw it (service.model.imaging's grayscale: palette, YBR,
    >8-bit and MONOCHROME1 handled there)."""
    frames = number_of_frames(ds)
    if not 1 <= frame_number <= frames:
        raise ValueError(f"instance {ds.SOPInstanceUID} has {frames} frame(s), not frame {frame_number}")
    return to_grayscale(ds, frame_number - 1)


def frame_rgb(ds: Dataset, frame_number: int = 1) -> np.ndarray:
    """One frame as the model saw it (:func:`frame_gray`) in RGB, ready for colour drawing."""
    return gray_rgb(frame_gray(ds, frame_number))


def gray_rgb(gray: np.ndarray) -> np.ndarray:
    """A grayscale frame in RGB, ready for colour drawing."""
    return np.stack([gray, gray, gray], axis=2)  # contiguous; faster than repeat()


def blend_heatmap(rgb: np.ndarray, heat: np.ndarray, crop: tuple[int, int, int, int]) -> np.ndarray:
    """Blend ``heat`` (the size of ``crop``; resized if not) into ``rgb`` at ``crop``."""
    x0, y0, x1, y1 = crop
    height, width = rgb.shape[:2]
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"crop {crop} lies outside the {width}x{height} image")
    if heat.shape != (y1 - y0, x1 - x0):
        heat = np.asarray(
            Image.fromarray(heat.astype(np.float32), mode="F").resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
        )
    heat = np.clip(np.nan_to_num(heat.astype(np.float32)), 0.0, 1.0)
    alpha = (MAX_OPACITY * heat)[:, :, None]
    out = rgb.copy()
    blended = out[y0:y1, x0:x1].astype(np.float32)  # region x (1 - alpha) + colour x alpha, in place
    blended *= 1 - alpha
    blended += jet(heat) * alpha
    out[y0:y1, x0:x1] = np.rint(blended, out=blended)  # to uint8 as astype() casts
    return out


@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled default font (no download, no system fonts needed), loaded
    once per size and process."""
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=256)
def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> tuple[str, ...]:
    """Greedy word wrap to a pixel width (the disclaimer is the same on every image:
    wrapped once per font and width)."""
    average = max(1.0, font.getlength("abcdefghijklmnopqrstuvwxyz") / 26)
    columns = max(8, int(width / average))
    while columns > 8 and any(font.getlength(line) > width for line in textwrap.wrap(text, columns)):
        columns -= 1
    return tuple(textwrap.wrap(text, columns))


def _text_band(
    draw: ImageDraw.ImageDraw,
    lines: Sequence[str],
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    top: int,
    width: int,
    line_height: int,
) -> None:
    """Lines of white text on a dark band, legible on any image."""
    draw.rectangle((0, top, width, top + line_height * len(lines) + 4), fill=(0, 0, 0))
    for n, line in enumerate(lines):
        draw.text((4, top + 2 + n * line_height), line, fill=(255, 255, 255), font=font)


def _font_size(height: int, width: int) -> int:
    """The burned-in text's size on an image of ``height`` x ``width``."""
    return max(10, min(width, height) // 30)


def annotate(rgb: np.ndarray, caption: str, disclaimer: str, legend: str | None) -> np.ndarray:
    """Burn the caption (top), the disclaimer (bottom) and, for a heatmap, its colour
    legend (right; None: no heatmap, no legend). What is the same on every image of
    a size (:func:`_furniture`) is drawn once and laid on, the same pixels."""
    image = Image.fromarray(rgb)
    height, width = rgb.shape[:2]
    draw_caption(image, caption)
    furniture = _furniture(height, width, disclaimer, legend)
    if furniture is None:
        draw_furniture(image, disclaimer, legend)
        return np.asarray(image)
    pixels, fixed = furniture
    out = np.array(image)
    np.copyto(out, pixels, where=fixed)
    return out


def draw_caption(image: Image.Image, caption: str) -> None:
    """The caption's band at the top of ``image``."""
    size = _font_size(image.height, image.width)
    font = _font(size)
    _text_band(ImageDraw.Draw(image), _wrap(caption, font, image.width - 8), font, 0, image.width, size + 3)


def draw_furniture(image: Image.Image, disclaimer: str, legend: str | None) -> None:
    """The disclaimer's band at the bottom of ``image`` and the legend (None: none)."""
    draw = ImageDraw.Draw(image)
    height, width = image.height, image.width
    size = _font_size(height, width)
    font = _font(size)
    line_height = size + 3
    footer = _wrap(disclaimer, font, width - 8)
    _text_band(draw, footer, font, height - line_height * len(footer) - 4, width, line_height)
    if legend is None:
        return
    # Legend: a vertical colour bar, hot at the top, labelled 1 and 0.
    bar_w = max(6, width // 60)
    bar_h = max(20, height // 3)
    x1 = width - 4 - draw.textlength("1", font=font) - 4
    x0, y0 = x1 - bar_w, (height - bar_h) // 2
    ramp = jet(np.linspace(1.0, 0.0, bar_h))[:, None, :].repeat(bar_w, axis=1)
    image.paste(Image.fromarray(ramp), (int(x0), y0))
    draw.rectangle((x0 - 1, y0 - 1, x1, y0 + bar_h), outline=(255, 255, 255))
    legend_w = draw.textlength(legend, font=font)
    for x, y, text in (
        (x1 + 3, y0 - size // 2, "1"),
        (x1 + 3, y0 + bar_h - size // 2, "0"),
        (max(0, x1 - legend_w), y0 - size - 6, legend),
    ):
        draw.rectangle(draw.textbbox((x, y), text, font=font), fill=(0, 0, 0))
        draw.text((x, y), text, fill=(255, 255, 255), font=font)


@functools.lru_cache(maxsize=16)
def _furniture(height: int, width: int, disclaimer: str, legend: str | None) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`draw_furniture`'s pixels on an image of ``height`` x ``width`` and where
    they lie (per channel: ``copyto`` is many times slower with a mask it must
    broadcast), or None where some pixel it draws shows what lies below (then it is
    drawn on each image). Drawn on black and on white: a pixel that comes out the
    same on both is opaque (white text blends to white on white only where it covers
    its pixel), one that stays black and white it leaves alone; any other mixes."""
    on_black, on_white = (Image.new("RGB", (width, height), (v, v, v)) for v in (0, 255))
    for image in (on_black, on_white):
        draw_furniture(image, disclaimer, legend)
    black, white = np.asarray(on_black), np.asarray(on_white)
    fixed = (black == white).all(axis=2)
    untouched = (black == 0).all(axis=2) & (white == 255).all(axis=2)
    if not (fixed | untouched).all():
        return None
    where = np.repeat(fixed[:, :, None], 3, axis=2)
    black.flags.writeable = False
    where.flags.writeable = False
    return black, where


def heatmap_caption(template: SrTemplate, image: ImageResult, frame: FrameResult) -> str:
    """The burned-in line: class and probability of the frame, or for an image not
    assessed why not (and no class)."""
    if image.out_of_distribution:
        return template.wording.sc_not_assessed.format(reason=not_assessed_reason(template, frame))
    label = image.predicted or frame.predicted
    return template.wording.sc_caption.format(
        label=class_display(template, label), probability=frame.probabilities.get(label, 0.0)
    )


def heatmap_pixels(template: SrTemplate, image: ImageResult, gray: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The annotated RGB pixels of an image's heatmap SC: its decisive frame (``gray``,
    :func:`frame_gray`) with ``heat`` (that frame's heatmap) blended in. An image not
    assessed gets no heatmap: a map drawn there would pose as an explanation of a
    class the node does not give."""
    frame = decisive_frame(image)
    caption = heatmap_caption(template, image, frame)
    if image.out_of_distribution:
        return annotate(gray_rgb(gray), caption, template.disclaimer, None)
    blended = blend_heatmap(gray_rgb(gray), heat, frame.crop)
    return annotate(blended, caption, template.disclaimer, template.wording.heatmap_legend)


def _reference_item(sop_class_uid: str, sop_instance_uid: str, frame_number: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    if frame_number is not None:
        item.ReferencedFrameNumber = frame_number
    return item


def _source_item(sop_class_uid: str, sop_instance_uid: str, frame_number: int | None) -> Dataset:
    item = _reference_item(sop_class_uid, sop_instance_uid, frame_number)
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = _SOURCE_PURPOSE
    item.PurposeOfReferenceCodeSequence = [purpose]
    return item


def _series_references(refs: Sequence[tuple[str, str, str]]) -> list[Dataset]:
    """(series UID, SOP class, SOP instance) -> Referenced Series Sequence items."""
    series: dict[str, list[Dataset]] = {}
    for series_uid, sop_class_uid, sop_uid in refs:
        series.setdefault(series_uid, []).append(_reference_item(sop_class_uid, sop_uid))
    items = []
    for series_uid, instances in series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.ReferencedInstanceSequence = instances
        items.append(item)
    return items


def _sc(
    pixels: np.ndarray,
    template: SrTemplate,
    reference: Dataset,
    placement: Placement,
    transfer_syntax: str,
    derivation: str,
    frame_number: int,
    fast: bool = False,
) -> Dataset:
    """An SC of ``pixels`` derived from ``reference`` (frame ``frame_number``): the
    parts both our SCs share, the source reference included. ``transfer_syntax`` is
    a key of :data:`TRANSFER_SYNTAXES` (setting ``sc_transfer_syntax``). ``fast``
    (setting ``fast_reports``): highdicom builds the first SC of a
    :func:`_prototype_key` and the others are filled copies of it (element for
    element the library's; :func:`service.reports.construction.filled_copy`)."""
    multi_frame = number_of_frames(reference) > 1
    own = {
        "PatientOrientation": reference.get("PatientOrientation", ""),
        "Laterality": reference.get("Laterality", ""),  # Type 2C for a paired organ: breast
        "DerivationDescription": derivation[:1024],
        "SourceImageSequence": [
            _source_item(reference.SOPClassUID, reference.SOPInstanceUID, frame_number if multi_frame else None)
        ],
        "ReferencedSeriesSequence": _series_references(
            [(reference.SeriesInstanceUID, reference.SOPClassUID, reference.SOPInstanceUID)]
        ),
    }
    if not fast:
        return _library_sc(pixels, template, reference, placement, transfer_syntax, own)

    def build() -> Prototype:
        sc = _library_sc(pixels, template, reference, placement, transfer_syntax, own)
        return prototype_of(sc, image_roles(reference, placement.series_uid, placement.sop_uid))

    prototype = _PROTOTYPES.get(_prototype_key(template, reference, pixels, transfer_syntax), build)
    return filled_copy(
        prototype,
        image_roles(reference, placement.series_uid, placement.sop_uid),
        reference,
        {
            **own,
            **patient_and_study(reference),
            "InstanceNumber": placement.instance_number,
            "SoftwareVersions": list(placement.software_versions),
            "ContributingEquipmentSequence": [*acquisition_equipment(reference), library_equipment(prototype)],
            "PixelData": encoded_pixels(prototype, pixels),
        },
    )


def _prototype_key(template: SrTemplate, reference: Dataset, pixels: np.ndarray, transfer_syntax: str) -> Hashable:
    """What an SC's content depends on besides the values a filled copy takes from
    its image (UIDs, numbers, the reference's patient, study, equipment, orientation
    and laterality, the references, the derivation, the clock, the pixels): the
    reference's SOP class and character set; the pixels' shape and type (the image
    pixel description); the transfer syntax; and the template's values the SC holds."""
    return (
        source_key(reference, ("SpecificCharacterSet",), copies=False),
        pixels.shape,
        pixels.dtype.str,
        transfer_syntax,
        template.device,
        template.sc_series,
        template.disclaimer,
    )


def _library_sc(
    pixels: np.ndarray,
    template: SrTemplate,
    reference: Dataset,
    placement: Placement,
    transfer_syntax: str,
    own: dict[str, object],
) -> SCImage:
    """The SC by highdicom, with ``own`` (our values, by keyword) set."""
    ts_uid, photometric = TRANSFER_SYNTAXES[transfer_syntax]
    device = template.device
    sc = SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=pixels,
        photometric_interpretation=photometric,
        bits_allocated=8,
        coordinate_system="PATIENT",
        # highdicom requires an orientation for PATIENT; ultrasound has none, so the
        # placeholder is replaced below by the source's own (usually empty) value.
        patient_orientation=("A", "R"),
        series_instance_uid=placement.series_uid,
        series_number=template.sc_series.number,
        sop_instance_uid=placement.sop_uid,
        instance_number=placement.instance_number,
        manufacturer=device.manufacturer,
        transfer_syntax_uid=ts_uid,
        series_description=template.sc_series.description,
        manufacturer_model_name=device.model_name,
        software_versions=placement.software_versions,
        device_serial_number=device.serial_number,
    )
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = template.disclaimer
    for keyword, value in own.items():
        setattr(sc, keyword, value)
    return sc


def derivation_text(result: StudyResult, what: str) -> str:
    """Derivation Description: which model (and index) made the picture."""
    return (
        f"{what} by {result.model.name} {result.model.version} (sha256 {result.model.sha256}); "
        f"index version {result.index_version or 'none'}"
    )


def build_heatmap_sc(
    result: StudyResult,
    template: SrTemplate,
    image: ImageResult,
    source: Dataset,
    gray: np.ndarray,
    heat: np.ndarray,
    placement: Placement,
    transfer_syntax: str,
    fast: bool = False,
) -> Dataset:
    """The Grad-CAM Secondary Capture of one analysed image (``source``: the
    instance's header; ``gray``: its decisive frame, :func:`frame_gray`; ``heat``:
    that frame's heatmap; see module doc). ``fast``: setting ``fast_reports`` (:func:`_sc`)."""
    frame = decisive_frame(image)
    what = (
        f"Frame {frame.frame_number} not assessed ({template.wording.ood}), no heatmap"
        if image.out_of_distribution
        else f"Grad-CAM heatmap of frame {frame.frame_number}"
    )
    return _sc(
        heatmap_pixels(template, image, gray, heat),
        template,
        source,
        placement,
        transfer_syntax,
        derivation_text(result, what),
        frame.frame_number,
        fast,
    )


def _tile(rgb: np.ndarray | None, missing: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> Image.Image:
    """A TILE x TILE square with the image letterboxed in (or a 'missing' note)."""
    tile = Image.new("RGB", (TILE, TILE), (0, 0, 0))
    if rgb is None:
        ImageDraw.Draw(tile).text((8, TILE // 2 - 8), missing, fill=(200, 200, 200), font=font)
        return tile
    picture = Image.fromarray(rgb)
    picture.thumbnail((TILE, TILE), Image.Resampling.BILINEAR)
    tile.paste(picture, ((TILE - picture.width) // 2, (TILE - picture.height) // 2))
    return tile


def _cropped(rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.ascontiguousarray(rgb[y0:y1, x0:x1])


def reference_picture(path: Path) -> np.ndarray:
    """A stored reference image cut to its B-mode region (service.model.imaging's crop):
    text bands, where scanners burn in names and IDs, stay out of the montage."""
    ds = dcmread(path)
    rgb = frame_rgb(ds)
    return _cropped(rgb, crop_box(ds, rgb[:, :, 0]))


def _reference_rgb(similar: SimilarStudy, reference_images: ReferenceImages, study_uid: str) -> np.ndarray | None:
    path = reference_images(similar.sop_instance_uid)
    if path is None:
        return None
    try:
        return reference_picture(path)
    except (OSError, InvalidDicomError, PixelError, AttributeError) as exc:  # damaged copy: drawn as missing
        LOG.warning("reference image %s cannot be drawn: %s", path, exc, extra={"study_uid": study_uid})
        return None


def montage_pixels(
    result: StudyResult,
    template: SrTemplate,
    query_gray: np.ndarray,
    query_image: ImageResult,
    reference_images: ReferenceImages,
) -> np.ndarray:
    """The query's analysed region (of ``query_gray``, its decisive frame) and the
    top-k reference images in a captioned grid."""
    wording = template.wording
    font = _font(14)
    line = 18
    frame = decisive_frame(query_image)
    label = query_image.predicted or frame.predicted
    tiles = [
        (
            _tile(_cropped(gray_rgb(query_gray), frame.crop), wording.montage_missing, font),
            [
                wording.montage_query.format(
                    label=class_display(template, label), probability=frame.probabilities.get(label, 0.0)
                )
            ],
        )
    ]
    for rank, similar in enumerate(result.similar, start=1):
        rgb = _reference_rgb(similar, reference_images, result.study_uid)
        tiles.append(
            (
                _tile(rgb, wording.montage_missing, font),
                [
                    wording.montage_case.format(
                        rank=rank, label=class_display(template, similar.label), label_source=similar.label_source
                    ),
                    wording.montage_distance.format(distance=similar.distance, similarity=similar.similarity),
                ],
            )
        )
    columns = min(len(tiles), 4)
    rows = math.ceil(len(tiles) / columns)
    pad, caption_h = 8, 2 * line + 6
    width = columns * (TILE + pad) + pad
    footer = _wrap(template.disclaimer, font, width - 8)
    header_h, footer_h = line + 12, line * len(footer) + 8
    height = header_h + rows * (TILE + caption_h + pad) + footer_h
    canvas = Image.new("RGB", (width, height + height % 2), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 6), wording.montage_title, fill=(255, 255, 255), font=_font(16))
    for n, (tile, captions) in enumerate(tiles):
        x = pad + (n % columns) * (TILE + pad)
        y = header_h + (n // columns) * (TILE + caption_h + pad)
        canvas.paste(tile, (x, y))
        if n == 0:
            draw.rectangle((x - 2, y - 2, x + TILE + 1, y + TILE + 1), outline=(255, 200, 0), width=2)
        for k, text in enumerate(captions):
            draw.text((x, y + TILE + 4 + k * line), text, fill=(255, 255, 255), font=font)
    _text_band(draw, footer, font, height - footer_h, width, line)
    return np.asarray(canvas)


def build_montage_sc(
    result: StudyResult,
    template: SrTemplate,
    query: Dataset,
    query_gray: np.ndarray,
    query_image: ImageResult,
    reference_images: ReferenceImages,
    placement: Placement,
    transfer_syntax: str,
) -> Dataset:
    """The study's "similar cases" Secondary Capture (``query``: the decisive
    instance's header; ``query_gray``: its decisive frame, :func:`frame_gray`; see
    module doc)."""
    pixels = montage_pixels(result, template, query_gray, query_image, reference_images)
    sc = _sc(
        pixels,
        template,
        query,
        placement,
        transfer_syntax,
        derivation_text(result, "Similar previously diagnosed cases found"),
        decisive_frame(query_image).frame_number,
    )
    sc.SourceImageSequence = [
        *sc.SourceImageSequence,
        *(_source_item(s.sop_class_uid, s.sop_instance_uid, None) for s in result.similar),
    ]
    others: dict[str, list[tuple[str, str, str]]] = {}
    for s in result.similar:
        others.setdefault(s.study_uid, []).append((s.series_uid, s.sop_class_uid, s.sop_instance_uid))
    studies = []
    for study_uid, refs in others.items():
        item = Dataset()
        item.StudyInstanceUID = study_uid
        item.ReferencedSeriesSequence = _series_references(refs)
        studies.append(item)
    sc.StudiesContainingOtherReferencedInstancesSequence = studies
    return sc
