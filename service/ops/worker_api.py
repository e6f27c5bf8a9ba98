"""The node's side of workers without its files (``data_access = "http"`` on the
worker; service.pipeline.remote is the other side).

Mounted on the node's HTTP side when ``worker_token`` is set, behind that token as
``Authorization: Bearer`` (not the web tokens: a worker is neither an administrator
nor a reviewer, and a web token opens nothing here):

* ``GET .../spool/studies/{study}/series/{series}/instances/{instance}``: WADO-RS
  retrieve instance (PS3.18 10.4), the spool file as stored, in
  ``multipart/related; type="application/dicom"``;
* ``GET .../earlier/{generation}/studies/{study}``: the same form for the SRs of
  the latest generation before ``generation`` that produced any (the new SR names
  them as predecessors);
* ``POST .../studies/{study}/similar``: the similar cases the node's index finds for
  a worker's result (its judged frames' embeddings; the patient, whose studies are
  left out, from the node's own copy of the study), and
  ``GET .../index/images/{instance}`` the stored reference images the montage shows;
* ``POST .../studies/{study}/generations/{generation}/result``: a worker's result,
  heatmaps (``.npz``) and gated output objects as ``multipart/form-data``;
  :func:`store_handed_back` checks everything, then writes the heatmap files, stores
  the result (and, with ``index_analysed_studies``, adds the study to its index),
  writes the objects to the outbox and queues them, as a worker with the shared
  volume would. Names of files come from the node (validated UIDs), never
  from the worker.
"""

from __future__ import annotations

import functools
import io
import logging
import uuid
from collections.abc import Callable, Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Annotated

import numpy as np
import pydicom
from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.responses import FileResponse, StreamingResponse
from pydicom.errors import InvalidDicomError
from pydicom.uid import KeyObjectSelectionDocumentStorage, SecondaryCaptureImageStorage, SegmentationStorage
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service.common.bearer import CHALLENGE, bearer_credential, token_matches
from service.common.deflate import read_instance
from service.common.spool import instance_path
from service.ingest.rules import is_valid_uid
from service.ledger import PENDING_ANALYSIS, Ledger
from service.model_card import ModelCard
from service.pipeline.analysis import heatmap_file, index_entries, save_heatmaps, study_attributes
from service.pipeline.remote import API_PREFIX, SimilarOut, heatmap_key
from service.pipeline.similar import ModelIndex, similar_studies
from service.reports.build import OutputObject, fail_report, predecessor_files, queue_objects
from service.reports.sr import SR_CLASSES
from service.results import StudyResult
from service.settings import Settings
from service.similar.index import SimilarCaseIndex

LOG = logging.getLogger(__name__)

#: The outbox file name prefix of each SOP class a worker may hand back.
KINDS: dict[str, str] = {
    **dict.fromkeys(SR_CLASSES, "SR"),
    SecondaryCaptureImageStorage: "SC",
    SegmentationStorage: "SEG",
    KeyObjectSelectionDocumentStorage: "KO",
}
_CHUNK = 1 << 20
#: Parts of one upload: the result, the heatmaps, and the objects (an SR, a KOS, a
#: montage, and an SC and a SEG per image) of up to this many images.
MAX_PARTS = 2 + 3 + 2 * 2000


class HandBackError(ValueError):
    """An upload the node does not take (HTTP 400); the message says why."""


def _bearer(settings: Settings) -> Callable[[str | None], None]:
    """The ``worker_token`` as ``Authorization: Bearer`` (service.common.bearer)."""

    def check(authorization: Annotated[str | None, Header()] = None) -> None:
        given = bearer_credential(authorization)
        if given is None or not token_matches(given, settings.worker_token):
            LOG.warning("worker API: missing or wrong Bearer token")
            raise HTTPException(HTTPStatus.UNAUTHORIZED, "send Authorization: Bearer <worker_token>", CHALLENGE)

    return check


def _uid(value: str, what: str) -> str:
    if not is_valid_uid(value):
        raise HTTPException(HTTPStatus.BAD_REQUEST, f"the {what} is not a valid UID")
    return value


def multipart_dicom(files: list[Path]) -> StreamingResponse:
    """``files`` as one ``multipart/related; type="application/dicom"`` body, read
    in chunks (a cine loop need not fit in memory)."""
    boundary = f"sonocase-{uuid.uuid4().hex}"

    def body() -> Iterator[bytes]:
        for path in files:
            yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            with path.open("rb") as fh:
                while chunk := fh.read(_CHUNK):
                    yield chunk
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return StreamingResponse(body(), media_type=f'multipart/related; type="application/dicom"; boundary={boundary}')


def _output_object(data: bytes, study_uid: str) -> OutputObject:
    """One handed-back object, named from its own (checked) UIDs."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except (InvalidDicomError, ValueError, EOFError) as exc:
        raise HandBackError(f"an object is not a DICOM file: {exc}") from None
    sop_class, sop_uid = str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", ""))
    if sop_class not in KINDS:
        raise HandBackError(f"an object is of SOP class {sop_class!r}, which the node does not send")
    if not is_valid_uid(sop_uid) or str(ds.get("StudyInstanceUID", "")) != study_uid:
        raise HandBackError("an object has no valid SOP Instance UID or belongs to another study")
    return OutputObject(sop_uid, sop_class, data, KINDS[sop_class])


def _heatmaps(settings: Settings, result: StudyResult, npz: bytes) -> dict[tuple[str, int], np.ndarray]:
    """Each analysed frame's heatmap from the upload, checked against its crop, and
    the frame's ``heatmap_path`` set to the node's own file for it."""
    try:
        archive = np.load(io.BytesIO(npz), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise HandBackError(f"the heatmaps are not an .npz archive: {exc}") from None
    folder = settings.results_dir / result.study_uid / str(result.generation)
    heatmaps = {}
    with archive:
        for image in result.images:
            if not is_valid_uid(image.sop_instance_uid):
                raise HandBackError("the result names an instance with an invalid UID")
            for frame in image.frames:
                key = heatmap_key(image.sop_instance_uid, frame.frame_number)
                if key not in archive.files:
                    raise HandBackError(f"the heatmap {key} is missing")
                heat = archive[key]
                x0, y0, x1, y1 = frame.crop
                if heat.shape != (y1 - y0, x1 - x0) or not np.all(np.isfinite(heat)):
                    raise HandBackError(f"the heatmap {key} is not a finite map of its crop's size")
                heatmaps[(image.sop_instance_uid, frame.frame_number)] = heat
                frame.heatmap_path = str(heatmap_file(folder, image.sop_instance_uid, frame.frame_number))
    return heatmaps


def store_handed_back(
    settings: Settings,
    ledger: Ledger,
    study_uid: str,
    generation: int,
    result_json: bytes,
    npz: bytes,
    objects: list[bytes],
    report_error: str | None,
    index_study: Callable[[StudyResult], None],
) -> str:
    """Take a worker's result: ``stale`` when the study is not waiting for this
    generation's result any more (a repeated upload changes nothing), ``failed`` when
    the worker could not build the report (the result is stored, the study FAILED at
    stage ``report`` with its reason), else ``reported``. Everything is checked
    before anything is written: the heatmap files first, then the result in the
    ledger, then the objects, so a node that dies in between leaves an analysed
    study its sender reports (as for a worker killed while reporting)."""
    try:
        result = StudyResult.model_validate_json(result_json)
    except ValueError as exc:
        raise HandBackError(f"the result is not valid: {exc}") from None
    if result.study_uid != study_uid or result.generation != generation:
        raise HandBackError("the result is of another study or generation than its address")
    heatmaps = _heatmaps(settings, result, npz)
    outputs = [_output_object(data, study_uid) for data in objects]
    study = ledger.study(study_uid)
    if study is None:
        raise HandBackError("no such study")
    if study.generation != generation or study.state not in PENDING_ANALYSIS:
        return "stale"
    save_heatmaps(result.images, heatmaps, settings.durability == "fsync")
    analysed, not_assessed = result.image_counts()
    if not ledger.finish_analysis(
        study_uid,
        generation,
        result,
        lease_s=settings.task_lease_s,
        images_analysed=analysed,
        images_not_assessed=not_assessed,
    ):
        return "stale"
    index_study(result)  # before the report: once sent, retention may remove the spool files it copies
    if report_error is not None:
        fail_report(ledger, study_uid, generation, report_error)
        return "failed"
    stored = ledger.study(study_uid)
    assert stored is not None  # it was just analysed
    queue_objects(settings, ledger, stored, result, outputs)
    return "reported"


def patient_key(settings: Settings, ledger: Ledger, study_uid: str, index: SimilarCaseIndex) -> str:
    """The index's keyed hash of the study's patient, from the first of its spool
    files that can be read (as the analysis takes it)."""
    for rec in ledger.instances(study_uid):
        if rec.ignored_reason:
            continue
        path = instance_path(settings.spool_dir, study_uid, rec.sop_instance_uid)
        try:
            header = read_instance(path, settings.max_dataset_mb << 20, stop_before_pixels=True)
        except (OSError, InvalidDicomError, ValueError, EOFError):
            continue
        return study_attributes(header, index).patient_key
    return ""


async def _read_upload(request: Request) -> tuple[bytes, bytes, list[bytes], str | None]:
    """The upload's parts: result JSON, heatmaps, objects, report error."""
    form = await request.form(max_files=MAX_PARTS, max_fields=4)
    try:
        result, npz = form.get("result"), form.get("heatmaps")
        if not isinstance(result, UploadFile) or not isinstance(npz, UploadFile):
            raise HandBackError("the upload needs a 'result' and a 'heatmaps' file")
        objects = []
        for part in form.getlist("object"):
            if not isinstance(part, UploadFile):
                raise HandBackError("an 'object' part is not a file")
            objects.append(await part.read())
        error = form.get("report_error")
        return await result.read(), await npz.read(), objects, str(error) if error is not None else None
    finally:
        await form.close()


def worker_router(settings: Settings, ledger: Ledger) -> APIRouter:
    """The worker routes under ``/worker/v1`` (see the module's description)."""
    router = APIRouter(prefix=API_PREFIX, tags=["workers"], dependencies=[Depends(_bearer(settings))])
    indexes = ModelIndex(settings)

    @functools.cache
    def own_card() -> ModelCard | None:
        try:
            return ModelCard.load(settings.model_path)
        except (OSError, ValueError):
            return None

    def index_study(result: StudyResult) -> None:
        """``index_analysed_studies`` for a worker without the index: the node adds the
        study, as a worker on the data folder does, when the result is of its own model."""
        if not settings.index_analysed_studies:
            return
        card = own_card()
        if card is None or card.sha256 != result.model.sha256:
            LOG.warning(
                "not added to the similar-case index: analysed by %s %s, not this node's model_path",
                result.model.name,
                result.model.version,
                extra={"study_uid": result.study_uid},
            )
            return
        index = indexes.for_model(result.model)
        if index is None:
            return
        try:
            index.add(index_entries(result.study_uid, result.images, card.classes, result.study, settings.spool_dir))
        except Exception:  # the result and reports stand; only the index misses this study
            LOG.exception(
                "the analysed study could not be added to the similar-case index", extra={"study_uid": result.study_uid}
            )

    @router.get("/spool/studies/{study_uid}/series/{series_uid}/instances/{sop_instance_uid}")
    def retrieve_instance(study_uid: str, series_uid: str, sop_instance_uid: str) -> StreamingResponse:
        """WADO-RS retrieve instance: the spool file, as stored."""
        _uid(study_uid, "Study Instance UID")
        _uid(sop_instance_uid, "SOP Instance UID")
        known = any(
            rec.sop_instance_uid == sop_instance_uid and rec.series_uid == series_uid
            for rec in ledger.instances(study_uid)
        )
        path = instance_path(settings.spool_dir, study_uid, sop_instance_uid)
        if not known or not path.is_file():
            raise HTTPException(HTTPStatus.NOT_FOUND, "no such instance in the spool")
        return multipart_dicom([path])

    @router.get("/earlier/{generation}/studies/{study_uid}")
    def earlier_srs(generation: int, study_uid: str) -> StreamingResponse:
        """The SRs an SR of ``generation`` supersedes (none: 404, as WADO-RS has it)."""
        files = predecessor_files(settings, _uid(study_uid, "Study Instance UID"), generation)
        if not files:
            raise HTTPException(HTTPStatus.NOT_FOUND, "no earlier SR")
        return multipart_dicom(files)

    @router.post("/studies/{study_uid}/similar")
    def similar(study_uid: str, result: StudyResult) -> SimilarOut:
        """The similar cases of a worker's result (none without an index for its model)."""
        if result.study_uid != _uid(study_uid, "Study Instance UID"):
            raise HTTPException(HTTPStatus.BAD_REQUEST, "the result is of another study than its address")
        index = indexes.for_model(result.model)
        if index is None:
            return SimilarOut(index_version=None, patient_key="", similar=[])
        key = patient_key(settings, ledger, study_uid, index)
        return SimilarOut(
            index_version=index.version,
            patient_key=key,
            similar=similar_studies(settings, index, study_uid, result.images, key),
        )

    @router.get("/index/images/{sop_instance_uid}")
    def reference_image(sop_instance_uid: str) -> FileResponse:
        """A reference image's stored copy (DICOM), for the montage."""
        index = indexes.current()
        stored = index.reference_image(_uid(sop_instance_uid, "SOP Instance UID")) if index is not None else None
        if stored is None or stored.path is None or not stored.path.is_file():
            raise HTTPException(HTTPStatus.NOT_FOUND, "no such reference image")
        return FileResponse(stored.path, media_type="application/dicom")

    @router.post("/studies/{study_uid}/generations/{generation}/result")
    async def hand_back(request: Request, study_uid: str, generation: int) -> dict[str, str]:
        """A worker's result, heatmaps and objects (see :func:`store_handed_back`)."""
        _uid(study_uid, "Study Instance UID")
        try:
            parts = await _read_upload(request)
            outcome = await run_in_threadpool(
                store_handed_back, settings, ledger, study_uid, generation, *parts, index_study
            )
        except HandBackError as exc:
            LOG.warning("worker upload refused: %s", exc, extra={"study_uid": study_uid})
            raise HTTPException(HTTPStatus.BAD_REQUEST, str(exc)) from None
        LOG.info("result of generation %d handed back: %s", generation, outcome, extra={"study_uid": study_uid})
        return {"outcome": outcome}

    return router
