"""Test inputs for the report builders and the sender (no tests here).

A study is made of real ultrasound files shipped in pydicom / pydicom-data, given
one Study Instance UID and stored in a real spool + ledger like the receiver does.
Its StudyResult is what the worker would store: probabilities per frame, a Gaussian
blob as the Grad-CAM heatmap (test input data), and similar studies whose reference
images are other real files.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from service.common.spool import instance_path
from service.ledger import InstanceRecord, Ledger, StudyState
from service.pipeline.analysis import summarise_study
from service.pipeline.measurement import frame_lesion
from service.reports.build import heatmap_references, read_sources
from service.reports.heatmaps import load_heats
from service.reports.kos import key_images
from service.reports.template import SrTemplate, load_template
from service.results import (
    NO_LESION,
    FrameResult,
    ImageResult,
    ModelIdentity,
    SimilarStudy,
    StudyResult,
)
from service.settings import Settings
from tests.support.common import dcmtk

DEFAULT_TEMPLATE = Path(__file__).resolve().parents[2] / "dicom_sr_templates" / "default.json"
CLASSES = ("normal", "benign", "malignant")
#: Top-level values highdicom takes from the clock: two builds of an object differ in them.
CLOCK_KEYWORDS = (
    "InstanceCreationDate",
    "InstanceCreationTime",
    "ContentDate",
    "ContentTime",
    "DateOfSecondaryCapture",
    "TimeOfSecondaryCapture",
)
MODEL = ModelIdentity(name="sonocase-hybrid", version="1.0.0", sha256="ab" * 32)

#: Real ultrasound files: RGB, palette colour, JPEG-baseline YBR cine (30 frames),
#: JPEG-lossless MONOCHROME2, 16-bit-LUT palette.
STUDY_FILES = ("US1_UNCR.dcm", "OBXXXX1A.dcm", "examples_ybr_color.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm")
#: Reference images the similar studies point at.
REFERENCE_FILES = ("examples_rgb_color.dcm", "gdcm-US-ALOKA-16.dcm", "examples_palette.dcm")


def data_file(name: str) -> Path:
    return Path(get_testdata_file(name))


@functools.cache
def default_template() -> SrTemplate:
    return load_template(DEFAULT_TEMPLATE)


@dataclass
class Study:
    uid: str
    paths: list[Path]
    result: StudyResult
    reference_images: dict[str, Path]


def store_study(
    settings: Settings, ledger: Ledger, files: Sequence[str] = STUDY_FILES, study_uid: str | None = None
) -> tuple[str, list[Path]]:
    """Copy real files into the spool as one study (new UIDs, one patient) and
    record them in the ledger, as the receiver would."""
    return store_datasets(settings, ledger, [pydicom.dcmread(data_file(name)) for name in files], study_uid)


def store_datasets(
    settings: Settings, ledger: Ledger, datasets: Sequence[pydicom.Dataset], study_uid: str | None = None
) -> tuple[str, list[Path]]:
    """Store data sets (with file meta) as one study, as :func:`store_study` does."""
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    paths = []
    for number, ds in enumerate(datasets, start=1):
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName = "Test^Patient"
        ds.PatientID = "TEST-0001"
        ds.InstanceNumber = number
        ds.AccessionNumber = "ACC-1"
        path = instance_path(settings.spool_dir, study_uid, ds.SOPInstanceUID)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        ledger.record_instance(
            InstanceRecord(
                sop_instance_uid=ds.SOPInstanceUID,
                study_uid=study_uid,
                series_uid=series_uid,
                sop_class_uid=ds.SOPClassUID,
                transfer_syntax=ds.file_meta.TransferSyntaxUID,
                path=str(path),
                size=path.stat().st_size,
                calling_ae="TESTSCU",
                modality="US",
            )
        )
        paths.append(path)
    return study_uid, paths


def gaussian_heatmap(height: int, width: int, centre: tuple[float, float] = (0.5, 0.4)) -> np.ndarray:
    """A smooth blob in [0, 1]: stands in for the model's Grad-CAM."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cy, cx = centre[0] * height, centre[1] * width
    sigma = 0.2 * min(height, width)
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)).astype(np.float32)


#: Probabilities of an image whose class a test chooses (``analyse(classes=...)``):
#: BI-RADS bands 1, 4A and 4C.
CHOSEN = {
    "normal": {"normal": 0.97, "benign": 0.02, "malignant": 0.01},
    "benign": {"normal": 0.13, "benign": 0.80, "malignant": 0.07},
    "malignant": {"normal": 0.02, "benign": 0.16, "malignant": 0.82},
}
#: The segmentation threshold of ``analyse(lesion_peak=...)``.
LESION_THRESHOLD = 0.5


def _probabilities(seed: int) -> dict[str, float]:
    raw = np.random.default_rng(seed).random(3) + np.array([0.1, 0.2, 0.3 * (seed % 3)])
    p = raw / raw.sum()
    return {c: float(v) for c, v in zip(CLASSES, p, strict=True)}


def analyse(
    settings: Settings,
    study_uid: str,
    paths: Sequence[Path],
    generation: int = 1,
    skip: Sequence[int] = (),
    n_similar: int = 3,
    ood_images: Sequence[int] = (),
    classes: Sequence[str] = (),
    lesion_peak: float | None = None,
) -> tuple[StudyResult, dict[str, Path]]:
    """The StudyResult a worker would store for the study (heatmaps on disk); the
    images numbered in ``ood_images`` lie outside the model's training domain (score
    0.4 against a threshold of 0.3), so they get no class, as in the worker.
    ``classes``: each image's class (probabilities :data:`CHOSEN`), else drawn.
    ``lesion_peak``: the model outlines lesions, its lesion map a blob of this peak
    (a lesion where it is above :data:`LESION_THRESHOLD`), outlined and measured on
    frames of a finding as the worker does; None: a model without segmentation."""
    images = []
    for index, path in enumerate(paths):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        base = {
            "sop_instance_uid": ds.SOPInstanceUID,
            "series_uid": ds.SeriesInstanceUID,
            "sop_class_uid": ds.SOPClassUID,
        }
        if index in skip:
            images.append(ImageResult(**base, skipped="mostly blank"))
            continue
        n_frames = int(ds.get("NumberOfFrames") or 1)
        frame_numbers = sorted({1, max(1, n_frames // 2), n_frames})
        x0, y0 = ds.Columns // 8, ds.Rows // 10
        x1, y1 = ds.Columns - ds.Columns // 8, ds.Rows - ds.Rows // 20
        frames = []
        for frame_number in frame_numbers:
            heat_path = settings.results_dir / study_uid / str(generation) / f"{ds.SOPInstanceUID}-{frame_number}.npy"
            heat_path.parent.mkdir(parents=True, exist_ok=True)
            np.save(heat_path, gaussian_heatmap(y1 - y0, x1 - x0, (0.3 + 0.1 * frame_number % 0.5, 0.5)))
            probs = dict(CHOSEN[classes[index]]) if classes else _probabilities(index * 7 + frame_number)
            predicted = max(probs, key=probs.__getitem__)
            lesion = None
            if lesion_peak is not None and predicted != NO_LESION and index not in ood_images:
                lesion_map = lesion_peak * gaussian_heatmap(64, 64, (0.45, 0.5))
                lesion = frame_lesion(lesion_map, (x0, y0, x1, y1), LESION_THRESHOLD, ds)
            frames.append(
                FrameResult(
                    frame_number=frame_number,
                    probabilities=probs,
                    predicted=predicted,
                    out_of_distribution=index in ood_images,
                    ood_distance=0.4 if index in ood_images else 0.1,
                    ood_threshold=0.3,
                    heatmap_path=str(heat_path),
                    crop=(x0, y0, x1, y1),
                    embedding=[0.0] * 8,
                    lesion_threshold=None if lesion_peak is None else LESION_THRESHOLD,
                    lesion=lesion,
                )
            )
        best = None if index in ood_images else max(frames, key=lambda f: max(f.probabilities.values()))
        images.append(
            ImageResult(
                **base,
                frames=frames,
                predicted=best.predicted if best else None,
                probability=best.probabilities[best.predicted] if best else None,
                out_of_distribution=best is None,
                number_of_frames=n_frames,
            )
        )
    references: dict[str, Path] = {}
    similar = []
    for rank, name in enumerate(REFERENCE_FILES[:n_similar]):  # each a study of its own
        ref_path = data_file(name)
        ref = pydicom.dcmread(ref_path, stop_before_pixels=True)
        references[ref.SOPInstanceUID] = ref_path
        similar.append(
            SimilarStudy(
                study_uid=ref.StudyInstanceUID,
                series_uid=ref.SeriesInstanceUID,
                sop_instance_uid=ref.SOPInstanceUID,
                sop_class_uid=ref.SOPClassUID,
                accession_number=f"REF-{rank}",
                study_date=f"2023010{rank + 1}",
                label=CLASSES[rank % 3],
                label_source="biopsy" if rank % 2 == 0 else "radiologist",
                distance=0.2 + 0.1 * rank,
                similarity=1 - (0.2 + 0.1 * rank) / 2,
            )
        )
    result = StudyResult(
        study_uid=study_uid,
        generation=generation,
        model=MODEL,
        index_version="idx-7",
        images=images,
        summary=summarise_study(images, CLASSES),
        similar=similar,
    )
    return result, references


def analysed_study(settings: Settings, ledger: Ledger, files: Sequence[str] = STUDY_FILES, **kwargs: object) -> Study:
    """A stored study taken through analysis: the ledger holds its result."""
    study_uid, paths = store_study(settings, ledger, files)
    ledger.complete_quiet_studies(0.0, now=time.time() + 1)
    generation = ledger.claim_analysis(study_uid, lease_s=60)
    assert generation is not None
    result, references = analyse(settings, study_uid, paths, generation=generation, **kwargs)  # type: ignore[arg-type]
    # the report lease a worker holds while it reports the study
    assert ledger.finish_analysis(study_uid, generation, result, lease_s=settings.task_lease_s)
    assert ledger.study(study_uid).state == StudyState.ANALYSED
    return Study(study_uid, paths, result, references)


def expected_outputs(ledger: Ledger, result: StudyResult) -> dict[str, int]:
    """How many objects of each kind ("SR", "SC", "SEG", "KO") the report builder
    writes for ``result``: an SR; per analysed image a heatmap SC and, where one can
    be made, an overlay SEG; the montage when there are similar studies; the
    key-image flag when an image was assessed."""
    sources, _ = read_sources(ledger, result)
    references = heatmap_references(result, sources, load_heats(result))
    analysed = bool(references)
    return {
        "SR": 1,
        "SC": len(references) + int(analysed and bool(result.similar)),
        "SEG": sum(len(refs) - 1 for refs in references.values()),
        "KO": int(bool(key_images(result))),
    }


def outbox_kinds(paths: Sequence[Path]) -> dict[str, int]:
    """The same count for files written to the outbox (named ``<kind>.<uid>.dcm``)."""
    kinds = {"SR": 0, "SC": 0, "SEG": 0, "KO": 0}
    for path in paths:
        kinds[path.name.split(".", 1)[0]] += 1
    return kinds


def measurement_groups(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    """An SR's measurement groups, in order."""
    return list(
        next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010").ContentSequence
    )


def tracking_identifier(group: pydicom.Dataset) -> str:
    """A measurement group's Tracking Identifier (what OHIF picks its tool by)."""
    return next(i.TextValue for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "112039")


def located_numbers(group: pydicom.Dataset) -> list[tuple[pydicom.Dataset, pydicom.Dataset]]:
    """A group's numbers that are inferred from coordinates, each with its SCOORD."""
    return [
        (number, child)
        for number in group.ContentSequence
        if number.ValueType == "NUM"
        for child in number.get("ContentSequence", [])
        if child.ValueType == "SCOORD" and child.RelationshipType == "INFERRED FROM"
    ]


def dciodvfy_errors(path: Path) -> list[str]:
    """dicom3tools' IOD check: the lines that report errors (warnings are allowed)."""
    proc = subprocess.run(["dciodvfy", str(path)], check=False, capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if re.match(r"^\s*Error", line)]


def dsr2html(path: Path, out: Path) -> str:
    """DCMTK renders the SR; a non-zero exit or an error line fails the caller."""
    proc = subprocess.run(
        [dcmtk("dsr2html"), str(path), str(out)], check=False, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "E:" not in proc.stderr, proc.stderr
    return out.read_text(encoding="utf-8", errors="replace")


@dataclass
class Storescp:
    """DCMTK's storescp as the receiving PACS: one file per received object."""

    port: int
    folder: Path
    process: subprocess.Popen[bytes]
    log: Path

    def received(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in sorted(self.folder.iterdir())]

    def received_uids(self) -> list[str]:
        return [ds.SOPInstanceUID for ds in self.received()]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def start_storescp(folder: Path, port: int, *extra: str) -> Storescp:
    """Start /usr/bin/storescp (TCP_NODELAY=1) and wait until it listens. ``+uf``
    (unique file names) keeps a second copy of a SOP instance as a second file, so
    duplicates show."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder.with_suffix(".log")
    process = subprocess.Popen(
        [dcmtk("storescp"), "-v", "+uf", "-od", str(folder), *extra, str(port)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    deadline = time.monotonic() + 10
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"storescp exited: {log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("storescp did not start listening") from None
            time.sleep(0.05)
    return Storescp(port, folder, process, log)


def storescp_profile(path: Path, sop_classes: Sequence[str]) -> list[str]:
    """storescp options for a PACS accepting only ``sop_classes`` (DCMTK names),
    uncompressed: a site that, say, does not know Comprehensive 3D SR."""
    contexts = "\n".join(
        f"PresentationContext{n} = {name}\\Uncompressed"
        for n, name in enumerate(["VerificationSOPClass", *sop_classes], start=1)
    )
    path.write_text(
        "[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = LocalEndianExplicit\n"
        "TransferSyntax2 = LittleEndianImplicit\n"
        f"[[PresentationContexts]]\n[Limited]\n{contexts}\n"
        "[[Profiles]]\n[Limited]\nPresentationContexts = Limited\n"
    )
    return ["-xf", str(path), "Limited"]
