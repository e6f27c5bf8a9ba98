"""Delivery over DICOMweb: one STOW-RS request per study, an outcome per object.

:func:`store_study` posts a study's objects with ``dicomweb-client`` and turns
whatever comes back (the PS3.18 response, an HTTP error, a dropped connection) into
one :class:`StowOutcome` per SOP Instance UID; :func:`stow_outcomes` is the pure
reading of the response. :class:`StowTransport` is the sender's transport for a
DICOMweb destination: it records each outcome in the outbox as the C-STORE
transport records a status.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset

from service.common import dicomweb
from service.delivery.transport import OutcomeRecorder, Row, Transport
from service.reports.build import OPTIONAL_CLASSES
from service.reports.sr import SR_CLASSES
from service.settings import DicomWebDestination, Settings

#: Failure Reason (0008,1197) values of PS3.18 Table I.2-2 and what they mean.
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0xC122: "transfer syntax not supported",
}
_FAILURE_RANGES = (
    (0xA700, 0xA7FF, "out of resources"),
    (0xA900, 0xA9FF, "data set does not match SOP class"),
    (0xC000, 0xCFFF, "cannot understand"),
)
#: Warning Reason (0008,1196) values (PS3.18 Table I.2-1): stored all the same.
WARNING_REASONS = {
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}
SOP_CLASS_NOT_SUPPORTED = 0x0122


@dataclass(frozen=True)
class StowOutcome:
    """What became of one object: stored (perhaps with a warning) or not, and why."""

    stored: bool
    reason: str = ""
    failure_reason: int | None = None


def failure_text(code: int) -> str:
    """A Failure Reason as words, with its code."""
    text = FAILURE_REASONS.get(code) or next((t for lo, hi, t in _FAILURE_RANGES if lo <= code <= hi), "failure")
    return f"{text} (Failure Reason 0x{code:04X})"


def stow_outcomes(http_status: int, response: Dataset, sent: Sequence[str]) -> dict[str, StowOutcome]:
    """Each sent SOP Instance UID's outcome from a STOW-RS response (PS3.18 10.5.3).

    An object is stored when the response's Referenced SOP Sequence lists it, or
    when the status is 200 (all stored) and the Failed SOP Sequence does not; it
    failed with its Failure Reason when listed there; otherwise it is not known to
    be stored, and is sent again (storing it twice is harmless).
    """
    referenced = {
        str(item.get("ReferencedSOPInstanceUID", "")): item for item in response.get("ReferencedSOPSequence", [])
    }
    failed = {str(item.get("ReferencedSOPInstanceUID", "")): item for item in response.get("FailedSOPSequence", [])}
    outcomes = {}
    for uid in sent:
        if uid in failed:
            code = int(failed[uid].get("FailureReason", 0x0110))
            outcomes[uid] = StowOutcome(False, failure_text(code), code)
        elif uid in referenced:
            warning = referenced[uid].get("WarningReason")
            text = (
                ""
                if warning is None
                else f"{WARNING_REASONS.get(int(warning), 'warning')} (Warning Reason 0x{int(warning):04X})"
            )
            outcomes[uid] = StowOutcome(True, text)
        elif http_status == HTTPStatus.OK:
            outcomes[uid] = StowOutcome(True)
        else:
            outcomes[uid] = StowOutcome(False, f"HTTP {http_status}, and the response does not list it")
    return outcomes


def _response_dataset(response: requests.Response) -> Dataset:
    """The PS3.18 response of a failed request, or an empty data set when it has none
    (read whatever its Content-Type: Orthanc's 409 names none)."""
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, AttributeError):  # no body, not JSON, or not the JSON of a data set
        return Dataset()


def store_study(web: DICOMwebClient, study_uid: str, datasets: Sequence[Dataset]) -> dict[str, StowOutcome]:
    """POST ``datasets`` to ``studies/{study_uid}``; an outcome per SOP Instance UID."""
    sent = [str(ds.SOPInstanceUID) for ds in datasets]
    try:
        response = web.store_instances(datasets, study_instance_uid=study_uid)
    except requests.HTTPError as exc:  # 409 (none stored) and every other failure status
        answer = exc.response
        if answer is None:
            return {uid: StowOutcome(False, f"HTTP error: {exc}") for uid in sent}
        outcomes = stow_outcomes(answer.status_code, _response_dataset(answer), sent)
        unlisted = StowOutcome(False, f"HTTP {answer.status_code} {answer.reason}")
        return {uid: o if o.stored or o.failure_reason is not None else unlisted for uid, o in outcomes.items()}
    except requests.RequestException as exc:  # refused, timed out, dropped mid-upload
        return {uid: StowOutcome(False, f"no answer: {type(exc).__name__}: {exc}") for uid in sent}
    # dicomweb-client raises for every status >= 400; what is left is 200 or 202.
    status = HTTPStatus.ACCEPTED if response.get("FailedSOPSequence") else HTTPStatus.OK
    return stow_outcomes(status, response, sent)


class StowTransport(Transport[DicomWebDestination]):
    """A DICOMweb destination (its base URL): the group in one STOW-RS request; each
    object's outcome is recorded on its own, so a partly stored request resends only
    what was not stored."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def read(self, path: str) -> Dataset:
        """The whole data set: STOW-RS posts it."""
        return dcmread(path)

    def deliver(
        self,
        dest: DicomWebDestination,
        study_uid: str,
        rows: list[Row],
        read: dict[str, Dataset],
        outcomes: OutcomeRecorder,
    ) -> int:
        try:
            web = dicomweb.client(self.settings, dest)
        except ValueError as exc:  # an unreadable secret file: every try fails the same way, visibly
            for row in rows:
                outcomes.failed(row, f"{dest}: {exc}")
            return 0
        stowed = store_study(web, study_uid, [read[row["sop_instance_uid"]] for row in rows])
        accepted = 0
        for row in rows:
            outcome = stowed[row["sop_instance_uid"]]
            if outcome.stored:
                accepted += outcomes.accepted(dest, row, outcome.reason)
            elif outcome.failure_reason == SOP_CLASS_NOT_SUPPORTED and row["sop_class_uid"] in SR_CLASSES:
                # Rebuilt in the next SR class, sent in the next round (soon: the row stays due).
                outcomes.fallback(dest, row, set(SR_CLASSES[SR_CLASSES.index(row["sop_class_uid"]) + 1 :]))
            elif outcome.failure_reason == SOP_CLASS_NOT_SUPPORTED and row["sop_class_uid"] in OPTIONAL_CLASSES:
                outcomes.skipped(dest, row)
            else:
                outcomes.failed(row, f"{dest} did not store {row['sop_instance_uid']}: {outcome.reason}")
        return accepted
