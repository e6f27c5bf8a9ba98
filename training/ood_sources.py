"""The out-of-domain evaluation set: images a breast-ultrasound model must not judge.

Everything comes from what ships here (nothing is downloaded): the real ultrasound
files of pydicom and pydicom-data (echocardiograms, obstetric and abdominal scans;
not one breast), other modalities from pydicom's test files re-tagged as ultrasound,
photographs from matplotlib's sample data, and pictures generated here. Each source
is prepared exactly as the node prepares a received image (service.model.imaging),
resized to the model's input.

Some sources are *held out*: the detector is chosen on the others (``held_out``
False), and the report's AUROC and flag rates on the held-out ones are the honest
figures. The real ultrasound files are held out, since they are what the guard is for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pydicom import dcmread
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset

from service.ingest.rules import ULTRASOUND_SOP_CLASSES
from service.model.imaging import PixelError, model_input, prepare_instance
from service.model_card import InputSpec

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
#: Cine loops contribute at most this many frames, as the node's default analyses.
MAX_FRAMES = 8
#: Other modalities from pydicom's test files, re-tagged as ultrasound (one file per
#: distinct picture: the same image in several encodings counts once).
RETAGGED = {
    "CT": ("CT_small.dcm", "693_UNCR.dcm", "eCT_Supplemental.dcm", "bad_sequence.dcm"),
    "MR": (
        "MR_small.dcm",
        "MR2_UNCR.dcm",
        "emri_small.dcm",
        "MR-SIEMENS-DICOM-WithOverlays.dcm",
        "examples_overlay.dcm",
    ),
    "CR": ("RG1_UNCR.dcm", "RG3_UNCR.dcm"),
    "NM": ("JPEG-LL.dcm",),
    "OT": ("image_dfl.dcm", "mlut_18.dcm", "vlut_04.dcm"),
}
#: matplotlib's sample photographs and drawings.
PHOTOGRAPHS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")
#: Sources the detector is chosen on; every other source is held out. The upside-down
#: synthetic images (training.calibration adds them) chose the number of depth bands.
TUNING = frozenset({"CT", "MR", "generated-noise", "generated-shapes", "generated-smooth", "synthetic-upside-down"})
GENERATED_PER_KIND = 10


@dataclass(frozen=True)
class OodSource:
    """Images of one source, uint8 [N, H, W] at the model's input size."""

    name: str
    images: np.ndarray
    items: tuple[str, ...]  # file name and frame of each image

    @property
    def held_out(self) -> bool:
        return self.name not in TUNING


def _frames(ds: Dataset, name: str, spec: InputSpec) -> list[tuple[str, np.ndarray]]:
    """The frames the node would analyse, as uint8 model inputs (none when it skips them)."""
    try:
        prepared = prepare_instance(ds, spec, MAX_FRAMES)
    except PixelError:
        return []
    return [(f"{name}#{f.frame_number}", _uint8(f.tensor[0], spec)) for f in prepared.frames]


def _uint8(tensor: np.ndarray, spec: InputSpec) -> np.ndarray:
    return np.clip(np.round((tensor * spec.std + spec.mean) * 255.0), 0, 255).astype(np.uint8)


def _source(name: str, frames: Iterable[tuple[str, np.ndarray]]) -> OodSource | None:
    listed = list(frames)
    if not listed:
        return None
    return OodSource(name, np.stack([image for _, image in listed]), tuple(item for item, _ in listed))


def real_ultrasound_files() -> list[Path]:
    """Every ultrasound file pydicom and pydicom-data ship (by SOP class or Modality)."""
    found = []
    for name in sorted(get_testdata_files()):
        try:
            ds = dcmread(name, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - pydicom ships deliberately broken files too
            continue
        if str(ds.get("SOPClassUID", "")) in ULTRASOUND_SOP_CLASSES or ds.get("Modality") == "US":
            found.append(Path(name))
    return found


def retagged_as_ultrasound(ds: Dataset) -> Dataset:
    """``ds`` as a scanner that mislabels it would send it: Modality US, US Image Storage."""
    ds.Modality = "US"
    ds.SOPClassUID = US_IMAGE_STORAGE
    return ds


def _photograph(path: Path, spec: InputSpec) -> np.ndarray:
    gray = np.asarray(Image.open(path).convert("L"))
    return _uint8(model_input(gray, spec)[0], spec)


def generated(kind: str, count: int, size: int, seed: int) -> np.ndarray:
    """``count`` pictures that are not ultrasound: uniform noise, drawn shapes, smooth
    fields, burned-in text."""
    rng = np.random.default_rng(seed)
    draw: dict[str, Callable[[], np.ndarray]] = {
        "noise": lambda: rng.integers(0, 256, (size, size)).astype(np.uint8),
        "shapes": lambda: _shapes(rng, size),
        "smooth": lambda: _smooth(rng, size),
        "text": lambda: _text(rng, size),
    }
    return np.stack([draw[kind]() for _ in range(count)])


def _shapes(rng: np.random.Generator, size: int) -> np.ndarray:
    image = Image.new("L", (size, size), int(rng.integers(0, 60)))
    pen = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.integers(0, size - 18, 2)
        w, h = rng.integers(10, size // 2, 2)
        shape = pen.ellipse if rng.random() < 0.5 else pen.rectangle
        shape([int(x), int(y), int(x + w), int(y + h)], fill=int(rng.integers(60, 255)))
    return np.asarray(image)


def _smooth(rng: np.random.Generator, size: int) -> np.ndarray:
    field = rng.normal(size=(8, 8))
    scaled = ((field - field.min()) / (field.max() - field.min()) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(scaled).resize((size, size), Image.Resampling.BICUBIC))


def _text(rng: np.random.Generator, size: int) -> np.ndarray:
    image = Image.new("L", (size, size), 0)
    pen = ImageDraw.Draw(image)
    line = "DEPTH 4.0 cm  GAIN 52  FR 28 Hz"
    for row in range(0, size - 12, 15):
        pen.text((2, row), line[: int(rng.integers(6, len(line)))], fill=255)
    return np.asarray(image)


def ood_sources(size: int, seed: int = 0) -> list[OodSource]:
    """The whole out-of-domain evaluation set for a model of ``size`` x ``size`` input."""
    spec = InputSpec(height=size, width=size, mean=0.0, std=1.0)  # _uint8 undoes any normalisation
    sources = [
        _source(
            "real-ultrasound",
            (frame for path in real_ultrasound_files() for frame in _frames(dcmread(path), path.name, spec)),
        )
    ]
    for modality, names in RETAGGED.items():
        sources.append(
            _source(
                modality,
                (
                    frame
                    for name in names
                    for frame in _frames(retagged_as_ultrasound(dcmread(get_testdata_file(name))), name, spec)
                ),
            )
        )
    import matplotlib  # training-only dependency: its sample data holds the photographs

    sample_data = Path(matplotlib.get_data_path()) / "sample_data"
    sources.append(_source("photographs", ((name, _photograph(sample_data / name, spec)) for name in PHOTOGRAPHS)))
    for k, kind in enumerate(("noise", "shapes", "smooth", "text")):
        images = generated(kind, GENERATED_PER_KIND, size, seed + k)
        sources.append(_source(f"generated-{kind}", ((f"{kind}#{i}", image) for i, image in enumerate(images))))
    return [s for s in sources if s is not None]
