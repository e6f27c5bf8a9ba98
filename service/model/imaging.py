"""Pixel preparation: a received DICOM instance -> the model's input tensors.

Pure functions, no I/O beyond the data set given, shared by the worker and by
``training/`` (which must prepare pixels exactly as the node does). The steps, each
documented where it is done:

1. decode one frame (every transfer syntax the receiver accepts; pydicom +
   pylibjpeg/openjpeg/libjpeg/rle/pyjpegls);
2. :func:`to_grayscale`: palette colour, RGB, YBR and MONOCHROME1/2 -> uint8 luma;
3. :func:`crop_box`: the B-mode region from the Sequence of Ultrasound Regions, or
   :func:`heuristic_region` when the scanner sent none or declared its whole screen
   (the picture found among the text, scales, logos and ECG trace around it);
4. :func:`model_input`: resize and normalise as the model card says;
5. images the model should not judge are skipped with a reason (:func:`dataset_skip_reason`,
   :func:`crop_skip_reason`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import pixel_array

from service.model_card import InputSpec

#: SOP classes whose pixels are a 2-D ultrasound picture the model can judge.
ULTRASOUND_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
        "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image Storage
        "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image Storage (Retired)
        "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image Storage (Retired)
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture: a scanner screenshot when Modality is US
    }
)
ENHANCED_US_VOLUME = "1.2.840.10008.5.1.4.1.1.6.2"

#: Region Spatial Format 2-D and Region Data Type tissue (PS3.3 C.8.5.5.1.1/.2).
SPATIAL_FORMAT_2D = 0x0001
DATA_TYPE_TISSUE = 0x0001
#: A tissue region covering at least this fraction of the frame is the whole display,
#: not the picture on it: a real adult echo declares 91 % of its screen, ECG trace and
#: measurements included, while scanners that frame the picture declare 40-70 %.
SCREEN_REGION = 0.85

#: A crop narrower or shorter than this (pixels) holds too little to judge.
MIN_SIDE = 32
#: Grey level at or below which a pixel counts as dark (border, background).
DARK_LEVEL = 16
#: Heuristic crop: a row/column belongs to the image when at least this fraction of
#: its pixels is above DARK_LEVEL. Speckle fills a B-mode image; the dark frame has
#: almost nothing and burned-in text lines far less than this.
FILL_FRACTION = 0.35
#: Picture finder on a screen whose rows are not full (a sector fan, a dark echo): the
#: frame is cut into square cells, about this many along its shorter side, so that a
#: text line or an ECG trace is at most a cell or two thick while the picture is tens.
CELLS_PER_SIDE = 60
#: Grey level at or below which a pixel is the screen's black: a dark echo's speckle
#: starts at 2, while JPEG noise on its black background reaches 1.
BLACK_LEVEL = 1
#: A cell belongs to the picture when at least this fraction of its pixels is above
#: BLACK_LEVEL: the dim far field of a dark echo fan fills a third to a half of its
#: cells, while the gaps between glyphs leave most cells of a text line below it.
CELL_FILL = 0.35
#: The row/column band is kept when it holds the picture finder's box: covers its
#: centre and at least this fraction of its area. On a rectangular picture both find
#: the same image (the band cut tighter where a text line touches it); on a fan the
#: band is a strip or a fragment of it and the finder's box is taken.
BAND_HOLDS = 0.5
#: Mostly blank: fewer than this fraction of the crop's pixels above DARK_LEVEL ...
BLANK_FRACTION = 0.10
#: ... or a standard deviation under this many grey levels (a flat image).
FLAT_STD = 2.0

#: (x0, y0, x1, y1) in source pixels, half-open like a slice: ``gray[y0:y1, x0:x1]``.
Box = tuple[int, int, int, int]


class PixelError(ValueError):
    """The pixel data cannot be turned into a grayscale picture; says why."""


@dataclass(frozen=True)
class PreparedFrame:
    """One frame ready for the model."""

    frame_number: int  # 1-based, as DICOM's Referenced Frame Number counts
    crop: Box
    tensor: np.ndarray  # float32 [1, H, W], normalised per the model card
    gray: np.ndarray  # the whole frame, uint8, as to_grayscale gives it (the reports draw on it)


@dataclass(frozen=True)
class PreparedInstance:
    """The frames of one instance to analyse, or why it is skipped."""

    frames: list[PreparedFrame]
    number_of_frames: int
    skipped: str | None = None


def number_of_frames(ds: Dataset) -> int:
    value = ds.get("NumberOfFrames")
    try:
        return max(1, int(value)) if value not in (None, "") else 1
    except (TypeError, ValueError):
        raise PixelError(f"Number of Frames {value!r} is not a number") from None


def frame_indices(n_frames: int, max_frames: int) -> list[int]:
    """At most ``max_frames`` 0-based frame indices spread evenly over a cine loop,
    first and last frame included, so the whole sweep is seen."""
    if n_frames <= max_frames:
        return list(range(n_frames))
    if max_frames == 1:
        return [n_frames // 2]
    return sorted({round(i * (n_frames - 1) / (max_frames - 1)) for i in range(max_frames)})


def dataset_skip_reason(ds: Dataset) -> str | None:
    """Why the model must not judge this instance at all, from its attributes alone."""
    modality = str(ds.get("Modality", "")).strip()
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class == ENHANCED_US_VOLUME:
        return "not analysed: Enhanced US Volume (3-D) is outside the 2-D B-mode model's experience"
    if modality != "US" or sop_class not in ULTRASOUND_SOP_CLASSES:
        return f"not ultrasound: Modality {modality or 'missing'}, SOP Class {sop_class or 'missing'}"
    if "PixelData" not in ds:
        return "no pixel data (only Pixel Data is supported; not float or double float pixel data)"
    for keyword in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "PhotometricInterpretation"):
        if ds.get(keyword) in (None, ""):
            return f"no pixel data description: {keyword} is missing"
    if min(int(ds.Rows), int(ds.Columns)) < MIN_SIDE:
        return f"tiny image: {ds.Columns}x{ds.Rows} pixels, below {MIN_SIDE}"
    if ds.get("SequenceOfUltrasoundRegions") and ultrasound_region(ds) is None:
        return (
            "no B-mode picture: the Sequence of Ultrasound Regions has no 2-D tissue region "
            "(Doppler, colour flow or M-mode only)"
        )
    return None


def to_grayscale(ds: Dataset, frame: int = 0) -> np.ndarray:
    """Frame ``frame`` (0-based) of ``ds`` as uint8 grayscale, the way the model was trained.

    * RGB, YBR_FULL(_422), YBR_ICT/RCT: decoded to RGB (pydicom converts YBR; the JPEG
      2000 decoder undoes ICT/RCT), then ITU-R BT.601 luma exactly as Pillow's
      ``convert("L")`` computes it, which is what the training data went through.
    * PALETTE COLOR: the palette applied, entries scaled to 8 bits (a 16-bit palette
      whose entries never exceed 255 holds 8-bit values, as some scanners write it),
      then luma.
    * MONOCHROME2 of 8 bits: as stored. Wider or signed data: modality LUT (rescale),
      then the VOI LUT or window when the file has one, then the result's own
      minimum..maximum stretched linearly to 0..255.
    * MONOCHROME1: as above, then inverted so that bright means echogenic.
    """
    photometric = str(ds.PhotometricInterpretation).strip()
    try:
        arr = pixel_array(ds, index=frame if number_of_frames(ds) > 1 else None)
    except Exception as exc:  # decoders raise many types; the reason is kept, nothing is lost
        raise PixelError(f"cannot decode the pixel data ({type(exc).__name__}: {exc})") from exc
    try:
        return _grayscale(arr, ds, photometric)
    except PixelError:
        raise
    except Exception as exc:  # a malformed palette, LUT or window: same as undecodable
        raise PixelError(f"cannot convert {photometric} to grayscale ({type(exc).__name__}: {exc})") from exc


def _grayscale(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        return _luma(_palette_to_rgb8(arr, ds))
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return _luma(_to_uint8(arr, int(ds.BitsStored)))
    if arr.ndim != 2:
        raise PixelError(f"unexpected decoded shape {arr.shape} for {photometric}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise PixelError(f"unsupported Photometric Interpretation {photometric!r}")
    gray = _monochrome_to_uint8(arr, ds)
    return 255 - gray if photometric == "MONOCHROME1" else gray


def _luma(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb), "RGB").convert("L"))


def _to_uint8(arr: np.ndarray, bits_stored: int) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    shift = max(0, bits_stored - 8)
    return (np.clip(arr, 0, None).astype(np.uint32) >> shift).clip(0, 255).astype(np.uint8)


def _palette_to_rgb8(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    rgb = apply_color_lut(arr, ds)
    if rgb.dtype == np.uint8:
        return rgb
    entries = int(ds.RedPaletteColorLookupTableDescriptor[0]) or 65536
    first = int(ds.RedPaletteColorLookupTableDescriptor[1])
    whole_palette = apply_color_lut(np.arange(first, first + entries, dtype=arr.dtype), ds)
    if whole_palette.max() <= 255:
        return rgb.astype(np.uint8)
    return (rgb >> 8).astype(np.uint8)  # the high byte, whether entries are v*257 or v<<8


def _monochrome_to_uint8(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    plain_8bit = arr.dtype == np.uint8 and "RescaleSlope" not in ds and "ModalityLUTSequence" not in ds
    if plain_8bit:
        return arr
    values = apply_modality_lut(arr, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds)
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(arr.shape, np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def ultrasound_region(ds: Dataset) -> Box | None:
    """The B-mode picture's box from the Sequence of Ultrasound Regions, or None.

    Only regions of spatial format 2-D and data type tissue count (Doppler spectra,
    colour flow, M-mode, colour bars and text regions are ignored); with several
    (a dual view), the largest. Bounds are inclusive in DICOM and clipped to the
    image, since some scanners describe regions larger than the pixel matrix.
    """
    rows, cols = int(ds.Rows), int(ds.Columns)
    best: Box | None = None
    for item in ds.get("SequenceOfUltrasoundRegions") or []:
        if item.get("RegionSpatialFormat") != SPATIAL_FORMAT_2D or item.get("RegionDataType") != DATA_TYPE_TISSUE:
            continue
        try:
            x0, y0 = max(0, int(item.RegionLocationMinX0)), max(0, int(item.RegionLocationMinY0))
            x1, y1 = min(cols, int(item.RegionLocationMaxX1) + 1), min(rows, int(item.RegionLocationMaxY1) + 1)
        except (AttributeError, TypeError, ValueError):
            continue  # a region without usable bounds describes nothing we can crop to
        if x1 > x0 and y1 > y0 and (best is None or _area((x0, y0, x1, y1)) > _area(best)):
            best = (x0, y0, x1, y1)
    return best


def _area(box: Box) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def _longest_run(flags: np.ndarray) -> tuple[int, int] | None:
    """Start and end (exclusive) of the longest run of True values."""
    padded = np.concatenate(([False], flags, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    if edges.size == 0:
        return None
    starts, ends = edges[0::2], edges[1::2]
    k = int(np.argmax(ends - starts))
    return int(starts[k]), int(ends[k])


def band_region(gray: np.ndarray) -> Box:
    """The image band of a screen: exact on a rectangular picture, blind to a fan.

    Rows are kept where at least FILL_FRACTION of the pixels are brighter than
    DARK_LEVEL (smoothed over 5 rows, so a dark speckle line does not split the
    image); the longest such run of rows is the image band: the dark frame and
    burned-in text bands (sparse bright glyphs on black) fall outside it. Within
    that band the same rule picks the columns, which drops side annotations, depth
    scales and logos. When nothing qualifies the whole image is returned.
    """
    height, width = gray.shape
    bright = gray > DARK_LEVEL
    kernel = np.ones(5) / 5
    rows = _longest_run(np.convolve(bright.mean(axis=1), kernel, mode="same") >= FILL_FRACTION)
    if rows is None:
        return 0, 0, width, height
    y0, y1 = rows
    cols = _longest_run(np.convolve(bright[y0:y1].mean(axis=0), kernel, mode="same") >= FILL_FRACTION)
    if cols is None:
        return 0, 0, width, height
    return cols[0], y0, cols[1], y1


def _neighbourhood_any(cells: np.ndarray) -> np.ndarray:
    """Morphological dilation of a boolean grid by its 3x3 neighbourhood."""
    height, width = cells.shape
    padded = np.pad(cells, 1)
    grown = np.zeros_like(cells)
    for dy in range(3):
        for dx in range(3):
            grown |= padded[dy : dy + height, dx : dx + width]
    return grown


def _largest_component(cells: np.ndarray) -> np.ndarray | None:
    """The largest 8-connected group of True cells, as a mask; None when there is none."""
    height, width = cells.shape
    labels = np.zeros(cells.shape, np.int32)
    label, best, best_size = 0, 0, 0
    for start in zip(*np.nonzero(cells), strict=True):
        if labels[start]:
            continue
        label += 1
        labels[start] = label
        queue, size = deque([start]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny in range(max(0, y - 1), min(height, y + 2)):
                for nx in range(max(0, x - 1), min(width, x + 2)):
                    if cells[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = label
                        queue.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best else None


def picture_region(gray: np.ndarray) -> Box | None:
    """The picture of a screen as the largest blob of filled cells, or None.

    The frame is cut into cells (CELLS_PER_SIDE along its shorter side); a cell is
    filled when CELL_FILL of its pixels are above BLACK_LEVEL, which speckle does even
    in a dark echo's far field. A morphological opening (one cell) then removes what
    is one or two cells thick: text lines, calipers, depth scales, the ECG trace. The
    largest 8-connected blob left is the picture (a fan or a rectangle, colour
    Doppler included: it is bright, not black); its box is tightened to the pixels
    above BLACK_LEVEL in its border cells.
    """
    height, width = gray.shape
    cell = max(2, min(height, width) // CELLS_PER_SIDE)
    rows, cols = -(-height // cell), -(-width // cell)
    lit = np.zeros((rows * cell, cols * cell), bool)
    lit[:height, :width] = gray > BLACK_LEVEL
    filled = lit.reshape(rows, cell, cols, cell).mean(axis=(1, 3)) >= CELL_FILL
    # An opening: erode (outside the frame counts as filled, so a picture that fills
    # the frame keeps its edges), then dilate back what survived.
    opened = _neighbourhood_any(~_neighbourhood_any(~filled))
    blob = _largest_component(opened)
    if blob is None:
        return None
    ys, xs = np.nonzero(blob)
    y0, y1 = int(ys.min()) * cell, min(height, (int(ys.max()) + 1) * cell)
    x0, x1 = int(xs.min()) * cell, min(width, (int(xs.max()) + 1) * cell)
    inside = lit[y0:y1, x0:x1]
    lit_rows, lit_cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    return x0 + int(lit_cols[0]), y0 + int(lit_rows[0]), x0 + int(lit_cols[-1]) + 1, y0 + int(lit_rows[-1]) + 1


def _holds(band: Box, picture: Box) -> bool:
    """Whether the band is the blob's picture, cut tighter (BAND_HOLDS), not a strip or fragment of it."""
    centre_x, centre_y = (picture[0] + picture[2]) / 2, (picture[1] + picture[3]) / 2
    covers_centre = band[0] <= centre_x < band[2] and band[1] <= centre_y < band[3]
    return covers_centre and _area(band) >= BAND_HOLDS * _area(picture)


def heuristic_region(gray: np.ndarray) -> Box:
    """The picture of a screen capture without a Sequence of Ultrasound Regions.

    Two views of the screen, because each fails where the other does not. The
    row/column band (:func:`band_region`) is exact on a rectangular (linear probe)
    picture, even where a text line touches it, but on a sector fan or a dark echo,
    whose rows are mostly black, it finds a toolbar or a fragment. The blob finder
    (:func:`picture_region`) finds the fan among the annotations, but cannot tell a
    text line that touches the picture from the picture. The band is kept when it
    holds the blob (BAND_HOLDS), else the blob is taken. When nothing qualifies the
    whole image is returned and the blank check skips it.
    """
    band = band_region(gray)
    picture = picture_region(gray)
    return band if picture is None or _holds(band, picture) else picture


def crop_box(ds: Dataset, gray: np.ndarray) -> Box:
    """The region the model judges: the scanner's B-mode region, else the heuristic.

    A region covering SCREEN_REGION of the frame or more describes the scanner's
    whole display (an echo's region holding its text, calipers and ECG trace), not
    its picture: the heuristic then looks for the picture inside it.
    """
    region = ultrasound_region(ds)
    if region is None:
        return heuristic_region(gray)
    if _area(region) < SCREEN_REGION * gray.size:
        return region
    x0, y0, x1, y1 = region
    inner = heuristic_region(gray[y0:y1, x0:x1])
    return inner[0] + x0, inner[1] + y0, inner[2] + x0, inner[3] + y0


def crop_skip_reason(crop: np.ndarray) -> str | None:
    """Why a cropped picture is not worth judging (too small or mostly blank)."""
    height, width = crop.shape
    if min(height, width) < MIN_SIDE:
        return f"tiny image region: {width}x{height} pixels, below {MIN_SIDE}"
    bright = float(np.mean(crop > DARK_LEVEL))
    if bright < BLANK_FRACTION or float(crop.std()) < FLAT_STD:
        return f"mostly blank: {bright:.0%} of the region above grey level {DARK_LEVEL}, std {crop.std():.1f}"
    return None


def model_input(crop: np.ndarray, spec: InputSpec) -> np.ndarray:
    """float32 [1, H, W]: Pillow bilinear resize of the whole crop to the card's size
    (aspect not kept), then ``(pixel/255 - mean) / std`` - as training/ prepares it."""
    resized = Image.fromarray(crop).resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    x = np.asarray(resized, dtype=np.float32) / 255.0
    return ((x - spec.mean) / spec.std)[None].astype(np.float32)


def resize_map(heatmap: np.ndarray, width: int, height: int) -> np.ndarray:
    """A model-resolution map (e.g. Grad-CAM) bilinearly resized to a crop, kept in [0, 1]."""
    image = Image.fromarray(np.ascontiguousarray(heatmap, dtype=np.float32), "F")
    resized = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.clip(resized, 0.0, 1.0)


def prepare_instance(ds: Dataset, spec: InputSpec, max_frames: int) -> PreparedInstance:
    """Every frame of ``ds`` the model should judge (at most ``max_frames`` of a cine
    loop, evenly spaced), or the reason the instance is skipped.

    An instance is skipped only when no frame can be judged; within a cine loop a
    blank frame is left out and the others are analysed.
    """
    try:
        n_frames = number_of_frames(ds)
    except PixelError as exc:
        return PreparedInstance([], 1, str(exc))
    reason = dataset_skip_reason(ds)
    if reason:
        return PreparedInstance([], n_frames, reason)
    frames: list[PreparedFrame] = []
    try:
        for index in frame_indices(n_frames, max_frames):
            gray = to_grayscale(ds, index)
            box = crop_box(ds, gray)
            crop = gray[box[1] : box[3], box[0] : box[2]]
            reason = crop_skip_reason(crop)
            if reason is None:
                frames.append(PreparedFrame(index + 1, box, model_input(crop, spec), gray))
    except PixelError as exc:
        return PreparedInstance([], n_frames, str(exc))
    return PreparedInstance(frames, n_frames, None if frames else reason)
