"""Load a folder of DICOM files labelled by a CSV as records.

The CSV has a header with ``label`` (a class name, or its index) and a key column:
``sop_instance_uid`` labels one instance, ``study_instance_uid`` every instance of a
study; a row may fill either (an instance label wins over its study's). Other
columns (``label_source``...) are allowed and ignored.

Pixels are prepared by :mod:`service.model.imaging`, the very functions the node's worker
uses (grayscale by luma, MONOCHROME1 inverted, crop to the B-mode region of the
Sequence of Ultrasound Regions or the documented heuristic), so the model is trained
on what it will see. Group key: the patient (a hash of Patient ID; the ID itself is
not kept), else the study.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from service.datasets.records import CLASSES, Record
from service.model.imaging import (
    PixelError,
    crop_box,
    dataset_skip_reason,
    frame_indices,
    number_of_frames,
    to_grayscale,
)

log = logging.getLogger(__name__)

SOP_COLUMN, STUDY_COLUMN, LABEL_COLUMN = "sop_instance_uid", "study_instance_uid", "label"


@dataclass
class LabelTable:
    """Labels by SOP Instance UID and by Study Instance UID, with the CSV line of each."""

    by_sop: dict[str, tuple[int, int]] = field(default_factory=dict)
    by_study: dict[str, tuple[int, int]] = field(default_factory=dict)

    def match(self, ds: Dataset) -> tuple[int | None, set[str]]:
        """The instance's class index (its own label, else its study's; None when
        unlabelled) and every label key that matches it, used or overridden."""
        sop, study = str(ds.get("SOPInstanceUID", "")), str(ds.get("StudyInstanceUID", ""))
        keys = {sop} & self.by_sop.keys() | {study} & self.by_study.keys()
        if sop in self.by_sop:
            return self.by_sop[sop][0], keys
        if study in self.by_study:
            return self.by_study[study][0], keys
        return None, keys


def _parse_label(value: str, where: str) -> int:
    text = value.strip().lower()
    if text in CLASSES:
        return CLASSES.index(text)
    if text.isdigit() and int(text) < len(CLASSES):
        return int(text)
    raise ValueError(f"{where}: unknown label {value!r}; expected one of {', '.join(CLASSES)}")


def read_labels(labels_csv: Path) -> LabelTable:
    """Parse the label CSV; any malformed or contradictory row raises ValueError naming it."""
    labels_csv = Path(labels_csv)
    if not labels_csv.is_file():
        raise ValueError(f"label file {labels_csv} does not exist")
    table = LabelTable()
    with labels_csv.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = {(name or "").strip().lower(): name for name in reader.fieldnames or []}
        if LABEL_COLUMN not in columns or not {SOP_COLUMN, STUDY_COLUMN} & set(columns):
            raise ValueError(
                f"{labels_csv}: needs a '{LABEL_COLUMN}' column and a "
                f"'{SOP_COLUMN}' or '{STUDY_COLUMN}' column, has {reader.fieldnames}"
            )
        for row in reader:
            where = f"{labels_csv}:{reader.line_num}"
            label = _parse_label(row[columns[LABEL_COLUMN]] or "", where)
            sop = (row.get(columns.get(SOP_COLUMN, ""), "") or "").strip()
            study = (row.get(columns.get(STUDY_COLUMN, ""), "") or "").strip()
            if not sop and not study:
                raise ValueError(f"{where}: neither {SOP_COLUMN} nor {STUDY_COLUMN} is filled")
            uid, target = (sop, table.by_sop) if sop else (study, table.by_study)
            previous = target.setdefault(uid, (label, reader.line_num))
            if previous[0] != label:
                raise ValueError(
                    f"{where}: {uid} is labelled {CLASSES[label]}, but line {previous[1]} says {CLASSES[previous[0]]}"
                )
    if not table.by_sop and not table.by_study:
        raise ValueError(f"{labels_csv}: no labelled rows")
    return table


def group_key(ds: Dataset) -> str:
    """Split group: the patient, so no patient's studies end up on both sides."""
    patient_id = str(ds.get("PatientID", "")).strip()
    if patient_id:
        return "patient:" + hashlib.sha256(patient_id.encode()).hexdigest()[:16]
    return f"study:{ds.StudyInstanceUID}"


def instance_records(ds: Dataset, label: int, source: str, max_frames: int = 1) -> list[Record]:
    """Records of one labelled instance: up to ``max_frames`` evenly spaced frames,
    grayscale and cropped exactly as the node's worker prepares them."""
    reason = dataset_skip_reason(ds)
    if reason:
        raise ValueError(f"{source}: labelled {CLASSES[label]} but unusable: {reason}")
    n_frames = number_of_frames(ds)
    records = []
    for index in frame_indices(n_frames, max_frames):
        try:
            gray = to_grayscale(ds, index)
        except PixelError as exc:
            raise ValueError(f"{source}: {exc}") from exc
        x0, y0, x1, y1 = crop_box(ds, gray)
        name = source if n_frames == 1 else f"{source}#frame{index + 1}"
        records.append(
            Record(image=gray[y0:y1, x0:x1].copy(), label=label, mask=None, group=group_key(ds), source=name)
        )
    return records


def load_dicom_labels(dicom_dir: Path, labels_csv: Path, *, max_frames: int = 1) -> list[Record]:
    """Every labelled DICOM instance under ``dicom_dir`` (recursively) as records.

    Files that are not DICOM, and DICOM instances the CSV does not label, are left
    out (logged at debug level). A labelled instance that cannot be used, or a CSV
    row that matches no file, raises ValueError: labels are never dropped silently.
    """
    dicom_dir = Path(dicom_dir)
    if not dicom_dir.is_dir():
        raise ValueError(f"DICOM folder {dicom_dir} does not exist")
    table = read_labels(labels_csv)
    used: set[str] = set()
    records: list[Record] = []
    unlabelled = 0
    for path in sorted(p for p in dicom_dir.rglob("*") if p.is_file()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError) as exc:
            log.debug("skipping %s: not a DICOM file (%s)", path, exc)
            continue
        label, keys = table.match(header)
        used |= keys
        if label is None:
            log.debug("skipping %s: no label in %s", path, labels_csv)
            unlabelled += 1
            continue
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, EOFError) as exc:
            raise ValueError(f"{path}: cannot read the labelled file ({exc})") from exc
        records += instance_records(ds, label, str(path), max_frames)
    unmatched = sorted((set(table.by_sop) | set(table.by_study)) - used)
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
        raise ValueError(f"{labels_csv}: {len(unmatched)} labelled UIDs match no file under {dicom_dir}: {shown}")
    log.info(
        "loaded %d labelled DICOM images from %s (%d DICOM files without a label)", len(records), dicom_dir, unlabelled
    )
    return records
