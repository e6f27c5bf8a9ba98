"""The mission, end to end, with real peers only: DCMTK's storescu plays the
scanner/PACS pushing a study to `sonocase serve`, DCMTK's storescp plays the PACS
receiving the results. One SR and the expected SCs arrive, once; they pass
dciodvfy and dsr2html; the SR's probabilities and similar studies are the ones the
worker computed and stored in the ledger."""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from service.ledger import Ledger, StudyState
from service.reports.sr import OHIF_BIDIRECTIONAL, OHIF_CONTOUR, assessed_frames, reading_order
from service.results import NO_LESION, StudyResult
from service.settings import Settings, load_settings
from tests.support.common import free_port, wait_for
from tests.support.reports import (
    Storescp,
    data_file,
    dciodvfy_errors,
    default_template,
    dsr2html,
    expected_outputs,
    located_numbers,
    measurement_groups,
    start_storescp,
)
from tests.support.worker import Process, serve, storescu, write_study

pytestmark = pytest.mark.integration

#: Real ultrasound files pushed as they are (each its own study): RGB, palette
#: colour, a 30-frame JPEG cine.
REAL_FILES = ("US1_UNCR.dcm", "OBXXXX1A.dcm", "examples_ybr_color.dcm")


@dataclass
class Site:
    settings: Settings
    node: Process
    pacs: Storescp
    folder: Path

    def result(self, study_uid: str) -> StudyResult:
        ledger = Ledger(self.settings.ledger_path, durable=False)
        try:
            result = ledger.result(study_uid)
            assert result is not None
            return result
        finally:
            ledger.close()

    def arrived(self, study_uid: str) -> list[pydicom.Dataset]:
        return [ds for ds in self.pacs.received() if ds.StudyInstanceUID == study_uid]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A node with a small synthetic reference index, sending to storescp."""
    folder = tmp_path_factory.mktemp("e2e")
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
        similar_studies=3,
    )
    if not settings.model_path.is_file():
        pytest.fail(f"the model {settings.model_path} is missing: it ships in onnx_models/")
    index = Process(settings, "index", "build", "--synthetic", "2", log=folder / "index.log")
    assert index.proc.wait(300) == 0, index.log()
    pacs = start_storescp(folder / "pacs", pacs_port)
    node = serve(settings, folder / "node.log")
    yield Site(settings, node, pacs, folder)
    node.stop()
    pacs.stop()


def _arrival(site: Site, study_uid: str, objects: int) -> list[pydicom.Dataset]:
    """Wait for the study to be SENT and ``objects`` objects to have arrived."""

    def sent() -> bool:
        ledger = Ledger(site.settings.ledger_path, durable=False)
        try:
            row = ledger.study(study_uid)
        finally:
            ledger.close()
        assert row is None or row.state != StudyState.FAILED, f"{row.failed_stage}: {row.error}"
        return row is not None and row.state == StudyState.SENT

    wait_for(f"study {study_uid} to be sent", sent, timeout=180)
    arrived = site.arrived(study_uid)
    assert len(arrived) == objects, site.node.log()[-4000:]
    return arrived


def _check_objects(site: Site, arrived: list[pydicom.Dataset], result: StudyResult, tmp: Path) -> None:
    """Each object once, valid for dciodvfy; the SR renders and says what the worker stored."""
    assert set(Counter(ds.SOPInstanceUID for ds in arrived).values()) == {1}
    for n, ds in enumerate(arrived):
        path = tmp / f"{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], path
    (sr_ds,) = [ds for ds in arrived if ds.Modality == "SR"]
    assert sr_ds.SOPClassUID == Comprehensive3DSRStorage
    path = tmp / "sr.dcm"
    sr_ds.save_as(path, enforce_file_format=True)
    html = dsr2html(path, tmp / "sr.html")
    assert default_template().disclaimer.split(".")[0] in html
    # a frame whose lesion the model outlined is drawn (its contour, then its measured axes as one group), as
    # tools OHIF rehydrates; a frame called normal or without a lesion is not, unless nothing is drawn at all
    # (then each assessed frame is a group without coordinates)
    content = hd.sr.srread(path).content
    frames = [frame for image in reading_order(result) for frame in assessed_frames(image)]
    drawn = [frame for frame in frames if frame.predicted != NO_LESION and frame.lesion is not None]
    template = default_template()
    probabilities = {spec.probability.meaning for spec in template.classes.values()}
    groups = content.get_image_measurement_groups()
    if drawn:
        frames = drawn
        assert all(located_numbers(g) for g in measurement_groups(sr_ds))
        tools = [g.tracking_identifier for g in groups]
        assert tools.count(OHIF_CONTOUR) == len(frames)
        assert tools.count(OHIF_BIDIRECTIONAL) == sum(bool(f.lesion and f.lesion.long_axis) for f in frames)
    lesions = [g for g in groups if probabilities & {m.name.meaning for m in g.get_measurements()}]
    assert len(lesions) == len(frames)
    other = {
        series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in sr_ds.get("PertinentOtherEvidenceSequence", [])
        for series in item.ReferencedSeriesSequence
    }
    assert other == {s.sop_instance_uid for s in result.similar}
    for similar in result.similar:
        assert f"accession {similar.accession_number or '-'}" in html


def test_synthetic_study_comes_back_as_sr_heatmaps_and_similar_cases(site: Site, tmp_path: Path) -> None:
    study_uid, paths = write_study(tmp_path / "study", 4, "malignant", seed=11)
    storescu(site.settings, paths)
    result = StudyResult.model_validate(_wait_result(site, study_uid))
    analysed = [image for image in result.images if image.frames]
    assert len(analysed) == 4 and result.similar, "the reference index answered"
    expected = _expected(site, result)
    arrived = _arrival(site, study_uid, sum(expected.values()))
    assert expected["SC"] == len(analysed) + 1  # a heatmap per image, the montage
    assert Counter(ds.SOPClassUID for ds in arrived)[SecondaryCaptureImageStorage] == len(analysed) + 1
    _check_objects(site, arrived, result, tmp_path)


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_ultrasound_file_comes_back(site: Site, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    shutil.copyfile(data_file(name), path)
    study_uid = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
    storescu(site.settings, [path])
    result = StudyResult.model_validate(_wait_result(site, study_uid))
    _check_objects(site, _arrival(site, study_uid, sum(_expected(site, result).values())), result, tmp_path)


def _expected(site: Site, result: StudyResult) -> dict[str, int]:
    ledger = Ledger(site.settings.ledger_path, durable=False)
    try:
        return expected_outputs(ledger, result)
    finally:
        ledger.close()


def _wait_result(site: Site, study_uid: str) -> dict[str, object]:
    def stored() -> dict[str, object] | None:
        ledger = Ledger(site.settings.ledger_path, durable=False)
        try:
            return ledger.result(study_uid)
        finally:
            ledger.close()

    return wait_for(f"a result for {study_uid}", stored, timeout=180)
