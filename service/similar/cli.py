"""``sonocase index``: fill, diagnose, retract, query and inspect the similar-case index.

Thin shells around :mod:`service.similar.index`. Filling embeds DICOM images with the
configured model exactly as the worker does (:mod:`service.model.imaging`,
:mod:`service.model.inference`), saves every ``--save-every`` images, and skips images the
index already holds, so an interrupted fill is resumed by running it again.
"""

from __future__ import annotations

import csv
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from tqdm import tqdm

from service.cli import peer_param, settings_from
from service.model.imaging import prepare_instance
from service.model_card import DISCLAIMER, ModelCard
from service.results import ModelIdentity
from service.settings import Destination, Peer, Settings
from service.similar.dicomweb_copy import copy_studies_web
from service.similar.index import (
    LABEL_SOURCES,
    IndexEntry,
    SimilarCaseIndex,
    StoredImage,
)
from service.similar.pacs_copy import PacsUnavailable, copy_studies

log = logging.getLogger(__name__)

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
        result = self.embed([_read(image.path)])[0]
        if isinstance(result, str):
            raise ValueError(result)
        return result[0]


@dataclass
class FillReport:
    added: int = 0
    already_there: int = 0
    unlabelled: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # path -> reason


def _read(path: Path, header_only: bool = False) -> Dataset:
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
                headers[path] = _read(path, header_only=True)
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
                datasets.append((path, diagnosis, _read(path)))
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


# --- the commands ------------------------------------------------------------


@contextmanager
def _clear_errors() -> Iterator[None]:
    """Bad input ends the command with its message, not a traceback."""
    try:
        yield
    except (ValueError, KeyError, FileNotFoundError, TimeoutError, PacsUnavailable) as exc:
        raise click.ClickException(str(exc.args[0]) if isinstance(exc, KeyError) else str(exc)) from exc


def _existing_index(settings: Settings) -> SimilarCaseIndex:
    return SimilarCaseIndex.from_settings(settings, None)


def _fill(ctx: click.Context, folder: Path, labels_csv: Path, label_source: str | None, save_every: int) -> None:
    settings = settings_from(ctx)
    with _clear_errors():
        embedder = ReferenceEmbedder(settings)
        labels = read_labels_csv(labels_csv, embedder.card.classes, label_source)
        paths = dicom_files(folder)
        with (
            SimilarCaseIndex.from_settings(settings, embedder.identity) as index,
            tqdm(total=len(paths), unit="file", desc="indexing", disable=None) as bar,
        ):
            report = fill_index(index, embedder.embed, paths, labels, save_every, bar.update)
            version = index.version
    _summary(report, version)


def _fill_from_pacs(
    ctx: click.Context, pacs: Peer, labels_csv: Path, label_source: str | None, save_every: int
) -> None:
    """Copy each labelled study out of the PACS (C-FIND + C-GET) or DICOMweb archive
    (QIDO-RS + WADO-RS), add it, and drop the copy; studies the index holds already
    are not fetched again, so a rerun resumes."""
    settings = settings_from(ctx)
    with _clear_errors():
        embedder = ReferenceEmbedder(settings)
        labels = read_labels_csv(labels_csv, embedder.card.classes, label_source)
        studies = study_keys(labels_csv)
        if not studies:
            raise ValueError(f"{labels_csv}: the PACS is asked by study: give study_instance_uid for each row")
        report, problems = FillReport(), dict[str, str]()
        with (
            SimilarCaseIndex.from_settings(settings, embedder.identity) as index,
            tempfile.TemporaryDirectory(prefix="sonocase-pacs-") as scratch,
        ):
            known = index.known_study_uids(studies)
            todo = [uid for uid in studies if uid not in known]
            with tqdm(total=len(todo), unit="study", desc=f"copying from {pacs}", disable=None) as bar:
                copies = (
                    copy_studies(pacs, todo, Path(scratch), settings)
                    if isinstance(pacs, Destination)
                    else copy_studies_web(pacs, todo, Path(scratch), settings)
                )
                for copy in copies:
                    fill_index(index, embedder.embed, copy.files, labels, save_every, report=report)
                    if copy.problem:
                        problems[copy.study_uid] = copy.problem
                    shutil.rmtree(Path(scratch) / copy.study_uid, ignore_errors=True)
                    bar.update(1)
            version = index.version
    for study_uid, problem in problems.items():
        click.echo(f"study {study_uid}: {problem}", err=True)
    click.echo(
        f"{len(known)} of {len(studies)} studies were in the index already, "
        f"{len(problems)} of {len(studies)} studies not copied in full"
    )
    _summary(report, version)


def _summary(report: FillReport, version: str) -> None:
    for path, reason in sorted(report.failed.items()):
        click.echo(f"skipped {path}: {reason}", err=True)
    click.echo(
        f"added {report.added} images; {report.already_there} were there already, "
        f"{report.unlabelled} had no label, {len(report.failed)} could not be used; index version {version}"
    )


def study_keys(labels_csv: Path) -> list[str]:
    """The Study Instance UIDs a label CSV names, in file order (rows keyed by SOP
    Instance UID name none)."""
    with labels_csv.open(newline="", encoding="utf-8-sig") as fh:
        uids = ((row.get("study_instance_uid") or "").strip() for row in csv.DictReader(fh))
        return list(dict.fromkeys(uid for uid in uids if uid))


@click.group("index")
def index() -> None:
    """Build, fill, query and inspect the similar-case index (reference studies with diagnoses)."""


@index.command()
@click.option(
    "--dicom",
    "folder",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="Folder of DICOM files (searched recursively).",
)
@click.option(
    "--pacs",
    type=str,
    default=None,
    callback=peer_param,
    metavar="AE@HOST:PORT[+tls]|URL",
    help="Instead of --dicom: copy each labelled study from this PACS (C-FIND, C-GET; "
    "it must know our AE title) or DICOMweb archive (its base URL, e.g. "
    "https://archive/dicom-web: QIDO-RS, WADO-RS). Needs study_instance_uid in the CSV.",
)
@click.option(
    "--labels",
    "labels_csv",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="CSV: study_instance_uid or sop_instance_uid, label, label_source.",
)
@click.option(
    "--label-source",
    type=click.Choice(LABEL_SOURCES),
    default=None,
    help="Source of every label (instead of the CSV's label_source column).",
)
@click.option(
    "--save-every",
    type=click.IntRange(1),
    default=256,
    show_default=True,
    help="Images per saved batch: an interrupted run resumes after the last one.",
)
@click.pass_context
def add(
    ctx: click.Context,
    folder: Path | None,
    pacs: Peer | None,
    labels_csv: Path,
    label_source: str | None,
    save_every: int,
) -> None:
    """Embed and add labelled studies from a folder or the PACS (skips what is there)."""
    if (folder is None) == (pacs is None):
        raise click.UsageError("give either --dicom DIR or --pacs AE@HOST:PORT|URL")
    if pacs is not None:
        _fill_from_pacs(ctx, pacs, labels_csv, label_source, save_every)
    else:
        assert folder is not None
        _fill(ctx, folder, labels_csv, label_source, save_every)


@index.command()
@click.option(
    "--synthetic",
    "per_class",
    type=click.IntRange(1),
    default=None,
    help="Generate this many synthetic images per class (label source: synthetic).",
)
@click.option(
    "--seed",
    type=click.IntRange(0),
    default=1,
    show_default=True,
    help="Synthetic patients' seed (the shipped model was trained on seed 0).",
)
@click.option(
    "--busi",
    "busi_dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="BUSI data set folder (Dataset_BUSI_with_GT layout; radiologist labels).",
)
@click.pass_context
def build(ctx: click.Context, per_class: int | None, seed: int, busi_dir: Path | None) -> None:
    """Fill the index with a reference library: synthetic studies or BUSI."""
    if (per_class is None) == (busi_dir is None):
        raise click.UsageError("give exactly one of --synthetic N or --busi DIR")
    settings = settings_from(ctx)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=settings.data_dir, prefix="index-build-") as tmp, _clear_errors():
        if per_class is not None:
            from service.datasets.synthetic import write_dicom_dataset

            _, labels_csv = write_dicom_dataset(Path(tmp), per_class, seed)
            source = "synthetic"
        else:
            assert busi_dir is not None
            labels_csv = busi_as_dicom(busi_dir, Path(tmp))
            source = "radiologist"
        _fill(ctx, Path(tmp), labels_csv, source, 256)


@index.command()
@click.pass_context
def rebuild(ctx: click.Context) -> None:
    """Re-embed every stored reference image with the configured model (after a
    model change). Resumable: run it again after an interruption and it goes on
    where it stopped; the node keeps answering with the old index until the end."""
    settings = settings_from(ctx)
    with _clear_errors():
        embedder = ReferenceEmbedder(settings)
        with SimilarCaseIndex.from_settings(settings, embedder.identity) as idx:
            done, total = idx.rebuild_progress()
            if done:
                click.echo(f"resuming: {done} of {total} images were re-embedded by an earlier run", err=True)
            with tqdm(total=total, initial=done, unit="image", desc="re-embedding", disable=None) as bar:
                result = idx.rebuild(embedder.embed_stored, bar.update)
            version = idx.version
    for sop, reason in sorted(result.failed.items()):
        click.echo(f"removed {sop}: {reason}", err=True)
    click.echo(
        f"re-embedded {result.embedded} images with {embedder.identity.name} {embedder.identity.version}; "
        f"{len(result.failed)} removed; index version {version}"
    )


@index.command()
@click.argument("study_uid", required=False)
@click.argument("label", required=False)
@click.option(
    "--source",
    type=click.Choice(("biopsy", "radiologist")),
    default=None,
    help="Where the diagnosis comes from (with --csv: for rows without label_source).",
)
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="CSV of diagnoses: study_instance_uid, label, label_source.",
)
@click.pass_context
def diagnose(
    ctx: click.Context, study_uid: str | None, label: str | None, source: str | None, csv_path: Path | None
) -> None:
    """Attach a confirmed diagnosis to a study: STUDY_UID LABEL --source, or --csv."""
    if csv_path is None and (study_uid is None or label is None or source is None):
        raise click.UsageError("give STUDY_UID LABEL --source SOURCE, or --csv FILE")
    if csv_path is not None and study_uid is not None:
        raise click.UsageError("give either STUDY_UID LABEL or --csv, not both")
    settings = settings_from(ctx)
    with _clear_errors():
        classes = ModelCard.load(settings.model_path).classes
        if csv_path is not None:
            diagnoses = read_labels_csv(csv_path, classes, source)
        else:
            assert study_uid is not None and label is not None and source is not None
            if label.lower() not in classes:
                raise ValueError(f"label {label!r} is not one of {', '.join(classes)}")
            diagnoses = {study_uid: Diagnosis(label.lower(), source)}
        if any(d.source == "ai" for d in diagnoses.values()):
            raise ValueError("a diagnosis comes from biopsy or radiologist, not ai")
        missing = []
        with _existing_index(settings) as idx:
            for uid, diagnosis in diagnoses.items():
                try:
                    idx.attach_diagnosis(uid, diagnosis.label, diagnosis.source)
                except KeyError:
                    missing.append(uid)
            version = idx.version
    for uid in missing:
        click.echo(f"not in the index: {uid}", err=True)
    click.echo(f"diagnosed {len(diagnoses) - len(missing)} studies; index version {version}")
    if missing:
        ctx.exit(1)


@index.command()
@click.argument("study_uid")
@click.option("--reason", default="retracted", show_default=True, help="Recorded with the deletion.")
@click.pass_context
def delete(ctx: click.Context, study_uid: str, reason: str) -> None:
    """Retract a study: it is never offered as a similar case again."""
    settings = settings_from(ctx)
    with _clear_errors(), _existing_index(settings) as idx:
        count = idx.mark_deleted(study_uid, reason)
        if not count:
            raise ValueError(f"study {study_uid} has no live images in the index")
        click.echo(f"deleted {count} images of study {study_uid}; index version {idx.version}")


@index.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("-k", "k_studies", type=click.IntRange(1, 50), default=5, show_default=True, help="Studies to show.")
@click.option(
    "--confirmed-only",
    is_flag=True,
    help="Only studies with a confirmed label (biopsy, radiologist, or synthetic ground truth).",
)
@click.pass_context
def query(ctx: click.Context, files: tuple[Path, ...], k_studies: int, confirmed_only: bool) -> None:
    """Show the studies most similar to one study's DICOM FILES (as the worker finds them)."""
    settings = settings_from(ctx)
    with _clear_errors():
        embedder = ReferenceEmbedder(settings)
        datasets = [_read(path) for path in files]
        studies = {str(ds.get("StudyInstanceUID", "")) for ds in datasets}
        if len(studies) != 1:
            raise ValueError(f"the files belong to {len(studies)} studies; give the images of one study")
        embedded = [
            (ds, result)
            for ds, result in zip(datasets, embedder.embed(datasets), strict=True)
            if not isinstance(result, str)
        ]
        if not embedded:
            raise ValueError("none of the files could be embedded")
        with SimilarCaseIndex.from_settings(settings, embedder.identity) as idx:
            found = idx.query(
                np.stack([result[0] for _, result in embedded]),
                k_studies,
                exclude_study_uid=studies.pop(),
                exclude_patient_key=idx.patient_key(
                    str(datasets[0].get("PatientID", "")), str(datasets[0].get("IssuerOfPatientID", ""))
                )
                or None,
                confirmed_only=confirmed_only,
                query_sop_instance_uids=[str(ds.SOPInstanceUID) for ds, _ in embedded],
            )
    for rank, hit in enumerate(found, start=1):
        click.echo(
            f"{rank}. {hit.label:10} ({hit.label_source}) distance {hit.distance:.3f} "
            f"similarity {hit.similarity:.2f}  study {hit.study_uid}  accession {hit.accession_number or '-'}"
        )
    if not found:
        click.echo("no similar studies in the index")
    click.echo(DISCLAIMER)


@index.command()
@click.pass_context
def info(ctx: click.Context) -> None:
    """Show the index: model, version, images, studies by label and source."""
    settings = settings_from(ctx)
    with _clear_errors(), _existing_index(settings) as idx:
        summary = idx.info()
    model = (
        f"{summary.model.name} {summary.model.version} (sha256 {summary.model.sha256[:12]})"
        if summary.model
        else "none"
    )
    click.echo(
        f"index     {summary.directory}\nversion   {summary.version}\nmodel     {model}\n"
        f"vectors   {summary.images} images of {summary.studies} studies ({summary.dim}-d, "
        f"{summary.vectors_bytes / 2**20:.1f} MB; hnswlib M={summary.m}, ef_construction="
        f"{summary.ef_construction}, ef={summary.ef}); {summary.deleted} deleted\n"
        f"confirmed {summary.confirmed_studies} studies"
    )
    for label, sources in summary.by_label.items():
        click.echo(f"  {label:10} " + ", ".join(f"{n} {source}" for source, n in sources.items()))
