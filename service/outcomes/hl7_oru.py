"""Outcomes from HL7 v2 ORU^R01 messages, and the ACK each message gets.

What a message must hold (docs/it-guide.md has the full conformance): per OBR
group, the imaging study by its accession number in OBR-18 (Placer Field 1, where
IHE Scheduled Workflow carries it; OBR-2/3 number the pathology order itself, so
they are never read as the study's) or by an OBX
``110180^Study Instance UID^DCM``; the outcome as an OBX ``22637-3^Pathology report
final diagnosis^LN`` whose value starts with benign, malignant or stable; the
lesion's laterality (OBX ``272741003^Laterality^SCT``: L/R/left/right) and clock
position (OBX ``CLOCK^Clock position^L``) where known; the date from OBR-7.

The ACK follows HL7's original acknowledgment mode (table 0008): ``AA`` when the
outcomes are stored; ``AE`` when the message is an ORU^R01 whose content is wrong
(sending it again unchanged will not help; it is kept for inspection); ``AR`` when
it is not a message this receiver takes (not HL7, another type), or the node
cannot store it now (the sender should try again). Error ACKs carry the reason in
MSA-3 and an ERR segment (HL7 table 0357 code, severity E).
"""

from __future__ import annotations

from dataclasses import dataclass

import hl7

from service.ledger import Outcome
from service.outcomes.records import clock_position, laterality, outcome_date

FINDING_CODE = "22637-3"
LATERALITY_CODE = "272741003"
CLOCK_CODE = "CLOCK"
STUDY_UID_CODE = "110180"
#: HL7 table 0357 message error condition codes used here.
REQUIRED_FIELD_MISSING, TABLE_VALUE_NOT_FOUND, UNSUPPORTED_MESSAGE_TYPE = "101", "103", "200"
APPLICATION_ERROR = "207"
_ERROR_TEXT = {
    REQUIRED_FIELD_MISSING: "Required field missing",
    TABLE_VALUE_NOT_FOUND: "Table value not found",
    UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    APPLICATION_ERROR: "Application internal error",
}
#: Stands in for a message whose own MSH cannot be read, so the ACK still has one.
_NO_HEADER = "MSH|^~\\&|||SONOCASE||||ORU^R01|||2.5.1"


class OruError(ValueError):
    """Why a message is not accepted: the ACK code (AE or AR), HL7's error code, and
    a message for the sender."""

    def __init__(self, ack_code: str, error_code: str, text: str) -> None:
        super().__init__(text)
        self.ack_code, self.error_code = ack_code, error_code


@dataclass(frozen=True)
class Received:
    """One message as the receiver handles it: the parsed message (None: not HL7),
    its control ID, the outcomes (if accepted) and the ACK to answer."""

    message: hl7.Message | None
    control_id: str
    ack_code: str
    error: str | None
    outcomes: tuple[Outcome, ...]
    ack: str


def _field(segment: hl7.Segment, field: int, component: int = 1) -> str:
    try:
        return str(segment.extract_field(1, field, 1, component)).strip()
    except IndexError:  # the field is not there, or has no such component
        return ""


def parse_message(text: str) -> hl7.Message:
    """``text`` as an HL7 message with a header; OruError AR otherwise."""
    try:
        message = hl7.parse(text.strip().replace("\n", "\r"))
        message.segment("MSH")
    except (hl7.ParseException, KeyError, IndexError) as exc:
        raise OruError("AR", UNSUPPORTED_MESSAGE_TYPE, f"not an HL7 v2 message: {exc}") from None
    return message


def outcomes_of(message: hl7.Message) -> tuple[Outcome, ...]:
    """The outcomes of an ORU^R01, one per OBR group; OruError says what is wrong."""
    msh = message.segment("MSH")
    kind = f"{_field(msh, 9, 1)}^{_field(msh, 9, 2)}"
    if kind != "ORU^R01":
        raise OruError("AR", UNSUPPORTED_MESSAGE_TYPE, f"message type {kind} is not taken here, only ORU^R01")
    control_id = _field(msh, 10)
    if not control_id:
        raise OruError("AE", REQUIRED_FIELD_MISSING, "MSH-10 (message control ID) is empty")
    groups: list[list[hl7.Segment]] = []
    for segment in message:
        name = str(segment[0])
        if name == "OBR":
            groups.append([segment])
        elif name == "OBX" and groups:
            groups[-1].append(segment)
    if not groups:
        raise OruError("AE", REQUIRED_FIELD_MISSING, "the message has no OBR segment")
    return tuple(_group_outcome(control_id, number, group) for number, group in enumerate(groups, start=1))


def _group_outcome(control_id: str, number: int, group: list[hl7.Segment]) -> Outcome:
    obr, observations = group[0], {_field(obx, 3): _field(obx, 5) for obx in group[1:]}
    finding = observations.get(FINDING_CODE, "").lower()
    word = next((f for f in ("malignant", "benign", "stable") if finding.startswith(f)), None)
    where = f"OBR {number}"
    if word is None:
        code = TABLE_VALUE_NOT_FOUND if finding else REQUIRED_FIELD_MISSING
        raise OruError("AE", code, f"{where}: no OBX {FINDING_CODE} saying benign, malignant or stable")
    try:
        return Outcome(
            source="hl7",
            reference=f"{control_id}/{number}",
            finding=word,
            accession_number=_field(obr, 18),
            study_uid=observations.get(STUDY_UID_CODE, ""),
            laterality=laterality(observations.get(LATERALITY_CODE, "")),
            clock_position=clock_position(observations.get(CLOCK_CODE, "")),
            outcome_date=outcome_date(_field(obr, 7)),
        )
    except ValueError as exc:
        raise OruError(
            "AE", REQUIRED_FIELD_MISSING if "needs" in str(exc) else TABLE_VALUE_NOT_FOUND, f"{where}: {exc}"
        ) from None


def ack(message: hl7.Message | None, code: str, error_code: str | None = None, text: str = "") -> str:
    """The ACK of ``message`` (None: one whose header could not be read)."""
    try:
        reply = hl7.parse(_NO_HEADER if message is None else str(message)).create_ack(code, application="SONOCASE")
    except (TypeError, IndexError, KeyError):  # a header too short for hl7's create_ack to read
        reply = hl7.parse(_NO_HEADER).create_ack(code, application="SONOCASE")
    if error_code is None:
        return str(reply)
    reply.segment("MSA").assign_field(text[:80], 3)
    err = reply.create_segment([reply.create_field(["ERR"])])
    err.assign_field(error_code, 3, 1, 1)
    err.assign_field(_ERROR_TEXT[error_code], 3, 1, 2)
    err.assign_field("HL70357", 3, 1, 3)
    err.assign_field("E", 4)
    err.assign_field(text, 8)
    reply.append(err)
    return str(reply)


def receive(text: str) -> Received:
    """What to store and answer for one message's text (pure: the shell stores it,
    then sends ``ack``)."""
    message: hl7.Message | None = None
    try:
        message = parse_message(text)
        outcomes = outcomes_of(message)
    except OruError as exc:
        control_id = _field(message.segment("MSH"), 10) if message is not None else ""
        return Received(
            message, control_id, exc.ack_code, str(exc), (), ack(message, exc.ack_code, exc.error_code, str(exc))
        )
    return Received(message, _field(message.segment("MSH"), 10), "AA", None, outcomes, ack(message, "AA"))
