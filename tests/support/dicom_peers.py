"""Test support for the receiver: the real ultrasound files that ship with pydicom
and pydicom-data, a C-STORE that sends raw bytes, and `sonocase serve` as a process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cache
from io import BytesIO
from pathlib import Path

from pydicom import dcmread, dcmwrite
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from training.ood_sources import real_ultrasound_files

#: Every ultrasound file shipped in pydicom and pydicom-data (found by SOP Class UID
#: or Modality US). The test suite fails if discovery finds a different set, so a
#: missing pydicom-data cannot silently shrink the coverage.
ULTRASOUND_FILES = frozenset(
    {
        "ExplVR_BigEnd.dcm",  # explicit VR big endian
        "examples_jpeg2k.dcm",  # JPEG 2000 lossless
        "examples_palette.dcm",  # palette colour
        "examples_rgb_color.dcm",
        "examples_ybr_color.dcm",  # multi-frame JPEG baseline, YBR_FULL_422
        "JPGLosslessP14SV1_1s_1f_8b.dcm",  # JPEG lossless process 14 SV1
        "OBXXXX1A.dcm",
        "OBXXXX1A_2frame.dcm",
        "OBXXXX1A_expb.dcm",  # big endian
        "OBXXXX1A_expb_2frame.dcm",
        "OBXXXX1A_rle.dcm",  # RLE
        "OBXXXX1A_rle_2frame.dcm",  # RLE, Ultrasound Multi-frame
        "US1_J2KI.dcm",  # JPEG 2000 lossy
        "US1_J2KR.dcm",
        "US1_UNCI.dcm",
        "US1_UNCR.dcm",
        "color-pl.dcm",  # retired Ultrasound Image Storage
        "color-px.dcm",
        "color3d_jpeg_baseline.dcm",  # 120 frames
        "gdcm-US-ALOKA-16.dcm",  # 16-bit palette, implicit VR
        "gdcm-US-ALOKA-16_big.dcm",
    }
)


@dataclass(frozen=True)
class UsFile:
    """A real ultrasound file split where the data set begins."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    transfer_syntax: str
    data_set: bytes  # the encoded data set after the file meta group

    @property
    def name(self) -> str:
        return self.path.name


def split_file(path: Path) -> UsFile:
    """Read a Part 10 file's meta group and return its data set bytes untouched."""
    ds = dcmread(path, stop_before_pixels=True)
    data = path.read_bytes()
    offset = data_set_offset(data)
    return UsFile(
        # The file meta names the instance even when a test deleted it from the data set.
        path=path,
        sop_class_uid=str(ds.get("SOPClassUID", ds.file_meta.MediaStorageSOPClassUID)),
        sop_instance_uid=str(ds.get("SOPInstanceUID", ds.file_meta.MediaStorageSOPInstanceUID)),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        data_set=data[offset:],
    )


def data_set_offset(data: bytes) -> int:
    """Where the data set starts: after preamble, ``DICM`` and the (0002,xxxx) group
    (explicit VR little endian, PS3.10 7.1), element by element."""
    assert data[128:132] == b"DICM", "not a Part 10 file"
    pos = 132
    while data[pos : pos + 2] == b"\x02\x00":
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            length = int.from_bytes(data[pos + 8 : pos + 12], "little")
            pos += 12 + length
        else:
            length = int.from_bytes(data[pos + 6 : pos + 8], "little")
            pos += 8 + length
    return pos


@cache
def ultrasound_files() -> tuple[UsFile, ...]:
    """The ultrasound files in pydicom and pydicom-data (once per session: it reads
    the header of every file pydicom ships)."""
    return tuple(split_file(path) for path in real_ultrasound_files())


def cstore_fragments(
    assoc: Association,
    raw: bytes,
    sop_class_uid: str,
    sop_instance_uid: str,
    message_id: int = 1,
    max_pdu: int | None = None,
) -> list[P_DATA]:
    """The P-DATA primitives of a C-STORE request with ``raw`` as its data set, as is
    (even empty), in PDUs of at most ``max_pdu`` bytes (default: the peer's limit).

    pynetdicom's own send_c_store encodes a Dataset or reads a file; tests need to
    put exactly these bytes on the wire, including a zero-length data set.
    """
    cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == sop_class_uid)
    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = sop_class_uid
    req.AffectedSOPInstanceUID = sop_instance_uid
    req.Priority = 2
    req.DataSet = BytesIO(raw or b"\0")
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    fragments = list(msg.encode_msg(cx.context_id, max_pdu or assoc.acceptor.maximum_length))
    if not raw:  # a single, empty, last data set fragment
        command = [f for f in fragments if f.presentation_data_value_list[0][1][0] & 1]
        empty = type(fragments[-1])()
        empty.presentation_data_value_list.append((cx.context_id, b"\x02"))
        fragments = [*command, empty]
    return fragments


def send_raw(assoc: Association, raw: bytes, sop_class_uid: str, sop_instance_uid: str, message_id: int = 1) -> int:
    """Send ``raw`` as the data set of a C-STORE (see :func:`cstore_fragments`);
    return the status."""
    fragments = cstore_fragments(assoc, raw, sop_class_uid, sop_instance_uid, message_id)
    # As Association.send_c_store does: pause the association's reactor so that it
    # does not take the response off the queue first.
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        for fragment in fragments:
            assoc.dul.send_pdu(fragment)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    assert rsp is not None, "no C-STORE response"
    return int(rsp.Status)


class NodeProcess:
    """`sonocase serve` in a subprocess, ready once it printed its listening line.

    Its log goes to a file, not a pipe: a pipe nobody reads would block the node.
    """

    def __init__(
        self, env: dict[str, str], args: tuple[str, ...] = (), log: Path | None = None, timeout: float = 30
    ) -> None:
        self.log = log or Path(env["SONOCASE_DATA_DIR"]).with_suffix(".log")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", "serve", *args],
                env={**os.environ, **env},
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if line.startswith("listening as "):
                self.ready_line = line.strip()
                return
            if not line or time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"sonocase serve did not start:\n{self.log.read_text()}")

    def stop(self) -> tuple[int, str]:
        """SIGTERM and wait; return the exit code and the log."""
        self.proc.terminate()
        self.proc.communicate(timeout=30)
        return self.proc.returncode, self.log.read_text()

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as in a crash."""
        self.proc.kill()
        self.proc.communicate(timeout=30)


def us_file(name: str) -> UsFile:
    """The shipped ultrasound file of that name."""
    return next(f for f in ultrasound_files() if f.name == name)


def rewrite(tmp_path: Path, name: str, transfer_syntax: str | None = None, **changes: object) -> UsFile:
    """A real file with some attributes changed (``None`` deletes), re-encoded by pydicom."""
    ds = dcmread(us_file(name).path)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    syntax = UID(transfer_syntax or ds.file_meta.TransferSyntaxUID)
    ds.file_meta.TransferSyntaxUID = syntax
    out = tmp_path / f"{name}.{len(list(tmp_path.iterdir()))}.dcm"
    # force_encoding: pydicom converts between byte orders only when told to.
    dcmwrite(out, ds, implicit_vr=syntax.is_implicit_VR, little_endian=syntax.is_little_endian, force_encoding=True)
    return split_file(out)


#: DCMTK's tools with Nagle off, as a PACS sends.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
#: The storescu option that proposes a file's own transfer syntax first: no transcoding.
STORESCU_SYNTAX_OPTION = {
    ImplicitVRLittleEndian: "-xi",
    ExplicitVRLittleEndian: "-xe",
    ExplicitVRBigEndian: "-xb",
    DeflatedExplicitVRLittleEndian: "-xd",
    JPEGBaseline8Bit: "-xy",
    JPEGExtended12Bit: "-xx",
    JPEGLosslessSV1: "-xs",
    JPEGLSLossless: "-xt",
    JPEGLSNearLossless: "-xu",
    JPEG2000Lossless: "-xv",
    JPEG2000: "-xw",
    RLELossless: "-xr",
}
