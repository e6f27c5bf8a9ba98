"""kill -9 the node while DCMTK storescu is sending, on each receiver engine: every
instance that got a success status must be on disk and in the ledger after a
restart, no file the ledger does not know is left in the spool, and the restarted
node completes the study."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from service.ingest.rules import parse_instance
from service.ledger import Ledger
from tests.support.common import dcmtk, free_port
from tests.support.dicom_peers import NodeProcess, data_set_offset, ultrasound_files

pytestmark = pytest.mark.integration

INSTANCES = 300
KILL_AFTER = 80  # successes seen before the kill


def make_instances(out: Path) -> tuple[str, list[Path]]:
    """Small real ultrasound instances of one study, each with its own UIDs."""
    source = next(f for f in ultrasound_files() if f.name == "OBXXXX1A_rle.dcm")
    ds = dcmread(source.path)
    ds.StudyInstanceUID = generate_uid()
    paths = []
    for n in range(INSTANCES):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = n + 1
        path = out / f"{n:04d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return str(ds.StudyInstanceUID), paths


def acknowledged(storescu_log: str) -> set[str]:
    """The files storescu got a success status for, from its verbose log."""
    done, current = set(), None
    for line in storescu_log.splitlines():
        if m := re.match(r"I: Sending file: (.+)$", line):
            current = m.group(1).strip()
        elif line.startswith("I: Received Store Response (Success)") and current:
            done.add(current)
    return done


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fast", "stock"])
def test_kill_9_while_receiving_loses_no_acknowledged_instance(tmp_path: Path, engine: str) -> None:
    src = tmp_path / "send"
    src.mkdir()
    study_uid, paths = make_instances(src)
    port = free_port()
    env = {
        "SONOCASE_HOST": "127.0.0.1",
        "SONOCASE_PORT": str(port),
        "SONOCASE_HTTP_PORT": "0",
        "SONOCASE_DATA_DIR": str(tmp_path / "data"),
        "SONOCASE_QUIET_PERIOD_S": "2",
        "SONOCASE_DURABILITY": "fsync",
        "SONOCASE_WORKERS": "0",
        "SONOCASE_RECEIVER_ENGINE": engine,
    }
    node = NodeProcess(env, log=tmp_path / "node1.log")
    sender = subprocess.Popen(
        [dcmtk("storescu"), "-v", "-R", "-xr", "-aec", "SONOCASE", "127.0.0.1", str(port), *map(str, paths)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert sender.stdout is not None
    lines, successes = [], 0
    for line in sender.stdout:
        lines.append(line)
        successes += line.startswith("I: Received Store Response (Success)")
        if successes == KILL_AFTER:
            node.kill()
            break
    lines.extend(sender.stdout)
    sender.wait(timeout=60)
    sent = acknowledged("".join(lines))
    assert KILL_AFTER <= len(sent) < INSTANCES, "the kill did not land mid-way"
    assert sender.returncode != 0

    restarted = NodeProcess(env, log=tmp_path / "node2.log")
    try:
        ledger = Ledger(tmp_path / "data" / "ledger.sqlite3", durable=False)
        try:
            recorded = {rec.sop_instance_uid: rec for rec in ledger.instances(study_uid)}
            for name in sent:
                sop_uid = str(dcmread(name, stop_before_pixels=True).SOPInstanceUID)
                assert sop_uid in recorded, f"{name}: acknowledged but not in the ledger"
                stored = Path(recorded[sop_uid].path).read_bytes()
                inst = parse_instance(stored[data_set_offset(stored) :], recorded[sop_uid].transfer_syntax, 1 << 30)
                assert inst.sop_instance_uid == sop_uid  # complete: every element parses to the end
            spool = tmp_path / "data" / "spool"
            assert not list(spool.glob("*/.tmp-*")), "stale temporary files kept"
            files = {path.stem for path in spool.glob("*/*.dcm")}
            assert files == set(recorded), "files in the spool the ledger does not know, or records without files"
            deadline = time.monotonic() + 30
            # complete, and perhaps already queued by the scheduler
            while ledger.study(study_uid).completed_at is None:
                assert time.monotonic() < deadline, "the restarted node did not complete the study"
                time.sleep(0.2)
        finally:
            ledger.close()
    finally:
        code, log = restarted.stop()
    assert code == 0, log
