"""Similar-case retrieval: an hnswlib index of diagnosed studies.

For every analysed image the worker asks for its nearest neighbours among stored
reference images, grouped to studies, so a radiologist can open a confirmed case that
looks like the one on screen.

Layout of the index folder::

    index.sqlite3         side table (WAL): one row per reference image + meta; its
                          schema is service.similar.schema, made and upgraded by the
                          Alembic scripts of service.similar.migrations, read and
                          written with SQLAlchemy Core on the ledger's connection
                          (service.ledger.engine), as typed rows (ImageRow, IndexMeta)
    vectors-<n>.hnsw      the hnswlib graph of saved version n (one current file)
    images/<study>/<sop>.dcm  the reference images, patient identifiers blanked
    .write.lock           fcntl lock: one writer at a time, across processes

A model change re-embeds every stored reference image (:meth:`SimilarCaseIndex.rebuild`):
the new vectors are staged in the side table (``rebuild_vectors``, keyed by the new
model's sha256) batch by batch while queries go on against the old graph, so an
interrupted rebuild resumes where it stopped; the swap to a graph of the new model
happens at once, under the writer lock. Vectors of two models are never in one graph.

Vectors: the model's L2-normalised embeddings in hnswlib space ``'l2'`` (squared
Euclidean). For unit vectors this ranks exactly as ``'ip'`` would, and its root is the
Euclidean distance (0..2) the report shows, so no conversion can go wrong.

Durability: a save writes the next ``vectors-<n+1>.hnsw`` under a temporary name,
fsyncs and renames it, and only then commits the side-table rows together with the
pointer to the new file in one SQLite transaction. A crash at any moment leaves the
pointer on a complete file: the previous version, or the new one. Diagnoses and
deletions live in the side table, which queries read fresh; deletions also rewrite
the graph so deleted images never take a neighbour's place.

Concurrency: hnswlib allows parallel queries or parallel adds, never both, so inside
a process a readers-writer lock guards the graph; across processes a writer holds an
fcntl lock, and readers notice a new saved version (the pointer in the side table) at
their next query and load it without a restart.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import io
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

import hnswlib
import numpy as np
import pydicom
import sqlalchemy as sa

from service.common.spool import fsync_dir, write_atomic
from service.ledger.engine import Prepared, open_sqlite
from service.ledger.rows import Row, columns
from service.results import ModelIdentity, SimilarStudy
from service.settings import Settings
from service.similar import migrations as index_migrations
from service.similar import schema

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Where a reference label came from. "synthetic" is the generator's ground truth
#: (demo and test libraries), never to be read as a clinical diagnosis.
LABEL_SOURCES: tuple[str, ...] = ("biopsy", "radiologist", "synthetic", "ai")
#: hnswlib graph degree and build-time beam; the issue fixes both.
HNSW_M = 16
EF_CONSTRUCTION = 200
#: Query-time beam, chosen with bench/retrieval.py on 256-d clusters shaped like the
#: shipped model's embeddings: recall@10 0.9999 at 100k and 0.993 at 1M (ef=64: 0.986
#: at 1M), p50 0.12 / 0.22 ms on one thread, over 100x faster than batched exact search.
DEFAULT_EF = 128
#: Neighbours fetched per query image before grouping, at least; grows until enough
#: distinct studies are found.
MIN_NEIGHBOURS = 32
#: Up to this many excluded images are fetched extra and dropped after the search;
#: more (e.g. every unconfirmed image) are filtered inside it.
MAX_OVERFETCH = 256
#: Attributes blanked (type 2) or removed in the stored reference copy: the index
#: keeps pixels for the similar-cases montage, never who the patient is.
_BLANKED = ("PatientName", "PatientID", "PatientBirthDate", "PatientAddress", "PatientTelephoneNumbers")
_REMOVED = ("OtherPatientIDsSequence", "OtherPatientNames", "PatientMotherBirthName", "IssuerOfPatientID")
_FORMAT = "1"
_NORM_TOLERANCE = 1e-3

#: Images re-embedded per committed batch of a rebuild (what an interruption can lose).
REBUILD_BATCH = 64


def _check_label_source(label_source: str, confirmed: bool) -> None:
    if label_source not in LABEL_SOURCES:
        raise ValueError(f"label source {label_source!r} is not one of {', '.join(LABEL_SOURCES)}")
    if label_source == "ai" and confirmed:
        raise ValueError("an AI-predicted label cannot be confirmed; attach a biopsy or radiologist diagnosis")


def unit_vectors(embeddings: np.ndarray, dim: int | None = None) -> np.ndarray:
    """Return ``embeddings`` as a C-contiguous float32 [N, D] array of unit vectors.

    Refuses (ValueError) anything else rather than normalising it silently: a vector
    that is not unit length means the wrong model output reached the index.
    """
    arr = np.asarray(embeddings, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"embeddings must be [N, D], got shape {np.shape(embeddings)}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"embeddings have {arr.shape[1]} dimensions, the index holds {dim}-dimensional ones")
    if not np.isfinite(arr).all():
        raise ValueError("embeddings contain NaN or infinite values")
    norms = np.linalg.norm(arr, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > _NORM_TOLERANCE)
    if bad.size:
        raise ValueError(
            f"embedding {int(bad[0])} has norm {norms[bad[0]]:.4f}; the index takes L2-normalised embeddings"
        )
    return np.ascontiguousarray(arr)


def distance_and_similarity(squared_l2: float) -> tuple[float, float]:
    """Euclidean distance (root of hnswlib's squared 'l2') and ``1 - d/2``, both clipped."""
    distance = float(min(2.0, np.sqrt(max(0.0, squared_l2))))
    return distance, 1.0 - distance / 2.0


@dataclass(frozen=True, eq=False)
class IndexEntry:
    """One reference image to add: its embedding, identity and diagnosis.

    ``patient_key`` is :meth:`SimilarCaseIndex.patient_key` of the Patient ID, never
    the ID itself; ``image_path`` is the DICOM file, copied into the index so the
    similar-cases montage can show it and ``rebuild`` can re-embed it (None: vectors
    only, as in benchmarks); ``frame_number`` is the frame the embedding came from
    (1 for single-frame images).
    """

    embedding: np.ndarray
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str
    label: str
    label_source: str
    image_path: Path | None = None
    confirmed: bool = False
    accession_number: str = ""
    study_date: str = ""
    patient_key: str = ""
    frame_number: int = 1

    def __post_init__(self) -> None:
        for name in ("sop_instance_uid", "series_uid", "study_uid", "sop_class_uid"):
            value = getattr(self, name)
            if not value or "/" in value or value.startswith("."):
                raise ValueError(f"{name} {value!r} is not a usable UID")
        if not self.label.strip():
            raise ValueError(f"image {self.sop_instance_uid} has an empty label")
        _check_label_source(self.label_source, self.confirmed)
        if self.frame_number < 1:
            raise ValueError(f"frame_number must be >= 1, got {self.frame_number}")


@dataclass(frozen=True)
class StoredImage:
    """A reference image as the index holds it (``path``: the stored DICOM copy)."""

    sop_instance_uid: str
    frame_number: int
    series_uid: str
    study_uid: str
    sop_class_uid: str
    label: str
    label_source: str
    confirmed: bool
    path: Path | None


@dataclass(frozen=True)
class AddResult:
    added: int
    skipped: list[str] = field(default_factory=list)  # SOP Instance UIDs already there


@dataclass(frozen=True)
class RebuildResult:
    embedded: int
    failed: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> reason


@dataclass(frozen=True)
class IndexInfo:
    directory: Path
    version: str
    model: ModelIdentity | None
    dim: int | None
    images: int
    deleted: int
    studies: int
    confirmed_studies: int
    by_label: dict[str, dict[str, int]]  # label -> label source -> studies
    vectors_bytes: int
    ef: int
    m: int
    ef_construction: int


@dataclass(frozen=True, slots=True)
class ImageRow(Row):
    """A reference image's row in the side table (:data:`schema.images`): what a query
    filters, groups to studies and returns, and what a rebuild re-embeds."""

    id: int  # its label in the hnswlib graph
    sop_instance_uid: str
    frame_number: int
    series_uid: str
    study_uid: str
    sop_class_uid: str
    accession_number: str
    study_date: str
    label: str
    label_source: str
    confirmed: int  # 0 or 1, as the table holds it
    patient_key: str
    image_file: str  # relative to the index folder; "" for an image added without one
    deleted: int

    def stored(self, directory: Path) -> StoredImage:
        """The image as :meth:`SimilarCaseIndex.stored_images` hands it out."""
        return StoredImage(
            sop_instance_uid=self.sop_instance_uid,
            frame_number=self.frame_number,
            series_uid=self.series_uid,
            study_uid=self.study_uid,
            sop_class_uid=self.sop_class_uid,
            label=self.label,
            label_source=self.label_source,
            confirmed=bool(self.confirmed),
            path=directory / self.image_file if self.image_file else None,
        )


@dataclass(frozen=True, slots=True)
class StagedRow:
    """A live image with the vector a rebuild staged for it (``vector`` None: ``failure``
    says why it could not be re-embedded)."""

    id: int
    sop_instance_uid: str
    image_file: str
    vector: bytes | None
    failure: str | None


@dataclass(frozen=True, slots=True)
class IndexMeta:
    """The index's own facts (:data:`schema.meta`, a key-value table of text), typed."""

    format: str
    index_id: str
    patient_key_salt: str
    counter: int  # the saved version: goes up with every saved change
    vectors_file: str  # the current graph file ("": none saved yet)
    live: int  # vectors of that graph not marked deleted
    max_id: int  # the highest image id in that graph
    dim: int | None
    m: int
    ef_construction: int
    model: ModelIdentity | None  # the model whose embeddings the index holds

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, str]]) -> IndexMeta:
        """The facts read from the table's (key, value) rows."""
        text = dict(pairs)
        return cls(
            format=text["format"],
            index_id=text["index_id"],
            patient_key_salt=text["patient_key_salt"],
            counter=int(text["counter"]),
            vectors_file=text["vectors_file"],
            live=int(text["live"]),
            max_id=int(text["max_id"]),
            dim=int(text["dim"]) if text["dim"] else None,
            m=int(text["m"]),
            ef_construction=int(text["ef_construction"]),
            model=ModelIdentity(name=text["model_name"], version=text["model_version"], sha256=text["model_sha256"])
            if "model_sha256" in text
            else None,
        )

    @property
    def version(self) -> str:
        return f"{self.index_id}.{self.counter}"


_m, _im, _rv = schema.meta.c, schema.images.c, schema.rebuild_vectors.c
_IMAGE_COLUMNS = columns(ImageRow, schema.images)


def _json_values(array: sa.BindParameter[str]) -> sa.Select[tuple[Any]]:
    """The elements of the JSON array ``array``: an IN list of any length in one
    parameter (a prepared statement cannot hold an expanding IN list)."""
    return sa.select(sa.func.json_each(array).table_valued("value").c.value)


def _excluded(by_patient: bool, unconfirmed: bool) -> Prepared:
    """Live images of a graph (up to ``max_id``) of the study ``study_uid``, of
    ``patient_key`` and, with ``unconfirmed``, those without a confirmed diagnosis:
    a UNION of indexed look-ups, as an OR of the three would scan the whole table."""
    parts = [sa.select(_im.id).where(_im.study_uid == sa.bindparam("study_uid"))]
    if by_patient:
        parts.append(sa.select(_im.id).where(_im.patient_key == sa.bindparam("patient_key")))
    if unconfirmed:
        parts.append(sa.select(_im.id).where(_im.confirmed == 0))
    return Prepared(
        sa.select(_im.id).where(_im.deleted == 0, _im.id <= sa.bindparam("max_id"), _im.id.in_(sa.union(*parts)))
    )


# What every query runs: prepared once (see service.ledger.engine.Prepared).
_READ_META = Prepared(sa.select(_m.key, _m.value))
_EXCLUDED = {(p, c): _excluded(p, c) for p in (False, True) for c in (False, True)}
_IN_IDS = _im.id.in_(_json_values(sa.bindparam("ids")))
#: Each neighbour's study, and whether a query may return it: not deleted, not of the
#: query's study or patient, confirmed if the query wants confirmed studies only. A
#: query reads only these of its neighbours, and whole rows for the studies it returns.
_NEIGHBOURS = Prepared(
    sa.select(
        _im.id,
        _im.study_uid,
        sa.and_(
            _im.deleted == 0,
            _im.study_uid != sa.bindparam("study_uid"),
            sa.or_(sa.bindparam("patient_key") == "", _im.patient_key != sa.bindparam("patient_key")),
            sa.or_(sa.bindparam("confirmed_only") == 0, _im.confirmed != 0),
        ),
    ).where(_IN_IDS)
)
_IMAGES_BY_ID = Prepared(sa.select(*_IMAGE_COLUMNS).where(_IN_IDS))
_LIVE_IDS = Prepared(sa.select(_im.id).where(_im.deleted == 0, _im.id <= sa.bindparam("max_id")))

_ADD_META = sa.insert(schema.meta).prefix_with("OR IGNORE")
_SET_META = sa.insert(schema.meta).prefix_with("OR REPLACE")
_MARK_DELETED = (
    sa.update(schema.images)
    .where(_im.id == sa.bindparam("image_id"))
    .values(deleted=1, deleted_reason=sa.bindparam("reason"), updated_at=sa.bindparam("now"))
)


def _meta_rows(values: dict[str, str]) -> list[dict[str, str]]:
    return [{"key": key, "value": value} for key, value in values.items()]


@dataclass(frozen=True)
class _Loaded:
    """The graph of one saved version, as this process holds it."""

    vectors_file: str
    hnsw: hnswlib.Index | None
    live: int  # vectors not marked deleted
    max_id: int


_NOTHING = _Loaded(vectors_file="", hnsw=None, live=0, max_id=-1)
_STALE = _Loaded(vectors_file="<stale>", hnsw=None, live=0, max_id=-1)


class _ReadWriteLock:
    """Many readers or one writer, writers first: hnswlib allows parallel queries or
    parallel adds, never both at once."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._waiting_writers = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class SimilarCaseIndex:
    """The similar-case index in ``directory``, bound to one model.

    Open it with the identity of the model whose embeddings you will add or query;
    an index that does not exist yet is created for that model. ``model=None`` opens
    an existing index for inspection, diagnoses and deletions only. Safe to share
    between threads; any number of processes may open the same folder.
    """

    def __init__(
        self,
        directory: Path,
        model: ModelIdentity | None,
        *,
        ef: int = DEFAULT_EF,
        m: int = HNSW_M,
        ef_construction: int = EF_CONSTRUCTION,
        durable: bool = True,
        lock_timeout_s: float = 600.0,
    ) -> None:
        self.directory = Path(directory)
        self.model = model
        self.ef = ef
        self.durable = durable
        self.lock_timeout_s = lock_timeout_s
        db_path = self.directory / "index.sqlite3"
        if model is None and not db_path.is_file():
            raise FileNotFoundError(f"there is no similar-case index in {self.directory}")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._db = open_sqlite(db_path, durable)
        try:
            with self._db.reading() as conn:
                current = index_migrations.revision(conn)
            if current != index_migrations.HEAD:
                index_migrations.upgrade(db_path)
            fresh = {
                "format": _FORMAT,
                "index_id": secrets.token_hex(4),
                "patient_key_salt": secrets.token_hex(32),
                "counter": "0",
                "vectors_file": "",
                "live": "0",
                "max_id": "-1",
                "dim": "",
                "m": str(m),
                "ef_construction": str(ef_construction),
            }
            if model is not None:
                fresh.update(_model_meta(model))
            with self._db.transaction() as db:
                db.execute(_ADD_META, _meta_rows(fresh))
            pairs = self._run(_READ_META)
            found = dict(pairs)["format"]
            if found != _FORMAT:
                raise ValueError(f"{db_path} has index format {found}, this version reads {_FORMAT}")
        except BaseException:
            self._db.close()
            raise
        self._salt = bytes.fromhex(IndexMeta.of(pairs).patient_key_salt)
        self._loaded = _NOTHING
        self._rw = _ReadWriteLock()
        self._refresh_lock = threading.Lock()
        self._write_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, model: ModelIdentity | None) -> SimilarCaseIndex:
        """The node's index (``settings.effective_index_dir``), as durable as its spool."""
        return cls(settings.effective_index_dir, model, durable=settings.durability == "fsync")

    # --- small helpers -------------------------------------------------------
    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, statement: Prepared, **params: Any) -> list[Any]:
        """The rows of a prepared statement (one of the query path's)."""
        with self._db.reading() as conn:
            rows: list[Any] = self._db.run(conn, statement, params).fetchall()
            return rows

    def _select(self, statement: sa.Executable) -> list[tuple[Any, ...]]:
        with self._db.reading() as conn:
            return [tuple(row) for row in conn.execute(statement)]

    def _read_meta(self) -> IndexMeta:
        return IndexMeta.of(self._run(_READ_META))

    @property
    def version(self) -> str:
        """Changes on every saved change (adds, deletions, diagnoses); named in the SR."""
        return self._read_meta().version

    @property
    def bound_model(self) -> ModelIdentity | None:
        """The model whose embeddings the index holds (None until one is bound)."""
        return self._read_meta().model

    def _check_model(self, meta: IndexMeta, action: str) -> None:
        if self.model is None:
            raise ValueError(f"cannot {action}: the index at {self.directory} was opened without a model identity")
        bound = meta.model
        if bound is None or bound.sha256 != self.model.sha256:
            held = "no model" if bound is None else f"model {bound.name} {bound.version} (sha256 {bound.sha256[:12]})"
            raise ValueError(
                f"cannot {action}: the index at {self.directory} holds embeddings of {held}, "
                f"not of {self.model.name} {self.model.version} (sha256 {self.model.sha256[:12]}); "
                "run 'sonocase index rebuild' to re-embed the reference images with this model"
            )

    def check_model(self, action: str) -> None:
        """Raise ValueError unless ``action`` may use this index with this object's
        model: before a long fill, not after its first batch (an index without
        images takes any model)."""
        if self.model is not None and self._count_rows() == 0:
            return
        self._check_model(self._read_meta(), action)

    def patient_key(self, patient_id: str, issuer: str = "") -> str:
        """A keyed hash of Patient ID (+ issuer) that links a patient's studies
        without storing who the patient is; "" when the ID is unknown."""
        if not patient_id.strip():
            return ""
        message = f"{issuer.strip()}\\{patient_id.strip()}".encode()
        return "pk1-" + hmac.new(self._salt, message, hashlib.sha256).hexdigest()[:32]

    # --- loading saved versions ---------------------------------------------
    def _load(self, meta: IndexMeta) -> _Loaded:
        name = meta.vectors_file
        if not name:
            return _NOTHING
        assert meta.dim is not None, "a saved graph has a dimension"
        index = hnswlib.Index(space="l2", dim=meta.dim)
        # Open first, load through the descriptor: a writer may unlink an old file
        # right after it committed a newer one, and a failed hnswlib load is fatal.
        fd = os.open(self.directory / name, os.O_RDONLY)
        try:
            index.load_index(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        index.set_ef(self.ef)
        return _Loaded(vectors_file=name, hnsw=index, live=meta.live, max_id=meta.max_id)

    def _on_saved_version(self, use: Callable[[IndexMeta], T]) -> tuple[IndexMeta, T]:
        """``use`` on the current saved version and the pointer to it; again on the next
        version when a writer superseded that one (and removed its graph file) between
        the pointer being read and the file being opened."""
        for _ in range(5):
            meta = self._read_meta()
            try:
                return meta, use(meta)
            except FileNotFoundError:
                continue  # superseded meanwhile
        raise RuntimeError(f"the index at {self.directory} changed five times while reading it")

    def _refresh(self) -> IndexMeta:
        """Read the pointer to the current saved version; load it if it is new to us."""
        with self._refresh_lock:
            meta, self._loaded = self._on_saved_version(
                lambda meta: self._loaded if meta.vectors_file == self._loaded.vectors_file else self._load(meta)
            )
            return meta

    # --- writing -------------------------------------------------------------
    @contextmanager
    def _writing(self) -> Iterator[IndexMeta]:
        """One writer at a time (threads and processes), on the latest saved version."""
        with self._write_lock:
            lock_fd = os.open(self.directory / ".write.lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                deadline = time.monotonic() + self.lock_timeout_s
                while True:
                    try:
                        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise TimeoutError(
                                f"another process has been writing the index at {self.directory} "
                                f"for over {self.lock_timeout_s:.0f} s"
                            ) from None
                        time.sleep(0.05)
                yield self._refresh()
            finally:
                os.close(lock_fd)  # releases the flock

    @contextmanager
    def _mutating(self) -> Iterator[None]:
        """Change the loaded graph in place, with no query running on it; if the
        change is not saved, forget the graph so the next use reloads the saved one."""
        with self._rw.exclusive():
            try:
                yield
            except BaseException:
                self._swap(_STALE)
                raise

    def _swap(self, loaded: _Loaded) -> None:
        with self._refresh_lock:  # never let a concurrent refresh put back an older version
            self._loaded = loaded

    def _save(
        self,
        meta: IndexMeta,
        hnsw: hnswlib.Index,
        live: int,
        max_id: int,
        rows: Callable[[sa.Connection], None],
        extra_meta: dict[str, str] | None = None,
    ) -> None:
        """Write ``hnsw`` as the next version's file, then commit ``rows`` with the
        pointer to it; remove the superseded file only after the commit."""
        counter = meta.counter + 1
        name = f"vectors-{counter}.hnsw"
        tmp = self.directory / f".tmp-{name}"
        hnsw.save_index(str(tmp))
        if self.durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, self.directory / name)
        if self.durable:
            fsync_dir(self.directory)
        updates = {
            "counter": str(counter),
            "vectors_file": name,
            "live": str(live),
            "max_id": str(max_id),
            "dim": str(hnsw.dim),
            **(extra_meta or {}),
        }
        with self._db.transaction() as db:
            rows(db)
            db.execute(_SET_META, _meta_rows(updates))
        self._swap(_Loaded(vectors_file=name, hnsw=hnsw, live=live, max_id=max_id))
        self._remove_stale_files(keep=name)

    def _remove_stale_files(self, keep: str) -> None:
        for path in self.directory.iterdir():
            if path.name != keep and (path.name.startswith("vectors-") or path.name.startswith(".tmp-vectors-")):
                path.unlink(missing_ok=True)

    def _bump(self, db: sa.Connection) -> None:
        """A saved change that needs no new graph (a diagnosis): only the version moves."""
        db.execute(sa.update(schema.meta).where(_m.key == "counter").values(value=sa.cast(_m.value, sa.Integer) + 1))

    def known_sop_instance_uids(self, sop_instance_uids: Iterable[str]) -> set[str]:
        """Which of these images the index already holds (also deleted ones), so a
        resumed fill skips them before spending time on inference."""
        wanted: sa.BindParameter[str] = sa.bindparam("uids", json.dumps(list(sop_instance_uids)))
        rows = self._select(sa.select(_im.sop_instance_uid).where(_im.sop_instance_uid.in_(_json_values(wanted))))
        return {uid for (uid,) in rows}

    def known_study_uids(self, study_uids: Iterable[str]) -> set[str]:
        """Which of these studies have images in the index (also deleted ones)."""
        wanted: sa.BindParameter[str] = sa.bindparam("uids", json.dumps(list(study_uids)))
        rows = self._select(sa.select(_im.study_uid).distinct().where(_im.study_uid.in_(_json_values(wanted))))
        return {uid for (uid,) in rows}

    def add(self, entries: Sequence[IndexEntry]) -> AddResult:
        """Add reference images and save; images already there (by SOP Instance UID,
        deleted ones included) are skipped, so re-running a study adds nothing."""
        if not entries:
            return AddResult(added=0)
        with self._writing() as meta:
            if self.model is not None and meta.model != self.model and self._count_rows() == 0:
                # An empty index takes the model of its first images.
                with self._db.transaction() as db:
                    db.execute(_SET_META, _meta_rows(_model_meta(self.model)))
                meta = self._refresh()
            self._check_model(meta, "add images")
            dim = meta.dim
            known = self.known_sop_instance_uids(e.sop_instance_uid for e in entries)
            new: dict[str, IndexEntry] = {}
            for entry in entries:
                if entry.sop_instance_uid not in known:
                    new.setdefault(entry.sop_instance_uid, entry)
            skipped = [e.sop_instance_uid for e in entries if e.sop_instance_uid in known]
            if not new:
                return AddResult(added=0, skipped=skipped)
            batch = list(new.values())
            vectors = unit_vectors(np.stack([np.asarray(e.embedding) for e in batch]), dim)
            stored = [self._store_reference(e) for e in batch]
            first_id = int(self._select(sa.select(sa.func.coalesce(sa.func.max(_im.id), -1) + 1))[0][0])
            ids = np.arange(first_id, first_id + len(batch), dtype=np.uint64)
            now = time.time()
            with self._mutating():
                hnsw = self._loaded.hnsw or self._new_graph(vectors.shape[1], meta)
                needed = hnsw.get_current_count() + len(batch)
                if needed > hnsw.get_max_elements():
                    hnsw.resize_index(needed)
                hnsw.add_items(vectors, ids, num_threads=os.cpu_count() or 1)

                def rows(db: sa.Connection) -> None:
                    db.execute(
                        sa.insert(schema.images),
                        [
                            {
                                "id": int(i),
                                "sop_instance_uid": e.sop_instance_uid,
                                "frame_number": e.frame_number,
                                "series_uid": e.series_uid,
                                "study_uid": e.study_uid,
                                "sop_class_uid": e.sop_class_uid,
                                "accession_number": e.accession_number,
                                "study_date": e.study_date,
                                "label": e.label.strip(),
                                "label_source": e.label_source,
                                "confirmed": int(e.confirmed),
                                "patient_key": e.patient_key,
                                "image_file": f,
                                "added_at": now,
                                "updated_at": now,
                            }
                            for i, e, f in zip(ids, batch, stored, strict=True)
                        ],
                    )

                self._save(meta, hnsw, meta.live + len(batch), int(ids[-1]), rows)
        for study_uid in sorted({e.study_uid for e in batch}):
            log.info("added reference images to the similar-case index", extra={"study_uid": study_uid})
        return AddResult(added=len(batch), skipped=skipped)

    def _count_rows(self) -> int:
        return int(self._select(sa.select(sa.func.count()).select_from(schema.images))[0][0])

    def _new_graph(self, dim: int, meta: IndexMeta) -> hnswlib.Index:
        index = hnswlib.Index(space="l2", dim=dim)
        index.init_index(max_elements=1, M=meta.m, ef_construction=meta.ef_construction, random_seed=100)
        index.set_ef(self.ef)
        return index

    def _store_reference(self, entry: IndexEntry) -> str:
        """Copy the image into the index with patient identifiers blanked; return its
        path relative to the index folder ("" for an entry without an image)."""
        if entry.image_path is None:
            return ""
        relative = Path("images") / entry.study_uid / f"{entry.sop_instance_uid}.dcm"
        try:
            ds = pydicom.dcmread(entry.image_path)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise ValueError(f"cannot read reference image {entry.image_path}: {exc}") from exc
        if ds.get("SOPInstanceUID") != entry.sop_instance_uid:
            raise ValueError(
                f"{entry.image_path} holds SOP Instance UID {ds.get('SOPInstanceUID')}, "
                f"not {entry.sop_instance_uid} as its index entry says"
            )
        for keyword in _BLANKED:
            if keyword in ds:
                setattr(ds, keyword, "")
        for keyword in _REMOVED:
            if keyword in ds:
                delattr(ds, keyword)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        write_atomic(self.directory / relative, buffer.getvalue(), durable=self.durable)
        return str(relative)

    def mark_deleted(self, study_uid: str, reason: str = "retracted") -> int:
        """Retract a study: its images never come back from a query; return how many."""
        with self._writing() as meta:
            rows = self._select(sa.select(_im.id, _im.image_file).where(_im.study_uid == study_uid, _im.deleted == 0))
            if not rows:
                return 0
            ids = [int(image_id) for image_id, _ in rows]
            now = time.time()

            def update(db: sa.Connection) -> None:
                db.execute(_MARK_DELETED, [{"image_id": i, "reason": reason, "now": now} for i in ids])

            with self._mutating():
                hnsw = self._loaded.hnsw
                assert hnsw is not None, "live images always have a saved graph"
                for label in ids:
                    hnsw.mark_deleted(label)
                self._save(meta, hnsw, meta.live - len(ids), meta.max_id, update)
        for _, image_file in rows:
            if image_file:
                (self.directory / image_file).unlink(missing_ok=True)
        log.info("marked %d reference images deleted (%s)", len(rows), reason, extra={"study_uid": study_uid})
        return len(rows)

    def attach_diagnosis(self, study_uid: str, label: str, source: str) -> int:
        """Attach a confirmed diagnosis to every image of a study; return how many."""
        if source == "ai":
            raise ValueError("a diagnosis is attached from 'biopsy' or 'radiologist', not 'ai'")
        _check_label_source(source, True)
        if not label.strip():
            raise ValueError("the diagnosis label is empty")
        with self._writing(), self._db.transaction() as db:
            changed = db.execute(
                sa.update(schema.images)
                .where(_im.study_uid == study_uid, _im.deleted == 0)
                .values(label=label.strip(), label_source=source, confirmed=1, updated_at=time.time())
            ).rowcount
            if not changed:
                raise KeyError(f"study {study_uid} is not in the similar-case index")
            self._bump(db)
        log.info("attached a %s diagnosis", source, extra={"study_uid": study_uid})
        return int(changed)

    def rebuild_progress(self) -> tuple[int, int]:
        """(images re-embedded for this object's model so far, live images): what a
        resumed :meth:`rebuild` has left to do."""
        if self.model is None:
            raise ValueError("cannot rebuild: the index was opened without a model identity")
        staged, live = self._select(
            sa.select(sa.func.count(_rv.image_id), sa.func.count())
            .select_from(schema.images.outerjoin(schema.rebuild_vectors, self._staged_for_this_model()))
            .where(_im.deleted == 0)
        )[0]
        return int(staged), int(live)

    def _staged_for_this_model(self) -> sa.ColumnElement[bool]:
        """Joins an image to the vector a rebuild staged for it with this object's model."""
        assert self.model is not None
        return sa.and_(_rv.image_id == _im.id, _rv.model_sha256 == self.model.sha256)

    def _stage(self, embed: Callable[[StoredImage], np.ndarray], progress: Callable[[int], None] | None) -> None:
        """Re-embed live images that have no staged vector for this model yet, a
        committed batch at a time."""
        assert self.model is not None
        while True:
            todo = self._stored(
                live_only=True,
                where=_im.id.not_in(sa.select(_rv.image_id).where(_rv.model_sha256 == self.model.sha256)),
                limit=REBUILD_BATCH,
            )
            if not todo:
                return
            rows: list[dict[str, Any]] = []
            for row in todo:
                image = row.stored(self.directory)
                vector: bytes | None = None
                failure: str | None = None
                try:
                    if image.path is None:
                        raise ValueError("added without a stored image")
                    vector = unit_vectors(embed(image))[0].tobytes()
                except ValueError as exc:
                    failure = str(exc)
                rows.append(
                    {"image_id": row.id, "model_sha256": self.model.sha256, "vector": vector, "failure": failure}
                )
                if progress is not None:
                    progress(1)
            with self._db.transaction() as db:
                db.execute(sa.insert(schema.rebuild_vectors).prefix_with("OR REPLACE"), rows)

    def rebuild(
        self, embed: Callable[[StoredImage], np.ndarray], progress: Callable[[int], None] | None = None
    ) -> RebuildResult:
        """Re-embed every stored reference image with this index object's model and
        bind the index to it. ``embed`` raises ValueError for an image it cannot
        embed (and images added without one cannot be); such images are marked
        deleted with the reason. Resumable: images re-embedded by an interrupted run
        are not embedded again. Readers keep the old graph until the new one is saved."""
        if self.model is None:
            raise ValueError("cannot rebuild: the index was opened without a model identity")
        self._stage(embed, progress)  # the long part, beside queries and other writers
        with self._writing() as meta:
            self._stage(embed, progress)  # images added meanwhile
            staged = [
                StagedRow(*row)
                for row in self._select(
                    sa.select(_im.id, _im.sop_instance_uid, _im.image_file, _rv.vector, _rv.failure)
                    .join(schema.rebuild_vectors, self._staged_for_this_model())
                    .where(_im.deleted == 0)
                    .order_by(_im.id)
                )
            ]
            ok = [(r.id, r.vector) for r in staged if r.vector is not None]
            failed = {r.sop_instance_uid: r.failure or "" for r in staged if r.vector is None}
            if not ok:
                raise ValueError(
                    f"none of the {len(staged)} reference images could be re-embedded; the index is left as it was"
                )
            now = time.time()

            def update(db: sa.Connection) -> None:
                gone = [
                    {"image_id": r.id, "reason": f"rebuild: {r.failure}", "now": now}
                    for r in staged
                    if r.vector is None
                ]
                if gone:
                    db.execute(_MARK_DELETED, gone)
                db.execute(sa.delete(schema.rebuild_vectors))  # this model's are in the graph; others' are stale

            # A new graph object: queries keep using the old one until the swap.
            matrix = unit_vectors(np.stack([np.frombuffer(vector, dtype=np.float32) for _, vector in ok]))
            ids = [image_id for image_id, _ in ok]
            hnsw = self._new_graph(matrix.shape[1], meta)
            hnsw.resize_index(len(ids))
            hnsw.add_items(matrix, np.asarray(ids, dtype=np.uint64), num_threads=os.cpu_count() or 1)
            self._save(meta, hnsw, len(ids), max(ids), update, extra_meta=_model_meta(self.model))
        for r in staged:
            if r.vector is None and r.image_file:
                (self.directory / r.image_file).unlink(missing_ok=True)
        log.info(
            "rebuilt the similar-case index with model %s %s: %d images, %d failed",
            self.model.name,
            self.model.version,
            len(ids),
            len(failed),
        )
        return RebuildResult(embedded=len(ids), failed=failed)

    # --- reading -------------------------------------------------------------
    def _stored(
        self, live_only: bool, where: sa.ColumnElement[bool] | None = None, limit: int | None = None
    ) -> list[ImageRow]:
        stmt = sa.select(*_IMAGE_COLUMNS).order_by(_im.id).limit(limit)
        if live_only:
            stmt = stmt.where(_im.deleted == 0)
        if where is not None:
            stmt = stmt.where(where)
        return [ImageRow.of(row) for row in self._select(stmt)]

    def stored_images(self) -> list[StoredImage]:
        """Every live reference image (what ``rebuild`` re-embeds)."""
        return [row.stored(self.directory) for row in self._stored(live_only=True)]

    def reference_image(self, sop_instance_uid: str) -> StoredImage | None:
        """The stored copy of a live reference image (for the similar-cases montage)."""
        found = self._stored(live_only=True, where=_im.sop_instance_uid == sop_instance_uid)
        return found[0].stored(self.directory) if found else None

    def info(self) -> IndexInfo:
        meta, vectors_bytes = self._on_saved_version(
            lambda meta: (self.directory / meta.vectors_file).stat().st_size if meta.vectors_file else 0
        )
        live = _im.deleted == 0
        images, deleted, studies, confirmed_studies = self._select(
            sa.select(
                sa.func.sum(sa.cast(live, sa.Integer)),
                sa.func.sum(_im.deleted),
                sa.func.count(sa.distinct(sa.case((live, _im.study_uid)))),
                sa.func.count(sa.distinct(sa.case((sa.and_(live, _im.confirmed == 1), _im.study_uid)))),
            )
        )[0]
        by_label: dict[str, dict[str, int]] = {}
        for label, source, count in self._select(
            sa.select(_im.label, _im.label_source, sa.func.count(sa.distinct(_im.study_uid)))
            .where(live)
            .group_by(_im.label, _im.label_source)
            .order_by(_im.label, _im.label_source)
        ):
            by_label.setdefault(label, {})[source] = int(count)
        return IndexInfo(
            directory=self.directory,
            version=meta.version,
            model=meta.model,
            dim=meta.dim,
            images=int(images or 0),
            deleted=int(deleted or 0),
            studies=int(studies),
            confirmed_studies=int(confirmed_studies),
            by_label=by_label,
            vectors_bytes=vectors_bytes,
            ef=self.ef,
            m=meta.m,
            ef_construction=meta.ef_construction,
        )

    def query(
        self,
        embeddings: np.ndarray,
        k_studies: int,
        exclude_study_uid: str,
        exclude_patient_key: str | None = None,
        confirmed_only: bool = False,
        query_sop_instance_uids: Sequence[str] | None = None,
    ) -> list[SimilarStudy]:
        """The ``k_studies`` studies nearest to any of the query images.

        Per image k nearest neighbours, grouped to studies; a study's distance is its
        best image's. Never returns ``exclude_study_uid`` (the query's own study), a
        study of ``exclude_patient_key``, or a deleted image; with ``confirmed_only``
        only studies with a biopsy or radiologist diagnosis. ``query_sop_instance_uids``
        names the query images, to say which one matched.
        """
        meta = self._refresh()
        self._check_model(meta, "query")
        queries = unit_vectors(embeddings, meta.dim)
        if query_sop_instance_uids is not None and len(query_sop_instance_uids) != len(queries):
            raise ValueError(f"{len(queries)} embeddings but {len(query_sop_instance_uids)} query SOP Instance UIDs")
        if k_studies < 1:
            return []
        with self._rw.shared():
            loaded = self._loaded
            if loaded.hnsw is None:
                return []
            excluded = self._excluded_ids(loaded.max_id, exclude_study_uid, exclude_patient_key or "", confirmed_only)
            allowed = loaded.live - len(excluded)
            k = min(allowed, max(MIN_NEIGHBOURS, 4 * k_studies))
            best: dict[str, tuple[float, int, int]] = {}  # study -> (squared distance, image id, query row)
            studies: dict[int, str | None] = {}  # image id -> its study; None: not to be returned
            while k > 0:
                ids, squared = self._neighbours(loaded, queries, k, excluded)
                studies.update(
                    self._studies(
                        set(ids.ravel().tolist()) - studies.keys(),
                        exclude_study_uid,
                        exclude_patient_key or "",
                        confirmed_only,
                    )
                )
                best = {}
                for q, (id_row, d_row) in enumerate(zip(ids, squared, strict=True)):
                    for image_id, d2 in zip(id_row.tolist(), d_row.tolist(), strict=True):
                        study = studies.get(image_id)
                        if study is None:
                            continue  # excluded, or changed since this version was saved
                        if study not in best or d2 < best[study][0]:
                            best[study] = (d2, image_id, q)
                if len(best) >= k_studies or k >= allowed:
                    break
                k = min(allowed, k * 4)
        ranked = sorted(best.items(), key=lambda item: (item[1][0], item[0]))[:k_studies]
        rows = self._rows({image_id for _, (_, image_id, _) in ranked})
        result = []
        for study, (d2, image_id, q) in ranked:
            row = rows[image_id]
            distance, similarity = distance_and_similarity(d2)
            result.append(
                SimilarStudy(
                    study_uid=study,
                    series_uid=row.series_uid,
                    sop_instance_uid=row.sop_instance_uid,
                    sop_class_uid=row.sop_class_uid,
                    accession_number=row.accession_number,
                    study_date=row.study_date,
                    label=row.label,
                    label_source=row.label_source,
                    distance=distance,
                    similarity=similarity,
                    query_sop_instance_uid=query_sop_instance_uids[q] if query_sop_instance_uids is not None else "",
                )
            )
        return result

    def _excluded_ids(self, max_id: int, study_uid: str, patient_key: str, confirmed_only: bool) -> np.ndarray:
        """Live images of this graph a query must not return."""
        rows = self._run(
            _EXCLUDED[bool(patient_key), confirmed_only], max_id=max_id, study_uid=study_uid, patient_key=patient_key
        )
        return np.fromiter((image_id for (image_id,) in rows), dtype=np.int64, count=len(rows))

    def _neighbours(
        self, loaded: _Loaded, queries: np.ndarray, k: int, excluded: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """k nearest allowed images per query: the graph, or exact search where the
        graph cannot promise k (k covers every allowed image, or a filtered search
        came back short)."""
        hnsw = loaded.hnsw
        assert hnsw is not None
        allowed_mask: np.ndarray | None = None
        if excluded.size:
            allowed_mask = np.ones(loaded.max_id + 1, dtype=bool)
            allowed_mask[excluded] = False
        if k < loaded.live - excluded.size:
            # A few excluded images (the query's own study): fetch that many more and
            # let the caller drop them, which is faster than hnswlib's Python filter.
            overfetch = excluded.size <= MAX_OVERFETCH
            try:
                labels, squared = hnsw.knn_query(
                    queries,
                    k=k + excluded.size if overfetch else k,
                    num_threads=1,
                    filter=None if overfetch or allowed_mask is None else allowed_mask.__getitem__,
                )
                return labels.astype(np.int64), squared
            except RuntimeError:
                pass  # fewer than k reachable through the filter: search exactly
        candidates = self._live_ids(loaded.max_id, allowed_mask)
        # float64 and the actual norms: float32 unit vectors are 1 only to ~1e-7,
        # which the root would magnify into a distance of ~4e-4 between equal images
        vectors = hnsw.get_items(candidates).astype(np.float64)
        q = queries.astype(np.float64)
        squared = (q * q).sum(1)[:, None] + (vectors * vectors).sum(1)[None, :] - 2.0 * q @ vectors.T
        squared = np.maximum(0.0, squared)
        order = np.argsort(squared, axis=1, kind="stable")[:, :k]
        return candidates[order], np.take_along_axis(squared, order, axis=1)

    def _live_ids(self, max_id: int, allowed_mask: np.ndarray | None) -> np.ndarray:
        rows = self._run(_LIVE_IDS, max_id=max_id)
        ids = np.fromiter((image_id for (image_id,) in rows), dtype=np.int64, count=len(rows))
        return ids if allowed_mask is None else ids[allowed_mask[ids]]

    def _studies(self, ids: set[int], study_uid: str, patient_key: str, confirmed_only: bool) -> dict[int, str | None]:
        """The study of each of these images; None for one a query that excludes
        ``study_uid``, ``patient_key`` (and unconfirmed studies) must not return."""
        if not ids:
            return {}
        rows = self._run(
            _NEIGHBOURS,
            ids=json.dumps(sorted(ids)),
            study_uid=study_uid,
            patient_key=patient_key,
            confirmed_only=int(confirmed_only),
        )
        return {image_id: study if eligible else None for image_id, study, eligible in rows}

    def _rows(self, ids: set[int]) -> dict[int, ImageRow]:
        if not ids:
            return {}
        found = [ImageRow.of(row) for row in self._run(_IMAGES_BY_ID, ids=json.dumps(sorted(ids)))]
        return {row.id: row for row in found}


def _model_meta(model: ModelIdentity) -> dict[str, str]:
    return {"model_name": model.name, "model_version": model.version, "model_sha256": model.sha256}
