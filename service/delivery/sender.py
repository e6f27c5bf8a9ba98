"""Delivery: the outbox goes to the PACS and stays there until accepted.

The ledger's outbox table and the files under ``outbox_dir`` are the whole state,
so a killed node resends after restart what was not yet accepted (a PACS may get an
object twice after a crash mid-association; storing the same SOP Instance UID again
is idempotent for a PACS). Each round:

* due objects are grouped per destination and study, and each group goes over
  one association (C-STORE, optional DICOM TLS) or, to a DICOMweb destination, in
  one STOW-RS request (:mod:`service.delivery.dicomweb`) whose response says per
  object whether it was stored;
* the SR is proposed in every SR class we write; when the destination refuses the
  one built (no presentation context, or STOW-RS Failure Reason 0x0122), the SR is
  rebuilt in the best class it accepts along Comprehensive 3D -> Comprehensive ->
  Enhanced SR, and the outbox row is swapped (logged);
* an object that is not accepted (no association or HTTP answer, refused context,
  failure status or Failure Reason) waits with exponential backoff and jitter; after
  ``send_max_attempts`` it is FAILED and so is its study (stage ``send``), until
  ``sonocase resend``;
* a study whose objects were all accepted becomes SENT.

It also reports studies a worker analysed but died before reporting (the report
builder is idempotent, so a late duplicate build is harmless).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from itertools import groupby
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association

from service.common import dicom_tls, dicomweb
from service.common.metrics import observe_send
from service.delivery.dicomweb import (
    SOP_CLASS_NOT_SUPPORTED,
    WARNING_REASONS,
    store_study,
)
from service.ledger import Ledger, OutboxRow, OutboxState, StudyState
from service.model_card import card_path_for
from service.reports.build import (
    OPTIONAL_CLASSES,
    ReportError,
    build_reports,
    index_reference_images,
    rebuild_sr,
)
from service.reports.sr import SR_CLASSES
from service.reports.template import validate_template_setting
from service.settings import Destination, DicomWebDestination, Settings, parse_peer
from service.similar.index import SimilarCaseIndex

LOG = logging.getLogger(__name__)

# C-STORE response statuses (PS3.4 B.2.3): success and the warnings that still
# mean "stored" (the same codes and meanings as STOW-RS Warning Reasons).
STATUS_SUCCESS = 0x0000
STATUS_WARNINGS = WARNING_REASONS
#: How often the loop looks for due objects: one indexed ledger query when nothing
#: is due; on average half of it is added to the time a result takes to the PACS.
POLL_S = 0.02
#: How often the loop looks for analysed studies whose worker died before reporting
#: them (an indexed query); they are noticed within task_lease_s plus this.
ORPHAN_CHECK_S = 1.0
#: How often a C-STORE waiting for its response checks that the association lives.
_WATCH_EVERY_S = 0.1


def backoff_delay(attempts: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Delay before try ``attempts + 1``: exponential, capped, with "equal jitter"
    (half fixed, half random) so many objects never hammer a PACS in lockstep."""
    delay = min(max_s, base_s * 2 ** max(0, attempts - 1))
    return delay / 2 + rng.uniform(0, delay / 2)


def send_c_store(assoc: Association, ds: Dataset) -> Dataset:
    """``assoc.send_c_store(ds)``, but a wait for the response that ends with the
    association.

    pynetdicom 3.0.4 wakes a waiting ``send_c_store`` when the peer aborts, but not
    when the association's DUL thread ends on a socket error (a peer that dropped
    the connection while we were sending): the wait would last the DIMSE timeout
    for each object. A watcher wakes it the way pynetdicom's own abort does.
    """
    done = threading.Event()

    def watch() -> None:
        while not done.wait(_WATCH_EVERY_S):
            if not assoc.dul.is_alive():
                assoc.dimse.msg_queue.put((None, None))  # pynetdicom's "no response"
                return

    watcher = threading.Thread(target=watch, name="sonocase-send-watch", daemon=True)
    watcher.start()
    try:
        return assoc.send_c_store(ds)
    except RuntimeError:  # it ended after the caller saw it established: pynetdicom refuses to send
        if assoc.is_established:
            raise
        return Dataset()  # no response
    finally:
        done.set()
        watcher.join()


def _transfer_syntaxes(sop_class_uid: str, stored: str) -> list[str]:
    """What we propose for a class: uncompressed both ways (pynetdicom converts
    between them), a compressed object only in its own syntax."""
    uncompressed = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    return uncompressed if stored in uncompressed or sop_class_uid in SR_CLASSES else [stored]


class Sender:
    """One delivery round at a time over the ledger's outbox (see module doc)."""

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.ledger = ledger
        self.rng = random.Random()
        # pynetdicom's own option: a file path given to send_c_store goes out as it lies
        # on disk, read in chunks, never decoded and re-encoded nor held whole in memory.
        _config.STORE_SEND_CHUNKED_DATASET = True

    # --- one round -------------------------------------------------------------
    def run_once(self, now: float | None = None) -> int:
        """Try every due object once; return how many were accepted."""
        rows = self.ledger.due_outbox(time.time() if now is None else now)
        accepted = 0
        for (destination, study_uid), group in groupby(rows, key=lambda r: (r.destination, r.study_uid)):
            accepted += self._deliver(destination, study_uid, list(group))
            self._settle(study_uid)
        return accepted

    def _deliver(self, destination: str, study_uid: str, rows: list[OutboxRow]) -> int:
        dest = parse_peer(destination)
        # The SR first: it is what the radiologist waits for, and it names the rest.
        rows = sorted(rows, key=lambda r: r.sop_class_uid not in SR_CLASSES)
        if isinstance(dest, DicomWebDestination):
            datasets = self._read(rows, dcmread)
            rows = [r for r in rows if r.sop_instance_uid in datasets]
            accepted = self._deliver_stow(dest, study_uid, rows, datasets) if rows else 0
        else:
            metas = self._read(rows, read_file_meta_info)  # the file meta only: objects are sent as files
            rows = [r for r in rows if r.sop_instance_uid in metas]
            accepted = self._deliver_cstore(dest, rows, metas) if rows else 0
        if rows:
            LOG.info(
                "%d of %d object(s) accepted by %s",
                accepted,
                len(rows),
                dest,
                extra={"study_uid": study_uid, "destination": str(dest)},
            )
        return accepted

    def _read(self, rows: list[OutboxRow], read: Callable[[str], Dataset]) -> dict[str, Dataset]:
        """``read`` of each row's outbox file, by SOP Instance UID; a file that cannot
        be read is a failed try of its row."""
        read_ok = {}
        for row in rows:
            try:
                read_ok[row.sop_instance_uid] = read(row.path)
            except (OSError, InvalidDicomError) as exc:
                self._failed(row, f"outbox file {row.path} cannot be read: {exc}")
        return read_ok

    def _deliver_cstore(self, dest: Destination, rows: list[OutboxRow], metas: dict[str, Dataset]) -> int:
        """The group over one association; return how many were accepted."""
        assoc = self._associate(dest, rows, metas)
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
            for row in rows:
                self._failed(row, f"association with {dest} {why}")
            return 0
        accepted = 0
        try:
            for row in rows:
                if not assoc.is_established:
                    self._failed(row, f"association with {dest} ended early")
                    continue
                accepted += self._store(assoc, dest, row, metas[row.sop_instance_uid].TransferSyntaxUID)
        finally:
            if assoc.is_established:
                assoc.release()
        return accepted

    def _deliver_stow(
        self, dest: DicomWebDestination, study_uid: str, rows: list[OutboxRow], datasets: dict[str, Dataset]
    ) -> int:
        """The group in one STOW-RS request; each object's outcome is recorded on its
        own, so a partly stored request resends only what was not stored."""
        try:
            web = dicomweb.client(self.settings, dest)
        except ValueError as exc:  # an unreadable secret file: every try fails the same way, visibly
            for row in rows:
                self._failed(row, f"{dest}: {exc}")
            return 0
        outcomes = store_study(web, study_uid, [datasets[row.sop_instance_uid] for row in rows])
        accepted = 0
        for row in rows:
            outcome = outcomes[row.sop_instance_uid]
            if outcome.stored:
                accepted += self._accepted(dest, row, outcome.reason)
            elif outcome.failure_reason == SOP_CLASS_NOT_SUPPORTED and row.sop_class_uid in SR_CLASSES:
                # Rebuilt in the next SR class, sent in the next round (soon: the row stays due).
                self._fallback(dest, row, set(SR_CLASSES[SR_CLASSES.index(row.sop_class_uid) + 1 :]))
            elif outcome.failure_reason == SOP_CLASS_NOT_SUPPORTED and row.sop_class_uid in OPTIONAL_CLASSES:
                self._skipped(dest, row)
            else:
                self._failed(row, f"{dest} did not store {row.sop_instance_uid}: {outcome.reason}")
        return accepted

    def _associate(self, dest: Destination, rows: list[OutboxRow], metas: dict[str, Dataset]) -> Association:
        ae = AE(ae_title=self.settings.ae_title)
        ae.acse_timeout = ae.network_timeout = 30
        ae.dimse_timeout = 120
        proposed: dict[str, list[str]] = {}
        for row in rows:
            stored = metas[row.sop_instance_uid].TransferSyntaxUID
            classes = SR_CLASSES if row.sop_class_uid in SR_CLASSES else (row.sop_class_uid,)
            for sop_class in classes:
                for syntax in _transfer_syntaxes(sop_class, stored):
                    proposed.setdefault(sop_class, [])
                    if syntax not in proposed[sop_class]:
                        proposed[sop_class].append(syntax)
        for sop_class, syntaxes in proposed.items():
            ae.add_requested_context(sop_class, syntaxes)
        return ae.associate(
            dest.host, dest.port, ae_title=dest.ae_title, tls_args=dicom_tls.client_args(self.settings, dest)
        )

    def _store(self, assoc: Association, dest: Destination, row: OutboxRow, stored: str) -> int:
        accepted_classes = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        if row.sop_class_uid not in accepted_classes:
            if row.sop_class_uid in OPTIONAL_CLASSES:
                return self._skipped(dest, row)
            if row.sop_class_uid not in SR_CLASSES:
                self._failed(row, f"{dest} accepts no presentation context for SOP class {row.sop_class_uid}")
                return 0
            fallback = self._fallback(dest, row, accepted_classes)
            if fallback is None:
                return 0
            row, stored = fallback
        as_stored = any(
            cx.abstract_syntax == row.sop_class_uid and cx.transfer_syntax[0] == stored
            for cx in assoc.accepted_contexts
        )
        try:
            # The file as it lies in the outbox (already checked by the gate) where the
            # destination takes its transfer syntax; else decoded, for pynetdicom to convert.
            status = send_c_store(assoc, Path(row.path) if as_stored else dcmread(row.path))
        except (OSError, InvalidDicomError) as exc:
            self._failed(row, f"outbox file {row.path} cannot be read: {exc}")
            return 0
        code = int(status.get("Status", -1)) if status else -1
        if code == STATUS_SUCCESS or code in STATUS_WARNINGS:
            return self._accepted(dest, row, STATUS_WARNINGS.get(code, ""))
        reason = "no response (association lost)" if code == -1 else f"C-STORE status 0x{code:04X}"
        self._failed(row, f"{dest} did not store {row.sop_instance_uid}: {reason}")
        return 0

    def _accepted(self, dest: Destination | DicomWebDestination, row: OutboxRow, warning: str) -> int:
        """Record an object the destination stored (with ``warning``, if any); 1."""
        if warning:
            LOG.warning(
                "%s stored %s with a warning: %s",
                dest,
                row.sop_instance_uid,
                warning,
                extra={"study_uid": row.study_uid},
            )
        self.ledger.update_outbox(row.sop_instance_uid, row.destination, OutboxState.SENT)
        observe_send("accepted")
        return 1

    def _skipped(self, dest: Destination | DicomWebDestination, row: OutboxRow) -> int:
        """An optional object the destination does not take: recorded as skipped
        there (``sonocase resend`` tries it again); 0."""
        reason = f"{dest} does not accept SOP class {row.sop_class_uid}"
        LOG.warning(
            "%s: %s not sent there (optional)",
            reason,
            row.sop_instance_uid,
            extra={"study_uid": row.study_uid, "destination": str(dest)},
        )
        self.ledger.update_outbox(row.sop_instance_uid, row.destination, OutboxState.SKIPPED, error=reason)
        return 0

    def _fallback(
        self,
        dest: Destination | DicomWebDestination,
        row: OutboxRow,
        accepted_classes: set[str],
    ) -> tuple[OutboxRow, str] | None:
        """Rebuild the SR in the first class after its own that ``dest`` accepts;
        the new row and its transfer syntax."""
        current = row.sop_class_uid
        later = SR_CLASSES[SR_CLASSES.index(current) + 1 :]
        target = next((c for c in later if c in accepted_classes), None)
        if target is None:
            self._failed(row, f"{dest} accepts none of the SR classes {list(SR_CLASSES[SR_CLASSES.index(current) :])}")
            return None
        try:
            new_uid, path = rebuild_sr(self.settings, self.ledger, row.study_uid, row.generation, target)
        except ReportError as exc:
            self._failed(row, f"the SR could not be rebuilt as {target}: {exc}")
            return None
        LOG.warning(
            "%s does not accept SR class %s; sending the SR rebuilt as %s",
            dest,
            current,
            target,
            extra={"study_uid": row.study_uid, "destination": str(dest)},
        )
        self.ledger.replace_outbox(row.sop_instance_uid, row.destination, new_uid, target, str(path))
        return (
            dataclasses.replace(row, sop_instance_uid=new_uid, sop_class_uid=target, path=str(path)),
            read_file_meta_info(path).TransferSyntaxUID,
        )

    def _failed(self, row: OutboxRow, reason: str) -> None:
        """Schedule another try, or give up visibly after send_max_attempts."""
        observe_send("failed")
        attempts = row.attempts + 1
        study_uid = row.study_uid
        if attempts >= self.settings.send_max_attempts:
            self.ledger.update_outbox(row.sop_instance_uid, row.destination, OutboxState.FAILED, error=reason)
            self.ledger.transition(
                study_uid,
                StudyState.FAILED,
                row.generation,
                sources=(StudyState.REPORTED,),
                failed_stage="send",
                error=reason[:2000],
            )
            LOG.error(
                "giving up after %d tries: %s",
                attempts,
                reason,
                extra={"study_uid": study_uid, "destination": row.destination, "stage": "send"},
            )
            return
        delay = backoff_delay(attempts, self.settings.send_backoff_s, self.settings.send_backoff_max_s, self.rng)
        self.ledger.update_outbox(
            row.sop_instance_uid,
            row.destination,
            OutboxState.PENDING,
            error=reason,
            next_attempt_at=time.time() + delay,
        )
        LOG.warning(
            "try %d failed, next in %.1f s: %s",
            attempts,
            delay,
            reason,
            extra={"study_uid": study_uid, "destination": row.destination},
        )

    def _settle(self, study_uid: str) -> None:
        """REPORTED -> SENT once every object of the current generation is accepted."""
        study = self.ledger.study(study_uid)
        if study is None or study.state != StudyState.REPORTED:
            return
        rows = [r for r in self.ledger.outbox(study_uid) if r.generation == study.generation]
        if rows and all(r.state in (OutboxState.SENT, OutboxState.SKIPPED) for r in rows):
            self.ledger.transition(study_uid, StudyState.SENT, study.generation)
            LOG.info("all %d object(s) accepted", len(rows), extra={"study_uid": study_uid})

    # --- studies a dead worker analysed but never reported ----------------------
    def report_orphans(self, now: float | None = None) -> int:
        """Report the analysed studies whose worker stopped renewing its lease before
        it reported them (see :meth:`Ledger.claim_orphaned_reports`). The report's
        objects have UIDs derived from the study and generation, so a late report of
        the same generation writes the same objects, never a second SR."""
        claimed = self.ledger.claim_orphaned_reports(self.settings.task_lease_s, now)
        if not claimed:
            return 0
        try:
            index: SimilarCaseIndex | None = SimilarCaseIndex.from_settings(self.settings, None)
        except FileNotFoundError:
            index = None
        try:
            for study_uid, generation in claimed:
                LOG.warning("analysed but never reported (worker lost): reporting now", extra={"study_uid": study_uid})
                with self.ledger.keep_lease(study_uid, generation, self.settings.task_lease_s):
                    build_reports(
                        self.settings, self.ledger, study_uid, index_reference_images(index) if index else None
                    )
        finally:
            if index is not None:
                index.close()
        return len(claimed)


class SenderService:
    """The sender as a node service: a thread running rounds until stopped."""

    name = "sender"

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.sender = Sender(settings, ledger)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sonocase-sender", daemon=True)

    def start(self) -> None:
        """Refuse to start with an SR template that cannot code the model's classes."""
        settings = self.sender.settings
        card = card_path_for(settings.model_path)
        classes = json.loads(card.read_text())["classes"] if card.is_file() else None
        validate_template_setting(settings.sr_template, classes)
        if not self.sender.settings.destinations:
            LOG.warning(
                "no destination configured: results stay in %s (set SONOCASE_DESTINATIONS)",
                self.sender.settings.outbox_dir,
            )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        next_orphan_check = time.monotonic()
        while not self._stop.wait(POLL_S):
            try:
                self.sender.run_once()
                if time.monotonic() >= next_orphan_check:
                    next_orphan_check = time.monotonic() + ORPHAN_CHECK_S
                    self.sender.report_orphans()
            except Exception:  # the loop must outlive one bad round; the ledger keeps the work
                LOG.exception("sender round failed; retrying")
