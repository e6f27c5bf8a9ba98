"""``sonocase index``: the commands on real synthetic DICOM studies, a real ONNX model
run by ONNX Runtime, and the real index, started as the user starts them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from service.datasets.synthetic import write_busi_layout
from service.similar.index import SimilarCaseIndex
from service.similar.references import read_labels_csv
from tests.support.common import dcmtk, free_port, wait_until
from tests.support.index import CLASSES, run, study_labels, write_report


def test_labels_csv_errors_name_every_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(
        "study_instance_uid,label,label_source\n1.2,benign,biopsy\n1.3,cyst,biopsy\n"
        ",benign,biopsy\n1.4,malignant,hearsay\n1.2,malignant,biopsy\n"
    )
    with pytest.raises(ValueError) as err:
        read_labels_csv(path, CLASSES)
    message = str(err.value)
    for expected in (
        "line 3: label 'cyst'",
        "line 4: no study_instance_uid",
        "line 5: label_source 'hearsay'",
        "line 6: 1.2 is labelled twice",
    ):
        assert expected in message
    path.write_text("sop_instance_uid,label,label_source\n1.5,Benign,synthetic phantom\n")
    assert read_labels_csv(path, CLASSES, source="radiologist")["1.5"].label == "benign"
    with pytest.raises(ValueError, match=r"label_source 'synthetic phantom'.*--label-source"):
        read_labels_csv(path, CLASSES)
    path.write_text("uid,label\n1.5,benign\n")
    with pytest.raises(ValueError, match="needs a header with label and one of study_instance_uid"):
        read_labels_csv(path, CLASSES, source="biopsy")


def test_add_embeds_labelled_studies_and_a_second_run_adds_nothing(
    env: dict[str, str], studies: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, labels = studies
    (folder / "notes.txt").write_text("not DICOM")
    first = run(env, "add", "--dicom", str(folder), "--labels", str(labels), "--label-source", "biopsy")
    assert first.exit_code == 0, first.output
    n_files = len(list(folder.rglob("*.dcm")))
    assert f"added {n_files} images; 0 were there already" in first.stdout, first.stderr
    assert "notes.txt: not a readable DICOM file" in first.stderr
    second = run(env, "add", "--dicom", str(folder), "--labels", str(labels), "--label-source", "biopsy")
    assert f"added 0 images; {n_files} were there already" in second.stdout
    info = run(env, "info")
    by_study = study_labels(labels)
    assert info.exit_code == 0 and f"{n_files} images of {len(by_study)} studies" in info.stdout
    assert "tiny-test 1" in info.stdout
    for label in CLASSES:
        assert f"{label:10} {list(by_study.values()).count(label)} biopsy" in info.stdout
    with SimilarCaseIndex(tmp_path / "data" / "index", None) as index:
        stored = index.stored_images()
        assert {image.label_source for image in stored} == {"biopsy"} and all(i.confirmed for i in stored)
        assert all(image.path is not None and image.path.is_file() for image in stored)


def test_add_refuses_an_index_of_another_model(
    env: dict[str, str], studies: tuple[Path, Path], models: tuple[Path, Path]
) -> None:
    folder, labels = studies
    assert run(env, "add", "--dicom", str(folder), "--labels", str(labels), "--label-source", "biopsy").exit_code == 0
    other = {**env, "SONOCASE_MODEL_PATH": str(models[1])}
    refused = run(other, "add", "--dicom", str(folder), "--labels", str(labels), "--label-source", "biopsy")
    assert refused.exit_code == 1
    assert "holds embeddings of model tiny-test 1" in refused.stderr and "index rebuild" in refused.stderr
    hearsay = labels.with_name("hearsay.csv")
    hearsay.write_text(labels.read_text().replace(",synthetic", ",hearsay"))
    bad = run(env, "add", "--dicom", str(folder), "--labels", str(hearsay))
    assert bad.exit_code == 1 and "label_source 'hearsay'" in bad.stderr


def test_rebuild_binds_the_index_to_the_new_model(
    env: dict[str, str], studies: tuple[Path, Path], models: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, labels = studies
    run(env, "add", "--dicom", str(folder), "--labels", str(labels), "--label-source", "radiologist")
    other = {**env, "SONOCASE_MODEL_PATH": str(models[1])}
    rebuilt = run(other, "rebuild")
    assert rebuilt.exit_code == 0, rebuilt.output
    n_files = len(list(folder.rglob("*.dcm")))
    assert f"re-embedded {n_files} images with tiny-test 2; 0 removed" in rebuilt.stdout
    with SimilarCaseIndex(tmp_path / "data" / "index", None) as index:
        assert index.bound_model is not None and index.bound_model.version == "2"
    assert (
        run(other, "add", "--dicom", str(folder), "--labels", str(labels), "--label-source", "radiologist").exit_code
        == 0
    )


def test_diagnose_delete_and_their_errors(env: dict[str, str], studies: tuple[Path, Path], tmp_path: Path) -> None:
    folder, labels = studies
    run(env, "add", "--dicom", str(folder), "--labels", str(labels), "--label-source", "radiologist")
    by_study = study_labels(labels)
    uids = [uid for uid, label in by_study.items() if label != "malignant"]
    one = run(env, "diagnose", uids[0], "Malignant", "--source", "biopsy")
    assert one.exit_code == 0 and "diagnosed 1 studies" in one.stdout
    csv_path = tmp_path / "diagnoses.csv"
    csv_path.write_text(f"study_instance_uid,label\n{uids[1]},benign\n9.9.9,benign\n")
    several = run(env, "diagnose", "--csv", str(csv_path), "--source", "biopsy")
    assert (
        several.exit_code == 1
        and "diagnosed 1 studies" in several.stdout
        and "not in the index: 9.9.9" in several.stderr
    )
    assert run(env, "diagnose", uids[0], "cyst", "--source", "biopsy").stderr.count("'cyst' is not one of") == 1
    assert run(env, "diagnose", uids[0]).exit_code == 2
    info = run(env, "info").stdout
    assert f"malignant  1 biopsy, {list(by_study.values()).count('malignant')} radiologist" in info
    deleted = run(env, "delete", uids[0])
    assert deleted.exit_code == 0 and "deleted" in deleted.stdout
    again = run(env, "delete", uids[0])
    assert again.exit_code == 1 and "has no live images" in again.stderr
    assert f"{len(by_study) - 1} studies" in run(env, "info").stdout


def test_info_without_an_index_says_so(env: dict[str, str]) -> None:
    result = run(env, "info")
    assert result.exit_code == 1 and "there is no similar-case index in" in result.stderr


@pytest.mark.heavy
def test_build_synthetic_and_busi(env: dict[str, str], tmp_path: Path) -> None:
    synthetic = run(env, "build", "--synthetic", "1")
    assert synthetic.exit_code == 0, synthetic.output
    assert "added 3 images" in synthetic.stdout
    busi = write_busi_layout(tmp_path / "busi", 1, seed=4)
    first = run(env, "build", "--busi", str(busi))
    assert first.exit_code == 0, first.output
    assert "added 3 images" in first.stdout
    assert "added 0 images; 3 were there already" in run(env, "build", "--busi", str(busi)).stdout
    info = run(env, "info").stdout
    assert "6 images" in info and "1 radiologist, 1 synthetic" in info
    assert run(env, "build").exit_code == 2


@pytest.mark.integration
def test_an_interrupted_add_resumes(env: dict[str, str], studies: tuple[Path, Path]) -> None:
    """Kill ``sonocase index add`` after its first saved batch; running it again
    finishes the job without duplicates."""
    folder, labels = studies
    n_files = len(list(folder.rglob("*.dcm")))
    command = [
        sys.executable,
        "-m",
        "service",
        "index",
        "add",
        "--dicom",
        str(folder),
        "--labels",
        str(labels),
        "--label-source",
        "biopsy",
        "--save-every",
        "1",
    ]
    index_dir = Path(env["SONOCASE_DATA_DIR"]) / "index"

    def indexed() -> int:
        if not (index_dir / "index.sqlite3").exists():
            return 0
        with SimilarCaseIndex(index_dir, None) as index:
            return index.info().images

    proc = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while indexed() < 1:
        assert proc.poll() is None and time.monotonic() < deadline, "add finished before it could be interrupted"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    done = indexed()
    assert 1 <= done < n_files
    result = run(env, "add", "--dicom", str(folder), "--labels", str(labels), "--label-source", "biopsy")
    assert f"added {n_files - done} images; {done} were there already" in result.stdout
    assert indexed() == n_files


def test_query_shows_similar_studies_but_never_the_own_one(env: dict[str, str], studies: tuple[Path, Path]) -> None:
    folder, labels = studies
    run(env, "add", "--dicom", str(folder), "--labels", str(labels), "--label-source", "biopsy")
    study = min(p for p in folder.iterdir() if p.is_dir())
    files = sorted(str(p) for p in study.rglob("*.dcm"))
    own_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    result = run(env, "query", *files, "-k", "50")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line[:1].isdigit()]
    n_studies = len(study_labels(labels))
    # Every other study, best first; never the query's own, and no other study of its
    # patient (each synthetic patient has one study, so only the own one is excluded).
    assert len(lines) == n_studies - 1 and own_uid not in result.stdout
    distances = [float(line.split("distance ")[1].split()[0]) for line in lines]
    assert distances == sorted(distances)
    assert "not for primary diagnosis" in result.stdout
    mixed = run(env, "query", files[0], *sorted(str(p) for p in folder.rglob("*.dcm") if str(p) not in files)[:1])
    assert mixed.exit_code == 1 and "belong to 2 studies" in mixed.stderr


# --- filling from the PACS -------------------------------------------------------------


@pytest.fixture
def qr_pacs(tmp_path: Path, studies: tuple[Path, Path]) -> Iterator[tuple[str, str]]:
    """DCMTK's dcmqrscp, a real Query/Retrieve SCP, holding the synthetic studies
    and, in one of them, a report (not an image: it must stay in the PACS).
    Yields its address and the study with the report."""
    db, port = tmp_path / "pacs-db", free_port()
    db.mkdir()
    config = tmp_path / "dcmqrscp.cfg"
    config.write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 4\n"
        "HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
        f"AETable BEGIN\nPACS {db} RW (200, 1024mb) ANY\nAETable END\n"
    )
    # dcmqrscp sends each image in the syntax of the first context it accepted for
    # the SOP class, and cannot decode JPEG to send it: it holds uncompressed copies.
    files = []
    for n, path in enumerate(sorted(studies[0].rglob("*.dcm"))):
        files.append(tmp_path / f"held-{n}.dcm")
        subprocess.run([dcmtk("dcmdjpeg"), str(path), str(files[-1])], check=True, capture_output=True)
    report = write_report(files[0], tmp_path / "report.dcm")
    subprocess.run(
        [dcmtk("dcmqridx"), str(db), *map(str, files), str(tmp_path / "report.dcm")], check=True, capture_output=True
    )
    with (tmp_path / "dcmqrscp.log").open("wb") as log:
        process = subprocess.Popen(
            [dcmtk("dcmqrscp"), "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
    try:
        assert wait_until(lambda: _listening(port)), "dcmqrscp did not start"
        yield f"PACS@127.0.0.1:{port}", str(report.StudyInstanceUID)
    finally:
        process.terminate()
        process.wait(timeout=30)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.integration
def test_add_copies_labelled_studies_from_the_pacs(
    env: dict[str, str],
    studies: tuple[Path, Path],
    qr_pacs: tuple[str, str],
    tmp_path: Path,
) -> None:
    pacs, with_report = qr_pacs
    labels = tmp_path / "labels.csv"
    missing = "1.2.826.0.1.3680043.8.498.4711"
    labels.write_text(studies[1].read_text() + f"{missing},benign,biopsy\n")
    n_files, n_studies = len(list(studies[0].rglob("*.dcm"))), len(study_labels(studies[1]))

    first = run(env, "add", "--pacs", pacs, "--labels", str(labels))
    assert first.exit_code == 0, first.output
    assert f"added {n_files} images; 0 were there already, 0 had no label, 0 could not be used" in first.stdout
    assert f"study {missing}: not found on the PACS" in first.stderr
    assert f"study {with_report}: 1 instance(s) not copied (not images)" in first.stderr
    assert f"2 of {n_studies + 1} studies not copied in full" in first.stdout
    info = run(env, "info")
    assert f"{n_files} images of {n_studies} studies" in info.stdout
    with SimilarCaseIndex(tmp_path / "data" / "index", None) as index:
        stored = index.stored_images()
        assert {(i.study_uid, i.label) for i in stored} == set(study_labels(studies[1]).items())
        assert all(i.path is not None and i.path.is_file() for i in stored), "reference copies kept"

    again = run(env, "add", "--pacs", pacs, "--labels", str(labels))
    assert again.exit_code == 0, again.output
    assert f"{n_studies} of {n_studies + 1} studies were in the index already" in again.stdout
    assert "added 0 images" in again.stdout


def test_add_from_the_pacs_says_what_is_wrong(env: dict[str, str], studies: tuple[Path, Path]) -> None:
    labels = str(studies[1])
    down = run(env, "add", "--pacs", f"PACS@127.0.0.1:{free_port()}", "--labels", labels)
    assert down.exit_code == 1 and "PACS@127.0.0.1" in down.output and "not answering" in down.output
    for args in ([], ["--dicom", str(studies[0]), "--pacs", "PACS@127.0.0.1:104"]):
        both = run(env, "add", *args, "--labels", labels)
        assert both.exit_code == 2 and "either --dicom DIR or --pacs" in both.output
    bad = run(env, "add", "--pacs", "127.0.0.1:104", "--labels", labels)
    assert bad.exit_code == 2 and "is not AE@host:port" in bad.output
