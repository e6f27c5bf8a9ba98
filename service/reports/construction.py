"""Where we go round highdicom's constructors for speed: the one module that does.

highdicom's SR constructor deep-copies the whole content tree, parses the copy
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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import highdicom as hd
from highdicom.sr.value_types import ContentSequence

Document = TypeVar("Document", hd.sr.Comprehensive3DSR, hd.sr.ComprehensiveSR, hd.sr.EnhancedSR)


def sr_document(sr_class: type[Document], content: Sequence[hd.sr.ContentItem], fast: bool, **kwargs: Any) -> Document:
    """``sr_class(content=content, **kwargs)``: by the library (``fast`` False) or
    with its copy and walks of the content tree left out (see module doc)."""
    if not fast:
        return sr_class(content=content, **kwargs)
    root = content[0]
    children = root.ContentSequence
    root.ContentSequence = []
    try:
        document = sr_class(content=content, **kwargs)
    finally:
        root.ContentSequence = children
    document.ContentSequence = children
    document._content = ContentSequence([root], is_root=True)  # what the `content` property reads
    return document
