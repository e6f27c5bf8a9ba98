"""The SR's content items and templates, made two ways: by highdicom's constructors
(:class:`LibraryContent`), or with the setting ``fast_reports`` copied from
prototypes those constructors made once (:class:`FastContent`), the shortcut
service/reports/construction.py names.

Why: a study's SR repeats the same items in every measurement group and every study
(the group container, its finding site and finding, the algorithm identification,
the concept names and units), and highdicom builds each anew, validating every
element and code as it goes: most of the SR's cost. An item differs from its
prototype only in the values we fill (a text, a number, a UID, an image
reference, a set of coordinates), set here as highdicom sets them, so the tree is
the library's element for element (tests/test_reports_construction.py encodes
both). Prototypes are keyed by everything the library's constructor was given
except those values (a code by value, scheme, meaning and version: pydicom's
``Code`` equality ignores the meaning and maps SRT to SCT).

The values each copy gets are the study's and pass through pydicom's element
conversion and validation as in the library; the gate checks the encoded SR.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, TypeVar, cast

import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    ContainerContentItem,
    ContentSequence,
    CoordinatesForMeasurement,
    FindingSite,
    GraphicTypeValues,
    ImageContentItem,
    Measurement,
    MeasurementsAndQualitativeEvaluations,
    NumContentItem,
    RelationshipTypeValues,
    SourceImageForMeasurement,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.coding import Code
from pydicom.tag import BaseTag
from pydicom.valuerep import DS

CONTAINS = RelationshipTypeValues.CONTAINS

T = TypeVar("T", bound=ContentSequence)
D = TypeVar("D", bound=Dataset)
S = TypeVar("S", bound=DicomSequence)

#: The image references of TID 1501 groups, their measurements and their regions.
SourceImage = TypeVar("SourceImage", SourceImageForRegion, SourceImageForMeasurement, SourceImageForMeasurementGroup)


class LibraryContent:
    """highdicom's constructors, with the arguments sr.py gives them."""

    def once(self, key: Hashable, make: Callable[[], T]) -> T:
        """``make()``, a template of the library's whose arguments ``key`` names
        in full (the fast path makes it once per key and copies it)."""
        return make()

    def text(self, name: Code, value: str, relationship_type: RelationshipTypeValues = CONTAINS) -> TextContentItem:
        return TextContentItem(name=name, value=value, relationship_type=relationship_type)

    def code(self, name: Code, value: Code, relationship_type: RelationshipTypeValues = CONTAINS) -> CodeContentItem:
        return CodeContentItem(name=name, value=value, relationship_type=relationship_type)

    def image(
        self,
        name: Code,
        referenced_sop_class_uid: str,
        referenced_sop_instance_uid: str,
        relationship_type: RelationshipTypeValues = CONTAINS,
    ) -> ImageContentItem:
        return ImageContentItem(
            name=name,
            referenced_sop_class_uid=referenced_sop_class_uid,
            referenced_sop_instance_uid=referenced_sop_instance_uid,
            relationship_type=relationship_type,
        )

    def container(self, name: Code, relationship_type: RelationshipTypeValues = CONTAINS) -> ContainerContentItem:
        return ContainerContentItem(name=name, relationship_type=relationship_type)

    def tracking_identifier(self, uid: str, identifier: str) -> TrackingIdentifier:
        return TrackingIdentifier(uid=uid, identifier=identifier)

    def algorithm_identification(self, name: str, version: str, parameters: Sequence[str]) -> AlgorithmIdentification:
        return AlgorithmIdentification(name=name, version=version, parameters=parameters)

    def finding_site(self, anatomic_location: Code) -> FindingSite:
        return FindingSite(anatomic_location)

    def source_image(
        self,
        kind: type[SourceImage],
        referenced_sop_class_uid: str,
        referenced_sop_instance_uid: str,
        referenced_frame_numbers: Sequence[int] | None = None,
    ) -> SourceImage:
        """An image reference of ``kind``: SourceImageForRegion, ...ForMeasurement
        or ...ForMeasurementGroup (each its concept name and relationship)."""
        return kind(
            referenced_sop_class_uid=referenced_sop_class_uid,
            referenced_sop_instance_uid=referenced_sop_instance_uid,
            referenced_frame_numbers=referenced_frame_numbers,
        )

    def coordinates_for_measurement(
        self, graphic_type: GraphicTypeValues, graphic_data: np.ndarray, source_image: SourceImageForRegion
    ) -> CoordinatesForMeasurement:
        return CoordinatesForMeasurement(
            graphic_type=graphic_type, graphic_data=graphic_data, source_image=source_image
        )

    def measurement(
        self,
        name: Code,
        value: float,
        unit: Code,
        referenced_images: Sequence[SourceImageForMeasurement] | None = None,
        referenced_coordinates: Sequence[CoordinatesForMeasurement] | None = None,
    ) -> Measurement:
        return Measurement(
            name=name,
            value=value,
            unit=unit,
            referenced_images=referenced_images,
            referenced_coordinates=referenced_coordinates,
        )

    def measurements_and_qualitative_evaluations(
        self,
        tracking_identifier: TrackingIdentifier,
        algorithm_id: AlgorithmIdentification,
        finding_sites: Sequence[FindingSite],
        finding_type: Code | None = None,
        measurements: Sequence[Measurement] | None = None,
        source_images: Sequence[SourceImageForMeasurementGroup] | None = None,
    ) -> MeasurementsAndQualitativeEvaluations:
        return MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking_identifier,
            algorithm_id=algorithm_id,
            finding_sites=finding_sites,
            finding_type=finding_type,
            measurements=measurements,
            source_images=source_images,
        )


#: A code as a prototype's key: pydicom's Code compares (and hashes) without its meaning.
CodeKey = tuple[str, str, str, str | None]


def _key(code: Code | CodedConcept) -> CodeKey:
    return (code.value, code.scheme_designator, code.meaning, code.scheme_version)


def _code(key: CodeKey) -> Code:
    return Code(*key)


class FastContent(LibraryContent):
    """The same items and templates, copied from prototypes (module doc)."""

    def once(self, key: Hashable, make: Callable[[], T]) -> T:
        made = _ONCE.get(key)
        if made is None:
            if len(_ONCE) >= _ONCE_SIZE:
                _ONCE.clear()
            made = _ONCE[key] = make()
            for item in made:
                _prototype(item)
        return _copy_template(made)

    def text(self, name: Code, value: str, relationship_type: RelationshipTypeValues = CONTAINS) -> TextContentItem:
        item = _copy(_text(_key(name), relationship_type))
        _put(item, "TextValue", str(value))
        return item

    def code(self, name: Code, value: Code, relationship_type: RelationshipTypeValues = CONTAINS) -> CodeContentItem:
        return _copy(_coded(_key(name), _key(value), relationship_type))

    def image(
        self,
        name: Code,
        referenced_sop_class_uid: str,
        referenced_sop_instance_uid: str,
        relationship_type: RelationshipTypeValues = CONTAINS,
    ) -> ImageContentItem:
        item = _copy(_image(_key(name), relationship_type))
        _reference(item, referenced_sop_class_uid, referenced_sop_instance_uid, None)
        return item

    def container(self, name: Code, relationship_type: RelationshipTypeValues = CONTAINS) -> ContainerContentItem:
        return _copy(_container(_key(name), None, relationship_type))

    def tracking_identifier(self, uid: str, identifier: str) -> TrackingIdentifier:
        text, uid_item = (_copy(item) for item in _tracking())
        _put(text, "TextValue", str(identifier))
        _put(uid_item, "UID", uid)
        return _sequence(TrackingIdentifier, [text, uid_item])

    def algorithm_identification(self, name: str, version: str, parameters: Sequence[str]) -> AlgorithmIdentification:
        return _copy_template(_algorithm(name, version, tuple(parameters)))

    def finding_site(self, anatomic_location: Code) -> FindingSite:
        return _copy(_finding_site(_key(anatomic_location)))

    def source_image(
        self,
        kind: type[SourceImage],
        referenced_sop_class_uid: str,
        referenced_sop_instance_uid: str,
        referenced_frame_numbers: Sequence[int] | None = None,
    ) -> SourceImage:
        if referenced_frame_numbers is not None and any(f < 1 for f in referenced_frame_numbers):
            raise ValueError("Referenced frame numbers must be >= 1. Frame indexing is 1-based.")
        item = _copy(_source_image(kind))
        _reference(item, referenced_sop_class_uid, referenced_sop_instance_uid, referenced_frame_numbers)
        return item

    def coordinates_for_measurement(
        self, graphic_type: GraphicTypeValues, graphic_data: np.ndarray, source_image: SourceImageForRegion
    ) -> CoordinatesForMeasurement:
        if graphic_type != GraphicTypeValues.POLYLINE:
            return super().coordinates_for_measurement(graphic_type, graphic_data, source_image)
        if graphic_data.ndim != 2 or graphic_data.shape[0] < 2 or graphic_data.shape[1] != 2:
            raise ValueError("Graphic data of a SCOORD must be multiple (column, row) pairs")
        item = _copy(_polyline())
        _graphic_data(item, graphic_data)
        _put(item, "ContentSequence", _sequence(ContentSequence, [source_image]))
        return item

    def measurement(
        self,
        name: Code,
        value: float,
        unit: Code,
        referenced_images: Sequence[SourceImageForMeasurement] | None = None,
        referenced_coordinates: Sequence[CoordinatesForMeasurement] | None = None,
    ) -> Measurement:
        if not isinstance(value, int | float):
            raise TypeError('Argument "value" must have type "int" or "float".')
        item = _copy(_number(_key(name)))
        measured = _copy(_EMPTY)
        measured.NumericValue = DS(value, auto_format=True)
        if isinstance(value, float):
            measured.FloatingPointValue = value
        _put(measured, "MeasurementUnitsCodeSequence", DicomSequence([_copy(_concept(_key(unit)))]))
        _put(item, "MeasuredValueSequence", DicomSequence([measured]))
        content = [*(referenced_images or ()), *(referenced_coordinates or ())]
        if content:
            _put(item, "ContentSequence", _sequence(ContentSequence, content))
        return _sequence(Measurement, [item])

    def measurements_and_qualitative_evaluations(
        self,
        tracking_identifier: TrackingIdentifier,
        algorithm_id: AlgorithmIdentification,
        finding_sites: Sequence[FindingSite],
        finding_type: Code | None = None,
        measurements: Sequence[Measurement] | None = None,
        source_images: Sequence[SourceImageForMeasurementGroup] | None = None,
    ) -> MeasurementsAndQualitativeEvaluations:
        if len(tracking_identifier) != 2:
            raise ValueError("a tracking identifier needs its text and its UID")
        finding = [] if finding_type is None else [_copy(_coded(_FINDING, _key(finding_type), CONTAINS))]
        # highdicom's order (templates.py, _MeasurementsAndQualitativeEvaluations and its subclass)
        content = [
            *tracking_identifier,
            *finding,
            *finding_sites,
            *algorithm_id,
            *(item for measurement in measurements or () for item in measurement),
            *(source_images or ()),
        ]
        group = _copy(_container(_GROUP, "1501", CONTAINS))
        _put(group, "ContentSequence", _sequence(ContentSequence, content))
        return _sequence(MeasurementsAndQualitativeEvaluations, [group])


# The prototypes: made by highdicom once (per code, model), stripped of the values copies fill.

_ONCE: dict[Hashable, Any] = {}
_ONCE_SIZE = 64
_FINDING: CodeKey = ("121071", "DCM", "Finding", None)
_GROUP: CodeKey = ("125007", "DCM", "Measurement Group", None)
_PLACEHOLDER_UID = "1.2.3"
_EMPTY = Dataset()


@functools.lru_cache(maxsize=256)
def _concept(key: CodeKey) -> CodedConcept:
    return CodedConcept(*key)


@functools.lru_cache(maxsize=256)
def _text(name: CodeKey, relationship: RelationshipTypeValues) -> TextContentItem:
    return _prototype(TextContentItem(name=_code(name), value="-", relationship_type=relationship), "TextValue")


@functools.lru_cache(maxsize=256)
def _coded(name: CodeKey, value: CodeKey, relationship: RelationshipTypeValues) -> CodeContentItem:
    return _prototype(CodeContentItem(name=_code(name), value=_code(value), relationship_type=relationship))


@functools.lru_cache(maxsize=64)
def _image(name: CodeKey, relationship: RelationshipTypeValues) -> ImageContentItem:
    item = ImageContentItem(
        name=_code(name),
        referenced_sop_class_uid=_PLACEHOLDER_UID,
        referenced_sop_instance_uid=_PLACEHOLDER_UID,
        relationship_type=relationship,
    )
    return _prototype(item, "ReferencedSOPSequence")


_SOURCE_IMAGES: dict[type[ImageContentItem], ImageContentItem] = {}


def _source_image(kind: type[SourceImage]) -> SourceImage:
    made = _SOURCE_IMAGES.get(kind)
    if made is None:
        item = kind(referenced_sop_class_uid=_PLACEHOLDER_UID, referenced_sop_instance_uid=_PLACEHOLDER_UID)
        made = _SOURCE_IMAGES[kind] = _prototype(item, "ReferencedSOPSequence")
    return cast(SourceImage, made)


@functools.lru_cache(maxsize=64)
def _container(name: CodeKey, template_id: str | None, relationship: RelationshipTypeValues) -> ContainerContentItem:
    return _prototype(ContainerContentItem(name=_code(name), template_id=template_id, relationship_type=relationship))


@functools.cache
def _tracking() -> tuple[Dataset, Dataset]:
    text, uid = TrackingIdentifier(uid=_PLACEHOLDER_UID, identifier="-")
    return _prototype(text, "TextValue"), _prototype(uid, "UID")


@functools.lru_cache(maxsize=16)
def _algorithm(name: str, version: str, parameters: tuple[str, ...]) -> AlgorithmIdentification:
    algorithm = AlgorithmIdentification(name=name, version=version, parameters=list(parameters))
    for item in algorithm:
        _prototype(item)
    return algorithm


@functools.lru_cache(maxsize=16)
def _finding_site(anatomic_location: CodeKey) -> FindingSite:
    return _prototype(FindingSite(_code(anatomic_location)))


@functools.cache
def _polyline() -> CoordinatesForMeasurement:
    item = CoordinatesForMeasurement(
        graphic_type=GraphicTypeValues.POLYLINE,
        graphic_data=np.zeros((2, 2), np.float32),
        source_image=SourceImageForRegion(_PLACEHOLDER_UID, _PLACEHOLDER_UID),
    )
    return _prototype(item, "GraphicData", "ContentSequence")


@functools.lru_cache(maxsize=64)
def _number(name: CodeKey) -> NumContentItem:
    item = NumContentItem(name=_code(name), value=0.0, unit=Code("1", "UCUM", "no units"), relationship_type=CONTAINS)
    return _prototype(item, "MeasuredValueSequence")


# Copies: new data sets, sequences and elements all the way down; the values of
# elements (strings and numbers, never changed in place) shared.


class _Name(CodedConcept):
    """A prototype's concept name, its hash and code remembered. highdicom indexes
    every item by its name (ContentSequence), and CodedConcept computes its hash
    from its elements on every look-up (a fifth of the SR's cost), and compares
    equal hashes through new Codes. Its elements never change (nothing changes a
    prototype, or a copy's name)."""

    _hash: int
    _code: CodeKey

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _Name) and other._code == self._code:  # the same code: equal
            return True
        return super().__eq__(other)  # else as the library compares (SRT is SCT, the meaning aside)


def _prototype(item: D, *keywords: str) -> D:
    """``item`` without the elements its copies fill, its names (all the way down)
    :class:`_Name` copies."""
    for keyword in keywords:
        delattr(item, keyword)
    for ds in _tree(item):
        name = ds.get("ConceptNameCodeSequence")
        if name and type(name[0]) is CodedConcept:  # a copy: highdicom shares some of its concepts
            named = _copy(name[0])
            named.__class__ = _Name
            named._hash = hash(name[0])
            named._code = _key(name[0])
            name[0] = named
    return item


def _tree(ds: Dataset) -> Iterable[Dataset]:
    yield ds
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _tree(item)


#: A Dataset's own state that is a dict (its elements, private blocks, pixel caches): each copy gets its own.
_STATE_DICTS = tuple(name for name, value in Dataset().__dict__.items() if isinstance(value, dict))


def _copy(ds: D) -> D:
    """``ds`` copied without pydicom's Dataset constructor (most of an item's cost)."""
    new = object.__new__(type(ds))
    attributes = new.__dict__
    attributes.update(ds.__dict__)
    for name in _STATE_DICTS:
        attributes[name] = attributes[name].copy()
    attributes["_dict"] = {tag: _copy_element(elem) for tag, elem in ds._dict.items()}  # type: ignore[arg-type]
    return new


def _copy_element(elem: DataElement) -> DataElement:
    new = object.__new__(type(elem))
    for name, value in elem.__dict__.items():  # one by one, in order: Python then keeps them as compactly
        object.__setattr__(new, name, value)  # as for an element it made (pydicom's writer reads them faster)
    value = elem._value
    if elem.VR == "SQ":
        items = [_copy(item) for item in value]
        if isinstance(value, ContentSequence):
            new._value = _sequence(type(value), items, is_root=value._is_root)
        else:
            new._value = DicomSequence(items)
    elif isinstance(value, MultiValue):  # a multi-valued element: its own list
        new._value = copied = object.__new__(type(value))
        copied.__dict__.update(value.__dict__)
        copied._list = list(value._list)
    return new


def _copy_template(template: S) -> S:
    return _sequence(type(template), [_copy(item) for item in template])


def _sequence(kind: type[S], items: Iterable[Dataset], is_root: bool = False) -> S:
    """A ContentSequence (or template) of ``items`` as highdicom's constructor
    makes it (its list and its index of items by name), without re-checking each
    item: prototypes the library made, or items made here."""
    sequence = object.__new__(kind)
    sequence._list = list(items)
    if isinstance(sequence, ContentSequence):
        sequence._is_root, sequence._is_sr = is_root, True
        lut: defaultdict[Any, list[Dataset]] = defaultdict(list)
        for item in sequence._list:
            name = item._dict[_CONCEPT_NAME].value[0]  # type: ignore[index]  # as highdicom reads ``item.name``
            lut[name].append(item)
        sequence._lut = lut  # type: ignore[assignment]  # of content items
    return sequence


_TAGS: dict[str, BaseTag] = {}


def _put(ds: Dataset, keyword: str, value: Any) -> None:
    """``ds.<keyword> = value`` for an element ``ds`` lacks, as pydicom makes it
    (an element of the dictionary's VR, its value converted and validated)."""
    tag = _TAGS.get(keyword)
    if tag is None:
        tag = _TAGS[keyword] = BaseTag(tag_for_keyword(keyword))  # type: ignore[arg-type]
    if isinstance(value, list) and dictionary_VR(tag) == "SQ":
        value = DicomSequence(value)
    ds._dict[tag] = DataElement(tag, dictionary_VR(tag), value)


_GRAPHIC_DATA = BaseTag(0x00700022)
_CONCEPT_NAME = BaseTag(0x0040A043)


def _graphic_data(item: Dataset, points: np.ndarray) -> None:
    """Graphic Data (FL) as highdicom sets it, ``points.flatten().tolist()``. Of a
    float array those are Python floats, which pydicom's conversion leaves as they
    are one by one after checking their type (a tenth of the SR's cost): here they
    are left as they are at once."""
    values = points.flatten().tolist()
    if points.dtype.kind != "f" or len(values) < 2:
        _put(item, "GraphicData", values)
        return
    elem = DataElement(_GRAPHIC_DATA, "FL", None, already_converted=True)
    converted: MultiValue[float] = object.__new__(MultiValue)
    converted._constructor = elem._convert
    converted._list = values
    elem._value = converted
    item._dict[_GRAPHIC_DATA] = elem


def _reference(item: Dataset, sop_class_uid: str, sop_instance_uid: str, frame_numbers: Sequence[int] | None) -> None:
    """An IMAGE item's Referenced SOP Sequence, as highdicom's ImageContentItem sets it."""
    reference = _copy(_EMPTY)
    reference.ReferencedSOPClassUID = str(sop_class_uid)
    reference.ReferencedSOPInstanceUID = str(sop_instance_uid)
    if frame_numbers is not None:
        reference.ReferencedFrameNumber = frame_numbers
    _put(item, "ReferencedSOPSequence", DicomSequence([reference]))
