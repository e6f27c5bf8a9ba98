"""Delivery: the outbox goes to the PACS and stays there until accepted.

The ledger's outbox table and the files under ``outbox_dir`` are the whole state,
so a killed node resends after restart what was not yet accepted (a PACS may get an
object twice after a crash mid-association; storing the same SOP Instance UID again
is idempotent for a PACS). Each round:

* due objects are grouped per destination and study, and each group goes to its
  destination by the :class:`~service.delivery.transport.Transport` registered
  for its kind (:data:`TRANSPORTS`): over one association (C-STORE, optional DICOM
  TLS; :mod:`service.delivery.cstore`) or in one STOW-RS request whose response
  says per object whether it was stored (:mod:`service.delivery.dicomweb`);
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

import json
import logging
import random
import time
from collections.abc import Callable
from itertools import groupby
from typing import Any

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from service.common.backoff import backoff_delay
from service.common.loop import PollingLoop
from service.common.metrics import observe_send
from service.delivery.cstore import CStoreTransport
from service.delivery.dicomweb import StowTransport
from service.delivery.transport import Transport
from service.ledger import Ledger, OutboxState, StudyState
from service.model_card import card_path_for
from service.reports.build import (
    ReportError,
    build_reports,
    index_reference_images,
    rebuild_sr,
)
from service.reports.sr import SR_CLASSES
from service.reports.template import validate_template_setting
from service.settings import Destination, DicomWebDestination, Peer, Settings, parse_peer
from service.similar.index import SimilarCaseIndex

LOG = logging.getLogger(__name__)

#: How often the loop looks for due objects: one indexed ledger query when nothing
#: is due; on average half of it is added to the time a result takes to the PACS.
POLL_S = 0.02
#: How often the loop looks for analysed studies whose worker died before reporting
#: them (an indexed query); they are noticed within task_lease_s plus this.
ORPHAN_CHECK_S = 1.0
#: The transport for each kind of destination: a new kind is a :class:`Transport`
#: subclass and a line here.
TRANSPORTS: dict[type[Peer], Callable[[Settings], Transport[Any]]] = {
    Destination: CStoreTransport,
    DicomWebDestination: StowTransport,
}


class Sender:
    """One delivery round at a time over the ledger's outbox (see module doc); the
    :class:`OutcomeRecorder` its transports tell what became of each object."""

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.ledger = ledger
        self.rng = random.Random()
        self.transports = {kind: make(settings) for kind, make in TRANSPORTS.items()}

    # --- one round -------------------------------------------------------------
    def run_once(self, now: float | None = None) -> int:
        """Try every due object once; return how many were accepted."""
        rows = self.ledger.due_outbox(time.time() if now is None else now)
        accepted = 0
        for (destination, study_uid), group in groupby(rows, key=lambda r: (r["destination"], r["study_uid"])):
            accepted += self._deliver(destination, study_uid, list(group))
            self._settle(study_uid)
        return accepted

    def _deliver(self, destination: str, study_uid: str, rows: list[dict[str, Any]]) -> int:
        dest = parse_peer(destination)
        transport = self.transports[type(dest)]
        # The SR first: it is what the radiologist waits for, and it names the rest.
        rows = sorted(rows, key=lambda r: r["sop_class_uid"] not in SR_CLASSES)
        read_ok = self._read(rows, transport.read)
        rows = [r for r in rows if r["sop_instance_uid"] in read_ok]
        if not rows:
            return 0
        accepted = transport.deliver(dest, study_uid, rows, read_ok, self)
        LOG.info(
            "%d of %d object(s) accepted by %s",
            accepted,
            len(rows),
            dest,
            extra={"study_uid": study_uid, "destination": str(dest)},
        )
        return accepted

    def _read(self, rows: list[dict[str, Any]], read: Callable[[str], Dataset]) -> dict[str, Dataset]:
        """``read`` of each row's outbox file, by SOP Instance UID; a file that cannot
        be read is a failed try of its row."""
        read_ok = {}
        for row in rows:
            try:
                read_ok[row["sop_instance_uid"]] = read(row["path"])
            except (OSError, InvalidDicomError) as exc:
                self.failed(row, f"outbox file {row['path']} cannot be read: {exc}")
        return read_ok

    # --- the outcome of each object, in the outbox ------------------------------
    def accepted(self, dest: Peer, row: dict[str, Any], warning: str) -> int:
        """Record an object the destination stored (with ``warning``, if any); 1."""
        if warning:
            LOG.warning(
                "%s stored %s with a warning: %s",
                dest,
                row["sop_instance_uid"],
                warning,
                extra={"study_uid": row["study_uid"]},
            )
        self.ledger.update_outbox(row["sop_instance_uid"], row["destination"], OutboxState.SENT)
        observe_send("accepted")
        return 1

    def skipped(self, dest: Peer, row: dict[str, Any]) -> int:
        """An optional object the destination does not take: recorded as skipped
        there (``sonocase resend`` tries it again); 0."""
        reason = f"{dest} does not accept SOP class {row['sop_class_uid']}"
        LOG.warning(
            "%s: %s not sent there (optional)",
            reason,
            row["sop_instance_uid"],
            extra={"study_uid": row["study_uid"], "destination": str(dest)},
        )
        self.ledger.update_outbox(row["sop_instance_uid"], row["destination"], OutboxState.SKIPPED, error=reason)
        return 0

    def fallback(
        self,
        dest: Peer,
        row: dict[str, Any],
        accepted_classes: set[str],
    ) -> tuple[dict[str, Any], str] | None:
        """Rebuild the SR in the first class after its own that ``dest`` accepts;
        the new row and its transfer syntax."""
        current = row["sop_class_uid"]
        later = SR_CLASSES[SR_CLASSES.index(current) + 1 :]
        target = next((c for c in later if c in accepted_classes), None)
        if target is None:
            self.failed(row, f"{dest} accepts none of the SR classes {list(SR_CLASSES[SR_CLASSES.index(current) :])}")
            return None
        try:
            new_uid, path = rebuild_sr(self.settings, self.ledger, row["study_uid"], row["generation"], target)
        except ReportError as exc:
            self.failed(row, f"the SR could not be rebuilt as {target}: {exc}")
            return None
        LOG.warning(
            "%s does not accept SR class %s; sending the SR rebuilt as %s",
            dest,
            current,
            target,
            extra={"study_uid": row["study_uid"], "destination": str(dest)},
        )
        self.ledger.replace_outbox(row["sop_instance_uid"], row["destination"], new_uid, target, str(path))
        return (
            {**row, "sop_instance_uid": new_uid, "sop_class_uid": target, "path": str(path)},
            read_file_meta_info(path).TransferSyntaxUID,
        )

    def failed(self, row: dict[str, Any], reason: str) -> None:
        """Schedule another try, or give up visibly after send_max_attempts."""
        observe_send("failed")
        attempts = row["attempts"] + 1
        study_uid = row["study_uid"]
        if attempts >= self.settings.send_max_attempts:
            self.ledger.update_outbox(row["sop_instance_uid"], row["destination"], OutboxState.FAILED, error=reason)
            self.ledger.transition(
                study_uid,
                StudyState.FAILED,
                (StudyState.REPORTED,),
                row["generation"],
                failed_stage="send",
                error=reason[:2000],
            )
            LOG.error(
                "giving up after %d tries: %s",
                attempts,
                reason,
                extra={"study_uid": study_uid, "destination": row["destination"], "stage": "send"},
            )
            return
        delay = backoff_delay(attempts, self.settings.send_backoff_s, self.settings.send_backoff_max_s, self.rng)
        self.ledger.update_outbox(
            row["sop_instance_uid"],
            row["destination"],
            OutboxState.PENDING,
            error=reason,
            next_attempt_at=time.time() + delay,
        )
        LOG.warning(
            "try %d failed, next in %.1f s: %s",
            attempts,
            delay,
            reason,
            extra={"study_uid": study_uid, "destination": row["destination"]},
        )

    def _settle(self, study_uid: str) -> None:
        """REPORTED -> SENT once every object of the current generation is accepted."""
        study = self.ledger.study(study_uid)
        if study is None or study["state"] != StudyState.REPORTED:
            return
        rows = [r for r in self.ledger.outbox(study_uid) if r["generation"] == study["generation"]]
        if rows and all(r["state"] in (OutboxState.SENT, OutboxState.SKIPPED) for r in rows):
            self.ledger.transition(
                study_uid, StudyState.SENT, (StudyState.REPORTED,), study["generation"], sent_at=time.time()
            )
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
        self._loop = PollingLoop(self.name, POLL_S, self._round)
        self._next_orphan_check = time.monotonic()

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
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def _round(self) -> None:
        self.sender.run_once()
        if time.monotonic() >= self._next_orphan_check:
            self._next_orphan_check = time.monotonic() + ORPHAN_CHECK_S
            self.sender.report_orphans()
