"""The reference library's work: label CSVs read, DICOM images embedded with the
node's model and added to the similar-case index, BUSI written as DICOM.

Library code for ``sonocase index`` (:mod:`service.similar.cli`), the demo and the
retrieval bench. Filling embeds DICOM images with the configured model exactly as
the worker does (:mod:`service.model.imaging`, :mod:`service.model.inference`),
saves every ``save_every`` images, and skips images the index already holds, so an
interrupted fill is resumed by running it again.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from service.model.imaging import prepare_instance
from service.model_card import ModelCard
from service.results import ModelIdentity
from service.settings import Settings
from service.similar.index import (
    LABEL_SOURCES,
    IndexEntry,
    SimilarCaseIndex,
    StoredImage,
)

#: Label CSV columns: a key (Study or SOP Instance UID), the label, optionally its source.
KEY_COLUMNS = ("study_instance_uid", "sop_instance_uid")


@dataclass(frozen=True)
class Diagnosis:
    label: str
    source: str


def read_labels_csv(path: Path, classes: Sequence[str], source: str | None = None) -> dict[str, Diagnosis]:
    """Labels by Study or SOP Instance UID from a CSV with a header.

    Columns: ``study_instance_uid`` or ``sop_instance_uid``, ``label`` (one of the
    model's ``classes``) and ``label_source`` (biopsy | radiologist | synthetic | ai) unless
    ``source`` is given, which then applies to every row. Every bad row is named in
    one ValueError, so a file is fixed in one go and nothing half-imported.
    """
    if source is not None and source not in LABEL_SOURCES:
        raise ValueError(f"label source {source!r} is not one of {', '.join(LABEL_SOURCES)}")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or ())
        keys = [c for c in KEY_COLUMNS if c in columns]
        if not keys or "label" not in columns:
            raise ValueError(
                f"{path}: needs a header with label and one of {', '.join(KEY_COLUMNS)}; "
                f"found {', '.join(sorted(columns)) or 'none'}"
            )
        if source is None and "label_source" not in columns:
            raise ValueError(f"{path}: no label_source column; give the source of every label with --label-source")
        labels: dict[str, Diagnosis] = {}
        errors: list[str] = []
        for line, row in enumerate(reader, start=2):
            key = next((row[k].strip() for k in keys if (row.get(k) or "").strip()), "")
            label = (row.get("label") or "").strip().lower()
            row_source = source or (row.get("label_source") or "").strip().lower()
            if not key:
                errors.append(f"line {line}: no {' or '.join(keys)}")
            elif label not in classes:
                errors.append(f"line {line}: label {label!r} is not one of {', '.join(classes)}")
            elif row_source not in LABEL_SOURCES:
                errors.append(
                    f"line {line}: label_source {row_source!r} is not one of {', '.join(LABEL_SOURCES)}"
                    " (or give --label-source)"
                )
            elif key in labels and labels[key] != Diagnosis(label, row_source):
                errors.append(f"line {line}: {key} is labelled twice, differently")
            else:
                labels[key] = Diagnosis(label, row_source)
    if errors:
        raise ValueError(
            f"{path}: " + "; ".join(errors[:20]) + (f"; and {len(errors) - 20} more" if len(errors) > 20 else "")
        )
    return labels


class ReferenceEmbedder:
    """Embeds reference images with the node's model, the way the worker does:
    one frame per instance (the middle frame of a cine loop)."""

    def __init__(self, settings: Settings) -> None:
        from service.model.inference import (  # onnxruntime: only for commands that embed
            ModelError,
            OnnxModel,
        )

        try:
            self.model = OnnxModel(settings.model_path, settings.execution_provider, settings.batch_size)
        except ModelError as exc:
            raise ValueError(str(exc)) from exc
        self.card: ModelCard = self.model.card
        self.identity: ModelIdentity = self.model.identity

    def embed(self, datasets: Sequence[Dataset]) -> list[tuple[np.ndarray, int] | str]:
        """Per data set: (embedding, frame number), or why it cannot be embedded."""
        prepared = [prepare_instance(ds, self.card.input, max_frames=1) for ds in datasets]
        results: list[tuple[np.ndarray, int] | str] = [p.skipped or "no frame to analyse" for p in prepared]
        ready = [i for i, p in enumerate(prepared) if p.frames]
        if ready:
            embeddings = self.model.run(np.stack([prepared[i].frames[0].tensor for i in ready])).embedding
            for i, vector in zip(ready, embeddings, strict=True):
                results[i] = (vector, prepared[i].frames[0].frame_number)
        return results

    def embed_stored(self, image: StoredImage) -> np.ndarray:
        """For ``rebuild``: the stored copy's embedding (ValueError if there is none)."""
        assert image.path is not None
        result = self.embed([read_dicom(image.path)])[0]
        if isinstance(result, str):
            raise ValueError(result)
        return result[0]


@dataclass
class FillReport:
    added: int = 0
    already_there: int = 0
    unlabelled: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # path -> reason


def read_dicom(path: Path, header_only: bool = False) -> Dataset:
    """A DICOM file, or ValueError saying why not (so a fill reports it and goes on)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=header_only)
    except (OSError, InvalidDicomError) as exc:
        raise ValueError(f"not a readable DICOM file: {exc}") from exc


def fill_index(
    index: SimilarCaseIndex,
    embed: Callable[[Sequence[Dataset]], list[tuple[np.ndarray, int] | str]],
    paths: Sequence[Path],
    labels: dict[str, Diagnosis],
    save_every: int = 256,
    progress: Callable[[int], object] = lambda n: None,
    report: FillReport | None = None,
) -> FillReport:
    """Embed and add the labelled images among ``paths``, saving every ``save_every``.

    Images the index holds already are skipped before any inference; images without
    a label are counted, unreadable or unanalysable ones reported with the reason
    (in ``report`` when given, to add up several fills).
    """
    index.check_model("add images")
    report = report or FillReport()
    for start in range(0, len(paths), save_every):
        chunk = paths[start : start + save_every]
        headers: dict[Path, Dataset] = {}
        for path in chunk:
            try:
                headers[path] = read_dicom(path, header_only=True)
            except ValueError as exc:
                report.failed[str(path)] = str(exc)
        known = index.known_sop_instance_uids(str(ds.get("SOPInstanceUID", "")) for ds in headers.values())
        todo: list[tuple[Path, Diagnosis]] = []
        for path, ds in headers.items():
            diagnosis = labels.get(str(ds.get("SOPInstanceUID", ""))) or labels.get(str(ds.get("StudyInstanceUID", "")))
            if ds.get("SOPInstanceUID") in known:
                report.already_there += 1
            elif diagnosis is None:
                report.unlabelled += 1
            else:
                todo.append((path, diagnosis))
        datasets: list[tuple[Path, Diagnosis, Dataset]] = []
        for path, diagnosis in todo:
            try:
                datasets.append((path, diagnosis, read_dicom(path)))
            except ValueError as exc:
                report.failed[str(path)] = str(exc)
        entries = []
        for (path, diagnosis, ds), result in zip(datasets, embed([d for _, _, d in datasets]), strict=True):
            if isinstance(result, str):
                report.failed[str(path)] = result
                continue
            try:
                entries.append(_entry(index, path, ds, diagnosis, *result))
            except ValueError as exc:
                report.failed[str(path)] = str(exc)
        report.added += index.add(entries).added
        progress(len(chunk))
    return report


def _entry(
    index: SimilarCaseIndex, path: Path, ds: Dataset, diagnosis: Diagnosis, embedding: np.ndarray, frame_number: int
) -> IndexEntry:
    return IndexEntry(
        embedding=embedding,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        label=diagnosis.label,
        label_source=diagnosis.source,
        confirmed=diagnosis.source != "ai",
        image_path=path,
        accession_number=str(ds.get("AccessionNumber", "") or ""),
        study_date=str(ds.get("StudyDate", "") or ""),
        patient_key=index.patient_key(str(ds.get("PatientID", "") or ""), str(ds.get("IssuerOfPatientID", "") or "")),
        frame_number=frame_number,
    )


def busi_as_dicom(busi_dir: Path, out: Path) -> Path:
    """Write the BUSI images as Ultrasound Image Storage files under ``out`` and return
    their labels CSV (by SOP Instance UID, radiologist labels).

    A study per near-duplicate group (BUSI names no patients, and near-duplicates
    are the closest thing to "the same patient"); UIDs are hashed from the file
    names, so building again finds the images already indexed.
    """
    from pydicom.uid import generate_uid

    from service.datasets.busi import load_busi
    from service.datasets.dicom_writer import StudyInfo, ultrasound_image
    from service.datasets.synthetic import write_dicom_study

    by_group: dict[str, list[tuple[Path, np.ndarray, str]]] = {}
    for record in load_busi(busi_dir):
        by_group.setdefault(record.group, []).append((Path(record.source), record.image, record.label_name))
    rows = []
    for group, images in by_group.items():
        key = f"sonocase-busi/{group}"
        info = StudyInfo(
            patient_name="BUSI^ANONYMOUS",
            patient_id=generate_uid(prefix=None, entropy_srcs=[key])[-12:],
            patient_birth_date="",
            study_uid=generate_uid(entropy_srcs=[key, "study"]),
            series_uid=generate_uid(entropy_srcs=[key, "series"]),
            study_date="",
            study_time="",
            accession_number="",
            laterality="",
            depth_cm=4.0,
        )
        datasets = []
        for number, (source, image, label) in enumerate(images, start=1):
            sop_uid = generate_uid(entropy_srcs=[key, source.name])
            datasets.append(
                ultrasound_image(image, info, instance_number=number, sop_instance_uid=sop_uid, variant="mono")
            )
            rows.append((sop_uid, label))
        write_dicom_study(out, datasets)
    labels_csv = out / "labels.csv"
    with labels_csv.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sop_instance_uid", "label", "label_source"])
        writer.writerows((uid, label, "radiologist") for uid, label in rows)
    return labels_csv


def dicom_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` except label CSVs, in a stable order."""
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() != ".csv")


def study_keys(labels_csv: Path) -> list[str]:
    """The Study Instance UIDs a label CSV names, in file order (rows keyed by SOP
    Instance UID name none)."""
    with labels_csv.open(newline="", encoding="utf-8-sig") as fh:
        uids = ((row.get("study_instance_uid") or "").strip() for row in csv.DictReader(fh))
        return list(dict.fromkeys(uid for uid in uids if uid))
