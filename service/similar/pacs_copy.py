"""Copy labelled reference studies out of the PACS, for the similar-case index.

For ``sonocase index add --pacs``: a C-FIND (Study Root, STUDY level) says whether
each study is there, and a C-GET copies its ultrasound images into a folder, which
the index then fills from like any other. C-GET rather than C-MOVE: the images come
back on the same association, so the PACS needs no move destination for us and no
port of ours has to be reachable from it. Only image SOP classes are offered for the
copy: the study's reports (our own AI results among them) stay in the PACS.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from service.common import dicom_tls, spool
from service.ingest.rules import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, is_valid_uid
from service.settings import Destination, Settings

LOG = logging.getLogger(__name__)

_PENDING = (0xFF00, 0xFF01)
_SUCCESS = 0x0000
_WARNING = 0xB000  # some sub-operations failed (PS3.4 C.4.3.1.4)


class PacsUnavailable(Exception):
    """The PACS cannot be reached, or does not take our association."""


@dataclass
class StudyCopy:
    """What one study's copy came to: its files, and why any are missing."""

    study_uid: str
    files: list[Path] = field(default_factory=list)
    problem: str = ""


def _study_query(study_uid: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    return query


class _Copier:
    """Writes the instances a C-GET brings into the current study's folder, as
    they came (file meta + the PACS's encoded data set)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.study_uid = ""
        self.files: list[Path] = []

    def on_store(self, event: Event) -> int:
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        if not is_valid_uid(sop_uid):
            return 0xC001  # Cannot understand: it would not name a file
        path = self.folder / self.study_uid / f"{sop_uid}.dcm"
        spool.write_atomic(path, event.encoded_dataset(), durable=False)
        self.files.append(path)
        return _SUCCESS


def _copy_one(assoc: Association, copier: _Copier, study_uid: str) -> StudyCopy:
    found = [
        identifier
        for status, identifier in assoc.send_c_find(_study_query(study_uid), StudyRootQueryRetrieveInformationModelFind)
        if status and status.get("Status") in _PENDING and identifier is not None
    ]
    if not found:
        return StudyCopy(study_uid, problem="not found on the PACS")
    copier.study_uid, copier.files = study_uid, []
    final: Dataset | None = None
    for status, _ in assoc.send_c_get(_study_query(study_uid), StudyRootQueryRetrieveInformationModelGet):
        if status and status.get("Status") not in _PENDING:
            final = status
    code = None if final is None else int(final.Status)
    if code is None:
        problem = "no C-GET response (association lost)"
    elif code == _WARNING:
        problem = f"{int(final.get('NumberOfFailedSuboperations', 0))} instance(s) not copied (not images)"
    elif code != _SUCCESS:
        problem = f"C-GET failed with status 0x{code:04X}"
    else:
        problem = ""
    return StudyCopy(study_uid, copier.files, problem)


def copy_studies(pacs: Destination, study_uids: Sequence[str], folder: Path, settings: Settings) -> Iterator[StudyCopy]:
    """Copy each study's images into ``folder/<study UID>/``, one association for
    all; yield each study's outcome as it is done. Raises :class:`PacsUnavailable`."""
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = ae.network_timeout = 30
    ae.dimse_timeout = 120
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    # A context per transfer syntax: the PACS accepts one syntax per context and
    # sends each image in the syntax it holds it in (it need not transcode).
    for sop_class in STORAGE_SOP_CLASSES:
        for syntax in TRANSFER_SYNTAXES:
            ae.add_requested_context(sop_class, syntax)
    roles = [build_role(sop_class, scp_role=True) for sop_class in STORAGE_SOP_CLASSES]
    copier = _Copier(folder)
    try:
        assoc = ae.associate(
            pacs.host,
            pacs.port,
            ae_title=pacs.ae_title,
            ext_neg=roles,
            evt_handlers=[(evt.EVT_C_STORE, copier.on_store)],
            tls_args=dicom_tls.client_args(settings, pacs),
        )
    except OSError as exc:
        raise PacsUnavailable(f"cannot reach {pacs}: {exc}") from exc
    if not assoc.is_established:
        why = "rejected the association" if assoc.is_rejected else "is not answering"
        raise PacsUnavailable(f"{pacs} {why}")
    try:
        for study_uid in study_uids:
            if not assoc.is_established:
                raise PacsUnavailable(f"{pacs} ended the association")
            outcome = _copy_one(assoc, copier, study_uid)
            LOG.info(
                "copied %d instance(s) from %s%s",
                len(outcome.files),
                pacs,
                f": {outcome.problem}" if outcome.problem else "",
                extra={"study_uid": study_uid},
            )
            yield outcome
    finally:
        if assoc.is_established:
            assoc.release()
