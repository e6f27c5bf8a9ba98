"""How deep a data set's sequences nest, read from its encoded bytes without
recursion, so that what the worker cannot read is refused at the door (0xC004).

pydicom reads nested sequences recursively, whether their lengths are explicit or
undefined; at Python's default recursion limit it reads about 150 levels, and
beyond it the worker would fail the study after the receiver had answered
Success. :data:`MAX_SEQUENCE_DEPTH` is well inside that (real objects nest a few
levels; an SR content tree a dozen or so), and the walk here counts levels the
way pydicom will read them: sequences of explicit and of undefined length, an
explicit-VR ``UN`` element of a sequence's tag (pydicom reads its value as an
implicit-VR sequence), and the items of encapsulated Pixel Data skipped as
fragments.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR

#: The deepest nesting of sequences accepted (the worker reads it; a test proves it).
MAX_SEQUENCE_DEPTH = 64

_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xE000, 0xE00D, 0xE0DD
_PIXEL_DATA = 0x7FE00010
#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


@dataclass
class _Level:
    """A sequence or an item being walked: where it ends (None: at its delimiter),
    and how the elements inside it are encoded."""

    end: int | None
    implicit: bool
    sequence: bool


def _is_sequence_tag(tag: int) -> bool:
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:  # a private or unknown tag: pydicom keeps its value as bytes
        return False


def too_deep(
    data: bytes | bytearray | memoryview, implicit_vr: bool, little_endian: bool, limit: int = MAX_SEQUENCE_DEPTH
) -> bool:
    """Whether sequences in ``data`` (an encoded data set) nest deeper than ``limit``.

    Walks element headers only, in a loop with an explicit stack, so its cost is
    the number of elements and its memory the depth (at most ``limit`` + 1). Bytes
    that do not parse end the walk quietly: judging them is the parser's work.
    """
    order = "<" if little_endian else ">"
    head, long_length = struct.Struct(order + "HHI"), struct.Struct(order + "I")
    short_length = struct.Struct(order + "H")
    size, pos, depth = len(data), 0, 0
    stack: list[_Level] = []
    while pos + 8 <= size:
        while stack and stack[-1].end is not None and pos >= stack[-1].end:  # explicit lengths end by position
            depth -= stack.pop().sequence
        implicit = stack[-1].implicit if stack else implicit_vr
        group, element, length = head.unpack_from(data, pos)
        if group == 0xFFFE:
            pos += 8
            if element == _ITEM:
                stack.append(_Level(None if length == _UNDEFINED else pos + length, implicit, False))
            elif stack and element in (_ITEM_END, _SEQUENCE_END) and stack[-1].end is None:
                depth -= stack.pop().sequence
            continue
        tag = group << 16 | element
        vr = b"" if implicit else bytes(data[pos + 4 : pos + 6])
        if implicit:
            header = 8
        elif vr in _LONG_VRS:
            header, length = 12, long_length.unpack_from(data, pos + 8)[0] if pos + 12 <= size else 0
        else:
            header, length = 8, short_length.unpack_from(data, pos + 6)[0]
        pos += header
        if tag == _PIXEL_DATA and length == _UNDEFINED:
            pos = _after_fragments(data, pos, head)
        elif vr == b"SQ" or length == _UNDEFINED or (vr in (b"", b"UN") and _is_sequence_tag(tag)):
            depth += 1
            if depth > limit:
                return True
            inner_implicit = implicit or vr == b"UN"  # a UN sequence's value is implicit VR little endian
            stack.append(_Level(None if length == _UNDEFINED else pos + length, inner_implicit, True))
        else:
            pos += length
    return False


def _after_fragments(data: bytes | bytearray | memoryview, pos: int, head: struct.Struct) -> int:
    """Where encapsulated Pixel Data's items (fragments, not data sets) end."""
    while pos + 8 <= len(data):
        group, element, length = head.unpack_from(data, pos)
        pos += 8
        if (group, element) == (0xFFFE, _SEQUENCE_END):
            break
        pos += length
    return pos
