"""``sonocase demo``: its stand-in PACS takes what a real DCMTK peer sends, and the
whole demo (node, worker, library, shipped model, sender, PACS) runs end to end as
the README's main command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from service.demo import CLASSES, StandInPacs, render_outputs
from tests.support.common import dcmtk
from tests.support.orthanc import Orthanc

pytestmark = pytest.mark.integration


def test_stand_in_pacs_keeps_what_storescu_sends(tmp_path: Path) -> None:
    pacs = StandInPacs(tmp_path / "pacs")
    pacs.start()
    try:
        source = get_testdata_file("SC_rgb.dcm", download=False)
        done = subprocess.run(
            [dcmtk("storescu"), "-aec", "DEMO_PACS", "127.0.0.1", str(pacs.port), source],
            check=False,
            env=os.environ | {"TCP_NODELAY": "1"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        sent = pydicom.dcmread(source)
        [stored] = pacs.objects(sent.StudyInstanceUID)
    finally:
        pacs.stop()
    assert pydicom.dcmread(stored).SOPInstanceUID == sent.SOPInstanceUID
    [png] = render_outputs([stored], tmp_path / "out").png
    assert Image.open(png).size == (sent.Columns, sent.Rows)


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, orthanc: Orthanc) -> None:
    """The README's demo, with a DICOMweb archive (Orthanc) as a further destination."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SONOCASE_")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "demo",
            "--data-dir",
            str(tmp_path / "demo"),
            "--timeout",
            "300",
            "--destination",
            orthanc.dicomweb_url,
        ],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-5000:]
    out = done.stdout
    rows = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in CLASSES]
    assert [r[0] for r in rows] == list(CLASSES)
    for row in rows:
        assert row[1] in (*CLASSES, "outside"), row
    html = [Path(p) for p in re.findall(r"^\s+(\S+\.html)$", out, re.M)]
    png = [Path(p) for p in re.findall(r"^\s+(\S+\.png)$", out, re.M)]
    assert len(html) == len(CLASSES), "one SR per study"
    assert len(png) >= len(CLASSES) * 2, "a heatmap per image"
    for page in html:
        assert "not for primary diagnosis" in page.read_text().lower()
    for image in png:
        assert Image.open(image).mode == "RGB"
    assert "not for primary diagnosis" in out
    in_pacs = sorted(
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in (tmp_path / "demo" / "pacs").rglob("*.dcm")
    )
    in_archive = sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.get_json("/instances?expand"))
    assert in_pacs and in_archive == in_pacs, "every result in the DICOMweb archive too (STOW-RS)"
