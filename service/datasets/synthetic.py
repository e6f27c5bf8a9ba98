"""Synthetic breast-ultrasound data sets: records, a BUSI-layout folder, DICOM studies.

BUSI cannot be downloaded here, so the tests, the demo and the shipped model use
images from :mod:`service.datasets.phantom`. A synthetic *patient* has one lesion
phantom (or none, for normal) seen in 1-3 views, like a real study's radial and
anti-radial views, so views of one patient are alike and must share a split group.

Reproducible: patient ``i`` of class ``c`` under ``seed`` is drawn from its own
random streams, so the same (seed, class, index) gives identical pixels and bytes
whichever writer asks, and the DICOM data set shows the same patients as
:func:`generate_records`.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from service.datasets.busi import BUSI_FOLDER
from service.datasets.dicom_writer import VARIANTS, StudyInfo, Variant, ultrasound_cine, ultrasound_image
from service.datasets.phantom import DEFAULT_SCANNER, NORMAL, Lesion, Scanner, jitter_view, render, sample_patient
from service.datasets.records import CLASSES, Record

#: Views per synthetic patient: drawn uniformly from this range (inclusive).
VIEWS_PER_PATIENT = (1, 3)

# Independent random streams of one patient, so asking for a different number of
# views (synthetic_study) does not change the patient's anatomy.
_COUNT, _PATIENT, _VIEW, _META = range(4)


@dataclass(frozen=True)
class SyntheticView:
    """One rendered view with one mask per lesion (BUSI keeps them as separate files)
    and the lesions as drawn in this view (their true geometry)."""

    image: np.ndarray
    masks: tuple[np.ndarray, ...]
    label: int
    group: str
    source: str
    lesions: tuple[Lesion, ...] = ()

    def record(self) -> Record:
        mask = None if self.label == NORMAL else np.logical_or.reduce(self.masks)
        return Record(image=self.image, label=self.label, mask=mask, group=self.group, source=self.source)


def class_index(label: int | str) -> int:
    """Accept a class index or name; reject anything else with the valid choices."""
    if isinstance(label, str):
        if label not in CLASSES:
            raise ValueError(f"unknown class {label!r}; expected one of {', '.join(CLASSES)}")
        return CLASSES.index(label)
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"class index {label} out of range 0..{len(CLASSES) - 1}")
    return int(label)


def _check_counts(n: int, what: str, seed: int) -> None:
    """numpy seeds must be non-negative; an empty data set is always a caller's bug."""
    if n < 1:
        raise ValueError(f"{what} must be at least 1, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def patient_views(
    seed: int, label: int, index: int, size: int = 256, n_views: int | None = None, scanner: Scanner = DEFAULT_SCANNER
) -> list[SyntheticView]:
    """Render patient ``index`` of class ``label`` on ``scanner``; ``n_views`` None draws 1-3."""
    if n_views is None:
        n_views = int(
            np.random.default_rng([seed, label, index, _COUNT]).integers(VIEWS_PER_PATIENT[0], VIEWS_PER_PATIENT[1] + 1)
        )
    patient = sample_patient(np.random.default_rng([seed, label, index, _PATIENT]), label)
    group = f"synthetic-{seed}-{CLASSES[label]}-{index:05d}"
    views = []
    for view in range(n_views):
        rng = np.random.default_rng([seed, label, index, _VIEW, view])
        seen = jitter_view(patient, rng)
        image, masks = render(seen, rng, size, scanner)
        views.append(
            SyntheticView(
                image=image,
                masks=tuple(masks),
                label=label,
                group=group,
                source=f"{group}-view{view + 1}",
                lesions=seen.lesions,
            )
        )
    return views


def synthetic_patients(n_per_class: int, size: int = 256, seed: int = 0) -> Iterator[tuple[int, list[SyntheticView]]]:
    """Yield (patient index within its class, views) class by class until each class
    has ``n_per_class`` images (the last patient may lose views to hit the count)."""
    _check_counts(n_per_class, "n_per_class", seed)
    for label in range(len(CLASSES)):
        remaining, index = n_per_class, 0
        while remaining > 0:
            views = patient_views(seed, label, index, size)[:remaining]
            remaining -= len(views)
            yield index, views
            index += 1


def generate_records(n_per_class: int, size: int = 256, seed: int = 0) -> list[Record]:
    """``n_per_class`` images of each class; masks for lesions, group = patient."""
    return [view.record() for _, views in synthetic_patients(n_per_class, size, seed) for view in views]


def write_busi_layout(root: Path, n_per_class: int, size: int = 256, seed: int = 0) -> Path:
    """Write the BUSI folder layout under ``root`` and return the data set folder.

    As in BUSI: ``<class>/<class> (N).png`` (an RGB PNG of a grey image),
    ``(N)_mask.png`` (0/255, empty for normal images) and ``(N)_mask_1.png`` for a
    second lesion."""
    folder = Path(root) / BUSI_FOLDER
    numbers = dict.fromkeys(CLASSES, 0)
    for _, views in synthetic_patients(n_per_class, size, seed):
        name = CLASSES[views[0].label]
        (folder / name).mkdir(parents=True, exist_ok=True)
        for view in views:
            numbers[name] += 1
            stem = folder / name / f"{name} ({numbers[name]})"
            Image.fromarray(view.image).convert("RGB").save(stem.with_name(stem.name + ".png"))
            masks = view.masks or (np.zeros_like(view.image, dtype=bool),)
            for k, mask in enumerate(masks):
                suffix = "_mask.png" if k == 0 else f"_mask_{k}.png"
                Image.fromarray(mask.astype(np.uint8) * 255).save(stem.with_name(stem.name + suffix))
    return folder


def _uid(*parts: str) -> str:
    """A UID hashed from ``parts`` (under pydicom's UID root): same parts, same UID."""
    return generate_uid(entropy_srcs=list(parts))


def _patient_key(seed: int, label: int, index: int) -> str:
    return f"sonocase-synthetic/{seed}/{label}/{index}"


def study_info(seed: int, label: int, index: int) -> StudyInfo:
    """Synthetic, PHI-free identity of a patient's study, derived from its seeds."""
    rng = np.random.default_rng([seed, label, index, _META])
    key = _patient_key(seed, label, index)
    # Ten hashed digits: unique across a data set's patients in practice (a clash
    # among 10,000 patients has odds ~0.5 %), and the ID carries no hint of the label.
    code = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10**10
    study_day = date(2024, 1, 1) + timedelta(days=int(rng.integers(0, 730)))
    birth_day = study_day - timedelta(days=int(rng.integers(30 * 365, 75 * 365)))
    return StudyInfo(
        patient_name=f"SYNTHETIC^PATIENT^{code:010d}",
        patient_id=f"SYN{code:010d}",
        patient_birth_date=birth_day.strftime("%Y%m%d"),
        study_uid=_uid(key, "study"),
        series_uid=_uid(key, "series"),
        study_date=study_day.strftime("%Y%m%d"),
        study_time=f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00",
        accession_number=f"SYNACC{code:010d}",
        laterality=str(rng.choice(["L", "R"])),
        depth_cm=float(rng.choice([3.0, 3.5, 4.0, 4.5, 5.0])),
    )


def _study(seed: int, label: int, index: int, views: list[SyntheticView], variant: Variant) -> list[Dataset]:
    info = study_info(seed, label, index)
    key = _patient_key(seed, label, index)
    return [
        ultrasound_image(
            view.image, info, instance_number=k + 1, sop_instance_uid=_uid(key, "instance", str(k)), variant=variant
        )
        for k, view in enumerate(views)
    ]


def synthetic_study(
    n_images: int, label: int | str, seed: int = 0, *, size: int = 256, variant: Variant = "ybr_jpeg", index: int = 0
) -> list[Dataset]:
    """One synthetic patient's study: ``n_images`` Ultrasound Image Storage objects
    of one breast lesion (or a normal breast), ready to send by C-STORE."""
    _check_counts(n_images, "n_images", seed)
    label = class_index(label)
    views = patient_views(seed, label, index, size, n_views=n_images)
    return _study(seed, label, index, views, variant)


def synthetic_cine(
    n_frames: int, label: int | str, seed: int = 0, *, size: int = 256, variant: Variant = "ybr_jpeg", index: int = 0
) -> Dataset:
    """One synthetic patient's cine loop: an Ultrasound Multi-frame Image Storage
    object whose ``n_frames`` frames are views of one breast lesion (or a normal
    breast), as a probe sweeping over it records them."""
    _check_counts(n_frames, "n_frames", seed)
    label = class_index(label)
    views = patient_views(seed, label, index, size, n_views=n_frames)
    key = _patient_key(seed, label, index)
    return ultrasound_cine(
        [view.image for view in views],
        study_info(seed, label, index),
        instance_number=1,
        sop_instance_uid=_uid(key, "cine"),
        variant=variant,
    )


def write_dicom_study(root: Path, datasets: list[Dataset]) -> list[Path]:
    """Write one study's datasets as ``root/<PatientID>/<StudyUID>/<n>.dcm`` files."""
    paths = []
    for ds in datasets:
        path = Path(root) / ds.PatientID / ds.StudyInstanceUID / f"{ds.InstanceNumber:04d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_dicom_dataset(
    root: Path, n_per_class: int, seed: int = 0, *, size: int = 256, variants: tuple[Variant, ...] = VARIANTS
) -> tuple[list[Path], Path]:
    """Write the synthetic data set as DICOM studies plus ``labels.csv``.

    One study per patient (the same patients as :func:`generate_records`), the pixel
    variant cycling through ``variants`` study by study, so a data set mixes
    grayscale, RGB and JPEG files as a real archive does. The CSV labels each study
    by Study Instance UID (columns ``study_instance_uid,label,label_source``)."""
    if not variants or set(variants) - set(VARIANTS):
        raise ValueError(f"variants must be a non-empty subset of {VARIANTS}, got {variants}")
    root = Path(root)
    paths: list[Path] = []
    rows = []
    for number, (index, views) in enumerate(synthetic_patients(n_per_class, size, seed)):
        label = views[0].label
        datasets = _study(seed, label, index, views, variants[number % len(variants)])
        paths += write_dicom_study(root, datasets)
        rows.append((datasets[0].StudyInstanceUID, CLASSES[label], "synthetic"))
    labels_csv = root / "labels.csv"
    with labels_csv.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study_instance_uid", "label", "label_source"])
        writer.writerows(rows)
    return paths, labels_csv
