"""Hypothesis strategies for hostile input: real files with bytes set, cut or
inserted, and PDU streams with any type and length."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypothesis import strategies as st

from service.ingest.fast import PDU_MARGIN
from tests.support.dicom_peers import us_file

MB = 1 << 20
#: Small real files (a few KB to a few hundred KB), so a fuzzed example runs fast.
SMALL = ("ExplVR_BigEnd.dcm", "OBXXXX1A_rle.dcm", "US1_J2KI.dcm", "gdcm-US-ALOKA-16.dcm")


@dataclass(frozen=True)
class Mutation:
    """Edits to a real file's data set; its repr stays short for hypothesis reports."""

    name: str
    edits: tuple[tuple[str, int, bytes], ...]

    def apply(self) -> bytes:
        data = bytearray(us_file(self.name).data_set)
        for kind, pos, value in self.edits:
            pos = min(pos, len(data))
            if kind == "set":
                data[pos : pos + 1] = value
            elif kind == "cut":
                del data[pos : pos + len(value)]
            else:
                data[pos:pos] = value
        return bytes(data)


@st.composite
def mutations(draw: st.DrawFn) -> Mutation:
    name = draw(st.sampled_from(SMALL))
    size = len(us_file(name).data_set)
    edits = []
    for _ in range(draw(st.integers(1, 8))):
        # Most of a file is pixel data: aim half the edits at the element headers up front.
        pos = draw(st.integers(0, min(size, 2048) - 1) | st.integers(0, size - 1))
        edits.append((draw(st.sampled_from(["set", "cut", "insert"])), pos, draw(st.binary(min_size=1, max_size=16))))
    return Mutation(name, tuple(edits))


@st.composite
def pdu_streams(draw: st.DrawFn) -> bytes:
    """PDU headers with any type and length (some announcing up to 4 GiB), and bodies
    shorter, longer or garbled."""
    out = b""
    for _ in range(draw(st.integers(1, 4))):
        pdu_type = draw(st.integers(0, 9))
        body = draw(st.binary(max_size=300))
        length = draw(
            st.sampled_from([len(body), len(body) + 5, 0xFFFFFFF0, MB + PDU_MARGIN + 1]) | st.integers(0, (1 << 32) - 1)
        )
        out += struct.pack(">BBL", pdu_type, draw(st.integers(0, 255)), length) + body
    return out + draw(st.binary(max_size=8))
