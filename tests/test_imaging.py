"""Pixel preparation on real files: every ultrasound file shipped with pydicom and
pydicom-data, and synthetic scanner screens whose true B-mode region is known."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from service.datasets.dicom_writer import VARIANTS
from service.datasets.synthetic import synthetic_study
from service.model.imaging import (
    MIN_SIDE,
    Box,
    PixelError,
    band_region,
    crop_box,
    crop_skip_reason,
    frame_indices,
    heuristic_region,
    model_input,
    number_of_frames,
    prepare_instance,
    resize_map,
    to_grayscale,
    ultrasound_region,
)
from service.model_card import InputSpec
from tests.support.dicom_peers import ULTRASOUND_FILES, ultrasound_files

SPEC = InputSpec(height=96, width=80, mean=0.4, std=0.2)

#: What preparation must make of each shipped file: the number of frames analysed
#: (at most 8 of a cine loop), or the start of the skip reason.
EXPECTED: dict[str, int | str] = {
    "ExplVR_BigEnd.dcm": 1,
    "examples_jpeg2k.dcm": 1,
    "examples_palette.dcm": "mostly blank",  # an empty obstetric frame: 8 % of its region is not black
    "examples_rgb_color.dcm": 1,
    "examples_ybr_color.dcm": 8,
    "JPGLosslessP14SV1_1s_1f_8b.dcm": 1,
    "OBXXXX1A.dcm": "mostly blank",
    "OBXXXX1A_2frame.dcm": 1,  # frame 1 is the blank one, frame 2 a sector scan
    "OBXXXX1A_expb.dcm": "mostly blank",
    "OBXXXX1A_expb_2frame.dcm": 1,
    "OBXXXX1A_rle.dcm": "mostly blank",
    "OBXXXX1A_rle_2frame.dcm": 1,
    "US1_J2KI.dcm": 1,
    "US1_J2KR.dcm": 1,
    "US1_UNCI.dcm": 1,
    "US1_UNCR.dcm": 1,
    "color-pl.dcm": 1,
    "color-px.dcm": 1,
    "color3d_jpeg_baseline.dcm": 8,
    "gdcm-US-ALOKA-16.dcm": 1,
    "gdcm-US-ALOKA-16_big.dcm": 1,
}


@dataclass(frozen=True)
class Screen:
    """What the crop must keep of a real screen, read off its frames (PNG renderings)."""

    picture: Box  # the ultrasound picture's bounds: the fan or rectangle, Doppler colour included
    kept: float  # the least fraction of the picture's box the crop keeps, on every analysed frame
    left_out: dict[str, Box] = field(default_factory=dict)  # annotations the crop must not reach


#: Every real screen, its Sequence of Ultrasound Regions removed where it has one (a
#: scanner that sends none, or a PACS that drops it), as the crop finds it. ``kept``
#: is what the crop keeps today, rounded down: the fan of a dark echo loses a dim
#: lateral wing on some frames, the flat-grey fan of OBXXXX1A its edges.
SCREENS: dict[str, Screen] = {
    # adult echo, phased array: text left and top, calipers, a grey bar, an ECG trace
    "JPGLosslessP14SV1_1s_1f_8b.dcm": Screen(
        (138, 163, 908, 650),
        0.9,
        {
            "ECG trace": (60, 695, 380, 750),
            "measurements": (80, 60, 340, 120),
            "mode text": (0, 20, 75, 240),
            "grey bar": (960, 75, 990, 335),
            "heart rate": (925, 725, 1000, 750),
        },
    ),
    # cine echo, 120 frames: its own region is the fan's box; a toolbar, text either side
    "color3d_jpeg_baseline.dcm": Screen(
        (84, 31, 596, 415),
        0.7,
        {"mode text": (0, 0, 75, 60), "depth scale": (594, 0, 640, 420), "toolbar": (75, 450, 570, 480)},
    ),
    # the same echo at half size (its region was not scaled: the fan is read off the frame)
    "examples_ybr_color.dcm": Screen(
        (42, 15, 298, 208),
        0.55,
        {"mode text": (0, 0, 37, 30), "depth scale": (297, 0, 320, 210), "toolbar": (37, 225, 283, 240)},
    ),
    # linear probe with power Doppler, no regions
    **{
        name: Screen(
            (12, 107, 625, 338),
            0.99,
            {
                "header": (0, 0, 640, 100),
                "label": (245, 358, 360, 378),
                "scale": (75, 442, 255, 458),
                "footer": (395, 455, 625, 475),
            },
        )
        for name in ("US1_UNCR.dcm", "US1_UNCI.dcm", "US1_J2KR.dcm", "US1_J2KI.dcm", "examples_jpeg2k.dcm")
    },
    "examples_rgb_color.dcm": Screen(
        (5, 53, 314, 169),
        0.99,
        {"header": (0, 0, 320, 50), "label": (120, 178, 182, 190), "footer": (195, 226, 315, 238)},
    ),
    # a dual view: both pictures together (the region names only the left one)
    **{
        name: Screen((32, 24, 640, 416), 0.95, {"header": (80, 0, 640, 22), "footer": (0, 425, 640, 480)})
        for name in ("gdcm-US-ALOKA-16.dcm", "gdcm-US-ALOKA-16_big.dcm")
    },
    # obstetric convex fan, frame 2 (frame 1 is blank: see BLANK_SCREENS)
    **{
        name: Screen((125, 65, 795, 518), 0.65, {"header": (0, 0, 800, 60), "side text": (0, 65, 110, 260)})
        for name in ("OBXXXX1A_2frame.dcm", "OBXXXX1A_expb_2frame.dcm", "OBXXXX1A_rle_2frame.dcm")
    },
    # the whole frame is picture
    **{name: Screen((0, 0, 256, 120), 1.0) for name in ("color-pl.dcm", "color-px.dcm")},
    "ExplVR_BigEnd.dcm": Screen((0, 0, 80, 60), 1.0),
}
#: Files whose only frame is blank (an empty obstetric sweep under a grey header
#: banner), and the blank frame's number in the two-frame copies of that sweep.
BLANK_SCREENS = frozenset({"OBXXXX1A.dcm", "OBXXXX1A_expb.dcm", "OBXXXX1A_rle.dcm", "examples_palette.dcm"})
BLANK_FRAMES = {"OBXXXX1A_2frame.dcm": 1, "OBXXXX1A_expb_2frame.dcm": 1, "OBXXXX1A_rle_2frame.dcm": 1}
#: Files whose Sequence of Ultrasound Regions declares the whole screen, ECG trace and
#: measurements included (SCREEN_REGION): the crop looks for the picture inside it.
WHOLE_SCREEN_REGIONS = frozenset({"JPGLosslessP14SV1_1s_1f_8b.dcm"})
#: A crop may pass the picture's box by this many pixels (a cell of the finder's grid).
SCREEN_SLACK = 8


@functools.cache
def _shipped() -> dict[str, Path]:
    return {f.name: f.path for f in ultrasound_files()}


def _read(name: str) -> Dataset:
    return pydicom.dcmread(_shipped()[name])


def _mono(seed: int = 0) -> Dataset:
    return synthetic_study(1, "malignant", seed=seed, variant="mono")[0]


def _without_regions(name: str) -> Dataset:
    ds = _read(name)
    if "SequenceOfUltrasoundRegions" in ds:
        del ds.SequenceOfUltrasoundRegions
    return ds


def _overlap(a: Box, b: Box) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def _tissue_box(ds: Dataset) -> tuple[int, int, int, int]:
    item = next(r for r in ds.SequenceOfUltrasoundRegions if r.RegionDataType == 1)
    x0, y0, x1, y1 = (
        item.RegionLocationMinX0,
        item.RegionLocationMinY0,
        item.RegionLocationMaxX1,
        item.RegionLocationMaxY1,
    )
    return x0, y0, x1 + 1, y1 + 1  # DICOM bounds are inclusive


def test_expectations_cover_every_shipped_ultrasound_file() -> None:
    assert set(EXPECTED) == ULTRASOUND_FILES


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_shipped_ultrasound_file_is_prepared_or_skipped_with_a_reason(name: str) -> None:
    prepared = prepare_instance(_read(name), SPEC, max_frames=8)
    expected = EXPECTED[name]
    if isinstance(expected, str):
        assert prepared.frames == [] and prepared.skipped is not None and prepared.skipped.startswith(expected)
        return
    assert prepared.skipped is None and len(prepared.frames) == expected
    region = ultrasound_region(_read(name))
    for frame in prepared.frames:
        if region is not None:  # the scanner's word, searched for the picture where it names the whole screen
            assert (frame.crop != region) == (name in WHOLE_SCREEN_REGIONS), frame.crop
        assert frame.tensor.shape == (1, 96, 80) and frame.tensor.dtype == np.float32
        assert np.isfinite(frame.tensor).all() and frame.tensor.std() > 0.05
        x0, y0, x1, y1 = frame.crop
        assert x1 - x0 >= MIN_SIDE and y1 - y0 >= MIN_SIDE


def test_screens_cover_every_shipped_ultrasound_file() -> None:
    assert SCREENS.keys() | BLANK_SCREENS == ULTRASOUND_FILES


@pytest.mark.parametrize(
    ("name", "regions"),
    [(name, False) for name in sorted(SCREENS)] + [(name, True) for name in sorted(WHOLE_SCREEN_REGIONS)],
)
def test_the_crop_keeps_the_picture_of_each_real_screen(name: str, regions: bool) -> None:
    """Without a Sequence of Ultrasound Regions (or with one that declares the whole
    screen), on every analysed frame the crop stays inside the picture, keeps most of
    it and reaches none of the annotations around it; and every frame the file
    analyses with its regions is analysed (none skipped as a "tiny image region", as
    the echo fans were by the row/column band alone, which cut them to the toolbar
    below)."""
    screen = SCREENS[name]
    prepared = prepare_instance(_read(name) if regions else _without_regions(name), SPEC, max_frames=8)
    frames = [frame for frame in prepared.frames if frame.frame_number != BLANK_FRAMES.get(name)]
    assert prepared.skipped is None and len(frames) == EXPECTED[name]
    px0, py0, px1, py1 = screen.picture
    for frame in frames:
        x0, y0, x1, y1 = frame.crop
        where = f"frame {frame.frame_number}: crop {frame.crop}"
        assert px0 - SCREEN_SLACK <= x0 and py0 - SCREEN_SLACK <= y0, where
        assert x1 <= px1 + SCREEN_SLACK and y1 <= py1 + SCREEN_SLACK, where
        assert _overlap(frame.crop, screen.picture) >= screen.kept * _overlap(screen.picture, screen.picture), where
        for what, box in screen.left_out.items():
            assert _overlap(frame.crop, box) == 0, f"{where} reaches the {what} {box}"


@pytest.mark.parametrize("name", sorted(BLANK_SCREENS | BLANK_FRAMES.keys()))
@pytest.mark.xfail(
    strict=True,
    reason="known gap: without regions, a blank frame's crop is the grey header "
    "banner above it (the longest filled band of rows, and the largest blob), which is not blank",
)
def test_a_blank_real_frame_without_regions_is_not_analysed(name: str) -> None:
    prepared = prepare_instance(_without_regions(name), SPEC, max_frames=8)
    assert all(frame.frame_number != BLANK_FRAMES.get(name, 1) for frame in prepared.frames)


@pytest.mark.heavy
def test_no_frame_of_a_real_file_is_a_tiny_region_with_or_without_regions() -> None:
    for name in sorted(ULTRASOUND_FILES):
        for ds in (_read(name), _without_regions(name)):
            for index in frame_indices(number_of_frames(ds), 8):
                gray = to_grayscale(ds, index)
                x0, y0, x1, y1 = crop_box(ds, gray)
                reason = crop_skip_reason(gray[y0:y1, x0:x1]) or ""
                assert not reason.startswith("tiny image region"), f"{name} frame {index + 1}: {reason}"


#: The row/column band's crop of synthetic screens without regions, as main computed it
#: before the picture finder existed (the same for every pixel variant).
SYNTHETIC_BANDS: dict[tuple[int, str], Box] = {
    (0, "benign"): (31, 30, 289, 288),
    (1, "malignant"): (31, 30, 289, 288),
    (2, "normal"): (31, 31, 289, 288),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_synthetic_screens_are_cropped_as_before(variant: str) -> None:
    """The model's input must not change: synthetic DICOMs are cropped to their region,
    and without it to the row/column band, exactly as before the picture finder (the
    finder's own box would reach the text line that touches the synthetic picture)."""
    for (seed, label), band in SYNTHETIC_BANDS.items():
        ds = synthetic_study(1, label, seed=seed, variant=variant)[0]
        gray = to_grayscale(ds)
        assert crop_box(ds, gray) == ultrasound_region(ds) == _tissue_box(ds)
        assert heuristic_region(gray) == band_region(gray) == band, (seed, label)


def test_rgb_and_lossless_jpeg2000_ybr_give_the_same_grayscale() -> None:
    rgb = to_grayscale(_read("US1_UNCR.dcm"))
    assert np.array_equal(rgb, to_grayscale(_read("US1_J2KR.dcm")))  # YBR_RCT, decoded to RGB
    assert np.abs(rgb.astype(int) - to_grayscale(_read("US1_J2KI.dcm"))).mean() < 3  # lossy


def test_palette_colour_is_the_same_in_every_encoding() -> None:
    """Little endian, RLE and big endian (whose 16-bit palette holds 8-bit values)."""
    reference = to_grayscale(_read("OBXXXX1A_2frame.dcm"), 1)
    assert reference.max() > 200
    for name in ("OBXXXX1A_rle_2frame.dcm", "OBXXXX1A_expb_2frame.dcm"):
        assert np.array_equal(reference, to_grayscale(_read(name), 1)), name


def test_grayscale_is_pillows_bt601_luma_like_the_training_data() -> None:
    ds = synthetic_study(1, "benign", seed=2, variant="rgb")[0]
    rgb = ds.pixel_array.astype(np.int64)
    expected = (rgb[..., 0] * 299 + rgb[..., 1] * 587 + rgb[..., 2] * 114 + 500) // 1000
    assert np.abs(to_grayscale(ds).astype(int) - expected).max() <= 1


def test_monochrome1_is_inverted() -> None:
    ds = _mono()
    original = to_grayscale(ds)
    inverted = copy.deepcopy(ds)
    inverted.PhotometricInterpretation = "MONOCHROME1"
    inverted.PixelData = (255 - original).tobytes()
    assert np.array_equal(to_grayscale(inverted), original)


def _as_12_bit(ds: Dataset, values: np.ndarray) -> Dataset:
    wide = copy.deepcopy(ds)
    wide.BitsAllocated, wide.BitsStored, wide.HighBit = 16, 12, 11
    wide.PixelData = values.astype(np.uint16).tobytes()
    wide.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return wide


def test_wider_than_8_bits_is_stretched_or_windowed() -> None:
    ds = _mono()
    original = to_grayscale(ds).astype(np.float64)
    wide = _as_12_bit(ds, original * 16 + 7)
    assert np.abs(to_grayscale(wide) - original).max() <= 1  # min..max stretch: the same picture
    wide.WindowCenter, wide.WindowWidth = 2048, 4096  # the window covers the whole 12-bit range
    windowed = to_grayscale(wide).astype(np.float64)
    assert np.corrcoef(windowed.ravel(), original.ravel())[0, 1] > 0.999


def test_sixteen_bit_palette_is_scaled_to_8_bits() -> None:
    gray = to_grayscale(_read("gdcm-US-ALOKA-16.dcm"))
    assert gray.dtype == np.uint8 and gray.max() > 200 and gray.mean() > 20


def test_region_crop_takes_the_tissue_region_not_the_colour_bar() -> None:
    ds = _mono()
    assert ultrasound_region(ds) == _tissue_box(ds)


def test_regions_are_clipped_to_the_image() -> None:
    """examples_palette.dcm describes a region reaching row 518 of a 350-row image."""
    ds = _read("examples_palette.dcm")
    assert ultrasound_region(ds) == (120, 60, 800, 350)


def test_dual_view_takes_the_larger_tissue_region() -> None:
    assert ultrasound_region(_read("gdcm-US-ALOKA-16.dcm")) == (32, 24, 336, 416)


def test_doppler_only_regions_are_skipped() -> None:
    ds = _mono()
    for item in ds.SequenceOfUltrasoundRegions:
        item.RegionDataType = 0x0003  # PW spectral Doppler
    prepared = prepare_instance(ds, SPEC, 8)
    assert prepared.frames == [] and "no 2-D tissue region" in (prepared.skipped or "")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_heuristic_finds_the_b_mode_image_without_regions(seed: int) -> None:
    """The synthetic screen has a dark frame, two text lines, a logo, a depth scale
    and a colour bar around the B-mode picture; the heuristic must find the picture."""
    ds = synthetic_study(1, ["normal", "benign", "malignant", "benign"][seed], seed=seed, variant="rgb")[0]
    truth = _tissue_box(ds)
    del ds.SequenceOfUltrasoundRegions
    found = crop_box(ds, to_grayscale(ds))
    ix = max(0, min(found[2], truth[2]) - max(found[0], truth[0]))
    iy = max(0, min(found[3], truth[3]) - max(found[1], truth[1]))
    union = (found[2] - found[0]) * (found[3] - found[1]) + (truth[2] - truth[0]) * (truth[3] - truth[1]) - ix * iy
    assert ix * iy / union > 0.95, (found, truth)


def test_heuristic_on_a_black_image_returns_the_whole_image() -> None:
    assert heuristic_region(np.zeros((50, 70), np.uint8)) == (0, 0, 70, 50)


@given(
    height=st.integers(32, 200),
    width=st.integers(32, 200),
    seed=st.integers(0, 2**32 - 1),
    level=st.integers(0, 255),
    fraction=st.floats(0.0, 1.0),
)
def test_heuristic_gives_a_box_inside_any_frame(
    height: int, width: int, seed: int, level: int, fraction: float
) -> None:
    """Whatever the screen (speckle of any density and brightness over a black frame,
    a rectangle of it anywhere), the box is a non-empty part of the frame."""
    rng = np.random.default_rng(seed)
    gray = np.zeros((height, width), np.uint8)
    y0, x0 = rng.integers(0, height), rng.integers(0, width)
    y1, x1 = rng.integers(y0 + 1, height + 1), rng.integers(x0 + 1, width + 1)
    speckle = (rng.random((y1 - y0, x1 - x0)) < fraction) * rng.integers(0, level + 1, (y1 - y0, x1 - x0))
    gray[y0:y1, x0:x1] = speckle
    bx0, by0, bx1, by1 = heuristic_region(gray)
    assert 0 <= bx0 < bx1 <= width and 0 <= by0 < by1 <= height


@given(n=st.integers(1, 500), k=st.integers(1, 50))
def test_cine_frames_are_bounded_and_evenly_spread(n: int, k: int) -> None:
    chosen = frame_indices(n, k)
    assert len(chosen) == min(n, k) and chosen == sorted(set(chosen))
    assert all(0 <= i < n for i in chosen)
    if n > k >= 2:
        assert chosen[0] == 0 and chosen[-1] == n - 1
        gaps = np.diff(chosen)
        assert gaps.max() - gaps.min() <= 1


def test_cine_loop_reports_its_frame_numbers() -> None:
    prepared = prepare_instance(_read("color3d_jpeg_baseline.dcm"), SPEC, max_frames=4)
    assert prepared.number_of_frames == 120
    assert [f.frame_number for f in prepared.frames] == [1, 41, 80, 120]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("not_us", "not ultrasound: Modality CT"),
        ("no_pixels", "no pixel data"),
        ("tiny", "tiny image"),
        ("blank", "mostly blank"),
        ("garbage", "cannot decode the pixel data"),
    ],
)
def test_images_the_model_must_not_judge_are_skipped_with_a_reason(change: str, reason: str) -> None:
    ds = _mono()
    if change == "not_us":
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    elif change == "no_pixels":
        del ds.PixelData
    elif change == "tiny":
        item = next(r for r in ds.SequenceOfUltrasoundRegions if r.RegionDataType == 1)
        item.RegionLocationMaxX1 = item.RegionLocationMinX0 + 20
    elif change == "blank":
        ds.PixelData = bytes(len(ds.PixelData))
    else:
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    prepared = prepare_instance(ds, SPEC, 8)
    assert prepared.frames == []
    assert prepared.skipped is not None and prepared.skipped.startswith(reason), prepared.skipped


def test_undecodable_pixels_raise_a_pixel_error_naming_the_cause() -> None:
    ds = _mono()
    ds.PixelData = b"\0" * 10
    with pytest.raises(PixelError, match="cannot decode the pixel data"):
        to_grayscale(ds)


def test_model_input_equals_the_training_preparation() -> None:
    """The worker and training must resize and normalise identically."""
    from service.datasets.records import Record
    from training.train import Normalisation, resize_images, to_tensor

    crop = to_grayscale(_mono(3))[40:250, 30:200]
    ours = model_input(crop, InputSpec(height=64, width=64, mean=0.41, std=0.23))
    theirs = to_tensor(resize_images([Record(crop, 0, None, "g", "s")], 64), Normalisation(0.41, 0.23)).numpy()
    assert np.allclose(ours, theirs[0], atol=1e-6)


def test_heatmap_is_resized_to_the_crop_and_stays_in_range() -> None:
    heatmap = np.zeros((4, 4), np.float32)
    heatmap[1, 2] = 1.0
    resized = resize_map(heatmap, 120, 90)
    assert resized.shape == (90, 120) and resized.dtype == np.float32
    assert resized.min() >= 0.0 and resized.max() <= 1.0
    y, x = np.unravel_index(resized.argmax(), resized.shape)
    assert 22 <= y <= 45 and 60 <= x <= 90  # the hot cell (row 1, column 2) stays where it was


def test_a_malformed_palette_is_a_pixel_error_not_a_crash() -> None:
    ds = _read("OBXXXX1A.dcm")
    ds.RedPaletteColorLookupTableData = ds.RedPaletteColorLookupTableData[:10]
    with pytest.raises(PixelError, match="cannot convert PALETTE COLOR to grayscale"):
        to_grayscale(ds)
