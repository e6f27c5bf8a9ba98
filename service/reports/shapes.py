"""The gate's memory of the shapes highdicom has read (setting ``fast_reports``).

highdicom's readers of an SR document (TID 1500) and of a key object selection (TID
2010) decide from the tree's shape alone, item by item: the root (SOP class, transfer
syntax, value type CONTAINER, concept name, template, continuity) and each content
item on its own (its value type and relationship type are known values, it carries the
attributes its value type requires, each code it holds has one code value, a
designator and a meaning). No value it reads is judged beyond that: the values (UIDs,
numbers, dates, text) are the gate's VR checks, and the disclaimer, evidence and
measurement groups its own checks, all run on every object. So highdicom reads only
what is new: a new root, the whole document; a content item of a new shape, with its
subtree (one it rejects: the whole document, for the library's own reason).

An item's shape, taken from its still raw elements: every attribute it carries, in
order, with its VR and whether it is empty; the encoded bytes of value type,
relationship type, continuity, graphic type, temporal range type and of each code
sequence (concept name, coded value, template, units, qualifier); the count of binary
numbers (graphic data: up to four points, beyond that whether they are whole points);
the shapes of the items of other sequences (measured values, references); only the
presence of its content sequence, whose items are shapes of their own. A tree with an
element pydicom converted already has no shape: highdicom reads it all.

An image (the Secondary Capture): highdicom's image reader and pydicom's decoding of
its pixels decide from its SOP class, transfer syntax, which attributes it carries
(and their items, recursively), the Image Pixel module's values and the pixel data's
length: its shape. The reader also keys a table by the instances the image references
and stores positions on a frame of reference: an image that references an instance
twice or has a frame of reference has no shape (highdicom reads it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from highdicom.sr.value_types import ContentSequence
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

Shape = tuple[object, ...]


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"{keyword} is not a DICOM keyword")
    return tag


_CONTENT_SEQUENCE = _tag("ContentSequence")
#: Attributes whose encoded value is part of an item's shape: what the reader decides on.
_SHAPE_VALUES = frozenset(
    map(
        _tag,
        (
            "ValueType",
            "RelationshipType",
            "ContinuityOfContent",
            "GraphicType",
            "TemporalRangeType",
            "ConceptNameCodeSequence",
            "ConceptCodeSequence",
            "ContentTemplateSequence",
            "MeasurementUnitsCodeSequence",
            "NumericValueQualifierCodeSequence",
        ),
    )
)
#: The root content item's attributes, which the readers take from the document.
_ROOT = ("ConceptNameCodeSequence", "ValueType", "ContinuityOfContent", "ContentTemplateSequence")
#: VRs of binary numbers, by the size of one: their count is part of the shape (graphic data: the points).
_NUMBER_SIZE = {"FL": 4, "FD": 8, "SL": 4, "SS": 2, "UL": 4, "US": 2, "SV": 8, "UV": 8}
_BINARY_NUMBERS = frozenset(_NUMBER_SIZE)
#: Counts of binary numbers up to this are part of the shape (a point, circle, ellipse);
#: beyond it, whether they make whole (x, y) points (a lesion's outline, whose length varies).
_COUNTED = 8

#: What decides how pydicom decodes an image's pixels, besides the transfer syntax and
#: the pixel data's length: their values are part of an image's shape.
_PIXEL_MODULE = frozenset(
    map(
        _tag,
        (
            "SamplesPerPixel",
            "PhotometricInterpretation",
            "PlanarConfiguration",
            "Rows",
            "Columns",
            "BitsAllocated",
            "BitsStored",
            "HighBit",
            "PixelRepresentation",
            "NumberOfFrames",
        ),
    )
)
_PIXEL_DATA = _tag("PixelData")
_CHARACTER_SET = _tag("SpecificCharacterSet")
_REFERENCED_SOP_INSTANCE = _tag("ReferencedSOPInstanceUID")

#: Shapes of roots, content items and images highdicom has accepted in this process.
_ACCEPTED: set[Shape] = set()
#: Beyond this many shapes the memory starts again (ours repeat: a few dozen).
_ACCEPTED_LIMIT = 10_000


class _Converted(Exception):
    """An element pydicom has converted already: its encoded bytes are gone."""


@dataclass(frozen=True)
class ContentShapes:
    """A document's root shape and each content item with its shape, in tree order."""

    root: Shape
    items: list[tuple[Shape, Dataset]]


def content_shapes(ds: Dataset) -> ContentShapes | None:
    """The shapes of a freshly read document's root and of all its content items,
    or None where some element is no longer raw. Reads the content sequences in place
    (as the gate's VR checks would)."""
    meta = ds.file_meta
    try:
        root: Shape = (
            "root",
            str(ds.get("SOPClassUID", "")),
            str(meta.get("TransferSyntaxUID", "")),
            *(_encoded(ds, keyword) for keyword in ("SpecificCharacterSet", *_ROOT)),
            _CONTENT_SEQUENCE in ds,
        )
        return ContentShapes(root, [(_item_shape(item), item) for item in _content_items(ds)])
    except _Converted:
        return None


def image_shape(ds: Dataset) -> Shape | None:
    """The shape of an image for highdicom's image reader and pydicom's decoding of
    its pixels (module doc), or None where the reader decides on values: positions
    on a frame of reference, or an instance referenced twice (keys of its tables)."""
    if "FrameOfReferenceUID" in ds:
        return None
    structure = _structure(ds)
    references = _referenced_instances(ds)
    if len(set(references)) != len(references):
        return None
    return ("image", str(ds.SOPClassUID), str(ds.file_meta.get("TransferSyntaxUID", "")), structure)


def _referenced_instances(ds: Dataset) -> list[bytes]:
    """The UIDs (encoded, without padding) of the instances highdicom's image reader
    keys a table by: those of the Referenced Series Sequence of the image and of its
    other studies' and evidence's items."""
    holders = [
        ds,
        *ds.get("StudiesContainingOtherReferencedInstancesSequence", []),
        *ds.get("SourceImageEvidenceSequence", []),
    ]
    uids = [
        instance.get_item(_REFERENCED_SOP_INSTANCE)
        for holder in holders
        for series in holder.get("ReferencedSeriesSequence", [])
        for keyword in ("ReferencedSOPSequence", "ReferencedInstanceSequence")
        for instance in series.get(keyword, [])
        if _REFERENCED_SOP_INSTANCE in instance
    ]
    encoded = (uid.value if isinstance(uid, RawDataElement) else str(uid.value).encode() for uid in uids)
    return [(value or b"").rstrip(b"\x00 ") for value in encoded]


def is_known(shape: Shape) -> bool:
    """Whether highdicom has accepted an object of this shape in this process."""
    return shape in _ACCEPTED


def read_new_shapes(shapes: ContentShapes | None, read_document: Callable[[], object]) -> None:
    """highdicom's reading of a document, as far as its shapes are new; raises what
    highdicom rejects. A new root (or a tree without shapes): ``read_document``, the
    library's reader of the whole document. Else each content item of a new shape
    with its subtree, by the content reader the document reader applies to every
    item below the root (copies: the parse stays as it is); where that rejects an
    item, the whole document is read, so that the reason is the library's own."""
    if shapes is None:
        read_document()
        return
    if shapes.root not in _ACCEPTED:
        read_document()
    else:
        new = [item for shape, item in shapes.items if shape not in _ACCEPTED]
        try:
            for item in new:
                ContentSequence.from_sequence([item], copy=True)
        except Exception:  # noqa: BLE001  # the document reader below raises it again, in the library's words
            read_document()
    remember([shapes.root, *(shape for shape, _ in shapes.items)])


def remember(shapes: list[Shape]) -> None:
    """Remember shapes highdicom has accepted."""
    if len(_ACCEPTED) + len(shapes) > _ACCEPTED_LIMIT:
        _ACCEPTED.clear()
    _ACCEPTED.update(shapes)


def _encoded(ds: Dataset, keyword: str) -> bytes | None:
    if keyword not in ds:
        return None
    elem = ds.get_item(keyword)
    if keyword == "SpecificCharacterSet":  # pydicom converts it on reading, to decode the rest
        return str(elem.value).encode()
    if not isinstance(elem, RawDataElement):
        raise _Converted
    return elem.value or b""


def _content_items(ds: Dataset) -> Iterator[Dataset]:
    if _CONTENT_SEQUENCE not in ds:
        return
    for item in ds[_CONTENT_SEQUENCE].value:
        yield item
        yield from _content_items(item)


def _item_shape(item: Dataset, content: bool = True) -> Shape:
    """One item's shape (module doc); ``content``: its content sequence is its
    children's, shown by presence only (not so in the items of other sequences)."""
    parts: list[object] = []
    for elem in item.elements():
        if content and elem.tag == _CONTENT_SEQUENCE:
            parts.append(elem.tag)
        elif not isinstance(elem, RawDataElement):
            raise _Converted
        elif elem.tag in _SHAPE_VALUES:
            parts.append((elem.tag, elem.VR, elem.value or b""))
        elif elem.VR == "SQ":
            parts.append((elem.tag, tuple(_item_shape(sub, content=False) for sub in item[elem.tag].value)))
        elif elem.VR in _BINARY_NUMBERS:
            parts.append((elem.tag, elem.VR, _count(len(elem.value or b"") // _NUMBER_SIZE[elem.VR])))
        else:
            parts.append((elem.tag, elem.VR, not elem.value))
    return tuple(parts)


def _structure(ds: Dataset) -> Shape:
    """A freshly read image's shape: each attribute with its VR and whether it is
    empty, the items of its sequences recursively, the encoded values of
    :data:`_PIXEL_MODULE` (converted ones, as pydicom converted them on reading) and
    the length of the pixel data. Reads its sequences in place."""
    parts: list[object] = []
    for elem in ds.elements():
        if elem.VR == "SQ":
            parts.append((elem.tag, tuple(_structure(item) for item in ds[elem.tag].value)))
        elif not isinstance(elem, RawDataElement):
            # converted on reading: the character set, at times the pixel representation
            value = elem.value
            shown = str(value) if elem.tag in _PIXEL_MODULE or elem.tag == _CHARACTER_SET else elem.is_empty
            parts.append((elem.tag, elem.VR, "converted", shown))
        elif elem.tag in _PIXEL_MODULE:
            parts.append((elem.tag, elem.VR, elem.value))
        elif elem.tag == _PIXEL_DATA:
            parts.append((elem.tag, elem.VR, len(elem.value or b"")))
        else:
            parts.append((elem.tag, elem.VR, not elem.value))
    return tuple(parts)


def _count(values: int) -> int | str:
    """The part of a count of binary numbers that is shape (:data:`_COUNTED`)."""
    if values <= _COUNTED:
        return values
    return "points" if values % 2 == 0 else "odd"
