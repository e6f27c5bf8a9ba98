"""STOW-RS (PS3.18 10.5): instances POSTed to the node over HTTP, stored exactly as
the C-STORE receiver stores them.

The body (``multipart/related; type="application/dicom"``) is read part by part
with python-multipart's streaming parser. As soon as a part's file meta group has
arrived, its data set goes to a temporary spool file while the rest arrives
(:class:`IncomingFile`, as for C-STORE), and at the part's end the receiver's own
:class:`StoreSCP` judges, writes and records it (same spool, ledger, durability,
checks and back-pressure) before the answer is sent. A refusal becomes the part's
Failure Reason: the C-STORE status codes are already in PS3.18 Table I.2-2's ranges
(0xA700 out of resources, 0xA900 SOP class mismatch, 0xC000-0xC002 cannot
understand, 0x0110 processing failure), plus 0x0122 for a SOP class the node does
not take and 0xC122 for a transfer syntax it does not take. The answer is the Store
Instances Response (PS3.18 10.5.3) as ``application/dicom+json``: 200 all stored,
202 some, 409 none; a ``Warning`` header per failed part says why in words.

Pure functions for the media types, a part's file meta and the response;
:class:`StowUpload` holds one request's state (bytes in, parts out, no network);
:func:`stow_router` is the thin FastAPI shell around them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from http import HTTPStatus
from io import BytesIO
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydicom.dataset import Dataset
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from service.common import spool
from service.common.bearer import CHALLENGE, bearer_credential, token_matches
from service.common.metrics import observe_stow
from service.ingest.rules import (
    STORAGE_SOP_CLASSES,
    TRANSFER_SYNTAXES,
    StoreStatus,
    capacity_problem,
    is_valid_uid,
    too_large,
)
from service.ingest.store import IncomingFile, MemoryBudget, StoreSCP, disk_full
from service.settings import Settings

LOG = logging.getLogger(__name__)

#: Stands for the calling AE title of an instance received over HTTP: in the spool
#: file's Source Application Entity Title, the ledger and the log.
STOW_SOURCE = "STOW-RS"


class StowFailure(IntEnum):
    """Failure Reasons of PS3.18 Table I.2-2 for what the C-STORE receiver refuses
    at association time, before any status."""

    SOP_CLASS_NOT_SUPPORTED = 0x0122
    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122


#: A file meta group longer than this is not one (PS3.10's holds a few UIDs).
MAX_META_BYTES = 64 << 10
#: At most this many Warning headers (one per failed part) in an answer.
MAX_WARNINGS = 20
DICOM_JSON = "application/dicom+json"
_LONG_VRS = (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN")
_META_FIELDS = {0x0002: "sop_class_uid", 0x0003: "sop_instance_uid", 0x0010: "transfer_syntax"}


class PartRefused(ValueError):
    """A part not stored: ``status`` is the Failure Reason (a C-STORE status, or a
    :class:`StowFailure`)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class StowError(Exception):
    """A request refused as a whole: the HTTP status and why."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.headers = headers or {}


# --- pure functions ---------------------------------------------------------------
def request_boundary(content_type: str | None) -> bytes:
    """The multipart boundary of a STOW-RS request; :class:`StowError` 415 for any
    other media type than ``multipart/related`` of ``application/dicom`` parts (a
    missing ``type`` is taken as that), 400 without a boundary."""
    media_type, params = parse_options_header(content_type or "")
    if media_type.lower() != b"multipart/related":
        raise StowError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE, 'Content-Type must be multipart/related; type="application/dicom"'
        )
    if params.get(b"type", b"application/dicom").lower() != b"application/dicom":
        raise StowError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "only application/dicom parts are accepted (no metadata with bulk data)"
        )
    boundary = params.get(b"boundary", b"")
    if not boundary:
        raise StowError(HTTPStatus.BAD_REQUEST, "the Content-Type has no boundary")
    return boundary


def accepts_json(accept: str | None) -> bool:
    """Whether a client with this Accept header takes our ``application/dicom+json``
    answer (the only one we give)."""
    if not accept:
        return True
    ranges = {item.split(";")[0].strip().lower() for item in accept.split(",")}
    return bool(ranges & {"*/*", "application/*", DICOM_JSON, "application/json"})


def upfront_refusal(free_mb: float, content_length: int, pending_studies: int, settings: Settings) -> StowError | None:
    """Back-pressure before a byte of the body is read (the C-STORE receiver's rules
    for the whole upload): 413 when the body would take the disk below
    ``min_free_disk_mb`` (or is over ``stow_max_request_mb``), 503 while the node is
    busy; both say when to try again."""
    retry = {"Retry-After": "60"}
    if content_length > settings.stow_max_request_mb << 20:
        return StowError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"request body over stow_max_request_mb ({settings.stow_max_request_mb} MB)",
        )
    busy = capacity_problem(free_mb, 0, pending_studies, settings)
    if busy:
        return StowError(HTTPStatus.SERVICE_UNAVAILABLE, busy, retry)
    too_large = capacity_problem(free_mb, content_length, pending_studies, settings)
    if too_large:
        return StowError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"upload of {content_length} bytes: {too_large}", retry)
    return None


@dataclass(frozen=True)
class PartMeta:
    """What a part's file meta group (PS3.10 7.1) says, and where its data set starts."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    data_offset: int


def read_part_meta(head: bytes, complete: bool = False) -> PartMeta | None:
    """Read a Part 10 file's meta group from its first bytes; ``None`` while more
    bytes are needed (``complete``: there are no more). Raises
    :class:`PartRefused` (0xC000) for anything that is not a DICOM file."""
    if len(head) < 132:
        if complete:
            raise PartRefused(StoreStatus.CANNOT_UNDERSTAND, f"part of {len(head)} bytes is not a DICOM file")
        return None
    if head[128:132] != b"DICM":
        raise PartRefused(StoreStatus.CANNOT_UNDERSTAND, "not a DICOM Part 10 file (no DICM prefix)")
    values: dict[str, str] = {}
    pos = 132
    while True:
        if pos > MAX_META_BYTES:
            raise PartRefused(StoreStatus.CANNOT_UNDERSTAND, "file meta group longer than 64 KiB")
        if len(head) < pos + 12:  # enough for the next element's header, or the end
            if not complete:
                return None
            if len(head) < pos + 8:
                break
        if int.from_bytes(head[pos : pos + 2], "little") != 0x0002:
            break
        vr = head[pos + 4 : pos + 6]
        if not vr.isalpha() or not vr.isupper():
            raise PartRefused(StoreStatus.CANNOT_UNDERSTAND, "file meta group is not explicit VR little endian")
        if vr in _LONG_VRS:
            start, length = pos + 12, int.from_bytes(head[pos + 8 : pos + 12], "little")
        else:
            start, length = pos + 8, int.from_bytes(head[pos + 6 : pos + 8], "little")
        if len(head) < start + length:
            if complete or start + length > MAX_META_BYTES:
                raise PartRefused(StoreStatus.CANNOT_UNDERSTAND, "truncated file meta group")
            return None
        name = _META_FIELDS.get(int.from_bytes(head[pos + 2 : pos + 4], "little"))
        if name is not None:
            values[name] = head[start : start + length].decode("ascii", "replace").strip("\0 ")
        pos = start + length
    if not values.get("transfer_syntax"):
        raise PartRefused(StoreStatus.CANNOT_UNDERSTAND, "file meta group has no Transfer Syntax UID")
    for name, label in (
        ("sop_class_uid", "Media Storage SOP Class UID"),
        ("sop_instance_uid", "Media Storage SOP Instance UID"),
    ):
        if not is_valid_uid(values.get(name, "")):
            raise PartRefused(StoreStatus.INVALID_UID, f"file meta group: {label} is missing or not a valid UID")
    return PartMeta(values["sop_class_uid"], values["sop_instance_uid"], values["transfer_syntax"], pos)


def check_part(meta: PartMeta) -> None:
    """What the C-STORE receiver refuses at association time, refused per part: a
    SOP class or transfer syntax it does not take (Failure Reasons 0x0122, 0xC122)."""
    if meta.sop_class_uid not in STORAGE_SOP_CLASSES:
        raise PartRefused(
            StowFailure.SOP_CLASS_NOT_SUPPORTED,
            f"SOP class {meta.sop_class_uid} is not accepted (ultrasound and Secondary Capture)",
        )
    if meta.transfer_syntax not in TRANSFER_SYNTAXES:
        raise PartRefused(
            StowFailure.TRANSFER_SYNTAX_NOT_SUPPORTED, f"transfer syntax {meta.transfer_syntax} is not accepted"
        )


@dataclass(frozen=True)
class InstanceResult:
    """One part's outcome, for the response."""

    sop_class_uid: str
    sop_instance_uid: str
    status: int  #: Success (0), or the Failure Reason
    reason: str = ""

    @property
    def stored(self) -> bool:
        return self.status == StoreStatus.SUCCESS


def store_response(results: list[InstanceResult]) -> tuple[int, dict[str, Any]]:
    """The HTTP status and Store Instances Response (PS3.18 10.5.3, as DICOM JSON)
    for the parts' outcomes: 200 all stored, 202 some, 409 none."""
    response = Dataset()
    stored = [r for r in results if r.stored]
    failed = [r for r in results if not r.stored]
    if failed:
        response.FailedSOPSequence = [_item(r, FailureReason=r.status) for r in failed]
    if stored:
        response.ReferencedSOPSequence = [_item(r) for r in stored]
    status = HTTPStatus.OK if not failed else HTTPStatus.ACCEPTED if stored else HTTPStatus.CONFLICT
    return status, response.to_json_dict()


def _item(result: InstanceResult, **extra: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = result.sop_class_uid
    item.ReferencedSOPInstanceUID = result.sop_instance_uid
    for keyword, value in extra.items():
        setattr(item, keyword, value)
    return item


def warning_headers(results: list[InstanceResult]) -> list[tuple[str, str]]:
    """``Warning: 299`` headers (RFC 9111 5.5, as PS3.18 8.2 uses them) saying in
    words why each part failed: the reason names attributes and UIDs, never values."""
    failed = [r for r in results if not r.stored][:MAX_WARNINGS]
    return [
        ("Warning", f'299 sonocase "{_ascii(r.sop_instance_uid or "part")}: 0x{r.status:04X} {_ascii(r.reason)}"')
        for r in failed
    ]


def summary(results: list[InstanceResult]) -> str:
    """One log line for a whole request: how many parts were stored, and how many
    were refused with each Failure Reason, with the first reason in words."""
    refused = Counter(r.status for r in results if not r.stored)
    line = f"{len(results) - refused.total()} of {len(results)} instance(s) stored"
    if refused:
        first = next(r for r in results if not r.stored)
        line += "; refused: " + ", ".join(f"{n} with 0x{status:04X}" for status, n in sorted(refused.items()))
        line += f" (first: {first.reason})"
    return line


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode().replace('"', "'").replace("\\", "/")


# --- one request --------------------------------------------------------------------
@dataclass(eq=False)  # hashable by identity: a holder of the store's memory budget
class _Part:
    """A part while it arrives: its first bytes until the file meta group is
    complete, then its data set (in memory for the rules, on disk for the spool),
    held within the receiver's memory budget like a C-STORE's data set."""

    budget: MemoryBudget | None = None
    size: int = 0
    head: bytearray = field(default_factory=bytearray)
    meta: PartMeta | None = None
    incoming: IncomingFile | None = None
    #: As the fast engine's buffer: its value is handed to the store without a copy
    data: BytesIO = field(default_factory=BytesIO)
    failure: PartRefused | None = None

    def fail(self, failure: PartRefused) -> None:
        self.failure = failure
        self.close()

    def close(self) -> None:
        self.data = BytesIO()
        if self.incoming is not None:
            self.incoming.close()  # removes the temporary file unless it was stored
        if self.budget is not None:
            self.budget.release(self)


class StowUpload:
    """One STOW-RS request body, fed as it arrives (see module doc); no network here.

    :meth:`feed` returns the parts it completed, :meth:`store_part` stores one
    (blocking: run it off the event loop), :meth:`finish` says whether the body was
    complete. :meth:`close` removes whatever a part left in ``.incoming``.
    """

    def __init__(self, store: StoreSCP, boundary: bytes, study_uid: str | None, max_bytes: int, max_parts: int) -> None:
        self.store = store
        self.study_uid = study_uid
        self.max_bytes = max_bytes
        self.max_parts = max_parts
        self.parts = 0
        self.received = 0
        self.ended = False
        self.malformed = ""
        self._part: _Part | None = None
        self._ready: list[_Part] = []
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_part_data": self._data,
                "on_part_end": self._end,
                "on_end": self._on_end,
            },
        )

    def feed(self, chunk: bytes) -> list[_Part]:
        """Parse ``chunk``; return the parts it completed. Past a malformed spot the
        rest of the body is read and ignored (:attr:`malformed` says why). Raises
        :class:`StowError` 413 past ``max_bytes``, or when a part begins past
        ``max_parts`` (what each part costs, however small, stays bounded)."""
        self.received += len(chunk)
        if self.received > self.max_bytes:
            raise StowError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over {self.max_bytes} bytes")
        if not self.malformed:
            try:
                self._parser.write(chunk)
            except MultipartParseError as exc:
                self.malformed = f"malformed multipart body: {exc}"
        ready, self._ready = self._ready, []
        if self.parts > self.max_parts:
            for part in ready:
                part.close()
            raise StowError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"more than {self.max_parts} parts in one request (stow_max_parts)"
            )
        return ready

    def finish(self) -> _Part | None:
        """After the last chunk: the part the body broke off in, failed, or ``None``
        when the body ended as a multipart message must."""
        part, self._part = self._part, None
        if self.ended and not self.malformed:
            return None
        part = part or _Part()
        part.fail(
            PartRefused(StoreStatus.CANNOT_UNDERSTAND, self.malformed or "the body ended inside this part (truncated)")
        )
        return part

    def store_part(self, part: _Part) -> InstanceResult:
        """Store one complete part through the receiver's store (blocking unless
        :meth:`refused`). A part refused before the store is not logged here: the
        request's summary line counts it."""
        meta = part.meta
        sop_class, sop_instance = (meta.sop_class_uid, meta.sop_instance_uid) if meta else ("", "")
        try:
            if self.refused(part):
                failure = part.failure or PartRefused(StoreStatus.CANNOT_UNDERSTAND, "empty part")
                return InstanceResult(sop_class, sop_instance, failure.status, str(failure))
            assert meta is not None
            outcome = self.store.store(
                part.data.getvalue(),
                meta.transfer_syntax,
                meta.sop_class_uid,
                meta.sop_instance_uid,
                STOW_SOURCE,
                part.incoming,
                study_uid=self.study_uid,
            )
        finally:
            part.close()
        return InstanceResult(sop_class, sop_instance, outcome.status, outcome.comment)

    @staticmethod
    def refused(part: _Part) -> bool:
        """Whether the part failed before the store: its result needs no disk, no thread."""
        return part.failure is not None or part.meta is None

    def close(self) -> None:
        for part in [*self._ready, *([self._part] if self._part else [])]:
            part.close()

    # --- the parser's callbacks ---
    def _begin(self) -> None:
        self.parts += 1
        self._part = _Part(self.store.budget) if self.parts <= self.max_parts else None

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part is not None and part.failure is None:
            self._guard(part, lambda: self._take(part, data[start:end]))

    def _take(self, part: _Part, chunk: bytes) -> None:
        if part.meta is None:
            part.head += chunk
            self._open(part, read_part_meta(bytes(part.head)))
        else:
            self._append(part, chunk)

    def _open(self, part: _Part, meta: PartMeta | None) -> None:
        """Once the file meta group is in: check the part, start its spool file."""
        if meta is None:
            return
        part.meta = meta
        check_part(meta)
        part.incoming = self.store.open_incoming(
            meta.sop_class_uid, meta.sop_instance_uid, meta.transfer_syntax, STOW_SOURCE
        )
        data, part.head = bytes(part.head[meta.data_offset :]), bytearray()
        self._append(part, data)

    def _append(self, part: _Part, data: bytes) -> None:
        """Keep a piece of the part's data set, within ``max_dataset_mb`` and the
        memory budget of data sets in flight (``max_in_flight_mb``), as C-STORE does."""
        if not data:
            return
        refusal = too_large(part.size + len(data), self.store.max_dataset)
        if refusal is not None:
            raise PartRefused(refusal.status, str(refusal))
        if not self.store.budget.take(part, len(data)):
            raise PartRefused(StoreStatus.OUT_OF_RESOURCES, "too many data sets in flight (max_in_flight_mb)")
        assert part.incoming is not None
        part.size += len(data)
        part.incoming.append(data)
        part.data.write(data)

    def _end(self) -> None:
        part, self._part = self._part, None
        if part is None:
            return
        if part.meta is None and part.failure is None:
            self._guard(part, lambda: self._open(part, read_part_meta(bytes(part.head), complete=True)))
        self._ready.append(part)

    @staticmethod
    def _guard(part: _Part, step: Callable[[], None]) -> None:
        """Run a step of a part: a refusal, or the spool's disk failing, fails the
        part and removes its file."""
        try:
            step()
        except PartRefused as exc:
            part.fail(exc)
        except OSError as exc:
            part.fail(_storage_error(exc))

    def _on_end(self) -> None:
        self.ended = True


def _storage_error(exc: OSError) -> PartRefused:
    """The spool's disk failed while a part was written: full (out of resources, the
    client should try later) or failing (processing failure)."""
    status = StoreStatus.OUT_OF_RESOURCES if disk_full(exc) else StoreStatus.PROCESSING_FAILURE
    return PartRefused(status, f"storage error: {exc.strerror or exc}")


# --- the HTTP shell --------------------------------------------------------------------
def _bearer_check(settings: Settings) -> Callable[[str | None], None]:
    """The node's web_token as ``Authorization: Bearer``; no token set: STOW-RS is off.

    Mounted on the node's HTTP side, the app's own check runs first (it throttles
    wrong tokens, and would also take a browser's session cookie); this one keeps
    STOW-RS to Bearer clients only, whatever app it is mounted in."""
    token = settings.web_token

    def check(authorization: Annotated[str | None, Header()] = None) -> None:
        if not token:
            raise HTTPException(HTTPStatus.NOT_FOUND, "STOW-RS is off: set SONOCASE_WEB_TOKEN to turn it on")
        if not token_matches(bearer_credential(authorization) or "", token):
            LOG.warning("STOW-RS: missing or wrong Bearer token")
            raise HTTPException(HTTPStatus.UNAUTHORIZED, "send Authorization: Bearer <web_token>", CHALLENGE)

    return check


def stow_router(settings: Settings, store: Callable[[], StoreSCP | None]) -> APIRouter:
    """``POST /studies`` and ``POST /studies/{study}``, storing through ``store()``
    (the running receiver's store, ``None`` while it is not running)."""
    router = APIRouter(tags=["dicomweb"], dependencies=[Depends(_bearer_check(settings))])
    max_bytes, max_parts = settings.stow_max_request_mb << 20, settings.stow_max_parts

    async def receive(request: Request, study_uid: str | None) -> Response:
        scp = store()
        try:
            if scp is None:
                raise StowError(HTTPStatus.SERVICE_UNAVAILABLE, "the receiver is not running", {"Retry-After": "10"})
            if not accepts_json(request.headers.get("accept")):
                raise StowError(HTTPStatus.NOT_ACCEPTABLE, f"the response is {DICOM_JSON} only")
            boundary = request_boundary(request.headers.get("content-type"))
            if study_uid is not None and not is_valid_uid(study_uid):
                raise StowError(HTTPStatus.BAD_REQUEST, "the Study Instance UID in the path is not a valid UID")
            length = request.headers.get("content-length")
            if length is not None:
                if not length.isdigit():
                    raise StowError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number")
                refusal = await run_in_threadpool(
                    lambda: upfront_refusal(
                        spool.free_disk_mb(settings.spool_dir),
                        int(length),
                        scp.ledger.pending_analysis_count(),
                        settings,
                    )
                )
                if refusal is not None:
                    raise refusal
            results = await _receive_body(request, StowUpload(scp, boundary, study_uid, max_bytes, max_parts))
        except StowError as exc:
            LOG.warning("STOW-RS request refused with HTTP %d: %s", exc.status, exc)
            return PlainTextResponse(f"{exc}\n", exc.status, exc.headers)
        status, body = store_response(results)
        LOG.info("STOW-RS: %s", summary(results), extra={"study_uid": study_uid, "calling_ae": STOW_SOURCE})
        response = JSONResponse(body, status, media_type=DICOM_JSON)
        for name, value in warning_headers(results):
            response.headers.append(name, value)
        return response

    @router.post("/studies", summary="STOW-RS: store instances (PS3.18 10.5)")
    async def store_instances(request: Request) -> Response:
        return await receive(request, None)

    @router.post("/studies/{study_uid}", summary="STOW-RS: store instances of one study")
    async def store_study_instances(request: Request, study_uid: Annotated[str, PathParam()]) -> Response:
        return await receive(request, study_uid)

    return router


async def _receive_body(request: Request, upload: StowUpload) -> list[InstanceResult]:
    """Feed the body to ``upload`` as it arrives, storing each part as it completes
    (off the event loop); the outcomes in order. A body that breaks off or goes
    wrong leaves nothing partial: complete parts are stored, the broken one is not."""
    results: list[InstanceResult] = []
    try:
        try:
            async for chunk in request.stream():
                for part in upload.feed(chunk):
                    results.append(
                        upload.store_part(part)
                        if upload.refused(part)
                        else await run_in_threadpool(upload.store_part, part)
                    )
        except ClientDisconnect:  # nobody is left to hear the answer; the log says what was kept
            raise StowError(
                HTTPStatus.BAD_REQUEST,
                f"the client went away after {upload.received} bytes, "
                f"{sum(r.stored for r in results)} instance(s) stored",
            ) from None
        broken = upload.finish()
        if broken is not None:
            if not results and broken.meta is None:
                raise StowError(
                    HTTPStatus.BAD_REQUEST, upload.malformed or "the body is not a complete multipart/related message"
                )
            results.append(upload.store_part(broken))
    finally:
        upload.close()
    if not results:
        raise StowError(HTTPStatus.BAD_REQUEST, "the body holds no part")
    for result in results:
        observe_stow(result.status)
    return results
