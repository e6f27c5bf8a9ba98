"""Load the BUSI data set layout (Al-Dhabyani et al. 2020) as records.

Layout: ``Dataset_BUSI_with_GT/<class>/<class> (N).png`` with the lesion mask in
``<class> (N)_mask.png`` and, where an image shows more lesions, further masks in
``_mask_1.png``, ``_mask_2.png``... Masks of one image are merged by OR; normal
images get no mask (BUSI ships empty ones). Images and masks may be RGB or
grayscale PNGs; images become uint8 grayscale.

The group key starts as the file's class and stem and is then widened to the
near-duplicate cluster (:mod:`service.datasets.splits`): BUSI contains near-duplicates.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.datasets.records import CLASSES, Record
from service.datasets.splits import with_near_duplicate_groups

log = logging.getLogger(__name__)

BUSI_FOLDER = "Dataset_BUSI_with_GT"
_NAME = re.compile(r"^(?P<stem>.+?)(?P<mask>_mask(?:_\d+)?)?\.png$", re.IGNORECASE)
_NUMBER = re.compile(r"(\d+)")


def _natural_key(path: Path) -> list[object]:
    """``benign (2)`` before ``benign (10)``: a stable, human order."""
    return [int(part) if part.isdigit() else part for part in _NUMBER.split(path.name)]


def read_gray(path: Path) -> np.ndarray:
    """Decode an image file to uint8 grayscale; a damaged file raises ValueError naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise ValueError(f"{path}: cannot decode image ({exc})") from exc


def _dataset_folder(root: Path) -> Path:
    root = Path(root)
    nested = root / BUSI_FOLDER
    folder = nested if nested.is_dir() else root
    if not folder.is_dir():
        raise ValueError(f"BUSI folder {root} does not exist")
    return folder


def _class_files(folder: Path, name: str) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """Image file of each stem in one class folder, and the mask files of each stem."""
    class_dir = folder / name
    if not class_dir.is_dir():
        raise ValueError(f"BUSI class folder {class_dir} is missing (expected {', '.join(CLASSES)})")
    images: dict[str, Path] = {}
    masks: dict[str, list[Path]] = {}
    for path in sorted(class_dir.iterdir(), key=_natural_key):
        match = _NAME.match(path.name)
        if not path.is_file() or match is None:
            log.debug("skipping %s: not a BUSI png", path)
            continue
        if match["mask"]:
            masks.setdefault(match["stem"], []).append(path)
        else:
            images[match["stem"]] = path
    if not images:
        raise ValueError(f"BUSI class folder {class_dir} holds no images")
    orphans = set(masks) - set(images)
    if orphans:
        raise ValueError(
            f"{class_dir}: masks without an image: {', '.join(sorted(str(p) for s in orphans for p in masks[s]))}"
        )
    return images, masks


def _merged_mask(image_path: Path, mask_paths: list[Path], shape: tuple[int, ...]) -> np.ndarray:
    if not mask_paths:
        raise ValueError(f"{image_path}: no mask; expected {image_path.stem}_mask.png beside it")
    merged = np.zeros(shape, bool)
    for path in mask_paths:
        mask = read_gray(path)
        if mask.shape != shape:
            raise ValueError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, its image is {shape[1]}x{shape[0]}")
        merged |= mask > 127
    return merged


def load_busi(root: Path) -> list[Record]:
    """Every image of the BUSI layout under ``root`` (or ``root/Dataset_BUSI_with_GT``)."""
    folder = _dataset_folder(root)
    records = []
    for label, name in enumerate(CLASSES):
        images, masks = _class_files(folder, name)
        for stem, path in images.items():
            image = read_gray(path)
            mask = None if name == "normal" else _merged_mask(path, masks.get(stem, []), image.shape)
            records.append(Record(image=image, label=label, mask=mask, group=f"busi:{name}/{stem}", source=str(path)))
    log.info("loaded %d BUSI images from %s", len(records), folder)
    return with_near_duplicate_groups(records)
