"""The validation gate: nothing leaves the node that a PACS could refuse or misread.

Every object is checked from the exact bytes that would be sent, parsed once:

1. pydicom re-reads it; file meta must agree with the data set; every value must
   be valid for its VR (strict value checking, which pydicom only warns about;
   with ``fast_reports``, once per process for the values and sequences every
   object repeats: the same bytes are the same values).
2. The attributes its IOD requires (PS3.3 Type 1: present and non-empty, Type 2:
   present) are checked module by module for the IODs we write: Comprehensive 3D,
   Comprehensive and Enhanced SR, Secondary Capture, Segmentation and Key Object
   Selection.
3. highdicom reads that same parse: an SR back into its TID 1500 Measurement Report (with at
   least one measurement group, each with an image region on its source image as OHIF reads it
   unless the study had nothing to analyse,
   every referenced object listed as evidence, and only the value types and
   relationships its SOP class allows); an SC into an image whose pixels decode to
   Rows x Columns x 3; a SEG into binary segments over the source it names, with
   the pixel spacing and plane orientation viewers need to overlay it; a KOS into
   its key objects, each listed as evidence. With ``fast_reports``, highdicom reads
   an SR's or KOS's content items and an SC only in shapes it has not accepted
   before in this process (service/reports/shapes.py says what a shape holds); the
   checks of values and our own checks of the content run on every object.
4. Our own promises: the disclaimer is in it, the SR is UNVERIFIED, the SC says
   its annotations are burned in and names its source image.

A failure raises :class:`GateError` with every reason found, so the study's
failure shows all of them at once.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator

import highdicom as hd
import numpy as np
from highdicom.sr.coding import CodedConcept
from pydicom import config, dcmread
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from pydicom.valuerep import validate_value

from service.common.errors import error_text
from service.reports.construction import iod_lookups_cached, key_object_selection
from service.reports.shapes import (
    ContentShapes,
    Shape,
    content_shapes,
    image_shape,
    is_known,
    read_new_shapes,
    remember,
)


class GateError(ValueError):
    """An object that must not be sent; ``reasons`` lists every problem found."""

    def __init__(self, what: str, reasons: list[str]) -> None:
        self.reasons = reasons
        super().__init__(f"{what} failed validation: " + "; ".join(reasons))


# --- the IODs' required attributes (PS3.3), keyword -> Type ---------------------
_PATIENT = {"PatientName": 2, "PatientID": 2, "PatientBirthDate": 2, "PatientSex": 2}
_GENERAL_STUDY = {
    "StudyInstanceUID": 1,
    "StudyDate": 2,
    "StudyTime": 2,
    "ReferringPhysicianName": 2,
    "StudyID": 2,
    "AccessionNumber": 2,
}
_SOP_COMMON = {"SOPClassUID": 1, "SOPInstanceUID": 1}
#: General Equipment is Type 2; we require the Enhanced General Equipment set
#: (Type 1) everywhere, because it is what traces an object to our node.
_EQUIPMENT = {"Manufacturer": 1, "ManufacturerModelName": 1, "DeviceSerialNumber": 1, "SoftwareVersions": 1}
_SR_DOCUMENT = {
    "Modality": 1,
    "SeriesInstanceUID": 1,
    "SeriesNumber": 1,
    "ReferencedPerformedProcedureStepSequence": 2,
    "InstanceNumber": 1,
    "CompletionFlag": 1,
    "VerificationFlag": 1,
    "ContentDate": 1,
    "ContentTime": 1,
    "PerformedProcedureCodeSequence": 2,
    "ValueType": 1,
    "ConceptNameCodeSequence": 1,
    "ContinuityOfContent": 1,
    "ContentSequence": 1,
    "ContentTemplateSequence": 1,
}
#: Image Pixel module (C.7.6.3), in every image IOD we write.
_IMAGE_PIXEL = {
    "SamplesPerPixel": 1,
    "PhotometricInterpretation": 1,
    "Rows": 1,
    "Columns": 1,
    "BitsAllocated": 1,
    "BitsStored": 1,
    "HighBit": 1,
    "PixelRepresentation": 1,
}
_SECONDARY_CAPTURE = {
    "Modality": 1,
    "SeriesInstanceUID": 1,
    "SeriesNumber": 2,
    "Laterality": 2,
    "ConversionType": 1,
    "InstanceNumber": 2,
    "PatientOrientation": 2,
    "BurnedInAnnotation": 1,
    "SourceImageSequence": 1,
    **_IMAGE_PIXEL,
    "PlanarConfiguration": 1,
    "PixelData": 1,
}
#: Segmentation IOD (A.51): series, General Image, Image Pixel, Segmentation Image,
#: Multi-frame Functional Groups and Dimension, Common Instance Reference.
_SEGMENTATION = {
    "Modality": 1,
    "SeriesInstanceUID": 1,
    "SeriesNumber": 1,
    "InstanceNumber": 1,
    "PatientOrientation": 2,
    "ImageType": 1,
    "ContentLabel": 1,
    "ContentDescription": 2,
    "ContentCreatorName": 2,
    **_IMAGE_PIXEL,
    "LossyImageCompression": 1,
    "SegmentationType": 1,
    "SegmentSequence": 1,
    "SharedFunctionalGroupsSequence": 1,
    "PerFrameFunctionalGroupsSequence": 1,
    "NumberOfFrames": 1,
    "ContentDate": 1,
    "ContentTime": 1,
    "DimensionOrganizationSequence": 1,
    "DimensionIndexSequence": 1,
    "ReferencedSeriesSequence": 1,
    "PixelData": 1,
}
#: Key Object Selection Document IOD (A.59): series, document, SR content.
_KEY_OBJECTS = {
    "Modality": 1,
    "SeriesInstanceUID": 1,
    "SeriesNumber": 1,
    "ReferencedPerformedProcedureStepSequence": 2,
    "InstanceNumber": 1,
    "ContentDate": 1,
    "ContentTime": 1,
    "CurrentRequestedProcedureEvidenceSequence": 1,
    "ValueType": 1,
    "ConceptNameCodeSequence": 1,
    "ContinuityOfContent": 1,
    "ContentSequence": 1,
    "ContentTemplateSequence": 1,
}
_COMMON = {**_PATIENT, **_GENERAL_STUDY, **_SOP_COMMON, **_EQUIPMENT}
REQUIRED: dict[str, dict[str, int]] = {
    Comprehensive3DSRStorage: {**_COMMON, **_SR_DOCUMENT},
    ComprehensiveSRStorage: {**_COMMON, **_SR_DOCUMENT},
    EnhancedSRStorage: {**_COMMON, **_SR_DOCUMENT},
    SecondaryCaptureImageStorage: {**_COMMON, **_SECONDARY_CAPTURE},
    SegmentationStorage: {**_COMMON, **_SEGMENTATION},
    KeyObjectSelectionDocumentStorage: {**_COMMON, **_KEY_OBJECTS},
}
#: Value types each SR SOP class allows (PS3.3 A.35.2, A.35.3, A.35.13).
_SR_VALUE_TYPES = {
    EnhancedSRStorage: {
        "TEXT",
        "CODE",
        "NUM",
        "DATETIME",
        "DATE",
        "TIME",
        "UIDREF",
        "PNAME",
        "COMPOSITE",
        "IMAGE",
        "WAVEFORM",
        "SCOORD",
        "TCOORD",
        "CONTAINER",
    },
}
_SR_VALUE_TYPES[ComprehensiveSRStorage] = _SR_VALUE_TYPES[EnhancedSRStorage]
_SR_VALUE_TYPES[Comprehensive3DSRStorage] = _SR_VALUE_TYPES[EnhancedSRStorage] | {"SCOORD3D", "TABLE"}
#: highdicom's reader of each SR class.
_HIGHDICOM_SR = {
    Comprehensive3DSRStorage: hd.sr.Comprehensive3DSR,
    ComprehensiveSRStorage: hd.sr.ComprehensiveSR,
    EnhancedSRStorage: hd.sr.EnhancedSR,
}
#: The value types by which a key object selection's root selects an object (highdicom's ``get_references``).
_REFERENCE_VALUE_TYPES = frozenset({"IMAGE", "COMPOSITE", "WAVEFORM"})


def check_object(data: bytes, disclaimer: str, fast: bool = False) -> Dataset:
    """Run the gate on an encoded object; return the parsed data set or raise.
    ``fast`` (setting ``fast_reports``): values found valid in earlier objects are
    not checked again (:data:`_VALID`); highdicom reads what of an SR, key-image
    flag or capture has a shape it has not accepted before (service/reports/shapes.py;
    the shapes are taken before the VR checks convert the elements), and a key-image
    flag without its copy of the whole document (:func:`key_object_selection`). The
    data set returned is then not always converted by highdicom."""
    try:
        ds = dcmread(io.BytesIO(data), force=False)
    except (InvalidDicomError, EOFError, ValueError, KeyError) as exc:
        raise GateError("object", [f"pydicom cannot read it: {error_text(exc)}"]) from None
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        raise GateError("object", ["its file meta information is missing or cut short"])
    what = f"{ds.get('SOPClassUID', 'object')!s} {ds.get('SOPInstanceUID', '?')}"
    sop_class = str(ds.get("SOPClassUID", ""))
    if not sop_class:
        raise GateError(what, ["SOPClassUID is missing: the object is truncated or not a composite instance"])
    if sop_class not in REQUIRED:
        raise GateError(what, [f"SOP class {sop_class} is not one we produce"])
    read = sop_class in _HIGHDICOM_SR or sop_class == KeyObjectSelectionDocumentStorage
    shapes = content_shapes(ds) if fast and read else None
    image = image_shape(ds) if fast and sop_class == SecondaryCaptureImageStorage else None
    reasons = _file_meta(ds) + _values(ds, fast) + _required(ds, REQUIRED[sop_class], fast)
    if not reasons:  # deeper checks need the required attributes in place (and may convert ds in place)
        if sop_class == KeyObjectSelectionDocumentStorage:
            reasons += _kos(ds, disclaimer, fast, shapes)
        elif sop_class in _HIGHDICOM_SR:
            reasons += _sr(ds, disclaimer, shapes)
        elif sop_class == SecondaryCaptureImageStorage:
            reasons += _sc(ds, disclaimer, fast, image)
        else:
            reasons += _seg(ds, disclaimer)
    if reasons:
        raise GateError(what, reasons)
    return ds


def _file_meta(ds: Dataset) -> list[str]:
    meta = ds.file_meta
    reasons = []
    if meta.get("MediaStorageSOPClassUID") != ds.get("SOPClassUID"):
        reasons.append("Media Storage SOP Class UID differs from SOP Class UID")
    if meta.get("MediaStorageSOPInstanceUID") != ds.get("SOPInstanceUID"):
        reasons.append("Media Storage SOP Instance UID differs from SOP Instance UID")
    return reasons


#: VRs of binary data (pixels): no value to check.
_BINARY_DATA_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV"})
#: VRs whose values are not checked: sequences (their items are), binary data, unknown.
_UNCHECKED_VRS = _BINARY_DATA_VRS | {"SQ", "UN"}
#: VRs of binary numbers (their range and count are checked).
_NUMBER_VRS = frozenset({"AT", "FL", "FD", "SL", "SS", "SV", "UL", "US", "UV"})
#: VRs whose value is text: the bytes decoded in the object's character set.
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
#: Values found valid, as encoded: (VR, character set, bytes) of a text value, of
#: binary numbers (an image's size and depth) or of a whole sequence (every value in
#: its items valid) in explicit VR little endian. The
#: same bytes in the same character set are the same values, so what every object of
#: ours repeats (codes and their meanings, the device, the model, the disclaimer, the
#: SEG's segments) is converted by pydicom and checked once per process rather than
#: in each object. A value not seen valid before is checked in full.
_VALID: set[tuple[str, str, bytes]] = set()
#: Values longer than this are not remembered (a report's whole content never repeats;
#: a SEG's segments take 1.5 KiB): at most about 40 MB remembered.
_VALID_MAX_BYTES = 2048
#: Beyond this many remembered values the memory starts again (UIDs never repeat).
_VALID_LIMIT = 20_000


def _values(ds: Dataset, remember: bool, path: str = "", charset: str = "") -> list[str]:
    """Strict VR checks of every value (lengths, characters, UID and date syntax),
    in ``ds`` and its items; with ``remember``, a value or sequence already found
    valid (:data:`_VALID`) is not checked again, and one found valid is remembered."""
    if "SpecificCharacterSet" in ds:
        charset = str(ds.SpecificCharacterSet)
    reasons: list[str] = []
    for raw in ds.elements():
        if remember and isinstance(raw, RawDataElement) and raw.VR in _BINARY_DATA_VRS:
            continue  # no value check (:data:`_UNCHECKED_VRS`): not converted either
        seen = _encoded(raw, charset) if remember else None
        if seen is not None and seen in _VALID:
            continue
        elem = ds[raw.tag]
        where = f"{path}{elem.keyword or elem.tag}"
        if elem.VR == "SQ":
            found = [r for n, item in enumerate(elem.value) for r in _values(item, remember, f"{where}[{n}].", charset)]
        else:
            reason = _value_reason(elem, where)
            found = [] if reason is None else [reason]
        reasons += found
        if not found and seen is not None and seen[0] == elem.VR:  # valid as the VR it was read with
            if len(_VALID) >= _VALID_LIMIT:
                _VALID.clear()
            _VALID.add(seen)
    return reasons


def _encoded(raw: DataElement | RawDataElement, charset: str) -> tuple[str, str, bytes] | None:
    """The key of a text value, binary number or sequence not yet converted (:data:`_VALID`), or None."""
    if (
        not isinstance(raw, RawDataElement)
        or (raw.VR not in _TEXT_VRS and raw.VR not in _NUMBER_VRS and raw.VR != "SQ")
        or raw.is_implicit_VR
        or not raw.is_little_endian
        or not isinstance(raw.value, bytes)
        or len(raw.value) > _VALID_MAX_BYTES
    ):
        return None
    return raw.VR, charset, raw.value


def _value_reason(elem: DataElement, where: str) -> str | None:
    """Why one element's value is not valid for its VR, or None."""
    if elem.VR in _UNCHECKED_VRS or elem.value is None:
        return None
    values = elem.value if elem.VM > 1 else [elem.value]
    for value in values:
        if elem.VR in ("DS", "IS", "PN"):  # pydicom's value classes: check their text
            value = getattr(value, "original_string", None) or str(value)
        try:
            validate_value(elem.VR, value, config.RAISE)
        except ValueError as exc:  # pydicom's text may quote the value: name the attribute only
            return f"{where} is not a valid {elem.VR}" + (" (too long)" if "length" in str(exc) else "")
    return None


def _required(ds: Dataset, required: dict[str, int], fast: bool) -> list[str]:
    reasons = []
    for keyword, kind in required.items():
        if keyword not in ds:
            reasons.append(f"{keyword} (Type {kind}) is missing")
        elif kind == 1 and _is_empty(ds, keyword, fast):
            reasons.append(f"{keyword} (Type 1) is empty")
    return reasons


#: A letter or digit: text holding one is not empty however pydicom strips it.
_ALPHANUMERIC = re.compile(rb"[0-9A-Za-z]")


def _is_empty(ds: Dataset, keyword: str, fast: bool) -> bool:
    """Whether the element has no value; with ``fast``, an element still raw whose
    bytes say so is not converted (no bytes; a sequence with an item, binary data,
    text with a letter or digit): the checks that remember values leave many raw."""
    raw = ds.get_item(keyword)
    if fast and isinstance(raw, RawDataElement) and not raw.is_implicit_VR:
        if not raw.value:
            return True
        if raw.VR == "SQ" or raw.VR in _BINARY_DATA_VRS:
            return False
        if raw.VR in _TEXT_VRS and _ALPHANUMERIC.search(raw.value):
            return False
    return bool(ds[keyword].is_empty)


def _is_located(group: Dataset) -> bool:
    """Whether a measurement group carries coordinates on a referenced image: a
    number inferred from a SCOORD selected from an image, what OHIF reads to place
    the group and rehydrate it as a tool."""
    return any(
        child.get("ValueType") == "SCOORD"
        and any("ReferencedSOPSequence" in source for source in child.get("ContentSequence", []))
        for number in group.get("ContentSequence", [])
        if number.get("ValueType") == "NUM"
        for child in number.get("ContentSequence", [])
    )


#: Tags the content checks look up in every item.
_REFERENCED_CONTENT_ITEM = Tag("ReferencedContentItemIdentifier")
_TEXT_VALUE = Tag("TextValue")


def _text_is(item: Dataset, text: str) -> bool:
    """Whether the item's Text Value is ``text``; one whose encoded bytes are fewer
    than its characters (no character set decodes to more) is not converted."""
    raw = item.get_item(_TEXT_VALUE) if _TEXT_VALUE in item else None
    if raw is None or (isinstance(raw, RawDataElement) and len(raw.value or b"") < len(text)):
        return False
    return bool(item[_TEXT_VALUE].value == text)


def _concept_name(item: Dataset) -> CodedConcept:
    """The item's concept name as highdicom reads it (``get_coded_name``), without its copy of the code."""
    return CodedConcept.from_dataset(item.ConceptNameCodeSequence[0], copy=False)


def _content_items(items: list[Dataset]) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from _content_items(item.get("ContentSequence", []))


def _sr(ds: Dataset, disclaimer: str, shapes: ContentShapes | None) -> list[str]:
    """The SR's content: ``shapes`` (fast only) spare highdicom's reader a tree it accepted before."""
    reasons = []
    if ds.Modality != "SR":
        reasons.append(f"Modality is {ds.Modality}, not SR")
    if ds.VerificationFlag != "UNVERIFIED":
        reasons.append("an AI result must be UNVERIFIED")
    allowed = _SR_VALUE_TYPES[ds.SOPClassUID]
    enhanced = ds.SOPClassUID == EnhancedSRStorage
    items = list(_content_items(ds.ContentSequence))
    value_types = [item.get("ValueType") for item in items]
    for item, value_type in zip(items, value_types, strict=True):
        by_reference = _REFERENCED_CONTENT_ITEM in item
        if by_reference and enhanced:
            reasons.append("Enhanced SR does not allow by-reference relationships")
        elif value_type not in allowed and not by_reference:
            reasons.append(f"value type {value_type} is not allowed in this SR class")
    if not any(_text_is(item, disclaimer) for item in items):
        reasons.append("the disclaimer is not in the content")
    try:  # highdicom's reader of the whole TID 1500 tree; the groups are checked below on its parse
        read_new_shapes(shapes, lambda: _HIGHDICOM_SR[ds.SOPClassUID].from_dataset(ds, copy=False))  # converts ds
    except (ValueError, TypeError, AttributeError, RuntimeError, KeyError) as exc:
        return [*reasons, f"highdicom cannot parse it as a TID 1500 Measurement Report: {error_text(exc)}"]
    groups = [
        item
        for item, value_type in zip(items, value_types, strict=True)
        if value_type == "CONTAINER" and _concept_name(item) == codes.DCM.MeasurementGroup
    ]
    if not groups:
        reasons.append("the report has no measurement group")
    drawn = [_is_located(group) for group in groups]
    if any(drawn):  # else groups without coordinates only: nothing to draw, nothing to break
        reasons += [
            f"measurement group {n} has no coordinates on a source image, beside groups with them "
            "(OHIF draws none of the report then)"
            for n, region in enumerate(drawn, start=1)
            if not region
        ]
    return reasons + _evidence(ds, items)


def _evidence(ds: Dataset, items: list[Dataset]) -> list[str]:
    """Every object an IMAGE or COMPOSITE item references is listed as evidence
    (Current Requested Procedure or Pertinent Other Evidence Sequence)."""
    evidence = {
        instance.ReferencedSOPInstanceUID
        for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence")
        for study in ds.get(keyword, [])
        for series in study.get("ReferencedSeriesSequence", [])
        for instance in series.get("ReferencedSOPSequence", [])
    }
    return [
        f"referenced instance {uid} is not listed as evidence"
        for item in items
        if item.get("ValueType") in ("IMAGE", "COMPOSITE")
        for uid in [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID]
        if uid not in evidence
    ]


def _seg(ds: Dataset, disclaimer: str) -> list[str]:
    reasons = []
    if ds.Modality != "SEG":
        reasons.append(f"Modality is {ds.Modality}, not SEG")
    if ds.SegmentationType != "BINARY":
        reasons.append(f"Segmentation Type is {ds.SegmentationType}: viewers overlay BINARY segments only")
    if disclaimer not in str(ds.get("ImageComments", "")):
        reasons.append("the disclaimer is not in Image Comments")
    shared = ds.SharedFunctionalGroupsSequence[0]
    for keyword in ("PixelMeasuresSequence", "PlaneOrientationSequence"):
        if keyword not in shared:
            reasons.append(f"the shared functional groups lack {keyword}, which viewers need to overlay it")
    numbers = {int(item.SegmentNumber) for item in ds.SegmentSequence}
    sources = {
        uid
        for series in ds.ReferencedSeriesSequence
        for uid in (i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence)
    }
    for n, frame in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
        try:
            segment = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        except (AttributeError, IndexError, TypeError, ValueError):
            reasons.append(f"frame {n} does not say which segment and source image it is")
            continue
        if segment not in numbers or source not in sources:
            reasons.append(f"frame {n} names segment {segment} or an image the segmentation does not list")
    try:  # highdicom's reader wants a slice thickness, which 2-D ultrasound has not: pydicom decodes
        pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    except (ValueError, TypeError, AttributeError, RuntimeError, NotImplementedError) as exc:
        return [*reasons, f"its pixels cannot be decoded: {error_text(exc)}"]
    if pixels.max(initial=0) > 1:
        reasons.append("its frames are not binary")
    return reasons


def _kos(ds: Dataset, disclaimer: str, fast: bool, shapes: ContentShapes | None) -> list[str]:
    """The key-image flag's content: with ``fast``, highdicom reads a tree of a new
    shape only, and the selected objects are its root's references as
    ``get_references`` finds them in an accepted tree."""
    reasons = []
    if ds.Modality != "KO":
        reasons.append(f"Modality is {ds.Modality}, not KO")
    items = list(_content_items(ds.ContentSequence))
    if not any(disclaimer in str(item.get("TextValue", "")) for item in items):
        reasons.append("the disclaimer is not in the content")
    try:
        if fast:
            read_new_shapes(shapes, lambda: key_object_selection(ds, fast))
            selected = [item for item in ds.ContentSequence if item.ValueType in _REFERENCE_VALUE_TYPES]
        else:
            selected = key_object_selection(ds, fast).get_references()
    except (ValueError, TypeError, AttributeError, RuntimeError, KeyError) as exc:
        return [*reasons, f"highdicom cannot read it as a key object selection: {error_text(exc)}"]
    if not selected:
        reasons.append("it selects no object")
    return reasons + _evidence(ds, items)


def _sc(ds: Dataset, disclaimer: str, fast: bool, shape: Shape | None) -> list[str]:
    """The capture's promises and pixels; with ``fast``, highdicom reads and decodes
    an image of a ``shape`` it has not read before only (service/reports/shapes.py;
    the shape holds the pixel module's values and the pixel data's length), with its
    look-ups of the IOD tables remembered (:func:`iod_lookups_cached`)."""
    reasons = []
    if ds.BurnedInAnnotation != "YES":
        reasons.append("Burned In Annotation must be YES: the class and disclaimer are drawn in")
    if disclaimer not in str(ds.get("ImageComments", "")):
        reasons.append("the disclaimer is not in Image Comments")
    if ds.SamplesPerPixel != 3:
        reasons.append(f"Samples per Pixel is {ds.SamplesPerPixel}, an RGB capture has 3")
    if shape is not None and is_known(shape):
        return reasons
    try:
        with iod_lookups_cached(fast):
            image = hd.Image.from_dataset(ds, copy=False)  # converts ds in place: only read after this
        pixels = image.pixel_array
    except (ValueError, TypeError, AttributeError, RuntimeError, NotImplementedError) as exc:
        return [*reasons, f"highdicom cannot read its pixels: {error_text(exc)}"]
    if pixels.shape != (ds.Rows, ds.Columns, 3) or pixels.dtype != np.uint8:
        reasons.append(f"pixels decode to {pixels.shape} {pixels.dtype}, not {ds.Rows}x{ds.Columns}x3 uint8")
    elif shape is not None:
        remember([shape])
    return reasons
