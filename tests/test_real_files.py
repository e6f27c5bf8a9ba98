"""Every real ultrasound file that ships in pydicom and pydicom-data, each pushed as a
study of its own by DCMTK's storescu (in its own transfer syntax) to one running
`sonocase serve`, ends `sent`, its SR and SCs accepted by a DCMTK storescp PACS and
valid there, or `skipped` by a named routing rule; never `failed`. Archive values
that pydicom and highdicom refuse (``1994.11.05``, ``11:20:00``) are repaired, and
no data-set value of these files reaches the node's log."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.ledger import Ledger, StudyState
from service.reports.validation import check_object
from tests.support.dicom_peers import ULTRASOUND_FILES, ultrasound_files
from tests.support.reports import default_template
from tests.support.site import Site, start_site

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

#: Files a default routing rule keeps out of the analysis, and the rule: two name
#: an echocardiogram in Study and Series Description, one in Performed Procedure
#: Step Description.
SKIPPED = {
    "color-pl.dcm": "other-body-part",
    "color-px.dcm": "other-body-part",
    "JPGLosslessP14SV1_1s_1f_8b.dcm": "other-body-part",
}
#: What these files hold that pydicom or highdicom refuse, and names: never in the log.
VALUES = (
    "1994.11.05",
    "11:20:00",
    "1997.04.24",
    "14:04:38",
    "CompressedSamples^US1",
    "Citizen^Jan",
    "NAME^PATIENT^NAME",
    "Echocardiogram",
    "ECHOCARDIOGRAM",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    site = start_site(tmp_path_factory.mktemp("real-files"))
    yield site
    site.node.stop()
    site.pacs.stop()


def test_every_shipped_ultrasound_file_is_in_the_matrix() -> None:
    assert {f.name for f in ultrasound_files()} == ULTRASOUND_FILES


@pytest.mark.parametrize("name", sorted(ULTRASOUND_FILES))
def test_real_file_is_sent_or_skipped_by_a_named_rule(site: Site, name: str, tmp_path: Path) -> None:
    study_uid = site.studies[name]
    row = site.states[study_uid]
    assert row.state != StudyState.FAILED, f"{row.failed_stage}: {row.error}"
    arrived = [ds for ds in site.pacs.received() if ds.StudyInstanceUID == study_uid]
    if name in SKIPPED:
        assert (row.state, row.routing_rule) == (StudyState.SKIPPED, SKIPPED[name])
        assert arrived == []
        return
    assert row.state == StudyState.SENT
    ledger = Ledger(site.settings.ledger_path, durable=False)
    try:
        result = ledger.result(study_uid)
    finally:
        ledger.close()
    (image,) = result.images
    assert bool(image.frames) != bool(image.skipped)  # analysed, or the SR says why not
    kinds = [ds.Modality for ds in arrived]
    assert (kinds.count("SR"), kinds.count("OT")) == (1, bool(image.frames))  # the SR; a heatmap SC if analysed
    disclaimer = default_template().disclaimer
    for n, ds in enumerate(arrived):
        path = tmp_path / f"{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        check_object(path.read_bytes(), disclaimer)  # valid as the PACS holds it, not only as we sent it


def test_no_value_of_these_files_reaches_the_log(site: Site) -> None:
    log = site.node.log()
    assert "source values not valid for their VR, repaired" in log  # the archive dates and times
    for value in VALUES:
        assert value not in log, value
