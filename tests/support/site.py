"""A whole site on loopback: ``sonocase serve`` sending to a DCMTK storescp PACS, with
every real ultrasound file pushed to it by DCMTK's storescu as a study of its own."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import UID, generate_uid

from service.ledger import Ledger, StudyState
from service.settings import Settings, load_settings
from tests.support.common import dcmtk, free_port, wait_for
from tests.support.dicom_peers import DCMTK_ENV, STORESCU_SYNTAX_OPTION, ultrasound_files
from tests.support.reports import Storescp, start_storescp
from tests.support.worker import Process, serve


@dataclass
class Site:
    settings: Settings
    node: Process
    pacs: Storescp
    studies: dict[str, str]  # file name -> its study's UID
    states: dict[str, dict[str, object]]  # study UID -> its ledger row once it settled


def _as_own_study(path: Path, out: Path, values: dict[str, str]) -> str:
    """The file with new study, series and instance UIDs (several files share them)
    and ``values`` (keyword -> value) set, everything else as it was; returns the
    study UID."""
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(out, enforce_file_format=True)
    return str(ds.StudyInstanceUID)


def start_site(folder: Path, **values: str) -> Site:
    """A node sending to a DCMTK storescp, and every real ultrasound file pushed to
    it by storescu (in its own transfer syntax) as a study of its own, with
    ``values`` set; returns once every study is sent, skipped or failed."""
    pacs_port = free_port()
    settings = load_settings(
        data_dir=folder / "data",
        host="127.0.0.1",
        port=free_port(),
        http_port=0,
        quiet_period_s=1.0,
        durability="none",
        workers=1,
        destinations=f"STORESCP@127.0.0.1:{pacs_port}",
    )
    pacs = start_storescp(folder / "pacs", pacs_port)
    node = serve(settings, folder / "node.log")
    studies = {}
    (folder / "push").mkdir()
    for us_file in ultrasound_files():
        out = folder / "push" / us_file.name
        studies[us_file.name] = _as_own_study(us_file.path, out, values)
        pushed = subprocess.run(
            [
                dcmtk("storescu"),
                "-R",
                STORESCU_SYNTAX_OPTION[UID(us_file.transfer_syntax)],
                "-aec",
                settings.ae_title,
                "127.0.0.1",
                str(settings.port),
                str(out),
            ],
            env=DCMTK_ENV,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert pushed.returncode == 0, f"{us_file.name}: {pushed.stderr}"

    def settled() -> dict[str, dict[str, object]] | None:
        ledger = Ledger(settings.ledger_path, durable=False)
        try:
            rows = {uid: ledger.study(uid) for uid in studies.values()}
        finally:
            ledger.close()
        done = (StudyState.SENT, StudyState.SKIPPED, StudyState.FAILED)
        return rows if all(row is not None and row.state in done for row in rows.values()) else None  # type: ignore[misc]

    states = wait_for("every study to be sent, skipped or failed", settled, timeout=600, interval=0.5)
    return Site(settings, node, pacs, studies, states)
