"""Delivery over DICOM: a study's objects over one association (C-STORE, optional
DICOM TLS), each sent as the file lies in the outbox where the destination takes
its transfer syntax."""

from __future__ import annotations

import threading
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association

from service.common import dicom_tls
from service.delivery.dicomweb import WARNING_REASONS
from service.delivery.transport import OutcomeRecorder, Row, Transport
from service.reports.build import OPTIONAL_CLASSES
from service.reports.sr import SR_CLASSES
from service.settings import Destination, Settings

# C-STORE response statuses (PS3.4 B.2.3): success and the warnings that still
# mean "stored" (the same codes and meanings as STOW-RS Warning Reasons).
STATUS_SUCCESS = 0x0000
STATUS_WARNINGS = WARNING_REASONS
#: How often a C-STORE waiting for its response checks that the association lives.
_WATCH_EVERY_S = 0.1


def send_c_store(assoc: Association, ds: Dataset | Path) -> Dataset:
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
    uncompressed: list[str] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    return uncompressed if stored in uncompressed or sop_class_uid in SR_CLASSES else [stored]


class CStoreTransport(Transport[Destination]):
    """A DICOM destination (AE@host:port): the group over one association."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # pynetdicom's own option: a file path given to send_c_store goes out as it lies
        # on disk, read in chunks, never decoded and re-encoded nor held whole in memory.
        _config.STORE_SEND_CHUNKED_DATASET = True

    def read(self, path: str) -> Dataset:
        """The file meta only: objects are sent as files."""
        return read_file_meta_info(path)

    def deliver(
        self, dest: Destination, study_uid: str, rows: list[Row], read: dict[str, Dataset], outcomes: OutcomeRecorder
    ) -> int:
        assoc = self._associate(dest, rows, read)
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
            for row in rows:
                outcomes.failed(row, f"association with {dest} {why}")
            return 0
        accepted = 0
        try:
            for row in rows:
                if not assoc.is_established:
                    outcomes.failed(row, f"association with {dest} ended early")
                    continue
                stored = read[row["sop_instance_uid"]].TransferSyntaxUID
                accepted += self._store(assoc, dest, row, stored, outcomes)
        finally:
            if assoc.is_established:
                assoc.release()
        return accepted

    def _associate(self, dest: Destination, rows: list[Row], metas: dict[str, Dataset]) -> Association:
        ae = AE(ae_title=self.settings.ae_title)
        ae.acse_timeout = ae.network_timeout = 30
        ae.dimse_timeout = 120
        proposed: dict[str, list[str]] = {}
        for row in rows:
            stored = metas[row["sop_instance_uid"]].TransferSyntaxUID
            classes = SR_CLASSES if row["sop_class_uid"] in SR_CLASSES else (row["sop_class_uid"],)
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

    def _store(self, assoc: Association, dest: Destination, row: Row, stored: str, outcomes: OutcomeRecorder) -> int:
        accepted_classes = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        if row["sop_class_uid"] not in accepted_classes:
            if row["sop_class_uid"] in OPTIONAL_CLASSES:
                return outcomes.skipped(dest, row)
            if row["sop_class_uid"] not in SR_CLASSES:
                outcomes.failed(row, f"{dest} accepts no presentation context for SOP class {row['sop_class_uid']}")
                return 0
            fallback = outcomes.fallback(dest, row, accepted_classes)
            if fallback is None:
                return 0
            row, stored = fallback
        as_stored = any(
            cx.abstract_syntax == row["sop_class_uid"] and cx.transfer_syntax[0] == stored
            for cx in assoc.accepted_contexts
        )
        try:
            # The file as it lies in the outbox (already checked by the gate) where the
            # destination takes its transfer syntax; else decoded, for pynetdicom to convert.
            status = send_c_store(assoc, Path(row["path"]) if as_stored else dcmread(row["path"]))
        except (OSError, InvalidDicomError) as exc:
            outcomes.failed(row, f"outbox file {row['path']} cannot be read: {exc}")
            return 0
        code = int(status.get("Status", -1)) if status else -1
        if code == STATUS_SUCCESS or code in STATUS_WARNINGS:
            return outcomes.accepted(dest, row, STATUS_WARNINGS.get(code, ""))
        reason = "no response (association lost)" if code == -1 else f"C-STORE status 0x{code:04X}"
        outcomes.failed(row, f"{dest} did not store {row['sop_instance_uid']}: {reason}")
        return 0
