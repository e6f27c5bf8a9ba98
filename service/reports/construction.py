"""Where we go round highdicom's constructors for speed: the one module that does.

Three shortcuts here and, first, one beside, all on with the setting
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

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import highdicom as hd
import highdicom._standard_utils
import highdicom.base
import highdicom.sr.content
from highdicom.sr.value_types import ContentSequence
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

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
