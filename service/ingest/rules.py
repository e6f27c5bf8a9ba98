"""The receiver's rules: pure functions that judge what a peer sends.

Parse an encoded data set without decoding its pixels, judge it against the
C-STORE request and the modality policy, judge a caller, apply back-pressure, and
encode the file meta group a spool file starts with. No network and no disk here;
:mod:`service.ingest.store` applies these rules, the engines in
:mod:`service.ingest.server` and :mod:`service.ingest.fast` carry them to the wire.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from io import BytesIO

from pydicom.dataelem import RawDataElement
from pydicom.filereader import data_element_generator
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    EnhancedUSVolumeStorage,
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
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
)
from pynetdicom import register_uid
from pynetdicom.service_class import StorageServiceClass

from service.common.deflate import (
    InflatedTooLarge,
    InflateError,
    inflate,
    inflated_size,
)
from service.ingest.nesting import MAX_SEQUENCE_DEPTH, too_deep
from service.settings import Settings

#: Identifies the software that wrote our files (PS3.7 D.3.3.2); a UUID-derived
#: UID (PS3.5 B.2) because the project has no registered root.
IMPLEMENTATION_CLASS_UID = "2.25.242059410395934624218930311384893412713"
IMPLEMENTATION_VERSION_NAME = "SONOCASE_010"
#: The longest PDU peers may send us (our A-ASSOCIATE maximum length).
MAX_PDU_BYTES = 1 << 20
#: How far a PDU may exceed the maximum length we negotiated (PS3.8 D.1: it counts
#: the PDVs' data, some peers count their headers too) before it is refused.
PDU_MARGIN = 64 << 10

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
    implementation; we use five so a peer's log tells the causes apart. None of
    them invites a retry: sending the same data set again cannot help.
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
    #: Error: Cannot understand: larger than this node takes (``max_dataset_mb``,
    #: after inflating a deflated data set).
    TOO_LARGE = 0xC003
    #: Error: Cannot understand: sequences nested deeper than this node reads.
    TOO_DEEP = 0xC004
    #: Failure: Processing failure (an error of ours, not of the data set).
    PROCESSING_FAILURE = 0x0110


#: A-ASSOCIATE-RJ Result, Source and Reason (PS3.8 Table 9-21): a caller we do not
#: serve is rejected permanent by the service user; one beyond max_associations
#: transient by the presentation layer, "local limit exceeded" (try again later).
REJECTED_PERMANENT = 0x01
REJECTED_TRANSIENT = 0x02
SOURCE_SERVICE_USER = 0x01
SOURCE_PROVIDER_PRESENTATION = 0x03
LOCAL_LIMIT_EXCEEDED = 0x02


class RejectReason(IntEnum):
    """A-ASSOCIATE-RJ Reason/Diag. for source "service user" (PS3.8 Table 9-21)."""

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


def parse_instance(raw: bytes | memoryview, transfer_syntax: str, max_inflated: int) -> ParsedInstance:
    """Read the needed attributes from an encoded data set without decoding pixels.

    Walks every top-level element header (values skipped, undefined-length pixel
    data checked for its delimiter), so a truncated or garbled data set is caught
    here rather than by the worker. A deflated data set is inflated to at most
    ``max_inflated`` bytes. Raises :class:`InvalidInstance`.
    """
    if not raw:
        raise InvalidInstance(StoreStatus.CANNOT_UNDERSTAND, "empty data set")
    syntax = UID(transfer_syntax)
    data = raw
    if syntax == DeflatedExplicitVRLittleEndian:
        data = inflate_data_set(raw, max_inflated)
    if too_deep(data, syntax.is_implicit_VR, syntax.is_little_endian):
        # what the worker could not read is refused now, not failed after Success
        raise InvalidInstance(StoreStatus.TOO_DEEP, f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels")
    fp = BytesIO(data)
    values: dict[str, str] = {}
    end = 0
    try:
        for elem in data_element_generator(fp, syntax.is_implicit_VR, syntax.is_little_endian, defer_size=_DEFER_BYTES):
            raw_elem = isinstance(elem, RawDataElement)  # undefined-length sequences come parsed
            if isinstance(elem, RawDataElement) and elem.length != _UNDEFINED_LENGTH:
                end = elem.value_tell + elem.length
            else:
                end = fp.tell()
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


def inflate_data_set(raw: bytes | memoryview, max_inflated: int) -> bytes:
    """A deflated data set's bytes inflated, at most ``max_inflated`` of them."""
    with _inflate_refusals():
        return inflate(raw, max_inflated)


def inflated_data_set_size(raw: bytes | memoryview, max_inflated: int) -> int:
    """The inflated size of a deflated data set, at most ``max_inflated`` (constant memory)."""
    with _inflate_refusals():
        return inflated_size(raw, max_inflated)


@contextmanager
def _inflate_refusals() -> Iterator[None]:
    try:
        yield
    except InflatedTooLarge as exc:
        raise InvalidInstance(StoreStatus.TOO_LARGE, f"{exc} (max_dataset_mb)") from None
    except InflateError as exc:
        raise InvalidInstance(StoreStatus.CANNOT_UNDERSTAND, str(exc)) from None


def too_large(size: int, max_bytes: int) -> InvalidInstance | None:
    """A data set of ``size`` bytes is refused beyond ``max_bytes`` (``max_dataset_mb``)."""
    if size <= max_bytes:
        return None
    return InvalidInstance(StoreStatus.TOO_LARGE, f"data set larger than {max_bytes >> 20} MB (max_dataset_mb)")


def check_request(
    inst: ParsedInstance,
    affected_sop_class: str,
    affected_sop_instance: str,
    study_uid: str | None = None,
) -> None:
    """The data set must be the one the C-STORE request announces (PS3.4 B.2.3) and,
    when the request names a study (STOW-RS to ``/studies/{study}``), of that study."""
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
    if study_uid is not None and inst.study_uid != study_uid:
        raise InvalidInstance(
            StoreStatus.INVALID_UID,
            f"data set Study Instance UID differs from the request's {study_uid}",
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


def check_association(calling_ae: str, called_ae: str, settings: Settings) -> Rejection | None:
    """Who may send to us: our own AE title must be called; the allow-list of
    calling AE titles applies when it is not empty. (Peer addresses are judged
    before anything is read: :func:`host_allowed`.)"""
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
    return None


def _element(group_elem: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of the file meta group."""
    tag = struct.pack("<HH", group_elem >> 16, group_elem & 0xFFFF)
    if vr == b"OB":  # the only long-form VR in the file meta group
        return tag + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def pad(text: str, padding: bytes) -> bytes:
    """ASCII ``text`` padded to an even length, as every DICOM value is."""
    data = text.encode("ascii")
    return data + padding if len(data) % 2 else data


def error_comment(text: str) -> str:
    """A reason as an Error Comment (0000,0902): LO, at most 64 characters from the
    default character repertoire."""
    return text[:64].encode("ascii", "replace").decode()


def encode_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, ``DICM`` and the file meta group (PS3.10 7.1) for a received data set.

    Encoded directly: building it through a pydicom Dataset costs more than the
    rest of the C-STORE handler together.
    """
    body = b"".join(
        (
            _element(0x00020001, b"OB", b"\0\1"),
            _element(0x00020002, b"UI", pad(sop_class_uid, b"\0")),
            _element(0x00020003, b"UI", pad(sop_instance_uid, b"\0")),
            _element(0x00020010, b"UI", pad(transfer_syntax, b"\0")),
            _element(0x00020012, b"UI", pad(IMPLEMENTATION_CLASS_UID, b"\0")),
            _element(0x00020013, b"SH", pad(IMPLEMENTATION_VERSION_NAME, b" ")),
            _element(0x00020016, b"AE", pad(source_ae, b" ")),
        )
    )
    return b"\0" * 128 + b"DICM" + _element(0x00020000, b"UL", struct.pack("<I", len(body))) + body
