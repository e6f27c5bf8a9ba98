"""The DICOM receiver: the C-STORE listener the PACS pushes ultrasound studies to.

The work is done by pure functions (parse an encoded data set without decoding its
pixels, judge it, judge a caller, encode the file meta group); :class:`StoreSCP`
applies them and makes an instance durable; the pynetdicom handlers around it are
thin. Success is answered only after the received bytes are on disk exactly as they
came (file meta + the peer's encoded data set, never re-encoded) and recorded in the
ledger. Bad input gets a failure status that says why, and a log line; nothing a
peer sends can stop the server.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import logging
import os
import queue
import re
import select
import socket
import socketserver
import sqlite3
import ssl
import struct
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.dataelem import RawDataElement
from pydicom.filereader import data_element_generator
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt, register_uid
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dul import DULServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import (
    EnhancedUSVolumeStorage,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    Verification,
)
from pynetdicom.transport import (
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from service import dicom_tls, spool
from service.ledger import InstanceRecord, Ledger
from service.metrics import observe_cstore
from service.settings import Settings

LOG = logging.getLogger(__name__)

#: Identifies the software that wrote our files (PS3.7 D.3.3.2); a UUID-derived
#: UID (PS3.5 B.2) because the project has no registered root.
IMPLEMENTATION_CLASS_UID = "2.25.242059410395934624218930311384893412713"
IMPLEMENTATION_VERSION_NAME = "SONOCASE_010"
MAX_PDU_BYTES = 1 << 20
_COLLECT_EVERY_S = 30.0

#: Both retired ultrasound SOP classes: older scanners still send them. pynetdicom
#: does not know them; without registering them it aborts the association.
UltrasoundImageStorageRetired = UID("1.2.840.10008.5.1.4.1.1.6")
UltrasoundMultiFrameImageStorageRetired = UID("1.2.840.10008.5.1.4.1.1.3")
register_uid(UltrasoundImageStorageRetired, "UltrasoundImageStorageRetired", StorageServiceClass)
register_uid(UltrasoundMultiFrameImageStorageRetired, "UltrasoundMultiFrameImageStorageRetired", StorageServiceClass)

ULTRASOUND_SOP_CLASSES: tuple[str, ...] = (
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    UltrasoundImageStorageRetired,
    UltrasoundMultiFrameImageStorageRetired,
    EnhancedUSVolumeStorage,
)
#: Secondary Capture too: sites often send screen captures of the scanner.
STORAGE_SOP_CLASSES: tuple[str, ...] = (*ULTRASOUND_SOP_CLASSES, SecondaryCaptureImageStorage)

#: What real scanners send; every one decodes later (pylibjpeg, pyjpegls).
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)


class StoreStatus(IntEnum):
    """C-STORE response statuses (PS3.4 Table B.2-1; 0x0110 is PS3.7 Annex C).

    PS3.4 leaves the codes inside the C000-CFFF "Cannot understand" range to the
    implementation; we use three so a peer's log tells the causes apart.
    """

    SUCCESS = 0x0000
    #: Refused: Out of Resources (A7xx): disk low or too many studies waiting.
    OUT_OF_RESOURCES = 0xA700
    #: Error: Data Set does not match SOP Class (A9xx).
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: Error: Cannot understand: empty, truncated or unparsable data set.
    CANNOT_UNDERSTAND = 0xC000
    #: Error: Cannot understand: a required UID is missing or malformed.
    INVALID_UID = 0xC001
    #: Error: Cannot understand: not ultrasound and the policy is "refuse".
    MODALITY_REFUSED = 0xC002
    #: Failure: Processing failure (an error of ours, not of the data set).
    PROCESSING_FAILURE = 0x0110


#: A-ASSOCIATE-RJ Result and Source (PS3.8 Table 9-21): our rejections are
#: permanent (calling again will not help) and made by the service user.
REJECTED_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01


class RejectReason(IntEnum):
    """A-ASSOCIATE-RJ Reason/Diag. for source "service user" (PS3.8 Table 9-21)."""

    NO_REASON_GIVEN = 0x01
    CALLING_AE_TITLE_NOT_RECOGNIZED = 0x03
    CALLED_AE_TITLE_NOT_RECOGNIZED = 0x07


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why an association is refused: the reason code on the wire, the text in the log."""

    reason: RejectReason
    why: str


@dataclass(frozen=True, slots=True)
class ParsedInstance:
    """The few attributes the receiver needs, read from the encoded bytes."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str


class InvalidInstance(ValueError):
    """A data set we refuse; ``status`` is the C-STORE status that says why."""

    def __init__(self, status: StoreStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class StoreOutcome:
    """What a C-STORE came to: the status for the peer and the reason for the log."""

    status: StoreStatus
    comment: str = ""
    study_uid: str | None = None
    stored: bool = False


# --- pure functions ---------------------------------------------------------

_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
_TAGS = {
    0x00080016: "sop_class_uid",
    0x00080018: "sop_instance_uid",
    0x0020000D: "study_uid",
    0x0020000E: "series_uid",
    0x00080060: "modality",
}
_UID_LABELS = {
    "sop_class_uid": "SOP Class UID",
    "sop_instance_uid": "SOP Instance UID",
    "study_uid": "Study Instance UID",
    "series_uid": "Series Instance UID",
}
_UNDEFINED_LENGTH = 0xFFFFFFFF
#: Values longer than this are skipped, not read: only short strings are wanted.
_DEFER_BYTES = 256


def is_valid_uid(value: str) -> bool:
    """A UID is digits and dots, at most 64 characters (PS3.5 9.1); it also names
    a spool file, so anything else is refused."""
    return len(value) <= 64 and _UID_RE.fullmatch(value) is not None


def parse_instance(raw: bytes, transfer_syntax: str) -> ParsedInstance:
    """Read the needed attributes from an encoded data set without decoding pixels.

    Walks every top-level element header (values skipped, undefined-length pixel
    data checked for its delimiter), so a truncated or garbled data set is caught
    here rather than by the worker. Raises :class:`InvalidInstance`.
    """
    if not raw:
        raise InvalidInstance(StoreStatus.CANNOT_UNDERSTAND, "empty data set")
    syntax = UID(transfer_syntax)
    data = raw
    if syntax == DeflatedExplicitVRLittleEndian:
        try:
            data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(raw)
        except zlib.error as exc:
            raise InvalidInstance(StoreStatus.CANNOT_UNDERSTAND, f"deflated data set does not inflate: {exc}") from None
    fp = BytesIO(data)
    values: dict[str, str] = {}
    end = 0
    try:
        for elem in data_element_generator(fp, syntax.is_implicit_VR, syntax.is_little_endian, defer_size=_DEFER_BYTES):
            raw_elem = isinstance(elem, RawDataElement)  # undefined-length sequences come parsed
            end = elem.value_tell + elem.length if raw_elem and elem.length != _UNDEFINED_LENGTH else fp.tell()
            name = _TAGS.get(elem.tag)
            if name is not None and raw_elem and isinstance(elem.value, bytes):
                values[name] = elem.value.decode("ascii").strip("\0 ")
    except (EOFError, OSError, struct.error, ValueError, NotImplementedError, KeyError, IndexError) as exc:
        # what pydicom raises on malformed bytes (OSError: "No tag to read" in a sequence)
        raise InvalidInstance(StoreStatus.CANNOT_UNDERSTAND, f"unparsable data set: {exc}") from None
    if end != len(data):
        raise InvalidInstance(
            StoreStatus.CANNOT_UNDERSTAND,
            f"truncated data set: elements end at byte {end}, {len(data)} received",
        )
    for name in ("sop_class_uid", "sop_instance_uid", "study_uid"):
        if not values.get(name):
            raise InvalidInstance(StoreStatus.INVALID_UID, f"{_UID_LABELS[name]} is missing")
    for name, label in _UID_LABELS.items():
        if values.get(name) and not is_valid_uid(values[name]):
            raise InvalidInstance(StoreStatus.INVALID_UID, f"{label} {values[name][:64]!r} is not a valid UID")
    return ParsedInstance(
        sop_class_uid=values["sop_class_uid"],
        sop_instance_uid=values["sop_instance_uid"],
        study_uid=values["study_uid"],
        series_uid=values.get("series_uid", ""),
        modality=values.get("modality", ""),
    )


def check_request(inst: ParsedInstance, affected_sop_class: str, affected_sop_instance: str) -> None:
    """The data set must be the one the C-STORE request announces (PS3.4 B.2.3)."""
    if inst.sop_class_uid != affected_sop_class:
        raise InvalidInstance(
            StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            f"data set SOP Class {inst.sop_class_uid} differs from the request's {affected_sop_class}",
        )
    if inst.sop_instance_uid != affected_sop_instance:
        raise InvalidInstance(
            StoreStatus.INVALID_UID,
            f"data set SOP Instance UID differs from the request's {affected_sop_instance}",
        )


def modality_policy(inst: ParsedInstance, policy: str) -> str | None:
    """Return why a non-ultrasound instance is stored but ignored (``None`` for
    ultrasound); raise :class:`InvalidInstance` when the policy refuses it."""
    if inst.modality == "US":
        return None
    reason = f"modality {inst.modality or '(missing)'} is not US"
    if policy == "refuse":
        raise InvalidInstance(StoreStatus.MODALITY_REFUSED, f"{reason}; this node accepts ultrasound only")
    return reason


def capacity_problem(free_mb: float, incoming_bytes: int, pending_studies: int, settings: Settings) -> str | None:
    """Back-pressure: say why we cannot take an instance now, or ``None``."""
    after_mb = free_mb - incoming_bytes / 2**20
    if after_mb < settings.min_free_disk_mb:
        return f"free disk {after_mb:.0f} MB would fall below the {settings.min_free_disk_mb} MB watermark"
    if pending_studies >= settings.max_pending_studies:
        return f"{pending_studies} studies wait for analysis (limit {settings.max_pending_studies})"
    return None


def check_association(calling_ae: str, called_ae: str, host: str, settings: Settings) -> Rejection | None:
    """Who may send to us: our own AE title must be called; an allow-list of
    calling AE titles and of host addresses applies when it is not empty."""
    if called_ae.strip() != settings.ae_title:
        return Rejection(
            RejectReason.CALLED_AE_TITLE_NOT_RECOGNIZED,
            f"called AE title {called_ae.strip()!r} is not ours ({settings.ae_title!r})",
        )
    if settings.allowed_callers and calling_ae.strip() not in settings.allowed_callers:
        return Rejection(
            RejectReason.CALLING_AE_TITLE_NOT_RECOGNIZED,
            f"calling AE title {calling_ae.strip()!r} is not in allowed_callers",
        )
    if settings.allowed_hosts and host not in settings.allowed_hosts:
        return Rejection(RejectReason.NO_REASON_GIVEN, f"host {host} is not in allowed_hosts")
    return None


def _element(group_elem: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of the file meta group."""
    tag = struct.pack("<HH", group_elem >> 16, group_elem & 0xFFFF)
    if vr == b"OB":  # the only long-form VR in the file meta group
        return tag + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def _pad(text: str, pad: bytes) -> bytes:
    data = text.encode("ascii")
    return data + pad if len(data) % 2 else data


def encode_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, ``DICM`` and the file meta group (PS3.10 7.1) for a received data set.

    Encoded directly: building it through a pydicom Dataset costs more than the
    rest of the C-STORE handler together.
    """
    body = b"".join((
        _element(0x00020001, b"OB", b"\0\1"),
        _element(0x00020002, b"UI", _pad(sop_class_uid, b"\0")),
        _element(0x00020003, b"UI", _pad(sop_instance_uid, b"\0")),
        _element(0x00020010, b"UI", _pad(transfer_syntax, b"\0")),
        _element(0x00020012, b"UI", _pad(IMPLEMENTATION_CLASS_UID, b"\0")),
        _element(0x00020013, b"SH", _pad(IMPLEMENTATION_VERSION_NAME, b" ")),
        _element(0x00020016, b"AE", _pad(source_ae, b" ")),
    ))
    return b"\0" * 128 + b"DICM" + _element(0x00020000, b"UL", struct.pack("<I", len(body))) + body


def _command_element(element: int, value: bytes) -> bytes:
    """One element of the command group (0000,eeee), implicit VR little endian."""
    return struct.pack("<HHI", 0, element, len(value)) + value


_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101


def encode_store_response(
    message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int, comment: str = "",
) -> bytes:
    """The command set of a C-STORE-RSP (PS3.7 9.3.1.2), implicit VR little endian as
    every command set (PS3.7 6.3.1), with an Error Comment when there is one.

    Encoded directly: pynetdicom's response primitive and its encoding through pydicom
    validate each UID with three regular expressions, a sixth of a C-STORE's CPU.
    """
    body = b"".join((
        _command_element(0x0002, _pad(sop_class_uid, b"\0")),
        _command_element(0x0100, struct.pack("<H", _C_STORE_RSP)),
        _command_element(0x0120, struct.pack("<H", message_id)),
        _command_element(0x0800, struct.pack("<H", _NO_DATA_SET)),
        _command_element(0x0900, struct.pack("<H", status)),
        # LO: 64 characters at most, from the default character repertoire
        _command_element(0x0902, _pad(comment[:64].encode("ascii", "replace").decode(), b" ")) if comment else b"",
        _command_element(0x1000, _pad(sop_instance_uid, b"\0")),
    ))
    return _command_element(0x0000, struct.pack("<I", len(body))) + body


# --- the store itself ---------------------------------------------------------

def disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception that caused it, says a disk is full: the
    spool's (ENOSPC, EDQUOT) or the ledger's (SQLite's SQLITE_FULL, PostgreSQL's
    disk_full)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or getattr(exc, "sqlstate", None) == "53100":
            return True
        exc = exc.__cause__
    return False


def write_new_file(path: Path, chunks: list[bytes], checksum: bool = True) -> tuple[int, int | None]:
    """Write a spool file under a temporary name and rename it into place, without
    waiting for the disk; return its size and (with ``checksum``) CRC-32.

    A crash of the process never leaves a partial file under the final name. Making
    it survive a power loss is :func:`flush_file`'s job, which the receiver runs at the
    same time as the ledger commit (see :meth:`StoreSCP._write`); the CRC-32 is for
    that case only (see :meth:`StoreSCP._forget_torn_instances`).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".dcm")
    crc = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                if checksum:
                    crc = zlib.crc32(chunk, crc)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return sum(len(chunk) for chunk in chunks), crc if checksum else None


def flush_file(path: Path) -> None:
    """Make a file's data durable (its name is the folder's :func:`spool.fsync_dir`)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _writeback_starter() -> Callable[[int, int, int], object] | None:
    """Linux's sync_file_range(2) with SYNC_FILE_RANGE_WRITE: start writing a range
    of a file to the disk without waiting for it (``None`` where there is none)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return lambda fd, offset, length: call(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


_SYNC_FILE_RANGE_WRITE = 2
#: Writeback is started for this much data at a time: a call per 128 KiB fragment
#: cost more than it saved (bench A/B: about 7 % fewer images/s in fsync mode).
_WRITEBACK_BATCH = 512 << 10
_start_writeback = _writeback_starter()


class IncomingFile:
    """An instance's spool file while its data set is still arriving.

    The file meta group and each data set fragment are written the moment the
    fragment arrives, so the disk write overlaps the network transfer instead of
    following it. A ``durable`` file also takes the CRC-32 of what it writes (for
    the torn-file check after a power loss) and tells the disk to start writing
    every half megabyte, so the fsync before Success has little left to wait for.
    The file keeps a temporary name in ``directory`` until :meth:`commit`; whoever
    opened it must :meth:`close` it (which removes it unless committed).
    """

    def __init__(self, directory: Path, head: bytes, durable: bool) -> None:
        self.head = head
        self.size = 0
        self.crc32: int | None = 0 if durable else None
        self.committed = False
        self._sent = 0
        self._writeback = _start_writeback if durable else None
        self._lock = threading.Lock()  # close() may come from another thread than append()
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")
        self.fd: int | None = fd
        self.path = Path(tmp)
        self.append(head)

    def append(self, data: bytes | memoryview) -> None:
        with self._lock:
            if self.fd is None:
                raise ValueError("the incoming file was closed")
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            if self.crc32 is not None:
                self.crc32 = zlib.crc32(data, self.crc32)
            self.size += len(data)
            if self._writeback is not None and self.size - self._sent >= _WRITEBACK_BATCH:
                self._writeback(self.fd, self._sent, self.size - self._sent)
                self._sent = self.size

    def holds(self, head: bytes, data_set_size: int) -> bool:
        """Whether this file is ``head`` followed by a data set of that size."""
        return self.head == head and self.size == len(head) + data_set_size

    def commit(self, path: Path) -> None:
        """Give the file its final name (same file system, so atomic)."""
        os.replace(self.path, path)
        self.path, self.committed = path, True

    def flush(self) -> None:
        """Make the file's data durable (its name is the folder's fsync)."""
        with self._lock:
            if self.fd is None:
                raise ValueError("the incoming file was closed")
            os.fsync(self.fd)

    def close(self) -> None:
        """Close the file; an uncommitted one is removed. Safe to call twice."""
        with self._lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
            if not self.committed:
                self.path.unlink(missing_ok=True)


def file_matches(path: Path, size: int, crc32: int) -> bool:
    """Whether ``path`` holds exactly the bytes that were recorded."""
    try:
        with path.open("rb") as fh:
            crc, total = 0, 0
            for block in iter(lambda: fh.read(1 << 20), b""):
                crc, total = zlib.crc32(block, crc), total + len(block)
    except FileNotFoundError:
        return False
    return total == size and crc == crc32


@dataclass(slots=True)
class _Pending:
    rec: InstanceRecord
    done: bool = False
    recorded: bool = False
    error: Exception | None = None


class InstanceRecorder:
    """Records stored instances with group commit: while one association's thread
    commits, the others queue their records and the next commit takes them all, so
    concurrent associations share one ledger fsync instead of waiting for one each."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._queue: list[_Pending] = []
        self._queue_lock = threading.Lock()
        self._commit_lock = threading.Lock()

    def record(self, rec: InstanceRecord) -> bool:
        """Record ``rec`` durably; False if its SOP Instance UID was already known."""
        mine = _Pending(rec)
        with self._queue_lock:
            self._queue.append(mine)
        with self._commit_lock:
            if not mine.done:  # nobody took it along: commit everything queued
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                self._commit(batch)
        if mine.error is not None:
            raise RuntimeError(f"ledger commit failed: {mine.error}") from mine.error
        return mine.recorded

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            results = self.ledger.record_instances([p.rec for p in batch])
        except Exception as exc:  # every store in the batch answers a failure
            for pending in batch:
                pending.error, pending.done = exc, True
            return
        for pending, recorded in zip(batch, results, strict=True):
            pending.recorded, pending.done = recorded, True


class StoreSCP:
    """Judge one received instance and make it durable; no network in here."""

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.ledger = ledger
        self.recorder = InstanceRecorder(ledger)
        self.durable = settings.durability == "fsync"
        self._fsync_pool = ThreadPoolExecutor(2 * settings.max_associations, thread_name_prefix="sonocase-fsync")
        self._study_dirs: set[str] = set()
        self._dir_lock = threading.Lock()
        self.incoming_dir = settings.spool_dir / ".incoming"
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        if self.durable:
            spool.fsync_dir(settings.spool_dir.parent)
        self._remove_partial_files()
        self._forget_torn_instances()

    def _forget_torn_instances(self) -> None:
        """Drop records whose file did not reach the disk before a power loss.

        In ``fsync`` mode the file's flush and the ledger commit run at the same time
        (one disk round trip instead of two), and Success waits for both; so a record
        can outlive a power loss that tore its file, but only for an instance the peer
        never heard Success for. Its study is still receiving: check those files
        against their recorded size and CRC-32, forget the torn ones, and the peer's
        retry stores them again.
        """
        torn = [
            rec for rec in self.ledger.receiving_instances()
            if rec.crc32 is not None and not file_matches(Path(rec.path), rec.size, rec.crc32)
        ]
        if not torn:
            return
        self.ledger.forget_instances([rec.sop_instance_uid for rec in torn])
        for rec in torn:
            Path(rec.path).unlink(missing_ok=True)
            LOG.warning("forgot instance %s: its file did not survive the last shutdown (never acknowledged)",
                        rec.sop_instance_uid, extra={"study_uid": rec.study_uid})

    def _remove_partial_files(self) -> None:
        """Temporary files left by a crash were never acknowledged: the peer sends
        them again. Only one receiver writes a spool, so none is in use now."""
        partial = list(self.settings.spool_dir.glob("*/.tmp-*"))
        for path in partial:
            path.unlink(missing_ok=True)
        if partial:
            LOG.info("removed %d partial files left by an interrupted receiver", len(partial))

    def open_incoming(
        self, affected_sop_class: str, affected_sop_instance: str, transfer_syntax: str, calling_ae: str,
    ) -> IncomingFile:
        """A temporary spool file for a data set about to arrive, its file meta group
        taken from the C-STORE request; :meth:`store` keeps it only if the data set
        turns out to be that instance."""
        head = encode_file_meta(affected_sop_class, affected_sop_instance, transfer_syntax, calling_ae)
        return IncomingFile(self.incoming_dir, head, durable=self.durable)

    def store(
        self, raw: bytes, transfer_syntax: str, affected_sop_class: str, affected_sop_instance: str,
        calling_ae: str, incoming: IncomingFile | None = None,
    ) -> StoreOutcome:
        """Parse, judge, write and record one instance; never raises. ``incoming``,
        when given, already holds the bytes on disk (see :class:`IncomingFile`); the
        caller closes it."""
        study_uid = None
        try:
            inst = parse_instance(raw, transfer_syntax)
            study_uid = inst.study_uid
            check_request(inst, affected_sop_class, affected_sop_instance)
            ignored = modality_policy(inst, self.settings.non_ultrasound)
            if self.ledger.has_instance(inst.sop_instance_uid):
                LOG.info("duplicate SOP Instance UID %s: already stored, not rewritten", inst.sop_instance_uid,
                         extra={"study_uid": study_uid, "calling_ae": calling_ae})
                return StoreOutcome(StoreStatus.SUCCESS, "duplicate", study_uid)
            problem = capacity_problem(
                spool.free_disk_mb(self.settings.spool_dir), len(raw), self.ledger.pending_analysis_count(),
                self.settings,
            )
            if problem:
                return self._refuse(StoreStatus.OUT_OF_RESOURCES, problem, study_uid, calling_ae)
            self._write(inst, raw, transfer_syntax, calling_ae, ignored, incoming)
        except InvalidInstance as exc:
            return self._refuse(exc.status, str(exc), study_uid, calling_ae)
        except Exception as exc:  # the SCP must answer and keep serving, whatever broke
            return self._failed(exc, study_uid, calling_ae)
        LOG.debug("stored %s", inst.sop_instance_uid, extra={"study_uid": study_uid, "calling_ae": calling_ae})
        return StoreOutcome(StoreStatus.SUCCESS, ignored or "", study_uid, stored=True)

    @staticmethod
    def _failed(exc: Exception, study_uid: str | None, calling_ae: str) -> StoreOutcome:
        """A failure of ours. Out of resources when the disk (spool or ledger) is
        full, so the peer retries later; a processing failure otherwise."""
        extra = {"study_uid": study_uid, "calling_ae": calling_ae}
        if disk_full(exc):
            LOG.error("cannot store an instance from %s: no space left (%s)", calling_ae, exc, extra=extra)
            return StoreOutcome(StoreStatus.OUT_OF_RESOURCES, "storage error: no space left on the disk", study_uid)
        LOG.exception("cannot store an instance from %s", calling_ae, extra=extra)
        reason = f"storage error: {exc.strerror or exc}" if isinstance(exc, OSError) else \
            f"internal error: {type(exc).__name__}"
        return StoreOutcome(StoreStatus.PROCESSING_FAILURE, reason, study_uid)

    def _refuse(self, status: StoreStatus, reason: str, study_uid: str | None, calling_ae: str) -> StoreOutcome:
        LOG.warning("refused C-STORE from %s with 0x%04X: %s", calling_ae, status, reason,
                    extra={"study_uid": study_uid, "calling_ae": calling_ae, "status": f"0x{status:04X}"})
        return StoreOutcome(status, reason, study_uid)

    def close(self) -> None:
        self._fsync_pool.shutdown()

    def _write(
        self, inst: ParsedInstance, raw: bytes, transfer_syntax: str, calling_ae: str, ignored: str | None,
        incoming: IncomingFile | None,
    ) -> None:
        path = spool.instance_path(self.settings.spool_dir, inst.study_uid, inst.sop_instance_uid)
        head = encode_file_meta(inst.sop_class_uid, inst.sop_instance_uid, transfer_syntax, calling_ae)
        if incoming is None or not incoming.holds(head, len(raw)):
            incoming = None
        self._ensure_dir(path.parent)
        try:
            size, crc = self._place(path, head, raw, incoming)
        except FileNotFoundError:  # the study's folder was removed since (spool clean-up): make it again
            self._study_dirs.discard(path.parent.name)
            self._ensure_dir(path.parent)
            size, crc = self._place(path, head, raw, incoming)
        # The file's flush runs beside the ledger commit; Success waits for both.
        flushes = []
        if self.durable:
            flush = incoming.flush if incoming is not None else partial(flush_file, path)
            flushes = [self._fsync_pool.submit(flush), self._fsync_pool.submit(spool.fsync_dir, path.parent)]
        try:
            self.recorder.record(InstanceRecord(
                sop_instance_uid=inst.sop_instance_uid, study_uid=inst.study_uid, series_uid=inst.series_uid,
                sop_class_uid=inst.sop_class_uid, transfer_syntax=transfer_syntax, path=str(path), size=size,
                calling_ae=calling_ae, modality=inst.modality, ignored_reason=ignored, crc32=crc,
            ))
        except Exception:  # not recorded: no file without a record (the peer's retry writes it again)
            path.unlink(missing_ok=True)
            raise
        try:
            for flush in flushes:
                flush.result()
        except OSError:  # not on disk: the peer must not hear Success, and its retry must not be a duplicate
            self.ledger.forget_instances([inst.sop_instance_uid])
            path.unlink(missing_ok=True)
            raise

    def _place(self, path: Path, head: bytes, raw: bytes, incoming: IncomingFile | None) -> tuple[int, int | None]:
        """Put the instance's file at ``path``; return its size and, in ``fsync``
        mode, CRC-32."""
        if incoming is None:
            return write_new_file(path, [head, raw], checksum=self.durable)
        incoming.commit(path)
        return incoming.size, incoming.crc32

    def _ensure_dir(self, study_dir: Path) -> None:
        """Create a study's folder once; its entry in the spool folder is made durable
        too, or a power loss could drop a folder full of acknowledged files."""
        key = study_dir.name
        if key in self._study_dirs:
            return
        with self._dir_lock:
            if key not in self._study_dirs:
                study_dir.mkdir(exist_ok=True)
                if self.durable:
                    spool.fsync_dir(study_dir.parent)
                self._study_dirs.add(key)


# --- the pynetdicom shell ---------------------------------------------------------

class SpoolingBuffer(BytesIO):
    """The buffer pynetdicom collects a DIMSE message's data set fragments in, which
    also writes each C-STORE fragment to an :class:`IncomingFile` as it arrives.

    It runs in the association's DUL thread, which otherwise waits for the network.
    Spooling is an optimisation only: if it fails (say the disk is full) the file is
    dropped and the C-STORE handler writes the data set itself, and reports the
    error that write meets.
    """

    def __init__(self, message: DIMSEMessage, assoc: Association) -> None:
        super().__init__()
        self._message = message
        self._assoc = assoc
        self._spooling = True
        self.incoming: IncomingFile | None = None

    def write(self, data: Any) -> int:
        if self._spooling:
            try:
                self._spool(data)
            except Exception:
                LOG.debug("spooling a data set while it arrives failed; the handler writes it", exc_info=True)
                self.discard()
        return super().write(data)

    def _spool(self, data: bytes) -> None:
        if self.incoming is None:
            message = self._message
            if not isinstance(message, C_STORE_RQ):
                self._spooling = False
                return
            command, assoc = message.command_set, self._assoc
            assert assoc._server is not None  # an acceptor: our server made it
            self.incoming = assoc._server.store.open_incoming(
                str(command.AffectedSOPClassUID), str(command.AffectedSOPInstanceUID),
                assoc._accepted_cx[message.context_id].transfer_syntax[0], assoc.requestor.ae_title,
            )
        self.incoming.append(data)

    def discard(self) -> None:
        """Stop spooling and remove what was spooled (unless the store kept it)."""
        self._spooling = False
        if self.incoming is not None:
            self.incoming.close()
            self.incoming = None


class RequestQueue(queue.Queue[tuple[int, Any]]):
    """The queue of complete DIMSE requests from the DUL thread to the association's
    reactor, except that C-STORE requests are served on the spot.

    Replaces pynetdicom 3.0.4's ``DIMSEServiceProvider.msg_queue``. A C-STORE is
    served in the DUL thread that decoded it (the peer waits for the response in
    any case) with a hand-encoded response (:func:`serve_store`): pynetdicom's hand-off
    to the reactor thread and back, its storage service class and its response
    primitive cost about a millisecond per instance. Everything else, C-ECHO
    included, is queued for the reactor as before.
    """

    def __init__(self, assoc: ReceiverAssociation) -> None:
        super().__init__()
        self._assoc = assoc

    def put(self, item: tuple[int, Any], block: bool = True, timeout: float | None = None) -> None:
        context_id, msg = item
        if not self._assoc.serve_at_once(msg, context_id):
            super().put(item, block, timeout)


class ReceiverDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, collecting each message's data set in a
    :class:`SpoolingBuffer` (pynetdicom 3.0.4 makes a plain ``BytesIO`` in
    ``DIMSEMessage.__init__``; ``receive_primitive`` is otherwise unchanged)."""

    def receive_primitive(self, primitive: P_DATA) -> None:
        if self.message is None:
            self.message = DIMSEMessage()
            self.message.data_set = SpoolingBuffer(self.message, self.assoc)
        super().receive_primitive(primitive)

    def discard_unhandled(self) -> None:
        """Drop the files of messages no handler will see: the one the peer never
        finished and those still queued when the association ended."""
        buffers = [self.message.data_set] if self.message is not None else []
        while True:
            try:
                _, primitive = self.msg_queue.get_nowait()
            except queue.Empty:
                break
            buffers.append(getattr(primitive, "DataSet", None))
        for buffer in buffers:
            if isinstance(buffer, SpoolingBuffer):
                buffer.discard()


def serve_store(scp: StoreSCP, request: C_STORE, context_id: int, transfer_syntax: str, calling_ae: str) -> P_DATA:
    """Store one C-STORE request's data set; return the response to send."""
    buffer = request.DataSet
    incoming = buffer.incoming if isinstance(buffer, SpoolingBuffer) else None
    try:
        outcome = scp.store(
            buffer.getvalue() if buffer is not None else b"", transfer_syntax, str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID), calling_ae, incoming,
        )
    finally:
        if isinstance(buffer, SpoolingBuffer):
            buffer.discard()
    observe_cstore(outcome.status)
    command = encode_store_response(
        int(request.MessageID or 0), str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
        int(outcome.status), outcome.comment if outcome.status != StoreStatus.SUCCESS else "",
    )
    response = P_DATA()
    response.presentation_data_value_list.append((context_id, b"\x03" + command))  # last command fragment
    return response


def _on_echo(event: Event) -> int:
    return int(StoreStatus.SUCCESS)


def _on_requested(event: Event, settings: Settings) -> None:
    request = event.assoc.requestor.primitive
    calling_ae, host = request.calling_ae_title, event.assoc.requestor.address
    rejection = check_association(calling_ae, request.called_ae_title, host, settings)
    if rejection is None:
        LOG.info("association from %s at %s accepted", calling_ae, host, extra={"calling_ae": calling_ae})
        return
    LOG.warning("association from %s at %s rejected: %s", calling_ae, host, rejection.why,
                extra={"calling_ae": calling_ae})
    # As pynetdicom's own rejections do: kill() waits until the A-ASSOCIATE-RJ is
    # sent and the peer has closed, before the server closes the socket.
    event.assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, rejection.reason)
    event.assoc.kill()


def build_ae(settings: Settings) -> AE:
    """Our Application Entity: the storage contexts, Verification, limits."""
    ae = AE(ae_title=settings.ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.maximum_associations = settings.max_associations
    # Peers send PDUs up to this size: fewer, larger PDUs cost far less Python per
    # instance than pynetdicom's default of 16 KiB (DCMTK sends at most 128 KiB).
    ae.maximum_pdu_size = MAX_PDU_BYTES
    ae.require_called_aet = True
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
    return ae


_PER_MESSAGE_LOG_EVENTS = (evt.EVT_PDU_RECV, evt.EVT_PDU_SENT, evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT)


def _without_message_logging(event: Event) -> None:
    """pynetdicom binds handlers to every association that format a DEBUG line for
    each PDU and DIMSE message, logged or not: a sixth of the CPU of a C-STORE.
    We bind nothing to these events, so all their handlers go."""
    for event_type in _PER_MESSAGE_LOG_EVENTS:
        for handler, _ in list(event.assoc.get_handlers(event_type)):
            event.assoc.unbind(event_type, handler)


#: The longest an association's DUL thread waits in select() for the peer, or for a
#: PDU of ours to send, before it looks at its timers and its stop flag again (the
#: same cadence as pynetdicom's idle sleep).
_DUL_WAIT_S = 0.001
#: How often an association's reactor checks for a release, an abort or the network
#: timeout while it waits for a DIMSE message (pynetdicom's cadence).
_REACTOR_CHECK_S = 0.001


class ReceiverSocket(AssociationSocket):
    """pynetdicom's association socket, receiving a PDU straight into one buffer.

    Overrides pynetdicom 3.0.4's ``AssociationSocket.recv``, which reads in 4 KiB
    pieces and appends each to a growing bytearray: about 250 calls and copies for
    a 1 MiB P-DATA PDU, a tenth of the CPU a C-STORE of a 0.9 MB image costs.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes``; fewer only when the peer closed the connection (as the
        original: the DUL then reports the short PDU)."""
        assert self.socket is not None  # the DUL reads only a connected socket
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        read = 0
        while read < nr_bytes:
            got = self.socket.recv_into(view[read:])
            if not got:
                break
            read += got
        view.release()
        del buffer[read:]
        return buffer


class ReceiverDUL(DULServiceProvider):
    """pynetdicom's DUL thread, waiting on the network instead of sleeping.

    Overrides pynetdicom 3.0.4's idle sleep (``_run_loop_delay``, 1 ms after every
    loop that found nothing to do, before a zero-timeout select): each PDU of the
    peer's waited half a millisecond on average, and each response of ours as long,
    and a shorter sleep costs a core per association. Here the loop does not sleep;
    when there is nothing to read, :meth:`_is_transport_event` blocks in select() on
    the socket and on a wake-up socket that :meth:`send_pdu` writes to, so either is
    handled the moment it comes.
    """

    _wake: tuple[socket.socket, socket.socket] | None = None  # pynetdicom builds the object: no __init__ of ours

    def run(self) -> None:
        """The thread's body (pynetdicom's ``run_reactor``), with the wake-up socket
        open for exactly as long as it runs."""
        self._run_loop_delay = 0.0  # pynetdicom sets it per object
        self._wake = socket.socketpair()
        for end in self._wake:
            end.setblocking(False)
        try:
            super().run()
        finally:
            wake, self._wake = self._wake, None
            for end in wake:
                end.close()

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        wake = self._wake
        if wake is not None:
            try:
                wake[1].send(b"\0")
            except OSError:  # full (a wake-up is pending anyway) or closed (the loop has ended)
                pass

    def _is_transport_event(self) -> bool:
        if super()._is_transport_event():
            return True
        self._wait_for_network()
        return False

    def _decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        """Decode a P-DATA-TF PDU over a view of the received bytes.

        Overrides pynetdicom 3.0.4's ``_decode_pdu``, which copies each PDU three
        times before the DIMSE layer sees it (``bytes()`` of it, its body, each
        fragment). Over a memoryview the data set is copied once, into its
        message's buffer. Other PDUs, and every PDU while a handler watches raw
        PDUs (DEBUG logging), go through the original.
        """
        if bytestream[:1] != _P_DATA_TF or any(self.assoc.get_handlers(e) for e in _RAW_PDU_EVENTS):
            return super()._decode_pdu(bytestream)
        pdu = P_DATA_TF()
        pdu.decode(memoryview(bytestream))
        return pdu, _P_DATA_TF_RECEIVED

    def _wait_for_network(self) -> None:
        """Block until the peer sent something, we have a PDU to send, or _DUL_WAIT_S."""
        transport, wake = self.socket, self._wake
        sock = transport.socket if transport is not None and transport._is_connected else None
        if sock is None or wake is None:
            time.sleep(_DUL_WAIT_S)
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted data select() cannot see
        try:
            ready, _, _ = select.select([sock, wake[0]], [], [], _DUL_WAIT_S)
        except (OSError, ValueError):  # closed meanwhile: the next look reports it
            return
        if wake[0] in ready:
            try:
                wake[0].recv(4096)
            except OSError:
                pass


_P_DATA_TF = b"\x04"
#: The state machine's event for a P-DATA-TF PDU received (PS3.8 Table 9-10: Evt10).
_P_DATA_TF_RECEIVED = "Evt10"
_RAW_PDU_EVENTS = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV)


class ReceiverAssociation(Association):
    """pynetdicom's acceptor association, picking up each DIMSE message at once.

    Overrides pynetdicom 3.0.4's ``Association._run_reactor``, which sleeps 1 ms
    before every look at the message queue, so a complete C-STORE request waited
    half a millisecond on average before its handler ran. This loop waits on the
    queue itself, with the same 1 ms cadence for everything else it checks; the
    checks and their order are pynetdicom's. C-STORE requests never reach it: see
    :class:`RequestQueue`.
    """

    def _run_reactor(self) -> None:
        try:
            self._react()
        finally:  # the DUL has stopped: nothing writes to a spooled file any more
            if isinstance(self.dimse, ReceiverDIMSE):
                self.dimse.discard_unhandled()

    def _react(self) -> None:
        self._is_paused = False
        while not self._kill:
            # pynetdicom's send_*() methods pause the reactor at this checkpoint
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            try:
                context_id, msg = self.dimse.msg_queue.get(timeout=_REACTOR_CHECK_S)
            except queue.Empty:
                context_id, msg = None, None
            if msg is not None:
                self._serve_request(msg, context_id)
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                LOG.info("association from %s released", self.requestor.ae_title)
                self.is_released, self.is_established = True, False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                LOG.info("association from %s aborted", self.requestor.ae_title)
                self.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV fires
                self.is_aborted, self.is_established = True, False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                LOG.warning("network timeout: no PDU from %s for %s s", self.requestor.ae_title,
                            self.network_timeout)
                self._end_idle_association()
                self.kill()
                return

    def serve_at_once(self, msg: Any, context_id: int) -> bool:
        """Serve a C-STORE request with :func:`serve_store`, in the calling thread;
        False for anything pynetdicom's ``_serve_request`` must serve (another
        request, or one it refuses: during release, invalid, unknown context)."""
        context = self._accepted_cx.get(context_id)
        if type(msg) is not C_STORE or context is None or self._sent_release or not msg.is_valid_request:
            return False
        assert self._server is not None  # an acceptor: our server made it
        response = serve_store(self._server.store, msg, context_id, context.transfer_syntax[0], self.requestor.ae_title)
        if self.is_established:  # not if the peer aborted meanwhile
            self.dul.send_pdu(response)
        return True

    def _end_idle_association(self) -> None:
        if self.network_timeout_response == "A-RELEASE":
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self.release()
            self._is_paused = False
        else:
            self.abort()


class ReceiverRequestHandler(RequestHandler):
    """Makes each incoming association one of ours: :class:`ReceiverAssociation`,
    :class:`ReceiverDUL`, :class:`ReceiverSocket`, :class:`ReceiverDIMSE` with a
    :class:`RequestQueue`."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # pynetdicom builds all three itself; ours differ in methods only, so the
        # objects are kept and given our classes.
        assoc.__class__ = ReceiverAssociation
        assoc.dul.__class__ = ReceiverDUL
        assoc.dul.socket.__class__ = ReceiverSocket
        assoc.dimse.__class__ = ReceiverDIMSE
        assoc.dimse.msg_queue = RequestQueue(assoc)
        return assoc


class ReceiverServer(ThreadedAssociationServer):
    """pynetdicom's threaded server that owns our store, polling for a stop request
    every 0.1 s instead of 0.5 s, so the node (and every test) stops promptly."""

    def __init__(self, *args: Any, store: StoreSCP, **kwargs: Any) -> None:
        super().__init__(*args, request_handler=ReceiverRequestHandler, **kwargs)
        self.store = store
        self._last_collect = time.monotonic()

    def serve_forever(self, poll_interval: float = 0.1) -> None:
        super().serve_forever(poll_interval)

    def service_actions(self) -> None:
        """pynetdicom runs a full gc.collect() every 60th poll (30 s at its 0.5 s) to
        free finished associations; a collection stalls every association for tens
        of milliseconds, so keep its 30 s cadence at our faster poll."""
        now = time.monotonic()
        if now - self._last_collect >= _COLLECT_EVERY_S:
            self._last_collect = now
            gc.collect()

    def shutdown(self) -> None:
        # AssociationServer.shutdown() also unregisters from AE.start_server's list,
        # which make_server() never joined.
        socketserver.BaseServer.shutdown(self)
        self.server_close()
        self.store.close()


def start_receiver(settings: Settings, ledger: Ledger) -> ReceiverServer:
    """Start listening (non-blocking); stop with ``server.shutdown()``."""
    scp = StoreSCP(settings, ledger)
    handlers: list[Any] = [
        (evt.EVT_C_ECHO, _on_echo),
        (evt.EVT_REQUESTED, _on_requested, [settings]),
    ]
    if settings.log_level != "DEBUG":
        handlers.append((evt.EVT_CONN_OPEN, _without_message_logging))
    server = build_ae(settings).make_server(
        (settings.host, settings.port), evt_handlers=handlers, ssl_context=dicom_tls.server_context(settings),
        server_class=ReceiverServer, store=scp,
    )
    threading.Thread(target=server.serve_forever, name="sonocase-receiver", daemon=True).start()
    return server


# --- study completion -------------------------------------------------------------

def complete_quiet_studies(ledger: Ledger, quiet_period_s: float) -> list[str]:
    """Mark studies without a new instance for ``quiet_period_s`` complete; log each."""
    done = ledger.complete_quiet_studies(quiet_period_s)
    for study_uid in done:
        LOG.info("study complete after %.1f s quiet", quiet_period_s, extra={"study_uid": study_uid})
    return done


class CompletionLoop:
    """A thread that completes quiet studies every ``interval_s``; the ledger, not
    this thread, remembers everything, so a restart loses nothing."""

    name = "completion"

    def __init__(self, ledger: Ledger, quiet_period_s: float, interval_s: float = 0.5) -> None:
        self.ledger = ledger
        self.quiet_period_s = quiet_period_s
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sonocase-completion", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                complete_quiet_studies(self.ledger, self.quiet_period_s)
            except Exception:  # a busy or broken ledger must not end completion for good
                LOG.exception("completing quiet studies failed; trying again")
            self._stop.wait(self.interval_s)


class ReceiverService:
    """The receiver as one of the node's background services."""

    name = "receiver"

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.ledger = ledger
        self.server: ReceiverServer | None = None

    def start(self) -> None:
        self.server = start_receiver(self.settings, self.ledger)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
