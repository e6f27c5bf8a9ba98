"""Deflated data sets (Deflated Explicit VR Little Endian, PS3.5 A.5), inflated with
a bound.

A megabyte of deflate can inflate to a gigabyte, and pydicom inflates a whole data
set at once. The receiver (which refuses a data set that inflates past
``max_dataset_mb``) and the worker (which reads what was stored) both inflate only
through here, so one bound holds on both sides.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

#: Inflated bytes produced per step: the memory a size check needs.
_PIECE = 1 << 20


class InflateError(ValueError):
    """The deflated bytes do not inflate (corrupt or truncated)."""


class InflatedTooLarge(ValueError):
    """The deflated bytes inflate to more than the bound."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the deflated data set inflates to more than {limit >> 20} MB")
        self.limit = limit


def inflated_pieces(deflated: bytes | memoryview, limit: int) -> Iterator[bytes]:
    """The inflated bytes of a raw deflate stream, a megabyte at a time; raise
    :class:`InflatedTooLarge` as soon as they pass ``limit`` bytes, and
    :class:`InflateError` where the stream is corrupt."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending: bytes | memoryview = deflated
    total = 0
    try:
        while True:
            piece = inflater.decompress(pending, _PIECE)
            total += len(piece)
            if total > limit:
                raise InflatedTooLarge(limit)
            if piece:
                yield piece
            pending = inflater.unconsumed_tail
            if inflater.eof or (not pending and len(piece) < _PIECE):
                return
    except zlib.error as exc:
        raise InflateError(f"the deflated data set does not inflate: {exc}") from None


def inflated_size(deflated: bytes | memoryview, limit: int) -> int:
    """How many bytes a raw deflate stream inflates to, in constant memory (see
    :func:`inflated_pieces` for the errors)."""
    return sum(len(piece) for piece in inflated_pieces(deflated, limit))


def inflate(deflated: bytes | memoryview, limit: int) -> bytes:
    """Inflate a raw deflate stream of at most ``limit`` inflated bytes (see
    :func:`inflated_pieces` for the errors)."""
    return b"".join(inflated_pieces(deflated, limit))


def read_instance(path: Path, max_inflated: int, stop_before_pixels: bool = False) -> Dataset:
    """``pydicom.dcmread`` of a Part 10 file, after checking that a deflated data set
    inflates to at most ``max_inflated`` bytes (pydicom inflates it whole, with no
    bound); raises :class:`InflatedTooLarge` or :class:`InflateError` otherwise."""
    meta = read_file_meta_info(path)
    if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        # preamble, "DICM", the group length element (12 bytes), then the group
        offset = 132 + 12 + int(meta.get("FileMetaInformationGroupLength", 0))
        with path.open("rb") as fh:
            fh.seek(offset)
            inflated_size(fh.read(), max_inflated)
    return dcmread(path, stop_before_pixels=stop_before_pixels)
