"""``sonocase index``: fill, diagnose, retract, query and inspect the similar-case index.

Thin shells around :mod:`service.similar.index` and :mod:`service.similar.references`
(which does the embedding and filling): options in, a summary out, bad input ended
with its message.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from service.cli import peer_param, settings_from
from service.model_card import DISCLAIMER, ModelCard
from service.settings import Destination, Peer, Settings
from service.similar.dicomweb_copy import copy_studies_web
from service.similar.index import LABEL_SOURCES, SimilarCaseIndex
from service.similar.pacs_copy import PacsUnavailable, copy_studies
from service.similar.references import (
    Diagnosis,
    FillReport,
    ReferenceEmbedder,
    busi_as_dicom,
    dicom_files,
    fill_index,
    read_dicom,
    read_labels_csv,
    study_keys,
)

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
        datasets = [read_dicom(path) for path in files]
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
