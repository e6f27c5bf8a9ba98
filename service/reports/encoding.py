"""Our result objects encoded without pydicom's generic writer, to the same bytes.

Why: ``Dataset.save_as(..., enforce_file_format=True)`` spends most of its time per
element on generic work (tag conversions, a buffer per element, ambiguous-VR and
character-set handling) that our objects do not need: encoding was a fifth of the
report stage. :func:`lean_encode` writes the preamble, the file meta (with its group
length) and the data set itself, by VR, with each (tag, VR) header made once.

It covers what our objects are made of: explicit VR little endian, native or
encapsulated pixel data (highdicom's Pixel Data of VR 'OB or OW' resolved as pydicom
resolves it); every standard VR of a known value type, as pydicom's own value writers
format and pad it; sequences and items of defined or undefined length; raw elements
written as read; the default character set, ISO_IR 100 and ISO_IR 192. Anything else
(another transfer syntax, another character set, another ambiguous VR, a value type
or length it does not know, a text its codec cannot encode) makes it
return None, and :func:`encode` lets pydicom encode the whole object: it never
guesses. tests/test_reports_encoding.py compares its bytes with pydicom's. Used with
the setting ``fast_reports`` (see service/reports/construction.py).
"""

from __future__ import annotations

import datetime
import functools
import io
import struct
from collections.abc import Callable, Mapping
from typing import Any

from pydicom import __version_info__
from pydicom.charset import python_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import _format_DA, _format_DT, _format_TM
from pydicom.multival import MultiValue
from pydicom.tag import _LUT_DESCRIPTOR_TAGS, BaseTag, Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, PersonName

#: A value's bytes from (value, Python codec of the data set's character set, tag).
ValueWriter = Callable[[Any, str, int], bytes]
Element = DataElement | RawDataElement


class _Unsupported(Exception):
    """Something the lean writer does not write exactly as pydicom does."""


#: What pydicom does not take as the lean writer does: pydicom encodes (and raises).
_NOT_AS_PYDICOM = (_Unsupported, TypeError, ValueError, struct.error)

_PIXEL_DATA = 0x7FE00010
_OB_OR_OW = "OB or OW"
_EXPLICIT_LITTLE = (False, True)  # (implicit VR, little endian) of original_encoding
_MEDIA_CLASS, _MEDIA_INSTANCE = BaseTag(0x00020002), BaseTag(0x00020003)
_CHARSET = 0x00080005
_DEFAULT_CODEC = python_encoding["ISO_IR 6"]  # pydicom's default_encoding
#: The character sets whose texts are one Python codec's bytes (pydicom's encode_string).
_CODECS = {term: python_encoding[term] for term in ("ISO_IR 6", "ISO_IR 100", "ISO_IR 192")}
_UNDEFINED = b"\xff\xff\xff\xff"
_ITEM = b"\xfe\xff\x00\xe0"
_ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_short_length = struct.Struct("<H").pack
_long_length = struct.Struct("<L").pack
_tag_bytes = struct.Struct("<HH").pack
_MULTI = (list, MultiValue)
#: Single values whose value multiplicity pydicom counts as 1 (DataElement.VM).
_SINGLE = (int, float, datetime.date, datetime.time)
#: The types of most values: empty when falsy (the common case of _is_empty, inline).
_TEXT_TYPES = frozenset((str, UID))


def library_encode(ds: Dataset) -> bytes:
    """The object as pydicom writes it in the DICOM file format."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def encode(ds: Dataset) -> bytes:
    """pydicom's bytes of the object (:func:`library_encode`), by the lean writer
    where it can write them, else by pydicom."""
    data = lean_encode(ds)
    return library_encode(ds) if data is None else data


def lean_encode(ds: Dataset) -> bytes | None:
    """The bytes of :func:`library_encode`, or None where the lean writer cannot
    vouch for them (module doc). Touches the objects as pydicom's writer does (raw
    elements read, person names encoded), no more."""
    try:
        meta, compressed = _file_meta(ds)
        if any(tag >> 16 in (0, 2) for tag in ds._dict):  # pydicom refuses them
            raise _Unsupported("command or file meta elements in the data set")
        preamble = getattr(ds, "preamble", None) or b"\x00" * 128
        if len(preamble) != 128:
            raise _Unsupported("a preamble not 128 bytes long")
        pixel_data_undefined = None
        if _PIXEL_DATA in ds._dict:
            ds[_PIXEL_DATA]  # dcmwrite reads it: a raw one becomes a DataElement
            pixel_data_undefined = compressed
        body = _dataset(ds, _DEFAULT_CODEC, pixel_data_undefined, False)
    except _NOT_AS_PYDICOM:
        return None
    return b"".join((preamble, b"DICM", meta, body))


def _file_meta(ds: Dataset) -> tuple[bytes, bool]:
    """The file meta as ``dcmwrite(enforce_file_format=True)`` completes and writes
    it, and whether the transfer syntax compresses (encapsulated pixel data)."""
    given = getattr(ds, "file_meta", None)
    elements: dict[BaseTag, Element] = {} if given is None else dict(given._dict)
    if any(tag >> 16 != 2 or elements[tag].is_raw for tag in elements):
        raise _Unsupported("file meta not made of group 2 elements")
    syntax = _meta_value(elements, BaseTag(0x00020010))
    if not isinstance(syntax, UID) or not syntax.is_transfer_syntax or syntax.is_private:
        raise _Unsupported("no public transfer syntax")
    if syntax.is_implicit_VR or not syntax.is_little_endian or syntax == DeflatedExplicitVRLittleEndian:
        raise _Unsupported(f"transfer syntax {syntax}")
    for meta_tag, keyword in ((_MEDIA_CLASS, "SOPClassUID"), (_MEDIA_INSTANCE, "SOPInstanceUID")):
        current, own = _meta_value(elements, meta_tag), ds.get(keyword, None)
        if current is None or (own and own != current):
            elements[meta_tag] = DataElement(meta_tag, "UI", own)
    defaults = (
        (BaseTag(0x00020001), "OB", b"\x00\x01", True),
        (BaseTag(0x00020012), "UI", UID(PYDICOM_IMPLEMENTATION_UID), True),
        (BaseTag(0x00020013), "SH", f"PYDICOM {'.'.join(__version_info__)}", False),
    )
    for meta_tag, vr, value, when_empty in defaults:
        if meta_tag not in elements or (when_empty and _is_empty(elements[meta_tag].value)):
            elements[meta_tag] = DataElement(meta_tag, vr, value)
    if any(
        meta_tag not in elements or _is_empty(elements[meta_tag].value) for meta_tag in (_MEDIA_CLASS, _MEDIA_INSTANCE)
    ):
        raise _Unsupported("required file meta elements missing")
    group_length = elements.pop(BaseTag(0x00020000), None)
    if group_length is not None and group_length.VR != "UL":
        raise _Unsupported("a file meta group length not UL")
    meta = _elements(elements, None, False, _DEFAULT_CODEC, None, False)
    return _tag_bytes(2, 0) + b"UL" + _short_length(4) + _long_length(len(meta)) + meta, syntax.is_compressed


def _meta_value(elements: Mapping[BaseTag, Element], tag: BaseTag) -> Any:
    elem = elements.get(tag)
    return None if elem is None else elem.value


def _dataset(ds: Dataset, codec: str, pixel_data_undefined: bool | None, above_converts: bool) -> bytes:
    """A data set's elements (nested items inherit its character set).
    ``pixel_data_undefined``: the top level's Pixel Data length is undefined
    (encapsulated), as dcmwrite sets it from the transfer syntax; None elsewhere.
    ``above_converts``: an enclosing data set is re-encoded (see :func:`_elements`)."""
    if _CHARSET in ds._dict:
        codec = _codec(ds.get("SpecificCharacterSet", None))
    # pydicom re-encodes a data set not read as explicit VR little endian in its
    # character set (every one we make): it reads its raw elements first
    converts = ds.original_encoding != _EXPLICIT_LITTLE or ds.original_character_set != ds._character_set
    return _elements(ds._dict, ds, converts, codec, pixel_data_undefined, converts or above_converts)


def _codec(charset: object) -> str:
    """The Python codec of a Specific Character Set value (an empty one is the default)."""
    if not charset:
        return _DEFAULT_CODEC
    if not isinstance(charset, str) or charset not in _CODECS:
        raise _Unsupported(f"character set {charset!r}")
    return _CODECS[charset]


def _elements(
    elements: Mapping[BaseTag, Element],
    owner: Dataset | None,
    converts: bool,
    codec: str,
    pixel_data_undefined: bool | None,
    sequences_converted: bool,
) -> bytes:
    """Elements in tag order as pydicom's write_dataset writes them (no group
    lengths past group 6). ``owner``: the data set they are of (None: the file
    meta); ``converts``: pydicom reads its raw elements before writing them, else
    writes them as read; ``sequences_converted``: it or an enclosing data set is
    re-encoded, which reads the raw sequences of every data set inside (pydicom's
    correct_ambiguous_vr)."""
    out: list[bytes] = []
    # sorted as plain ints: BaseTag compares in Python, a third of the time here
    for tag, elem in sorted(zip(map(int, elements), elements.values(), strict=True)):
        if not tag & 0xFFFF and tag > 0x6FFFF:
            continue
        if isinstance(elem, RawDataElement):
            if owner is None:
                raise _Unsupported("a raw element outside a data set")
            # read (converted) as pydicom reads it: in a data set it re-encodes, a
            # sequence below one, a value not read yet (pydicom's get_item)
            if converts or (sequences_converted and elem.VR == "SQ") or elem.value is None:
                elem = owner[tag]
            else:
                out.append(_raw(elem))
                continue
        vr, value = elem.VR, elem.value
        if vr == _OB_OR_OW and tag == _PIXEL_DATA and owner is not None and sequences_converted:
            encapsulated = elem.is_undefined_length if pixel_data_undefined is None else pixel_data_undefined
            vr = _pixel_data_vr(owner, encapsulated)
        header, long = _header(tag, vr)
        if vr == "SQ":
            items = b"".join(_item(item, codec, sequences_converted) for item in value)
            if elem.is_undefined_length:
                out += (header, _UNDEFINED, items, _SEQUENCE_END)
            else:
                out += (header, _long_length(len(items)), items)
            continue
        empty = not value if value.__class__ in _TEXT_TYPES else _is_empty(value)
        data = b"" if empty else _WRITERS[vr](value, codec, tag)
        undefined = (
            elem.is_undefined_length if pixel_data_undefined is None or tag != _PIXEL_DATA else pixel_data_undefined
        )
        if undefined:
            if tag != _PIXEL_DATA or not long or not data.startswith(_ITEM):
                raise _Unsupported("an undefined length that is not encapsulated pixel data")
            out += (header, _UNDEFINED, data, _SEQUENCE_END)
        elif long:
            out += (header, _long_length(len(data)), data)
        elif len(data) > 0xFFFF:
            raise _Unsupported("a value too long for its VR")  # pydicom makes it UN, with a warning
        else:
            out += (header, _short_length(len(data)), data)
    return b"".join(out)


def _pixel_data_vr(ds: Dataset, encapsulated: bool) -> str:
    """The VR pydicom's correct_ambiguous_vr gives Pixel Data of VR 'OB or OW'
    (highdicom's) in a data set it re-encodes: OB encapsulated, else by the bits."""
    if encapsulated:
        return "OB"
    if ds.original_encoding[0]:
        return "OW"
    bits = ds.get("BitsAllocated", None)
    if not isinstance(bits, int):
        raise _Unsupported("Pixel Data of VR 'OB or OW' without Bits Allocated")
    return "OW" if bits > 8 else "OB"


def _item(item: Dataset, codec: str, above_converts: bool) -> bytes:
    body = _dataset(item, codec, None, above_converts)
    if getattr(item, "is_undefined_length_sequence_item", False):
        return b"".join((_ITEM, _UNDEFINED, body, _ITEM_END))
    return b"".join((_ITEM, _long_length(len(body)), body))


def _raw(elem: RawDataElement) -> bytes:
    """A raw element written as read, as pydicom's write_data_element writes one."""
    value = elem.value
    if elem.VR is None or value is None:
        raise _Unsupported("a raw element without VR or not read")
    header, long = _header(elem.tag, elem.VR)
    if elem.length == 0xFFFFFFFF:
        if elem.VR != "SQ":
            raise _Unsupported("a raw element of undefined length that is not a sequence")
        return b"".join((header, _UNDEFINED, value, _SEQUENCE_END))
    if long:
        return header + _long_length(len(value)) + value
    if len(value) > 0xFFFF:
        raise _Unsupported("a value too long for its VR")
    return header + _short_length(len(value)) + value


@functools.lru_cache(maxsize=8192)
def _header(tag: int, vr: str) -> tuple[bytes, bool]:
    """An element's tag and VR (with the reserved bytes of a 4-byte length), and
    whether its length takes 4 bytes."""
    if len(vr) != 2 or vr not in _WRITERS:
        raise _Unsupported(f"VR {vr!r}")
    long = vr in EXPLICIT_VR_LENGTH_32
    return _tag_bytes(tag >> 16, tag & 0xFFFF) + vr.encode("ascii") + (b"\x00\x00" if long else b""), long


def _is_empty(value: object) -> bool:
    """pydicom's DataElement.is_empty (VM 0) for the value types written here."""
    if value is None:
        return True
    if isinstance(value, str | bytes | PersonName | list | MultiValue):
        return not value
    if isinstance(value, _SINGLE):
        return False
    raise _Unsupported(f"a value of type {type(value).__name__}")


def _padded(text: str, pad: str = " ") -> bytes:
    return (text + pad if len(text) % 2 else text).encode(_DEFAULT_CODEC)


def _joined(value: Any) -> str:
    """pydicom's multi_string, for the value types written here."""
    if isinstance(value, str):
        return value
    if isinstance(value, _MULTI):
        return "\\".join(value)
    raise _Unsupported(f"a string value of type {type(value).__name__}")


def _string(value: Any, _codec: str, _tag: int) -> bytes:
    """AE, AS, CS, UR: pydicom's write_string."""
    return _padded(_joined(value))


def _uid(value: Any, _codec: str, _tag: int) -> bytes:
    return _padded(_joined(value), "\x00")


def _text(value: Any, codec: str, _tag: int) -> bytes:
    """LO, LT, SH, ST, UC, UT: pydicom's write_text (encode_string of one codec)."""
    if isinstance(value, str):
        data = value.encode(codec)
    elif isinstance(value, bytes):
        data = value
    elif isinstance(value, _MULTI) and all(isinstance(v, str) for v in value):
        data = b"\\".join(v.encode(codec) for v in value)
    elif isinstance(value, _MULTI) and all(isinstance(v, bytes) for v in value):
        data = b"\\".join(value)
    else:
        raise _Unsupported("a text value of mixed types")
    return data + b" " if len(data) % 2 else data


def _person_name(value: Any, codec: str, _tag: int) -> bytes:
    """PN: pydicom's write_PN, each name encoded by PersonName.encode."""
    if isinstance(value, PersonName):
        data = value.encode([codec])
    elif isinstance(value, _MULTI) and len(value) > 1 and all(isinstance(v, PersonName) for v in value):
        data = b"\\".join(v.encode([codec]) for v in value)
    else:
        raise _Unsupported("a person name value of another type")
    return data + b" " if len(data) % 2 else data


def _number_string(value: Any, _codec: str, _tag: int) -> bytes:
    """DS, IS: each value's original string where it has one (pydicom's write_number_string)."""
    if isinstance(value, _MULTI):
        return _padded("\\".join(x.original_string if hasattr(x, "original_string") else str(x) for x in value))
    return _padded(value.original_string if hasattr(value, "original_string") else str(value))


def _date_time(format_value: Callable[[Any], str], kind: type) -> ValueWriter:
    """DA, DT, TM: pydicom's write_DA/DT/TM (strings as they are, objects formatted)."""

    def write(value: Any, _codec: str, _tag: int) -> bytes:
        if isinstance(value, str):
            return _padded(value)
        if isinstance(value, _MULTI):
            if not all(x is None or isinstance(x, str | kind) for x in value):
                raise _Unsupported("a date or time value of another type")
            return _padded("\\".join(x if isinstance(x, str) else format_value(x) for x in value))
        if not isinstance(value, kind):
            raise _Unsupported(f"a date or time value of type {type(value).__name__}")
        return _padded(format_value(value))

    return write


def _numbers(code: str) -> ValueWriter:
    """Binary numbers: pydicom's write_numbers."""
    single = struct.Struct("<" + code).pack

    def write(value: Any, _codec: str, tag: int) -> bytes:
        if isinstance(value, _MULTI):
            if code == "h" and tag in _LUT_DESCRIPTOR_TAGS:
                raise _Unsupported("a LUT descriptor written as SS")
            return struct.pack(f"<{len(value)}{code}", *value)
        return single(value)

    return write


def _binary(value: Any, _codec: str, _tag: int) -> bytes:
    """OB, OD, OF, OL, OV, OW: the bytes, padded to even length."""
    if not isinstance(value, bytes):
        raise _Unsupported(f"a binary value of type {type(value).__name__}")
    return value + b"\x00" if len(value) % 2 else value


def _unknown(value: Any, _codec: str, _tag: int) -> bytes:
    """UN: the bytes as they are (pydicom does not pad them)."""
    if not isinstance(value, bytes):
        raise _Unsupported(f"a UN value of type {type(value).__name__}")
    return value


def _attribute_tags(value: Any, _codec: str, _tag: int) -> bytes:
    """AT: each tag as two unsigned shorts (pydicom's write_ATvalue)."""
    if isinstance(value, _MULTI):
        return b"".join(_tag_bytes(t >> 16, t & 0xFFFF) for t in map(Tag, value))
    if not isinstance(value, int):
        raise _Unsupported(f"an AT value of type {type(value).__name__}")
    return _tag_bytes(value >> 16, value & 0xFFFF)


def _sequence(_value: Any, _codec: str, _tag: int) -> bytes:
    raise AssertionError("sequences are written by _elements")  # pragma: no cover


_WRITERS: dict[str, ValueWriter] = {
    **dict.fromkeys(("AE", "AS", "CS", "UR"), _string),
    "UI": _uid,
    **dict.fromkeys(("LO", "LT", "SH", "ST", "UC", "UT"), _text),
    "PN": _person_name,
    **dict.fromkeys(("DS", "IS"), _number_string),
    "DA": _date_time(_format_DA, datetime.date),
    "DT": _date_time(_format_DT, datetime.datetime),
    "TM": _date_time(_format_TM, datetime.time),
    "US": _numbers("H"),
    "SS": _numbers("h"),
    "UL": _numbers("L"),
    "SL": _numbers("l"),
    "UV": _numbers("Q"),
    "SV": _numbers("q"),
    "FL": _numbers("f"),
    "FD": _numbers("d"),
    **dict.fromkeys(("OB", "OD", "OF", "OL", "OV", "OW"), _binary),
    "UN": _unknown,
    "AT": _attribute_tags,
    "SQ": _sequence,
}
