"""Where we go round highdicom's constructors for speed: the one module that does.

Four shortcuts here and, first, one beside, all on with the setting
``fast_reports``, all off (the library's own path) without it:

* service/reports/sr_content.py: the SR's content items and templates copied from
  prototypes highdicom made once (per code, model), instead of made anew and
  checked item by item (most of the SR's cost; the encoded SR is the library's
  byte for byte, tests/test_reports_construction.py);

* :func:`sr_document`, the SR constructor without its copies of the content tree;
* :func:`key_object_selection`, the gate's reading of a key-image flag by the
  content reader highdicom's document reader ends with, without the deep copy of
  the whole document that reader makes first (more than half of checking a KOS):
  the gate only reads the parse;
* :func:`filled_copy`, with :class:`Prototypes`: the heatmap SEG, the heatmap SC
  and the key-image flag built once by the library for a key, and per object a
  copy with the values that change filled in (see :class:`Prototype`). Each key is
  its caller's, beside its builder, and names everything else the object holds:
  :func:`service.reports.seg._prototype_key`, :func:`service.reports.sc._prototype_key`,
  :func:`service.reports.kos._prototype_key` (tests/test_reports_prototypes.py
  builds both paths over many studies, templates and models);
* :func:`iod_lookups_cached`: highdicom asks its tables of the standard whether an
  IOD has an attribute (is the source multi-frame, does the new object have pixels,
  a content date) by scanning every attribute of every module of the IOD, many
  times per object (a third of making a Segmentation). The answer depends on the
  arguments and the library's tables only, so while our objects are built it is
  remembered.

The gate's memory of the content-tree shapes highdicom's SR and key object
selection readers accepted (service/reports/shapes.py, also ``fast_reports`` only)
is another module that goes round a library.

The SR: highdicom's constructor deep-copies the whole content tree, parses the copy
back into content items and walks the tree twice more to collect the evidence
(about two thirds of building a study's SR, a few content items per image). Our
content is made of highdicom's own content items and every object passes the
validation gate, which parses the encoded SR with highdicom and checks that each
referenced instance is listed as evidence: the same checks, on the bytes that
leave. So with ``fast_reports`` on, the constructor is given the root container
without its children (the document attributes, evidence and predecessors are
made by the library as usual) and the children are attached to the document
afterwards, as the constructor itself would attach them. The data set is the
library's, element for element (tests/test_reports_construction.py builds both).
With the setting off, the library's constructor does everything.

Another, round pydicom's writer, with the same setting: :mod:`service.reports.encoding` (the objects' bytes, pydicom's bytes).
"""

from __future__ import annotations

import copy
import datetime
import functools
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import highdicom._standard_utils
import highdicom.base
import highdicom.sr.content
import numpy as np
from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map
from highdicom.frame import encode_frame
from highdicom.sr.value_types import ContentSequence
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pydicom.valuerep import DA, DT, TM

Document = hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR | hd.sr.EnhancedSR


def sr_document(sr_class: type[Document], content: DicomSequence, fast: bool, **kwargs: Any) -> Document:
    """``sr_class(content=content, **kwargs)``: by the library (``fast`` False) or
    with its copy and walks of the content tree left out (see module doc)."""
    if not fast:
        return sr_class(content=content, **kwargs)
    root = content[0]
    if not isinstance(root, hd.sr.ContentItem):
        raise TypeError(f"the SR's root must be a highdicom content item, not {type(root).__name__}")
    children = root.ContentSequence
    root.ContentSequence = DicomSequence()
    try:
        document = sr_class(content=content, **kwargs)
    finally:
        root.ContentSequence = children
    document.ContentSequence = children
    document._content = ContentSequence([root], is_root=True)  # what the `content` property reads
    return document


#: The root CONTAINER's attributes of a key object selection document (highdicom's reader takes the same).
_KOS_ROOT = (
    "ConceptNameCodeSequence",
    "ContentSequence",
    "ContentTemplateSequence",
    "ValueType",
    "ContinuityOfContent",
)


def key_object_selection(ds: Dataset, fast: bool) -> hd.ko.KeyObjectSelection:
    """The content tree (TID 2010) of a parsed key object selection document, as
    highdicom reads it: by ``KeyObjectSelectionDocument.from_dataset`` (``fast``
    False), or by the content reader that method ends with, given the document's
    root content item as it does but without copying the whole document first."""
    if not fast:
        return hd.ko.KeyObjectSelectionDocument.from_dataset(ds).content
    root = Dataset()
    for keyword in _KOS_ROOT:
        setattr(root, keyword, ds[keyword].value)
    return hd.ko.KeyObjectSelection.from_sequence([root])


#: The modules that call highdicom's IOD look-up by a name of their own.
_IOD_LOOKUP_USERS = (highdicom._standard_utils, highdicom.base, highdicom.sr.content)
_library_lookup = highdicom._standard_utils.is_attribute_in_iod


@functools.cache
def _cached_lookup(attribute: str, sop_class_uid: str, exclude_path_elements: tuple[str, ...] | None) -> bool:
    return _library_lookup(attribute, sop_class_uid, exclude_path_elements)


def _remembered_lookup(attribute: str, sop_class_uid: str, exclude_path_elements: Sequence[str] | None = None) -> bool:
    """highdicom's ``is_attribute_in_iod``, remembered (its arguments made hashable)."""
    excluded = None if exclude_path_elements is None else tuple(exclude_path_elements)
    return _cached_lookup(attribute, str(sop_class_uid), excluded)


@contextmanager
def iod_lookups_cached(fast: bool) -> Iterator[None]:
    """Inside, with ``fast``, highdicom's IOD look-ups are remembered (module doc)."""
    if not fast or highdicom.base.is_attribute_in_iod is _remembered_lookup:  # type: ignore[attr-defined]  # off, or on already
        yield
        return
    for module in _IOD_LOOKUP_USERS:
        module.is_attribute_in_iod = _remembered_lookup  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module in _IOD_LOOKUP_USERS:
            module.is_attribute_in_iod = _library_lookup  # type: ignore[attr-defined]


#: What highdicom takes from the clock into a new object (SOP Common, General
#: Image, SC Image): each filled with the time of the copy.
_CLOCK: dict[str, Callable[[datetime.datetime], object]] = {
    "InstanceCreationDate": lambda now: DA(now.date()),
    "InstanceCreationTime": lambda now: TM(now.time()),
    "ContentDate": lambda now: DA(now.date()),
    "ContentTime": lambda now: TM(now.time()),
    "DateOfSecondaryCapture": lambda now: DA(now.date()),
    "TimeOfSecondaryCapture": lambda now: TM(now.time()),
}


def warm_up() -> None:
    """Load highdicom's tables of the standard (its IODs, their modules and the
    modules' attributes: half a second, once per process) now, so that a process's
    first study is not the slow one: a worker and a report lane call this as they start."""
    get_sop_class_iod_map()
    get_iod_module_map()
    get_module_attribute_map()


@functools.cache
def copied_tags(sop_class_uid: str) -> frozenset[int]:
    """The source attributes highdicom's Segmentation copies as they are: the root
    attributes of the Patient and Study modules of the source's IOD, and of its
    Specimen module (``copy_patient_and_study_information``, ``copy_specimen_information``)."""
    iods, modules, attributes = get_sop_class_iod_map(), get_iod_module_map(), get_module_attribute_map()
    tags: set[int] = set()
    for module in modules[iods[sop_class_uid]]:
        if module["ie"] in ("Patient", "Study") or (module["ie"], module["key"]) == ("Image", "specimen"):
            for item in attributes[module["key"]]:
                if not item["path"]:
                    tags.add(int(tag_for_keyword(str(item["keyword"]))))  # type: ignore[arg-type]
    return frozenset(tags)


def _hashable(value: object) -> Hashable:
    """A source's value as a key holds it (a multi-valued one as a tuple)."""
    return tuple(value) if isinstance(value, MultiValue | list) else value


def source_key(source: Dataset, keywords: Sequence[str], copies: bool) -> tuple[Hashable, ...]:
    """The part of a prototype's key that comes from its source: the SOP class and,
    for an object that ``copies`` the source's patient and study attributes
    (:func:`copied_tags`), which of them it has (their values are filled in, see
    :func:`filled_copy`); and the values of ``keywords``, the other attributes the
    library reads from it."""
    return (
        str(source.SOPClassUID),
        tuple(sorted(source.keys() & copied_tags(source.SOPClassUID))) if copies else (),
        tuple(_hashable(source.get(keyword)) for keyword in keywords),
    )


#: The value representations of the values a prototype fills in by role (:func:`prototype_of`).
_BY_ROLE = ("UI", "UT")


@dataclass(frozen=True)
class Prototype:
    """An object built by the library for one key: ``dataset`` without its pixel
    data; ``roles``, its values that differ from one object of the key to the next,
    by role (UIDs: its own SOP instance and series, its sources' SOP instances,
    series and study, highdicom's random dimension organization; texts that name
    them); ``varying``, the top-level sequences that hold one of them, and
    ``holders``, the ids of the items on the way to one (copied for each object,
    the rest shared); ``copied``, the source's elements the library copied into it;
    ``pixels``, its Pixel Data element (VR as the library chose it), emptied;
    ``keywords``, its elements' keywords by tag."""

    dataset: Dataset
    roles: Mapping[str, str]
    varying: frozenset[int]
    holders: frozenset[int]
    copied: frozenset[int]
    pixels: DataElement | None
    keywords: Mapping[int, str]


def _holders(item: Dataset, values: set[str], found: set[int]) -> bool:
    """Whether ``item`` holds one of ``values``, at any depth; ``found`` gets the ids
    of the items below it that do."""
    holds = False
    for elem in item:
        if elem.VR in _BY_ROLE and elem.value in values:
            holds = True
        elif elem.VR == "SQ":
            for child in elem.value:
                if _holders(child, values, found):
                    found.add(id(child))
                    holds = True
    return holds


def image_roles(source: Dataset, series_uid: str, sop_uid: str) -> dict[str, str]:
    """The UIDs by role of an image object derived from ``source`` (one reference to
    it) that goes to series ``series_uid`` as ``sop_uid``."""
    return {
        "series": series_uid,
        "sop": sop_uid,
        "source": str(source.SOPInstanceUID),
        "source_series": str(source.SeriesInstanceUID),
        "study": str(source.StudyInstanceUID),
    }


def prototype_of(dataset: Dataset, roles: Mapping[str, str], copied_from: Dataset | None = None) -> Prototype:
    """The :class:`Prototype` of a library-built ``dataset``: ``roles``, its values
    that change from object to object by role (UIDs, and texts that occur once;
    "sop" its own SOP Instance UID); ``copied_from``, the source whose patient and
    study elements (:func:`copied_tags`) the library copied into it, if any."""
    by_role = dict(roles)
    for item in dataset.get("DimensionOrganizationSequence") or []:
        by_role["dimension_organization"] = str(item.DimensionOrganizationUID)
    values = set(by_role.values())
    if len(values) != len(by_role):
        raise ValueError("a prototype's values by role must be distinct")
    kept = Dataset()
    for elem in dataset.iterall():  # every element converted: a copy reads them as they are
        if elem.VR == "UT" and elem.value in values and sum(e.value == elem.value for e in dataset.iterall()) > 1:
            raise ValueError(f"a text by role must occur once in the prototype: {elem.value!r}")
    for elem in dataset:
        if elem.keyword != "PixelData":
            kept.add(elem)
    kept.preamble, kept.file_meta = dataset.preamble, dataset.file_meta
    holders: set[int] = set()
    _holders(kept, values, holders)
    varying = frozenset(elem.tag for elem in kept if elem.VR == "SQ" and any(id(i) in holders for i in elem.value))
    copied: frozenset[int] = frozenset()
    if copied_from is not None:
        copied = frozenset(copied_from.keys() & kept.keys() & copied_tags(copied_from.SOPClassUID))
    pixels = None
    if "PixelData" in dataset:
        pixels = copy.copy(dataset["PixelData"])
        pixels.value = b""
    keywords: dict[int, str] = {elem.tag: elem.keyword for elem in kept}
    return Prototype(kept, by_role, varying, frozenset(holders), copied, pixels, keywords)


class Prototypes:
    """Prototypes by key, the ``size`` most recently used kept: a few per site and
    kind (an image size, a scanner's header layout, a study's shape, a model version)."""

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._items: OrderedDict[Hashable, Prototype] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable, build: Callable[[], Prototype]) -> Prototype:
        """The prototype of ``key``, made by ``build`` the first time."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        prototype = self._items[key] = build()
        if len(self._items) > self._size:
            self._items.popitem(last=False)
        return prototype


#: The elements of a data set being made, as pydicom's Dataset takes them.
_Elements = dict[BaseTag, DataElement | RawDataElement]


def _converted(item: Dataset) -> Iterator[tuple[BaseTag, DataElement]]:
    """``item``'s elements, every one converted (a prototype's are: :func:`prototype_of`)."""
    for tag, elem in item.items():
        if not isinstance(elem, DataElement):
            raise TypeError(f"element {tag} of a prototype is not converted")
        yield tag, elem


def _shell(elem: DataElement) -> DataElement:
    """A new element holding ``elem``'s value (shared): setting its value leaves
    ``elem`` as it was (``copy.copy`` without its generic protocol: most of a fill)."""
    shell: DataElement = DataElement.__new__(DataElement)
    shell.__dict__.update(elem.__dict__)
    return shell


def _retargeted(item: Dataset, mapping: Mapping[str, str], holders: frozenset[int]) -> Dataset:
    """A copy of ``item`` with each value of ``mapping``'s keys replaced by its value:
    the items on the way to one (``holders``, by id) copied, the others shared."""
    elements: _Elements = {}
    for tag, elem in _converted(item):
        shell = _shell(elem)
        value: Any = elem.value
        if elem.VR == "SQ":
            shell.value = [_retargeted(child, mapping, holders) if id(child) in holders else child for child in value]
        elif elem.VR in _BY_ROLE and value in mapping:
            shell.value = mapping[value]
        elements[tag] = shell
    return Dataset(elements)


def replaced(item: Dataset, values: Mapping[str, Any]) -> Dataset:
    """A copy of ``item`` (its elements, values shared) with ``values`` (by keyword) set."""
    elements: _Elements = {}
    for tag, elem in _converted(item):
        shell = _shell(elem)
        if elem.keyword in values:
            shell.value = values[elem.keyword]
        elements[tag] = shell
    return Dataset(elements)


def acquisition_equipment(source: Dataset) -> list[hd.ContributingEquipment]:
    """The source's acquisition equipment as highdicom's image constructors add it, or
    none where they add none."""
    try:
        return [hd.ContributingEquipment.for_image_acquisition(source)]
    except Exception:  # noqa: BLE001  # the constructors leave the item out on any error: so do we
        return []


def library_equipment(prototype: Prototype) -> Dataset:
    """highdicom's item of itself in Contributing Equipment (``ContributingEquipment.for_highdicom``,
    the prototype's last), made now: the same but for its Contribution DateTime."""
    item = prototype.dataset.ContributingEquipmentSequence[-1]
    if item.ManufacturerModelName != "highdicom":
        raise ValueError("the prototype's last contributing equipment is not highdicom")
    return replaced(item, {"ContributionDateTime": DT(datetime.datetime.now())})


def patient_and_study(source: Dataset) -> dict[str, Any]:
    """The patient and study values highdicom's ``SCImage.from_ref_dataset`` and
    ``KeyObjectSelectionDocument`` give an object of ``source`` (their reference,
    their first evidence): read from it (None where it has none; our first source
    has each, see ``service.reports.build.source_headers``) and turned into values
    as the library's base constructor turns them."""
    value = {keyword: source.get(keyword) for keyword in PATIENT_AND_STUDY}
    sex = value["PatientSex"]
    value["PatientBirthDate"] = DA(value["PatientBirthDate"])
    value["PatientSex"] = sex if sex is None or sex == "" else hd.PatientSexValues(sex).value
    value["StudyDate"] = None if value["StudyDate"] is None else DA(value["StudyDate"])
    value["StudyTime"] = None if value["StudyTime"] is None else TM(value["StudyTime"])
    return value


#: The source's patient and study attributes highdicom copies into a new object (what
#: ``patient_and_study`` reads; Type 2 in our objects, see ``build.source_headers``).
PATIENT_AND_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def binary_pixels(frames: np.ndarray) -> bytes:
    """The Pixel Data highdicom's Segmentation writes for the BINARY ``frames`` (in
    order, each a boolean plane): one bit a pixel, least significant first, packed
    as one run (highdicom packs whole bytes as it goes and the rest at the end), an
    odd length ended with b"0" as highdicom ends it."""
    packed = np.packbits(frames, bitorder="little").tobytes()
    return packed + b"0" if len(packed) % 2 else packed


def encoded_pixels(prototype: Prototype, pixels: np.ndarray) -> bytes:
    """``pixels`` as highdicom's SCImage constructor encodes its one frame, in the
    prototype's transfer syntax and pixel description."""
    ds = prototype.dataset
    syntax = ds.file_meta.TransferSyntaxUID
    frame = encode_frame(
        pixels,
        transfer_syntax_uid=syntax,
        bits_allocated=ds.BitsAllocated,
        bits_stored=ds.BitsStored,
        photometric_interpretation=ds.PhotometricInterpretation,
        pixel_representation=ds.PixelRepresentation,
        planar_configuration=ds.get("PlanarConfiguration"),
    )
    return encapsulate([frame]) if syntax.is_encapsulated else frame


def filled_copy(prototype: Prototype, roles: Mapping[str, str], source: Dataset, values: Mapping[str, Any]) -> Dataset:
    """The prototype's object for another object of its key: every value of a role
    made ``roles``' (a role not given, the dimension organization, gets a new UID as
    highdicom draws it), the source's copied elements taken from ``source`` (the
    same element, as the library adds it), the clock's values (:data:`_CLOCK`) now,
    and ``values`` (by keyword) set, each on an element the prototype has. Top-level
    elements are the object's own; nested items that hold none of the roles' values
    are the prototype's, shared (read and encoded, never changed)."""
    now = datetime.datetime.now()
    mapping = {old: roles[role] if role in roles else str(hd.UID()) for role, old in prototype.roles.items()}
    proto = prototype.dataset
    missing = values.keys() - {*prototype.keywords.values(), "PixelData"}
    if missing:
        raise KeyError(f"the prototype has no {', '.join(sorted(missing))}")
    elements: _Elements = {}
    for tag, elem in _converted(proto):
        if tag in prototype.copied:
            elements[tag] = source[tag]
            continue
        shell = _shell(elem)
        keyword = prototype.keywords[tag]
        value: Any = elem.value
        if keyword in values:
            shell.value = values[keyword]
        elif tag in prototype.varying:
            shell.value = [
                _retargeted(item, mapping, prototype.holders) if id(item) in prototype.holders else item
                for item in value
            ]
        elif elem.VR in _BY_ROLE and value in mapping:
            shell.value = mapping[value]
        elif keyword in _CLOCK:
            shell.value = _CLOCK[keyword](now)
        elements[tag] = shell
    if prototype.pixels is not None:
        pixels = _shell(prototype.pixels)
        pixels.value = values["PixelData"]
        elements[pixels.tag] = pixels
    new = Dataset(elements)
    new.preamble = proto.preamble
    new.file_meta = _file_meta(proto.file_meta, mapping[prototype.roles["sop"]])
    return new


def _file_meta(proto: FileMetaDataset, sop_uid: str) -> FileMetaDataset:
    """The prototype's file meta information for the object ``sop_uid``."""
    meta = FileMetaDataset()
    for elem in proto:
        meta.add(copy.copy(elem))
    old = str(proto.MediaStorageSOPInstanceUID)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.FileMetaInformationGroupLength = (
        int(proto.FileMetaInformationGroupLength) + len(sop_uid) + len(sop_uid) % 2 - len(old) - len(old) % 2
    )
    return meta
