"""Issue 19's test of the domain guard on real images: every real ultrasound file
that ships in pydicom and pydicom-data (echocardiograms, obstetric and abdominal
scans: not one breast) is pushed by DCMTK's storescu to one running `sonocase
serve` as a study named BREAST (Body Part Examined and Study Description), so no
routing rule can skip it. Each image must end not assessed: analysed and flagged
as outside the model's training domain (``out_of_distribution`` true in `sonocase
status --json`), or not analysed at all with the reason; never a class. The SR at
the DCMTK storescp PACS carries no class probability and no image region, and no
key-image flag arrives.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pydicom
import pytest

from service.ledger import StudyState
from tests.support.dicom_peers import ULTRASOUND_FILES
from tests.support.reports import default_template
from tests.support.site import Site, start_site
from tests.support.worker import child_env

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

BREAST = {"BodyPartExamined": "BREAST", "StudyDescription": "BREAST"}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    site = start_site(tmp_path_factory.mktemp("not-assessed"), **BREAST)
    yield site
    site.node.stop()
    site.pacs.stop()


def _status_json(site: Site, study_uid: str) -> dict[str, Any]:
    """What `sonocase status STUDY --json` prints, run as an operator would."""
    shown = subprocess.run(
        [sys.executable, "-m", "service", "status", study_uid, "--json"],
        check=False,
        env=child_env(site.settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    return dict(json.loads(shown.stdout))


def _content(items: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Every content item under ``items``, depth first."""
    return [found for item in items for found in (item, *_content(item.get("ContentSequence", [])))]


def _problems(site: Site, name: str) -> list[str]:
    """What is wrong with one file's study: empty when its image ended not assessed
    and its SR at the PACS carries no class probability."""
    study_uid = site.studies[name]
    row = site.states[study_uid]
    if (row.state, row.routing_rule) != (StudyState.SENT, "breast"):
        return [f"{name}: {row.state} by rule {row.routing_rule} ({row.failed_stage}: {row.error})"]
    result = _status_json(site, study_uid)["result"]
    (image,) = result["images"]
    problems = []
    if image["predicted"] is not None:
        problems.append(f"{name}: called {image['predicted']} {image['probability']:.2f}")
    if image["frames"] and not (
        image["out_of_distribution"]
        and result["summary"]["out_of_distribution"]
        and all(frame["out_of_distribution"] for frame in image["frames"])
    ):
        problems.append(f"{name}: out_of_distribution is not true for the image, each frame and the study")
    if not image["frames"] and not image["skipped"]:
        problems.append(f"{name}: neither analysed nor skipped with a reason")
    if result["similar"]:
        problems.append(f"{name}: similar diagnosed studies offered")
    arrived = [ds for ds in site.pacs.received() if ds.StudyInstanceUID == study_uid]
    srs = [ds for ds in arrived if ds.Modality == "SR"]
    if len(srs) != 1:
        return [*problems, f"{name}: {len(srs)} SRs at the PACS"]
    items = _content(srs[0].ContentSequence)
    template = default_template()
    probabilities = {(c.probability.value, c.probability.scheme) for c in template.classes.values()}
    named = {
        (i.ConceptNameCodeSequence[0].CodeValue, i.ConceptNameCodeSequence[0].CodingSchemeDesignator)
        for i in items
        if i.ValueType == "NUM"
    }
    if named & probabilities:
        problems.append(f"{name}: its SR at the PACS carries a class probability")
    if any(i.ValueType == "SCOORD" for i in items):
        problems.append(f"{name}: its SR at the PACS draws an image region")
    if "KO" in {ds.Modality for ds in arrived}:
        problems.append(f"{name}: a key-image flag reached the PACS")
    return problems


def test_every_real_non_breast_ultrasound_file_is_not_assessed(site: Site) -> None:
    """One test over every file (not one per file): the failure lists every file
    still given a class."""
    assert set(site.studies) == ULTRASOUND_FILES
    problems = [problem for name in sorted(site.studies) for problem in _problems(site, name)]
    assert problems == [], "\n".join(problems)
