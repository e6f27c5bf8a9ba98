"""Build a study's output objects, pass them through the gate, queue them.

The worker calls :func:`build_reports` right after it stored the study's result:

1. per analysed image its Grad-CAM SC and, where one can be made, its heatmap
   overlay (SEG); the SR (Comprehensive 3D by default; the sender asks
   :func:`rebuild_sr` for another class when a destination refuses it), which draws
   each frame's heatmap outline and references those objects; when there are
   similar studies, the similar-cases montage; the key-image flag (KOS) naming
   the most suspicious image(s) and the SR. Each frame's heatmap is read once;
2. each object is encoded and checked by :mod:`service.reports.validation` from
   its bytes; if any fails, nothing of the study is queued (half a report could
   mislead) and the study is FAILED at stage ``report`` with every reason;
3. the objects are written to ``outbox_dir/<study>/<generation>/`` (atomic,
   fsynced per the durability setting) and queued for every destination; the
   study becomes REPORTED. With no destination they simply stay in the outbox.

UIDs derive from (study, generation, object), so building again (a redelivered
task, a restart) rewrites the same files and queues nothing twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from service.common.errors import error_text
from service.common.spool import write_atomic_all
from service.ledger import Ledger, StudyRow, StudyState
from service.reports import Placement, derived_uid
from service.reports.construction import PATIENT_AND_STUDY, iod_lookups_cached
from service.reports.encoding import encode, library_encode
from service.reports.heatmaps import load_heats
from service.reports.kos import build_kos, key_images
from service.reports.sc import ReferenceImages, build_heatmap_sc, build_montage_sc, frame_gray
from service.reports.seg import build_heatmap_seg, seg_skip_reason
from service.reports.source import Repair, read_source
from service.reports.sr import (
    SR_CLASSES,
    Heats,
    build_sr,
    decisive_frame,
    software_versions,
    sr_series_uid,
)
from service.reports.template import SrTemplate, TemplateError, load_template
from service.reports.validation import GateError, check_object
from service.results import StudyResult
from service.settings import Settings
from service.similar.index import SimilarCaseIndex

LOG = logging.getLogger(__name__)

#: Decoded grayscale frames by (SOP Instance UID, frame number).
Frames = Mapping[tuple[str, int], np.ndarray]

#: The SR class every study gets first (the richest; see SR_CLASSES for fallback).
DEFAULT_SR_CLASS = Comprehensive3DSRStorage
#: Every SOP class the node sends.
SENT_CLASSES: tuple[str, ...] = (
    *SR_CLASSES,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    KeyObjectSelectionDocumentStorage,
)
#: What a destination may not know without losing the result: the heatmap overlay
#: and the key-image flag. Many archives store no SEG or KOS; the SR and the SCs
#: carry the finding and the heatmap, so these are skipped there, not failed.
OPTIONAL_CLASSES: tuple[str, ...] = (SegmentationStorage, KeyObjectSelectionDocumentStorage)


class ReportError(Exception):
    """A study's objects could not be built or did not pass the gate."""


#: What building a study's objects fails with on bad input (a template, a result, a
#: heatmap file, a source image; pydicom signals a missing attribute with
#: AttributeError): the study shows why, the worker moves on, and `sonocase resend`
#: builds again once it is fixed.
REPORT_ERRORS: tuple[type[Exception], ...] = (ReportError, TemplateError, ValueError, OSError, AttributeError)


@dataclass(frozen=True)
class OutputObject:
    sop_instance_uid: str
    sop_class_uid: str
    data: bytes
    kind: str  # "SR", "SC", "SEG" or "KO": the file name prefix in the outbox


def node_version() -> str:
    try:
        return version("sonocase")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _encode(ds: Dataset, fast: bool) -> bytes:
    """The object's file bytes: by pydicom, or with ``fast`` (the setting
    ``fast_reports``) the same bytes by :mod:`service.reports.encoding`."""
    return encode(ds) if fast else library_encode(ds)


def _output(ds: Dataset, kind: str, fast: bool) -> OutputObject:
    """A built object, encoded (:func:`_encode`)."""
    return OutputObject(ds.SOPInstanceUID, ds.SOPClassUID, _encode(ds, fast), kind)


def outbox_folder(settings: Settings, study_uid: str, generation: int) -> Path:
    return settings.outbox_dir / study_uid / str(generation)


def read_sources(ledger: Ledger, result: StudyResult) -> tuple[list[Dataset], dict[str, Path]]:
    """Headers (no pixels) of the instances the result speaks about, in its order
    (see :func:`source_headers`), and their spool paths."""
    paths = {rec.sop_instance_uid: Path(rec.path) for rec in ledger.instances(result.study_uid)}

    def header(sop_instance_uid: str) -> tuple[Dataset, list[Repair]]:
        if sop_instance_uid not in paths:
            raise ReportError(f"instance {sop_instance_uid} of the result is not in the ledger")
        return read_source(paths[sop_instance_uid])

    return source_headers(result, header), paths


def source_headers(result: StudyResult, header: Callable[[str], tuple[Dataset, list[Repair]]]) -> list[Dataset]:
    """The result's instances' headers in its order, each from ``header`` (by SOP
    Instance UID: the header made valid and its repairs). The first header gets
    empty Type 2 study attributes where the modality sent none."""
    headers: list[Dataset] = []
    repairs: set[str] = set()
    for image in result.images:
        ds, repaired = header(image.sop_instance_uid)
        headers.append(ds)
        repairs.update(map(str, repaired))
    if repairs:
        LOG.warning(
            "source values not valid for their VR, repaired or left out of our objects: %s",
            "; ".join(sorted(repairs)),
            extra={"study_uid": result.study_uid},
        )
    if not headers:
        raise ReportError("the result lists no instance")
    for keyword in PATIENT_AND_STUDY:  # Type 2: an empty value stands in for one not sent
        if keyword not in headers[0]:
            setattr(headers[0], keyword, "")
    return headers


def predecessor_files(settings: Settings, study_uid: str, generation: int) -> list[Path]:
    """The outbox files of the SRs of the latest earlier generation that produced any."""
    for earlier in range(generation - 1, 0, -1):
        files = sorted(outbox_folder(settings, study_uid, earlier).glob("SR.*.dcm"))
        if files:
            return files
    return []


def predecessors(settings: Settings, study_uid: str, generation: int) -> list[Dataset]:
    """The SRs of the latest earlier generation that produced any (re-analysis)."""
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in predecessor_files(settings, study_uid, generation)]


def _series(result: StudyResult, kind: str) -> str:
    """The series of our objects of one kind ("sc", "seg", "kos") in this generation."""
    return derived_uid(result.study_uid, result.generation, f"{kind}-series")


def _reference(result: StudyResult, series_uid: str, sop_class_uid: str, sop_uid: str) -> Dataset:
    """The UIDs by which one object of ours names another."""
    ds = Dataset()
    ds.StudyInstanceUID = result.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    return ds


def heatmap_references(result: StudyResult, sources: list[Dataset], heats: Heats) -> dict[str, list[Dataset]]:
    """Each analysed image's heatmap objects, by its SOP Instance UID: its SC, then
    its SEG when one can be made (:func:`service.reports.seg.seg_skip_reason`); an
    image not assessed (outside the training domain) gets no heatmap overlay.
    The UIDs derive from (study, generation, image), so the SR built now or rebuilt
    later names the objects :func:`build_objects` writes."""
    headers = {ds.SOPInstanceUID: ds for ds in sources}
    sc_series, seg_series = _series(result, "sc"), _series(result, "seg")
    references: dict[str, list[Dataset]] = {}
    for image in result.images:
        if not image.frames:
            continue
        uid = image.sop_instance_uid
        refs = [
            _reference(
                result,
                sc_series,
                SecondaryCaptureImageStorage,
                derived_uid(result.study_uid, result.generation, "sc", uid),
            )
        ]
        if (
            not image.out_of_distribution
            and seg_skip_reason(headers[uid], heats[(uid, decisive_frame(image).frame_number)]) is None
        ):
            refs.append(
                _reference(
                    result,
                    seg_series,
                    SegmentationStorage,
                    derived_uid(result.study_uid, result.generation, "seg", uid),
                )
            )
        references[uid] = refs
    return references


def _sr_object(
    settings: Settings,
    template: SrTemplate,
    result: StudyResult,
    sources: list[Dataset],
    sop_class_uid: str,
    heats: Heats,
    earlier: Sequence[Dataset] | None = None,
) -> OutputObject:
    with iod_lookups_cached(settings.fast_reports):
        sr = build_sr(
            result,
            template,
            sources,
            sop_class_uid,
            node_version(),
            heats,
            heatmap_references(result, sources, heats),
            predecessors(settings, result.study_uid, result.generation) if earlier is None else list(earlier),
            fast=settings.fast_reports,
        )
    return _output(sr, "SR", settings.fast_reports)


def build_objects(
    settings: Settings,
    template: SrTemplate,
    result: StudyResult,
    sources: list[Dataset],
    paths: dict[str, Path],
    reference_images: ReferenceImages,
    frames: Frames | None = None,
    heats: Heats | None = None,
    earlier: Sequence[Dataset] | None = None,
) -> list[OutputObject]:
    """Every output object of the study, encoded (pure apart from reading files).
    ``frames``: decoded frames the analysis still holds (see :func:`build_reports`);
    ``heats``: its heatmaps, read from the result's files when None; ``earlier``:
    the SRs this one supersedes, read from the outbox when None (:func:`predecessors`)."""
    frames = frames or {}
    heats = load_heats(result) if heats is None else heats
    with iod_lookups_cached(settings.fast_reports):  # highdicom's look-ups of the IOD tables, remembered
        versions = software_versions(node_version(), result)
        headers = {ds.SOPInstanceUID: ds for ds in sources}
        references = heatmap_references(result, sources, heats)
        objects = []
        analysed = [image for image in result.images if image.frames]
        grays: dict[str, np.ndarray] = {}  # each analysed image's decisive frame, which the pictures show
        for number, image in enumerate(analysed, start=1):
            uid, frame_number = image.sop_instance_uid, decisive_frame(image).frame_number
            grays[uid] = frames.get((uid, frame_number))
            if grays[uid] is None:  # not in memory (a report built after a restart, a resend): decoded again
                grays[uid] = frame_gray(read_source(paths[uid], stop_before_pixels=False)[0], frame_number)
            heat = heats[(uid, frame_number)]
            sc_ref, *seg_refs = references[uid]
            sc = build_heatmap_sc(
                result,
                template,
                image,
                headers[uid],
                grays[uid],
                heat,
                Placement(sc_ref.SeriesInstanceUID, sc_ref.SOPInstanceUID, number, versions),
                settings.sc_transfer_syntax,
                fast=settings.fast_reports,
            )
            objects.append(_output(sc, "SC", settings.fast_reports))
            for seg_ref in seg_refs:
                seg = build_heatmap_seg(
                    result,
                    template,
                    image,
                    headers[uid],
                    heat,
                    Placement(seg_ref.SeriesInstanceUID, seg_ref.SOPInstanceUID, number, versions),
                    fast=settings.fast_reports,
                )
                objects.append(_output(seg, "SEG", settings.fast_reports))
        sr = _sr_object(settings, template, result, sources, DEFAULT_SR_CLASS, heats, earlier)
        objects.insert(0, sr)
        decisive = next((i for i in analysed if i.sop_instance_uid == result.summary.decisive_sop_instance_uid), None)
        if result.similar and decisive is not None:
            montage = derived_uid(result.study_uid, result.generation, "montage")
            sc = build_montage_sc(
                result,
                template,
                headers[decisive.sop_instance_uid],
                grays[decisive.sop_instance_uid],
                decisive,
                reference_images,
                Placement(_series(result, "sc"), montage, len(analysed) + 1, versions),
                settings.sc_transfer_syntax,
            )
            objects.append(_output(sc, "SC", settings.fast_reports))
        if key_images(result):  # none when no image was assessed (each outside the training domain)
            sr_ref = _reference(
                result, sr_series_uid(result.study_uid, result.generation), sr.sop_class_uid, sr.sop_instance_uid
            )
            kos = build_kos(
                result,
                template,
                sources,
                sr_ref,
                Placement(_series(result, "kos"), derived_uid(result.study_uid, result.generation, "kos"), 1, versions),
                fast=settings.fast_reports,
            )
            objects.append(_output(kos, "KO", settings.fast_reports))
        return objects


def index_reference_images(index: SimilarCaseIndex) -> ReferenceImages:
    """The montage's view of the similar-case index: the stored copy of a
    reference image, by SOP Instance UID (what the worker passes to build_reports)."""

    def find(sop_instance_uid: str) -> Path | None:
        stored = index.reference_image(sop_instance_uid)
        return stored.path if stored is not None else None

    return find


def _resolver(reference_images: ReferenceImages | Mapping[str, Path] | None) -> ReferenceImages:
    if reference_images is None:
        return lambda _uid: None
    if isinstance(reference_images, Mapping):
        return reference_images.get
    return reference_images


def _write(settings: Settings, result: StudyResult, objects: Sequence[OutputObject]) -> list[Path]:
    """The objects' files in the outbox (durable per the setting; one fsync of the folder)."""
    folder = outbox_folder(settings, result.study_uid, result.generation)
    paths = [folder / f"{obj.kind}.{obj.sop_instance_uid}.dcm" for obj in objects]
    write_atomic_all(
        [(path, obj.data) for path, obj in zip(paths, objects, strict=True)], settings.durability == "fsync"
    )
    return paths


def gate(template: SrTemplate, objects: list[OutputObject], *, fast: bool) -> None:
    """Every object through the validation gate; :class:`ReportError` with each reason.
    ``fast``: the setting ``fast_reports`` (:func:`check_object`)."""
    reasons = []
    for obj in objects:
        try:
            check_object(obj.data, template.disclaimer, fast)
        except GateError as exc:
            reasons.append(str(exc))
    if reasons:
        raise ReportError("; ".join(reasons))


def build_reports(
    settings: Settings,
    ledger: Ledger,
    study_uid: str,
    reference_images: ReferenceImages | Mapping[str, Path] | None = None,
    frames: Frames | None = None,
) -> list[Path]:
    """Build, check, write and queue the objects of the study's newest result.

    ``reference_images`` finds the stored reference image of a similar study's SOP
    Instance UID (the similar-case index's copy); without one the montage shows
    "image not stored" tiles. ``frames``: the grayscale frames the worker decoded to
    analyse this result, by (SOP Instance UID, frame number); the pictures are drawn
    on them, and a source is read and decoded again only without them (a report
    built after a restart, ``sonocase resend``). Returns the outbox paths; an empty list means nothing
    was queued: the study failed (stage ``report``, reason in the ledger) or was
    re-opened meanwhile (its next generation will be reported instead).
    """
    study, result = ledger.study(study_uid), ledger.result(study_uid)
    if study is None or result is None:
        raise ValueError(f"study {study_uid} has no stored result to report")
    if result.generation != study.generation:
        LOG.info(
            "result of generation %d is stale (study is at %d): not reported",
            result.generation,
            study.generation,
            extra={"study_uid": study_uid},
        )
        return []
    try:
        template = load_template(settings.sr_template)
        sources, paths = read_sources(ledger, result)
        objects = build_objects(settings, template, result, sources, paths, _resolver(reference_images), frames)
        gate(template, objects, fast=settings.fast_reports)
    except REPORT_ERRORS as exc:
        fail_report(ledger, study_uid, result.generation, error_text(exc))
        return []
    return queue_objects(settings, ledger, study, result, objects)


def fail_report(ledger: Ledger, study_uid: str, generation: int, reason: str) -> None:
    """The study FAILED at stage ``report`` with ``reason`` (``sonocase resend`` builds again)."""
    LOG.error("report failed: %s", reason, extra={"study_uid": study_uid, "stage": "report"})
    ledger.transition(
        study_uid,
        StudyState.FAILED,
        generation,
        sources=(StudyState.ANALYSED, StudyState.FAILED),
        failed_stage="report",
        error=reason[:2000],
    )


def queue_objects(
    settings: Settings, ledger: Ledger, study: StudyRow, result: StudyResult, objects: list[OutputObject]
) -> list[Path]:
    """Write the gated objects to the outbox, queue them for the study's destinations
    and mark the study REPORTED; idempotent (same UIDs, same files, nothing queued
    twice). Returns the outbox paths."""
    study_uid = result.study_uid
    written = list(zip(objects, _write(settings, result, objects), strict=True))
    destinations = study.destinations_or([str(d) for d in settings.destinations])
    if destinations:
        ledger.enqueue_outbox(
            study_uid,
            result.generation,
            [(obj.sop_instance_uid, obj.sop_class_uid, str(path)) for obj, path in written],
            destinations,
        )
    if not ledger.transition(study_uid, StudyState.REPORTED, result.generation):
        now = ledger.study(study_uid)
        LOG.info(
            "study is %s, not analysed: its state is left as it is; the objects stay queued",
            now.state if now else "gone",
            extra={"study_uid": study_uid},
        )
    LOG.info(
        "%d object(s) written to the outbox%s",
        len(written),
        f", queued for {', '.join(destinations)}" if destinations else "; no destination configured",
        extra={"study_uid": study_uid},
    )
    return [path for _, path in written]


def rebuild_sr(
    settings: Settings, ledger: Ledger, study_uid: str, generation: int, sop_class_uid: str
) -> tuple[str, Path]:
    """The study's SR of ``generation`` built again in ``sop_class_uid`` (for a
    destination that refuses the default class), gated and written to the outbox.
    Returns its SOP Instance UID and path; :class:`ReportError` if it cannot be."""
    if sop_class_uid not in SR_CLASSES:
        raise ValueError(f"{sop_class_uid} is not an SR class we write")
    result = ledger.result(study_uid, generation)
    if result is None:
        raise ReportError(f"study {study_uid} has no result of generation {generation}")
    try:
        template = load_template(settings.sr_template)
        sources, _ = read_sources(ledger, result)
        obj = _sr_object(settings, template, result, sources, sop_class_uid, load_heats(result))
        gate(template, [obj], fast=settings.fast_reports)
    except (TemplateError, ValueError, OSError, AttributeError) as exc:
        raise ReportError(error_text(exc)) from exc
    return obj.sop_instance_uid, _write(settings, result, [obj])[0]
