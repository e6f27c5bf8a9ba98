"""Real Ultrasound Image Storage objects around a B-mode image, as scanners send them.

A scanner does not send the bare B-mode image: it sends its whole screen, the image
inside a dark frame with a burned-in text band, a depth scale and a colour bar, and
says in the Sequence of Ultrasound Regions where the tissue image is. Pixels come
grayscale or RGB, uncompressed or JPEG baseline (YBR_FULL_422 is the common lossy
form). The variants here let the node's and the training loaders' pixel preparation
(colour to luma, cropping to the tissue region) be tested against all of them.

pydicom 3 has no JPEG baseline encoder, so Pillow encodes the frame and pydicom
encapsulates it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
)

from service.model_card import DISCLAIMER

#: Pixel forms: raw grayscale, raw RGB, JPEG baseline grayscale and JPEG baseline
#: YBR_FULL_422. (An "RGB" JPEG is common from scanners but not conformant: the US
#: Image IOD allows only YBR_FULL_422 for lossy colour, and dciodvfy rejects it.)
Variant = Literal["mono", "rgb", "mono_jpeg", "ybr_jpeg"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)

#: Region Data Type (PS3.3 C.8.5.5.1.2) and Region Spatial Format (C.8.5.5.1.1) codes.
REGION_TISSUE, REGION_COLOR_BAR = 0x0001, 0x000E
SPATIAL_2D, SPATIAL_NONE = 0x0001, 0x0000
#: Physical Units X/Y Direction (C.8.5.5.1.15): 3 = cm, 0 = none.
UNITS_CM, UNITS_NONE = 0x0003, 0x0000
JPEG_QUALITY = 92
#: A cine loop's frame interval (ms): 25 frames a second, as a breast preset records.
FRAME_TIME_MS = 40.0
_BORDER = 6  # grey level of the dark frame around the image


@dataclass(frozen=True)
class StudyInfo:
    """The synthetic patient and study every image of one study shares (no real PHI)."""

    patient_name: str
    patient_id: str
    patient_birth_date: str
    study_uid: str
    series_uid: str
    study_date: str
    study_time: str
    accession_number: str
    laterality: str  # "L" or "R"; "" when unknown
    depth_cm: float


@dataclass(frozen=True)
class Region:
    """One Sequence of Ultrasound Regions item (inclusive pixel bounds)."""

    x0: int
    y0: int
    x1: int
    y1: int
    data_type: int
    spatial_format: int
    units: int
    delta_cm: float

    def item(self) -> Dataset:
        item = Dataset()
        item.RegionSpatialFormat = self.spatial_format
        item.RegionDataType = self.data_type
        item.RegionFlags = 0
        item.RegionLocationMinX0 = self.x0
        item.RegionLocationMinY0 = self.y0
        item.RegionLocationMaxX1 = self.x1
        item.RegionLocationMaxY1 = self.y1
        item.PhysicalUnitsXDirection = self.units
        item.PhysicalUnitsYDirection = self.units
        item.PhysicalDeltaX = self.delta_cm
        item.PhysicalDeltaY = self.delta_cm
        return item


def compose_frame(image: np.ndarray, info: StudyInfo) -> tuple[np.ndarray, list[Region]]:
    """Put the B-mode ``image`` on a scanner screen: RGB frame and its regions."""
    size_y, size_x = image.shape
    top, left, bottom = max(16, size_y // 8), max(16, size_x // 8), max(8, size_y // 16)
    right = max(24, size_x // 5)
    rows, cols = top + size_y + bottom, left + size_x + right
    cols += cols % 2  # YBR_FULL_422 halves the chroma horizontally: keep the width even
    canvas = Image.new("RGB", (cols, rows), (_BORDER,) * 3)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(6, (top - 4) // 2))
    date = f"{info.study_date[:4]}-{info.study_date[4:6]}-{info.study_date[6:]}"
    draw.text((left, 2), f"SONOCASE PHANTOM  L12-5  BREAST {info.laterality}", fill=(230, 230, 230), font=font)
    draw.text(
        (left, 2 + top // 2),
        f"{date}  {info.study_time[:2]}:{info.study_time[2:4]}  {info.depth_cm:.1f} cm",
        fill=(200, 200, 120),
        font=font,
    )
    logo = top - 4
    draw.rectangle((cols - logo - 2, 2, cols - 3, logo + 1), fill=(240, 140, 20))
    draw.text((cols - logo + 2, 4), "S", fill=(255, 255, 255), font=font)
    delta_cm = info.depth_cm / size_y
    for cm in range(int(info.depth_cm) + 1):
        y = top + min(size_y - 1, round(cm / delta_cm))
        draw.line((left - 8, y, left - 3, y), fill=(180, 180, 180))
    frame = np.asarray(canvas).copy()
    frame[top : top + size_y, left : left + size_x] = image[..., None]  # last: nothing overdraws it

    bar_x0, bar_x1 = left + size_x + 6, left + size_x + 6 + max(6, right // 4)
    bar_y0, bar_y1 = top + size_y // 10, top + size_y // 2
    ramp = np.linspace(1.0, -1.0, bar_y1 - bar_y0)[:, None]
    bar = np.stack([255 * np.clip(ramp, 0, 1), 60 * np.abs(ramp), 255 * np.clip(-ramp, 0, 1)], -1)
    frame[bar_y0:bar_y1, bar_x0:bar_x1] = bar.astype(np.uint8)

    regions = [
        Region(left, top, left + size_x - 1, top + size_y - 1, REGION_TISSUE, SPATIAL_2D, UNITS_CM, delta_cm),
        Region(bar_x0, bar_y0, bar_x1 - 1, bar_y1 - 1, REGION_COLOR_BAR, SPATIAL_NONE, UNITS_NONE, 0.0),
    ]
    return frame, regions


def ultrasound_image(
    image: np.ndarray, info: StudyInfo, *, instance_number: int, sop_instance_uid: str, variant: Variant = "ybr_jpeg"
) -> Dataset:
    """One Ultrasound Image Storage dataset (with file meta) showing ``image``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown pixel variant {variant!r}; expected one of {VARIANTS}")
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"image must be 2-D uint8 grayscale, got {image.dtype} {image.shape}")
    frame, regions = compose_frame(image, info)
    ds = _identity(info, instance_number, sop_instance_uid)
    ds.SequenceOfUltrasoundRegions = [region.item() for region in regions]
    _set_pixels(ds, frame, variant)
    return ds


def ultrasound_cine(
    images: list[np.ndarray],
    info: StudyInfo,
    *,
    instance_number: int,
    sop_instance_uid: str,
    variant: Variant = "ybr_jpeg",
) -> Dataset:
    """One Ultrasound Multi-frame Image Storage dataset: a cine loop of ``images`` (one
    frame each, same size) on the same screen and regions, ``FRAME_TIME_MS`` apart."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown pixel variant {variant!r}; expected one of {VARIANTS}")
    if len(images) < 2 or len({image.shape for image in images}) != 1:
        raise ValueError("a cine loop needs at least two frames of one size")
    composed = [compose_frame(image, info) for image in images]
    ds = _identity(info, instance_number, sop_instance_uid)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SequenceOfUltrasoundRegions = [region.item() for region in composed[0][1]]
    ds.NumberOfFrames = len(images)
    ds.FrameTime = FRAME_TIME_MS
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    _set_pixels(ds, np.stack([frame for frame, _ in composed]), variant)
    return ds


def _identity(info: StudyInfo, instance_number: int, sop_instance_uid: str) -> Dataset:
    """Patient, study, series, equipment and image attributes of the US Image IOD."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.PatientName = info.patient_name
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = info.patient_birth_date
    ds.PatientSex = "F"
    ds.StudyInstanceUID = info.study_uid
    ds.StudyDate = info.study_date
    ds.StudyTime = info.study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = info.accession_number
    ds.StudyDescription = f"US BREAST {info.laterality}".strip()
    ds.Modality = "US"
    ds.SeriesInstanceUID = info.series_uid
    ds.SeriesNumber = 1
    ds.SeriesDescription = "B-mode"
    ds.BodyPartExamined = "BREAST"
    ds.Manufacturer = "Sonocase synthetic phantom"
    ds.ManufacturerModelName = "PHANTOM-US"
    ds.SoftwareVersions = "1"
    ds.InstitutionName = "Synthetic data"
    ds.ImageComments = f"Synthetic image. {DISCLAIMER}"
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ""
    ds.ContentDate = info.study_date
    ds.ContentTime = info.study_time
    ds.ImageType = ["ORIGINAL", "PRIMARY", "BREAST", "0001"]  # value 4: 2-D imaging
    # The breast is paired: Image Laterality when known, else an empty (Type 2C)
    # series Laterality; dciodvfy rejects an empty Image Laterality and both at once.
    if info.laterality:
        ds.ImageLaterality = info.laterality
    else:
        ds.Laterality = ""
    ds.BurnedInAnnotation = "YES"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _set_pixels(ds: Dataset, frames: np.ndarray, variant: Variant) -> None:
    """Store the RGB frame [H, W, 3] (or frames [N, H, W, 3] of a cine loop) as the
    variant asks: grayscale or colour, raw or JPEG (one JPEG per frame)."""
    gray = variant.startswith("mono")
    stack = frames if frames.ndim == 4 else frames[None]
    pixels = [np.asarray(Image.fromarray(f).convert("L")) if gray else f for f in stack]
    ds.Rows, ds.Columns = stack.shape[1:3]
    ds.SamplesPerPixel = 1 if gray else 3
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if not gray:
        ds.PlanarConfiguration = 0
    if not variant.endswith("jpeg"):
        ds.PhotometricInterpretation = "MONOCHROME2" if gray else "RGB"
        ds.LossyImageCompression = "00"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = np.ascontiguousarray(np.stack(pixels)).tobytes()
        return
    encoded = [_jpeg(p, variant) for p in pixels]
    ds.PhotometricInterpretation = "YBR_FULL_422" if variant == "ybr_jpeg" else "MONOCHROME2"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = f"{sum(p.nbytes for p in pixels) / sum(len(e) for e in encoded):.2f}"
    ds.LossyImageCompressionMethod = "ISO_10918_1"


def _jpeg(pixels: np.ndarray, variant: Variant) -> bytes:
    buffer = io.BytesIO()
    if variant == "ybr_jpeg":
        Image.fromarray(pixels).save(buffer, "JPEG", quality=JPEG_QUALITY, subsampling="4:2:2")
    else:
        Image.fromarray(pixels).save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()
