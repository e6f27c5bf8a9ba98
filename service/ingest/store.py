"""The store: one received instance made durable, with no network in here.

:class:`StoreSCP` applies the rules (:mod:`service.ingest.rules`) to a received data
set and keeps it: the bytes exactly as they came behind a file meta group, in the
study's spool folder, fsynced and recorded in the ledger (with group commit) before
the engine may answer Success. :class:`IncomingFile` lets an engine write a data set
to disk while it is still arriving.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import sqlite3
import tempfile
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pydicom.uid import DeflatedExplicitVRLittleEndian

from service.common import spool
from service.ingest.rules import (
    InvalidInstance,
    ParsedInstance,
    StoreOutcome,
    StoreStatus,
    capacity_problem,
    check_request,
    encode_file_meta,
    inflated_data_set_size,
    modality_policy,
    parse_instance,
    too_large,
)
from service.ledger import InstanceRecord, Ledger
from service.settings import Settings

LOG = logging.getLogger(__name__)


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
                view = view[os.write(self.fd, view) :]
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
        except Exception as exc:  # noqa: BLE001 - every store in the batch answers a failure
            for pending in batch:
                pending.error, pending.done = exc, True
            return
        for pending, recorded in zip(batch, results, strict=True):
            pending.recorded, pending.done = recorded, True


class MemoryBudget:
    """The memory data sets take while they arrive (or are inflated), all
    associations together: ``max_in_flight_mb``. Each holder (a data set being
    received, an association, an inflation) takes what it holds and releases it
    all when done; thread-safe.

    Holders are served first come, first served: when a take does not fit, holders
    that began later and can be preempted (they passed ``preempt`` at their first
    take) are preempted, latest first, until it fits; only if it still does not fit
    is the take refused. So the data set that began first always gets through, and
    large data sets that arrive together and exceed the limit together are stored
    one after another on the peer's resends, instead of all refused every time.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._held: dict[object, int] = {}  # in the order the holders began
        self._preempt: dict[object, Callable[[], None]] = {}
        self._preempted: set[object] = set()
        self._lock = threading.Lock()

    def take(self, holder: object, size: int, preempt: Callable[[], None] | None = None) -> bool:
        """Add ``size`` bytes to what ``holder`` holds, preempting later holders if
        that is what makes room; False (nothing taken) if even that would not, or if
        ``holder`` was itself preempted. ``preempt``, at a holder's first take, says
        how to make it drop its bytes and refuse its data set (called from the
        preempting thread, after the budget has let go of its bytes)."""
        with self._lock:
            if holder in self._preempted:
                return False
            victims = self._room_for(holder, size)
            if victims is None:
                return False
            calls = []
            for victim in victims:
                self.used -= self._held.pop(victim)
                self._preempted.add(victim)
                calls.append(self._preempt.pop(victim))
            if holder not in self._held and preempt is not None:
                self._preempt[holder] = preempt
            self.used += size
            self._held[holder] = self._held.get(holder, 0) + size
        for call in calls:
            call()
        return True

    def _room_for(self, holder: object, size: int) -> list[object] | None:
        """The later, preemptible holders to preempt (latest first) for ``size``
        more bytes of ``holder``; None when they would not make room."""
        over = self.used + size - self.limit
        if over <= 0:
            return []
        if holder not in self._held:  # a new holder is the latest: it preempts nobody
            return None
        victims: list[object] = []
        for other in reversed(self._held):
            if other is holder:
                break
            if other in self._preempt:
                victims.append(other)
                over -= self._held[other]
                if over <= 0:
                    return victims
        return None

    def pin(self, holder: object) -> bool:
        """Make ``holder`` safe from preemption from now on (its data set is complete
        and about to be stored); False if it was preempted already."""
        with self._lock:
            self._preempt.pop(holder, None)
            return holder not in self._preempted

    def held(self, holder: object) -> int:
        with self._lock:
            return self._held.get(holder, 0)

    def release(self, holder: object) -> None:
        """Give back everything ``holder`` holds (nothing if it holds nothing)."""
        with self._lock:
            self.used -= self._held.pop(holder, 0)
            self._preempt.pop(holder, None)
            self._preempted.discard(holder)


class StoreSCP:
    """Judge one received instance and make it durable; no network in here."""

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.ledger = ledger
        self.recorder = InstanceRecorder(ledger)
        self.budget = MemoryBudget(settings.max_in_flight_mb << 20)
        self.max_dataset = settings.max_dataset_mb << 20
        self.durable = settings.durability == "fsync"
        self._fsync_pool = ThreadPoolExecutor(2 * settings.max_associations, thread_name_prefix="sonocase-fsync")
        self._study_dirs: set[str] = set()
        self._dir_lock = threading.Lock()
        self.incoming_dir = settings.spool_dir / ".incoming"
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        if self.durable:
            spool.fsync_dir(settings.spool_dir.parent)
        self._remove_partial_files()
        self._remove_unrecorded_files()
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
            rec
            for rec in self.ledger.receiving_instances()
            if rec.crc32 is not None and not file_matches(Path(rec.path), rec.size, rec.crc32)
        ]
        if not torn:
            return
        self.ledger.forget_instances([rec.sop_instance_uid for rec in torn])
        for rec in torn:
            Path(rec.path).unlink(missing_ok=True)
            LOG.warning(
                "forgot instance %s: its file did not survive the last shutdown (never acknowledged)",
                rec.sop_instance_uid,
                extra={"study_uid": rec.study_uid},
            )

    def _remove_partial_files(self) -> None:
        """Temporary files left by a crash were never acknowledged: the peer sends
        them again. Only one receiver writes a spool, so none is in use now."""
        partial = list(self.settings.spool_dir.glob("*/.tmp-*"))
        for path in partial:
            path.unlink(missing_ok=True)
        if partial:
            LOG.info("removed %d partial files left by an interrupted receiver", len(partial))

    def _remove_unrecorded_files(self) -> None:
        """A crash between renaming an instance's file into place and recording it
        leaves a file the ledger does not know; its peer never heard Success and
        sends it again. Such files go, or nothing would ever remove them."""
        unrecorded = []
        for study_dir in self.settings.spool_dir.iterdir():
            if study_dir.name.startswith(".") or not study_dir.is_dir():
                continue
            recorded = {Path(rec.path).name for rec in self.ledger.instances(study_dir.name)}
            unrecorded += [path for path in study_dir.glob("*.dcm") if path.name not in recorded]
        for path in unrecorded:
            path.unlink(missing_ok=True)
            LOG.warning(
                "removed %s: its file was never recorded (never acknowledged)",
                path.stem,
                extra={"study_uid": path.parent.name},
            )

    def open_incoming(
        self,
        affected_sop_class: str,
        affected_sop_instance: str,
        transfer_syntax: str,
        calling_ae: str,
    ) -> IncomingFile:
        """A temporary spool file for a data set about to arrive, its file meta group
        taken from the C-STORE request; :meth:`store` keeps it only if the data set
        turns out to be that instance."""
        head = encode_file_meta(affected_sop_class, affected_sop_instance, transfer_syntax, calling_ae)
        return IncomingFile(self.incoming_dir, head, durable=self.durable)

    def store(
        self,
        raw: bytes,
        transfer_syntax: str,
        affected_sop_class: str,
        affected_sop_instance: str,
        calling_ae: str,
        incoming: IncomingFile | None = None,
        study_uid: str | None = None,
    ) -> StoreOutcome:
        """Parse, judge, write and record one instance; never raises. ``incoming``,
        when given, already holds the bytes on disk (see :class:`IncomingFile`); the
        caller closes it. ``study_uid``, when given, is the only study accepted."""
        expected_study, study_uid = study_uid, None
        try:
            inst = self._parse(raw, transfer_syntax)
            study_uid = inst.study_uid
            check_request(inst, affected_sop_class, affected_sop_instance, expected_study)
            ignored = modality_policy(inst, self.settings.non_ultrasound)
            if self.ledger.has_instance(inst.sop_instance_uid):
                LOG.info(
                    "duplicate SOP Instance UID %s: already stored, not rewritten",
                    inst.sop_instance_uid,
                    extra={"study_uid": study_uid, "calling_ae": calling_ae},
                )
                return StoreOutcome(StoreStatus.SUCCESS, "duplicate", study_uid)
            problem = capacity_problem(
                spool.free_disk_mb(self.settings.spool_dir),
                len(raw),
                self.ledger.pending_analysis_count(),
                self.settings,
            )
            if problem:
                return self._refuse(StoreStatus.OUT_OF_RESOURCES, problem, study_uid, calling_ae)
            self._write(inst, raw, transfer_syntax, calling_ae, ignored, incoming)
        except InvalidInstance as exc:
            return self._refuse(exc.status, str(exc), study_uid, calling_ae)
        except Exception as exc:  # noqa: BLE001 - the SCP must answer and keep serving, whatever broke
            return self._failed(exc, study_uid, calling_ae)
        LOG.debug("stored %s", inst.sop_instance_uid, extra={"study_uid": study_uid, "calling_ae": calling_ae})
        return StoreOutcome(StoreStatus.SUCCESS, ignored or "", study_uid, stored=True)

    def _parse(self, raw: bytes | memoryview, transfer_syntax: str) -> ParsedInstance:
        """:func:`parse_instance` within ``max_dataset_mb``; a deflated data set is
        measured first, in constant memory, and inflated only within the budget."""
        if transfer_syntax != DeflatedExplicitVRLittleEndian:
            refusal = too_large(len(raw), self.max_dataset)
            if refusal is not None:
                raise refusal
            return parse_instance(raw, transfer_syntax, self.max_dataset)
        size = inflated_data_set_size(raw, self.max_dataset)
        token = object()
        if not self.budget.take(token, size):
            raise InvalidInstance(
                StoreStatus.OUT_OF_RESOURCES, "data sets in flight fill max_in_flight_mb; cannot inflate this one now"
            )
        try:
            return parse_instance(raw, transfer_syntax, self.max_dataset)
        finally:
            self.budget.release(token)

    @staticmethod
    def _failed(exc: Exception, study_uid: str | None, calling_ae: str) -> StoreOutcome:
        """A failure of ours. Out of resources when the disk (spool or ledger) is
        full, so the peer retries later; a processing failure otherwise."""
        extra = {"study_uid": study_uid, "calling_ae": calling_ae}
        if disk_full(exc):
            LOG.error("cannot store an instance from %s: no space left (%s)", calling_ae, exc, extra=extra)
            return StoreOutcome(StoreStatus.OUT_OF_RESOURCES, "storage error: no space left on the disk", study_uid)
        LOG.exception("cannot store an instance from %s", calling_ae, extra=extra)
        reason = (
            f"storage error: {exc.strerror or exc}"
            if isinstance(exc, OSError)
            else f"internal error: {type(exc).__name__}"
        )
        return StoreOutcome(StoreStatus.PROCESSING_FAILURE, reason, study_uid)

    def refuse(self, refusal: InvalidInstance, calling_ae: str) -> StoreOutcome:
        """The outcome of a data set an engine refused while it arrived (too large,
        no memory left for it): logged as :meth:`store` logs its own refusals."""
        return self._refuse(refusal.status, str(refusal), None, calling_ae)

    def _refuse(self, status: StoreStatus, reason: str, study_uid: str | None, calling_ae: str) -> StoreOutcome:
        LOG.warning(
            "refused C-STORE from %s with 0x%04X: %s",
            calling_ae,
            status,
            reason,
            extra={"study_uid": study_uid, "calling_ae": calling_ae, "status": f"0x{status:04X}"},
        )
        return StoreOutcome(status, reason, study_uid)

    def close(self) -> None:
        self._fsync_pool.shutdown()

    def _write(
        self,
        inst: ParsedInstance,
        raw: bytes,
        transfer_syntax: str,
        calling_ae: str,
        ignored: str | None,
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
            self.recorder.record(
                InstanceRecord(
                    sop_instance_uid=inst.sop_instance_uid,
                    study_uid=inst.study_uid,
                    series_uid=inst.series_uid,
                    sop_class_uid=inst.sop_class_uid,
                    transfer_syntax=transfer_syntax,
                    path=str(path),
                    size=size,
                    calling_ae=calling_ae,
                    modality=inst.modality,
                    ignored_reason=ignored,
                    crc32=crc,
                )
            )
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
