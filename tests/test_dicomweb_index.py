"""``sonocase index add --pacs URL``: the similar-case library filled from a real
Orthanc over DICOMweb (QIDO-RS finds each labelled study, WADO-RS fetches its
images, reports stay in the archive), resumable, and clear when the archive is
down or refuses us."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from service.similar.index import SimilarCaseIndex
from tests.support.common import free_port
from tests.support.index import run, study_labels, write_report
from tests.support.orthanc import Orthanc

pytestmark = pytest.mark.integration


@pytest.fixture
def archive(tmp_path: Path, studies: tuple[Path, Path]) -> Iterator[tuple[Orthanc, str]]:
    """Orthanc (basic authentication on) holding the synthetic studies and, in one of
    them, a report; the archive and the study with the report."""
    orthanc = Orthanc.start(tmp_path / "orthanc", users={"librarian": "pw-for-tests"})
    files = sorted(studies[0].rglob("*.dcm"))
    report = write_report(files[0], tmp_path / "report.dcm")
    orthanc.store([*files, tmp_path / "report.dcm"])
    yield orthanc, str(report.StudyInstanceUID)
    orthanc.stop()


@pytest.fixture
def web_env(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    password = tmp_path / "password"
    password.write_text("pw-for-tests\n")
    return {**env, "SONOCASE_DICOMWEB_USER": "librarian", "SONOCASE_DICOMWEB_PASSWORD_FILE": str(password)}


def test_add_copies_labelled_studies_from_a_dicomweb_archive(
    web_env: dict[str, str],
    studies: tuple[Path, Path],
    archive: tuple[Orthanc, str],
    tmp_path: Path,
) -> None:
    orthanc, with_report = archive
    labels = tmp_path / "labels.csv"
    missing = "1.2.826.0.1.3680043.8.498.4711"
    labels.write_text(studies[1].read_text() + f"{missing},benign,biopsy\n")
    n_files, n_studies = len(list(studies[0].rglob("*.dcm"))), len(study_labels(studies[1]))

    first = run(web_env, "add", "--pacs", orthanc.dicomweb_url, "--labels", str(labels))
    assert first.exit_code == 0, first.output
    assert f"added {n_files} images; 0 were there already, 0 had no label, 0 could not be used" in first.stdout
    assert f"study {missing}: not found in the archive" in first.stderr
    assert f"study {with_report}: 1 instance(s) not copied (not images)" in first.stderr
    with SimilarCaseIndex(tmp_path / "data" / "index", None) as index:
        stored = index.stored_images()
        assert {(i.study_uid, i.label) for i in stored} == set(study_labels(studies[1]).items())
        sources = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in studies[0].rglob("*.dcm")}
        assert {i.sop_instance_uid for i in stored} == sources

    again = run(web_env, "add", "--pacs", orthanc.dicomweb_url, "--labels", str(labels))
    assert again.exit_code == 0, again.output
    assert f"{n_studies} of {n_studies + 1} studies were in the index already" in again.stdout
    assert "added 0 images" in again.stdout


def test_add_from_a_dicomweb_archive_says_what_is_wrong(
    web_env: dict[str, str],
    env: dict[str, str],
    studies: tuple[Path, Path],
    archive: tuple[Orthanc, str],
) -> None:
    orthanc, _ = archive
    labels = str(studies[1])
    refused = run(env, "add", "--pacs", orthanc.dicomweb_url, "--labels", labels)  # no credentials
    assert refused.exit_code == 1 and "answered HTTP 401" in refused.output
    down = run(web_env, "add", "--pacs", f"http://127.0.0.1:{free_port()}/dicom-web", "--labels", labels)
    assert down.exit_code == 1 and "cannot reach http://127.0.0.1" in down.output
    bad = run(web_env, "add", "--pacs", "https://user:pw@archive/dicom-web", "--labels", labels)
    assert bad.exit_code == 2 and "must not hold credentials" in bad.output
