"""The similar-case index: real hnswlib, real SQLite, real DICOM files, real processes."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from service.results import ModelIdentity
from service.similar.index import (
    MAX_OVERFETCH,
    MIN_NEIGHBOURS,
    IndexEntry,
    SimilarCaseIndex,
    StoredImage,
    distance_and_similarity,
    unit_vectors,
)

MODEL = ModelIdentity(name="sonocase-hybrid", version="1.0.0", sha256="a" * 64)
OTHER_MODEL = ModelIdentity(name="sonocase-hybrid", version="2.0.0", sha256="b" * 64)
US_CLASS = "1.2.840.10008.5.1.4.1.1.6.1"
DIM = 32


def unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def clustered(n: int, dim: int = DIM, clusters: int = 20, seed: int = 0) -> np.ndarray:
    """Unit vectors around a few centres, like embeddings of a trained model."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(clusters, dim)))
    return unit(centres[rng.integers(clusters, size=n)] + 0.25 * rng.normal(size=(n, dim)) / np.sqrt(dim))


def entries(vectors: np.ndarray, per_study: int = 5, prefix: str = "1.2.3", **fields: object) -> list[IndexEntry]:
    """One entry per vector, ``per_study`` images per study."""
    return [
        IndexEntry(
            embedding=v,
            sop_instance_uid=f"{prefix}.1.{i}",
            series_uid=f"{prefix}.2.{i // per_study}",
            study_uid=f"{prefix}.3.{i // per_study}",
            sop_class_uid=US_CLASS,
            **{"label": "benign", "label_source": "ai", **fields},  # type: ignore[arg-type]
        )
        for i, v in enumerate(vectors)
    ]


def open_index(path: Path, model: ModelIdentity | None = MODEL, **kwargs: object) -> SimilarCaseIndex:
    return SimilarCaseIndex(path, model, durable=False, **kwargs)  # type: ignore[arg-type]


def dicom_copy(src: str, dest: Path, sop_uid: str, patient_id: str = "PAT-4711") -> Path:
    """A real ultrasound file from pydicom-data, re-identified as ``sop_uid``."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.PatientID = patient_id
    ds.PatientName = "Doe^Jane"
    ds.PatientBirthDate = "19700101"
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)
    return dest


def test_round_trip_survives_reopen(tmp_path: Path) -> None:
    vectors = clustered(400)
    with open_index(tmp_path) as index:
        assert index.add(entries(vectors)).added == 400
        before = index.query(vectors[:3], 5, exclude_study_uid="1.2.3.3.0")
        version = index.version
    with open_index(tmp_path) as reopened:
        assert reopened.version == version
        assert reopened.query(vectors[:3], 5, exclude_study_uid="1.2.3.3.0") == before
        info = reopened.info()
    assert (info.images, info.studies, info.dim, info.model) == (400, 80, DIM, MODEL)
    assert len(before) == 5 and info.vectors_bytes > 400 * DIM * 4


def test_add_is_idempotent_per_sop_instance(tmp_path: Path) -> None:
    vectors = clustered(20)
    with open_index(tmp_path) as index:
        index.add(entries(vectors[:10]))
        version = index.version
        again = index.add(entries(vectors[:10]))
        assert (again.added, len(again.skipped)) == (0, 10)
        assert index.version == version, "adding nothing must not make a new version"
        mixed = index.add(entries(vectors) + entries(vectors)[15:])  # 10 known, 5 twice
        assert (mixed.added, len(mixed.skipped)) == (10, 10)
        assert index.info().images == 20
        assert index.version != version


def test_distances_are_euclidean_between_unit_vectors(tmp_path: Path) -> None:
    vectors = clustered(60)
    query = clustered(1, seed=9)
    with open_index(tmp_path) as index:
        index.add(entries(vectors, per_study=1))
        found = index.query(query, 60, exclude_study_uid="none", query_sop_instance_uids=["9.9"])
    exact = np.linalg.norm(vectors - query, axis=1)
    assert len(found) == 60
    for hit in found:
        i = int(hit.sop_instance_uid.rsplit(".", 1)[1])
        assert hit.distance == pytest.approx(float(exact[i]), abs=1e-4)
        assert hit.similarity == pytest.approx(1 - exact[i] / 2, abs=1e-4)
        assert hit.query_sop_instance_uid == "9.9"
    assert [h.distance for h in found] == sorted(h.distance for h in found)
    assert distance_and_similarity(4.0000005) == (2.0, 0.0)
    assert distance_and_similarity(-1e-7) == (0.0, 1.0)


def test_study_distance_is_its_best_image_and_k_distinct_studies(tmp_path: Path) -> None:
    """One study with more near images than a first search fetches must not crowd
    out the others: the search widens until it has k distinct studies."""
    query = unit(np.eye(DIM)[0])
    near = unit(np.eye(DIM)[0] + 0.05 * np.random.default_rng(1).normal(size=(MIN_NEIGHBOURS * 3, DIM)))
    crowd = entries(near, per_study=len(near), prefix="1.5")
    others = [unit(np.eye(DIM)[0] + (0.6 + 0.1 * i) * np.eye(DIM)[1 + i]) for i in range(4)]
    with open_index(tmp_path) as index:
        index.add(crowd + entries(np.stack(others), per_study=1, prefix="1.6"))
        found = index.query(query, 3, exclude_study_uid="none")
    assert [h.study_uid for h in found] == ["1.5.3.0", "1.6.3.0", "1.6.3.1"]
    best = float(np.min(np.linalg.norm(near - query, axis=1)))
    assert found[0].distance == pytest.approx(best, abs=1e-4)


def test_query_never_returns_own_study_or_same_patient(tmp_path: Path) -> None:
    vectors = clustered(300, seed=3)
    with open_index(tmp_path) as index:
        key = index.patient_key("PAT-1")
        same_patient = entries(unit(vectors[:5] + 1e-3), prefix="1.7", patient_key=key)  # near-duplicates
        index.add(entries(vectors) + same_patient)
        for study in range(0, 60, 7):
            own = vectors[study * 5 : (study + 1) * 5]
            uid = f"1.2.3.3.{study}"
            found = index.query(own, 10, exclude_study_uid=uid)
            assert len(found) == 10 and uid not in {h.study_uid for h in found}
        with_patient = index.query(vectors[:5], 3, exclude_study_uid="1.2.3.3.0")
        without = index.query(vectors[:5], 3, exclude_study_uid="1.2.3.3.0", exclude_patient_key=key)
    assert with_patient[0].study_uid == "1.7.3.0"
    assert "1.7.3.0" not in {h.study_uid for h in without} and len(without) == 3


def test_confirmed_only_and_attached_diagnosis(tmp_path: Path) -> None:
    vectors = clustered(500, seed=4)
    with open_index(tmp_path) as index:
        index.add(entries(vectors))
        assert index.query(vectors[:1], 5, "x", confirmed_only=True) == []
        version = index.version
        assert index.attach_diagnosis("1.2.3.3.77", "malignant", "biopsy") == 5
        assert index.version != version
        found = index.query(vectors[:1], 5, "x", confirmed_only=True)
        assert [(h.study_uid, h.label, h.label_source) for h in found] == [("1.2.3.3.77", "malignant", "biopsy")]
        index.attach_diagnosis("1.2.3.3.1", "benign", "radiologist")
        assert {h.study_uid for h in index.query(vectors[:1], 5, "x", confirmed_only=True)} == {
            "1.2.3.3.1",
            "1.2.3.3.77",
        }
        with pytest.raises(KeyError, match="not in the similar-case index"):
            index.attach_diagnosis("9.9.9", "benign", "biopsy")
        with pytest.raises(ValueError, match="not 'ai'"):
            index.attach_diagnosis("1.2.3.3.1", "benign", "ai")
        with pytest.raises(ValueError, match="label source"):
            index.attach_diagnosis("1.2.3.3.1", "benign", "rumour")


def test_confirmed_only_filters_inside_the_search_when_many_are_unconfirmed(tmp_path: Path) -> None:
    """More unconfirmed images than MAX_OVERFETCH: hnswlib's filter does the work."""
    vectors = clustered(2000, seed=10)
    confirmed = entries(vectors[:1000], label_source="radiologist", confirmed=True)
    unconfirmed = entries(vectors[1000:], prefix="1.8")
    assert len(unconfirmed) > MAX_OVERFETCH
    queries = clustered(10, seed=11)
    with open_index(tmp_path, ef=200) as index:
        index.add(confirmed + unconfirmed)
        for q in queries:
            found = index.query(q, 5, exclude_study_uid="x", confirmed_only=True)
            d = np.linalg.norm(vectors[:1000] - q, axis=1).reshape(-1, 5).min(axis=1)
            assert [h.study_uid for h in found] == [f"1.2.3.3.{s}" for s in np.argsort(d)[:5]]


def test_deleted_study_never_returns_and_loses_its_image(tmp_path: Path) -> None:
    src = get_testdata_file("US1_UNCR.dcm")
    path = dicom_copy(src, tmp_path / "in" / "a.dcm", "1.2.3.1.0")
    vectors = clustered(50, seed=5)
    batch = entries(vectors)
    batch[0] = IndexEntry(**{**batch[0].__dict__, "image_path": path})
    with open_index(tmp_path / "index") as index:
        index.add(batch)
        stored = index.reference_image("1.2.3.1.0")
        assert stored is not None and stored.path is not None and stored.path.is_file()
        assert index.mark_deleted("1.2.3.3.0") == 5
        assert index.mark_deleted("1.2.3.3.0") == 0
        assert not stored.path.exists() and index.reference_image("1.2.3.1.0") is None
        assert "1.2.3.3.0" not in {h.study_uid for h in index.query(vectors[:5], 9, "x")}
        assert index.add(batch[:5]).added == 0, "a retracted image is not added back"
    with open_index(tmp_path / "index") as reopened:
        found = reopened.query(vectors[:5], 9, "x")
        assert len(found) == 9 and "1.2.3.3.0" not in {h.study_uid for h in found}
        assert (reopened.info().images, reopened.info().deleted) == (45, 5)


def test_reference_copy_has_no_patient_identity(tmp_path: Path) -> None:
    path = dicom_copy(get_testdata_file("US1_UNCR.dcm"), tmp_path / "a.dcm", "1.2.3.1.0")
    entry = IndexEntry(**{**entries(clustered(1))[0].__dict__, "image_path": path})
    with open_index(tmp_path / "index") as index:
        index.add([entry])
        stored = index.reference_image("1.2.3.1.0")
        assert stored is not None and stored.path is not None
        copy = pydicom.dcmread(stored.path)
        wrong = IndexEntry(**{**entry.__dict__, "sop_instance_uid": "1.2.3.1.1"})
        with pytest.raises(ValueError, match=r"holds SOP Instance UID 1.2.3.1.0"):
            index.add([wrong])
    assert (copy.PatientID, str(copy.PatientName), copy.PatientBirthDate) == ("", "", "")
    assert copy.SOPInstanceUID == "1.2.3.1.0"
    np.testing.assert_array_equal(copy.pixel_array, pydicom.dcmread(path).pixel_array)


def test_bad_inputs_are_refused_with_clear_messages(tmp_path: Path) -> None:
    vectors = clustered(10)
    with open_index(tmp_path) as index:
        index.add(entries(vectors))
        with pytest.raises(ValueError, match="index holds 32-dimensional"):
            index.query(unit(np.ones((1, 16))), 3, "x")
        with pytest.raises(ValueError, match="L2-normalised"):
            index.query(vectors[:1] * 2, 3, "x")
        with pytest.raises(ValueError, match="NaN"):
            index.query(np.full((1, DIM), np.nan), 3, "x")
        with pytest.raises(ValueError, match="2 embeddings but 1"):
            index.query(vectors[:2], 3, "x", query_sop_instance_uids=["1"])
    with pytest.raises(ValueError, match="cannot be confirmed"):
        entries(vectors[:1], confirmed=True)
    with pytest.raises(ValueError, match="not a usable UID"):
        IndexEntry(
            embedding=vectors[0],
            sop_instance_uid="../x",
            series_uid="1",
            study_uid="1",
            sop_class_uid=US_CLASS,
            label="benign",
            label_source="ai",
        )
    with pytest.raises(FileNotFoundError, match="no similar-case index"):
        SimilarCaseIndex(tmp_path / "absent", None)
    with pytest.raises(ValueError, match=r"norm 0.5000"):
        unit_vectors(np.full((2, 4), 0.25))


def test_other_model_is_refused(tmp_path: Path) -> None:
    vectors = clustered(10)
    with open_index(tmp_path) as index:
        index.add(entries(vectors))
    with open_index(tmp_path, OTHER_MODEL) as other:
        for action in (lambda: other.query(vectors[:1], 3, "x"), lambda: other.add(entries(vectors, prefix="9"))):
            with pytest.raises(ValueError, match=r"holds embeddings of model sonocase-hybrid 1.0.0.*index rebuild"):
                action()
    with open_index(tmp_path, None) as inspect:
        assert inspect.bound_model == MODEL
        with pytest.raises(ValueError, match="opened without a model identity"):
            inspect.query(vectors[:1], 3, "x")


def test_empty_index_takes_the_model_of_its_first_images(tmp_path: Path) -> None:
    open_index(tmp_path).close()
    with open_index(tmp_path, OTHER_MODEL) as index:
        assert index.bound_model == MODEL
        index.add(entries(clustered(3)))
        assert index.bound_model == OTHER_MODEL
        assert len(index.query(clustered(1), 3, "x")) == 1


def test_rebuild_re_embeds_stored_images_with_the_new_model(tmp_path: Path) -> None:
    src = get_testdata_file("US1_UNCR.dcm")
    batch = [
        IndexEntry(**{**e.__dict__, "image_path": dicom_copy(src, tmp_path / "in" / f"{i}.dcm", e.sop_instance_uid)})
        for i, e in enumerate(entries(clustered(6), per_study=2))
    ]
    old = open_index(tmp_path / "index")  # a worker still running the old model
    old.add(batch)
    assert len(old.query(clustered(1), 3, "x")) == 3

    def embed(image: StoredImage) -> np.ndarray:
        """A stand-in for the new model: reads the stored file, 8-d output."""
        assert image.path is not None
        ds = pydicom.dcmread(image.path)
        if ds.SOPInstanceUID.endswith(".5"):
            raise ValueError("cannot prepare pixels")
        seed = int(ds.SOPInstanceUID.rsplit(".", 1)[1])
        return unit(np.random.default_rng(seed).normal(size=8))

    with open_index(tmp_path / "index", OTHER_MODEL) as new:
        result = new.rebuild(embed)
        assert result.embedded == 5 and list(result.failed) == ["1.2.3.1.5"]
        assert new.bound_model == OTHER_MODEL and new.info().dim == 8 and new.info().deleted == 1
        found = new.query(embed(new.stored_images()[0]), 5, "x")
        assert found[0].sop_instance_uid == "1.2.3.1.0" and found[0].distance == pytest.approx(0, abs=1e-4)
        assert {h.study_uid for h in found} == {"1.2.3.3.0", "1.2.3.3.1", "1.2.3.3.2"}
    with pytest.raises(ValueError, match=r"holds embeddings of model sonocase-hybrid 2.0.0"):
        old.query(clustered(1), 3, "x")
    old.close()


def test_an_interrupted_rebuild_resumes_and_never_mixes_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rebuild stopped half-way (the process killed: here its embedding raises)
    keeps what it embedded; queries go on against the old model's graph; the next
    run embeds only the rest, and the new graph holds the new model's vectors only."""
    monkeypatch.setattr("service.similar.index.REBUILD_BATCH", 4)
    src = get_testdata_file("US1_UNCR.dcm")
    batch = [
        IndexEntry(**{**e.__dict__, "image_path": dicom_copy(src, tmp_path / "in" / f"{i}.dcm", e.sop_instance_uid)})
        for i, e in enumerate(entries(clustered(10), per_study=2))
    ]
    with open_index(tmp_path / "index") as old:
        old.add(batch)
    embedded: list[str] = []

    def new_model(image: StoredImage) -> np.ndarray:
        embedded.append(image.sop_instance_uid)
        if len(embedded) == 7:
            raise KeyboardInterrupt  # the operator's Ctrl-C, mid-batch
        return unit(np.random.default_rng(int(image.sop_instance_uid.rsplit(".", 1)[1])).normal(size=8))

    with open_index(tmp_path / "index", OTHER_MODEL) as new:
        assert new.rebuild_progress() == (0, 10)
        with pytest.raises(KeyboardInterrupt):
            new.rebuild(new_model)
        assert new.rebuild_progress() == (4, 10)  # the first batch was committed, the second not
        assert new.bound_model == MODEL
        with open_index(tmp_path / "index") as still_old:
            assert len(still_old.query(clustered(1), 3, "x")) == 3  # the old graph answers meanwhile
        done: list[int] = []
        result = new.rebuild(new_model, done.append)
        assert result.embedded == 10 and sum(done) == 6  # only what the first run had not committed
        assert embedded[7:] == [f"1.2.3.1.{i}" for i in range(4, 10)]
        assert new.bound_model == OTHER_MODEL and new.info().dim == 8
        assert new.rebuild_progress() == (0, 10)  # staging emptied with the swap
        found = new.query(new_model(new.stored_images()[3]), 3, "x")
        assert found[0].sop_instance_uid == "1.2.3.1.3" and found[0].distance == pytest.approx(0, abs=1e-4)


def beside_a_writer(write: Callable[[], None], readers: list[Callable[[], None]]) -> list[BaseException]:
    """Each of ``readers`` called over and over in a thread of its own while ``write``
    runs; what the readers raised (a reader stops at its first error)."""
    errors: list[BaseException] = []
    done = threading.Event()

    def loop(read: Callable[[], None]) -> None:
        try:
            while not done.is_set():
                read()
        except Exception as exc:  # reported to the test
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(read,)) for read in readers]
    for t in threads:
        t.start()
    try:
        write()
    finally:
        done.set()
        for t in threads:
            t.join()
    return errors


def test_info_on_its_own_connection_while_a_writer_saves_versions(tmp_path: Path) -> None:
    """``info`` (``sonocase index info``, the status page) on its own connection while
    ``index add`` saves version after version: each save replaces the graph file the
    pointer named a moment before, so the size is read from the version the pointer
    names when the file is looked at (a CI run once met the file gone)."""
    vectors = clustered(300, seed=8)
    writer = open_index(tmp_path)
    writer.add(entries(vectors[:20]))
    reader = open_index(tmp_path)
    sizes: list[int] = []

    def write() -> None:
        for start in range(20, 300, 5):
            writer.add(entries(vectors, prefix="1.2.3")[start : start + 5])

    errors = beside_a_writer(write, [lambda: sizes.append(reader.info().vectors_bytes)])
    assert not errors, errors[0]
    assert len(sizes) > 20 and all(size > 0 for size in sizes)
    assert reader.info().images == 300


@pytest.mark.heavy
def test_concurrent_queries_while_a_writer_adds(tmp_path: Path) -> None:
    vectors = clustered(3000, seed=6)
    truth = {f"1.2.3.1.{i}": v for i, v in enumerate(vectors)}
    queries = clustered(40, seed=7)
    index = open_index(tmp_path, ef=100)
    index.add(entries(vectors[:1000]))
    counts = [0] * 4

    def query(n: int) -> None:
        q = queries[counts[n] % len(queries)]
        found = index.query(q, 10, exclude_study_uid="1.2.3.3.0")
        assert len(found) == 10 and len({h.study_uid for h in found}) == 10
        assert [h.distance for h in found] == sorted(h.distance for h in found)
        for hit in found:
            exact = float(np.linalg.norm(truth[hit.sop_instance_uid] - q))
            assert hit.distance == pytest.approx(exact, abs=1e-4)
        counts[n] += 1

    def write() -> None:
        for start in range(1000, 3000, 100):
            index.add(entries(vectors, prefix="1.2.3")[start : start + 100])

    errors = beside_a_writer(write, [functools.partial(query, n) for n in range(4)])
    assert not errors, errors[0]
    assert sum(counts) > 20, "the readers must have run while the writer added"
    # After the writes, answers match an exact search over all 3000 images.
    for q in queries[:10]:
        found = index.query(q, 5, exclude_study_uid="1.2.3.3.0")
        d = np.linalg.norm(vectors - q, axis=1).reshape(-1, 5).min(axis=1)
        d[0] = np.inf
        assert [h.study_uid for h in found] == [f"1.2.3.3.{s}" for s in np.argsort(d)[:5]]
    index.close()


WRITER = """
import json, sys
import numpy as np
from pathlib import Path
from service.results import ModelIdentity
from service.similar.index import IndexEntry, SimilarCaseIndex
directory, model, seed, count = Path(sys.argv[1]), ModelIdentity(**json.loads(sys.argv[2])), int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(seed)
vectors = rng.normal(size=(count, int(sys.argv[5]))).astype(np.float32)
vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
index = SimilarCaseIndex(directory, model, durable=True, ef_construction=20)
print("opened", flush=True)
index.add([IndexEntry(embedding=v, sop_instance_uid=f"7.{seed}.{i}", series_uid=f"7.{seed}", study_uid=f"7.{seed}",
           sop_class_uid="1.2.840.10008.5.1.4.1.1.6.1", label="malignant", label_source="biopsy", confirmed=True)
           for i, v in enumerate(vectors)])
print("saved", index.version, flush=True)
"""


def run_writer(directory: Path, seed: int, count: int, dim: int = DIM) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(directory), MODEL.model_dump_json(), str(seed), str(count), str(dim)],
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.mark.integration
def test_reader_process_picks_up_a_new_version_without_restart(tmp_path: Path) -> None:
    vectors = clustered(50)
    with open_index(tmp_path) as reader:
        reader.add(entries(vectors))
        assert reader.query(vectors[:1], 3, "x", confirmed_only=True) == []
        writer = run_writer(tmp_path, seed=1, count=3)
        out, _ = writer.communicate(timeout=60)
        assert writer.returncode == 0 and "saved" in out
        assert out.split()[-1] == reader.version
        found = reader.query(vectors[:1], 3, "x", confirmed_only=True)
        assert [h.study_uid for h in found] == ["7.1"]


@pytest.mark.integration
def test_one_writer_at_a_time_across_processes(tmp_path: Path) -> None:
    with open_index(tmp_path, lock_timeout_s=0.3) as index:
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                (
                    "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR);"
                    " fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(30)"
                ),
                str(tmp_path / ".write.lock"),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
            with pytest.raises(TimeoutError, match="another process"):
                index.add(entries(clustered(2)))
        finally:
            holder.kill()
            holder.wait()
        assert index.add(entries(clustered(2))).added == 2


@pytest.mark.integration
def test_crash_during_save_leaves_the_previous_version_loadable(tmp_path: Path) -> None:
    """kill -9 a writer while it writes a 16 MB graph: the index opens at the old version."""
    base = clustered(60_000, seed=8)
    with SimilarCaseIndex(tmp_path, MODEL, durable=True, ef_construction=20) as index:
        index.add(entries(base, per_study=10))
        version = index.version
    writer = run_writer(tmp_path, seed=2, count=1)
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".tmp-vectors-") for p in tmp_path.iterdir()):
        assert writer.poll() is None, "the writer finished before it could be killed mid-save"
        assert time.monotonic() < deadline
        time.sleep(0.0005)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    with SimilarCaseIndex(tmp_path, MODEL) as reopened:
        assert reopened.version == version and reopened.info().images == 60_000
        # HNSW is approximate, and with ef_construction=20 over 3,000 near-equidistant
        # points per cluster it need not return the exact vector; a usable graph still
        # lands in the query's cluster (members ~0.35 apart, cluster centres ~1.4).
        found = reopened.query(base[:1], 3, "x")
        assert len(found) == 3 and all(hit.distance < 0.6 for hit in found)
        # The next writer finishes the job and clears the torn file away.
        assert reopened.add(entries(clustered(1, seed=9), prefix="8")).added == 1
        assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    # Killed at other moments, the index is always the old or the new version.
    for delay in (0.2, 0.5, 1.0):
        before = SimilarCaseIndex(tmp_path, None).info().images
        writer = run_writer(tmp_path, seed=int(delay * 10) + 10, count=1)
        time.sleep(delay)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        with SimilarCaseIndex(tmp_path, MODEL) as reopened:
            assert reopened.info().images in (before, before + 1)
            assert len(reopened.query(base[:1], 3, "x")) == 3


def test_patient_key_hides_the_id_and_is_stable(tmp_path: Path) -> None:
    with open_index(tmp_path) as index:
        key = index.patient_key("PAT-4711")
        assert key.startswith("pk1-") and "4711" not in key
        assert index.patient_key(" PAT-4711 ") == key
        assert index.patient_key("PAT-4711", issuer="HOSP-B") != key
        assert index.patient_key("") == ""
    with open_index(tmp_path) as reopened:
        assert reopened.patient_key("PAT-4711") == key
    with open_index(tmp_path / "other") as other:
        assert other.patient_key("PAT-4711") != key, "each index has its own secret"
