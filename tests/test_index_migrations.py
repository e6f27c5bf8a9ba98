"""The similar-case index's side table under Alembic: an index file made before
migrations is adopted with every row intact, a new one is made by the migrations,
and both match the table declarations."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from service.results import ModelIdentity
from service.similar import migrations as index_migrations
from service.similar import schema
from service.similar.index import SimilarCaseIndex

MODEL = ModelIdentity(name="sonocase-hybrid", version="1.0.0", sha256="a" * 64)

#: The side table as the index made it before migrations (service/similar/index.py's _SCHEMA).
LEGACY_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL UNIQUE,
    frame_number INTEGER NOT NULL,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    accession_number TEXT NOT NULL,
    study_date TEXT NOT NULL,
    label TEXT NOT NULL,
    label_source TEXT NOT NULL,
    confirmed INTEGER NOT NULL,
    patient_key TEXT NOT NULL,
    image_file TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    deleted_reason TEXT,
    added_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS images_study ON images(study_uid);
CREATE INDEX IF NOT EXISTS images_patient ON images(patient_key);
CREATE TABLE IF NOT EXISTS rebuild_vectors (
    image_id INTEGER NOT NULL,
    model_sha256 TEXT NOT NULL,
    vector BLOB,
    failure TEXT,
    PRIMARY KEY (image_id, model_sha256)
);
"""
META = {
    "format": "1",
    "index_id": "0badcafe",
    "patient_key_salt": "11" * 32,
    "counter": "7",
    "vectors_file": "",
    "live": "0",
    "max_id": "0",
    "dim": "",
    "m": "16",
    "ef_construction": "200",
    "model_name": MODEL.name,
    "model_version": MODEL.version,
    "model_sha256": MODEL.sha256,
}
IMAGE = (0, "1.2.3.1.1", 1, "1.2.3.1", "1.2.3", "1.2.840.10008.5.1.4.1.1.6.1", "A1", "20250101", "benign",
         "biopsy", 1, "pk1-00", "images/1.2.3/1.2.3.1.1.dcm", 1, "retracted", 10.0, 11.0)  # fmt: skip
STAGED = (0, "b" * 64, b"\x00\x01", None)


def _legacy_index(directory: Path) -> Path:
    directory.mkdir()
    path = directory / "index.sqlite3"
    db = sqlite3.connect(path)
    try:
        db.executescript(LEGACY_SCHEMA)
        db.executemany("INSERT INTO meta VALUES (?, ?)", META.items())
        db.execute(f"INSERT INTO images VALUES ({','.join('?' * len(IMAGE))})", IMAGE)
        db.execute("INSERT INTO rebuild_vectors VALUES (?, ?, ?, ?)", STAGED)
        db.commit()
    finally:
        db.close()
    return path


def _read(path: Path, sql: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(path)
    try:
        return [tuple(r) for r in db.execute(sql)]
    finally:
        db.close()


def _schema(path: Path) -> dict[str, object]:
    """Tables -> columns, indexes, keys, unique constraints, as SQLAlchemy reads them back."""
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            return {
                table: (
                    [
                        (c["name"], str(c["type"]), c["nullable"], str(c["default"]))
                        for c in inspector.get_columns(table)
                    ],
                    sorted((i["name"], tuple(i["column_names"])) for i in inspector.get_indexes(table)),
                    inspector.get_pk_constraint(table)["constrained_columns"],
                    sorted(tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)),
                )
                for table in inspector.get_table_names()
                if table != "alembic_version"
            }
    finally:
        engine.dispose()


def test_an_index_from_before_migrations_is_adopted_with_every_row_intact(tmp_path: Path) -> None:
    path = _legacy_index(tmp_path / "old")
    with SimilarCaseIndex(tmp_path / "old", MODEL, durable=False) as index:
        assert index.version == "0badcafe.7" and index.bound_model == MODEL
        assert [s.sop_instance_uid for s in index.stored_images()] == []  # the one image is deleted
    assert _read(path, "SELECT version_num FROM alembic_version") == [(index_migrations.HEAD,)]
    assert _read(path, "SELECT * FROM images") == [IMAGE]
    assert _read(path, "SELECT * FROM rebuild_vectors") == [STAGED]
    assert dict(_read(path, "SELECT key, value FROM meta")) == META
    with SimilarCaseIndex(tmp_path / "new", MODEL, durable=False):
        pass
    assert _schema(path) == _schema(tmp_path / "new" / "index.sqlite3")


def test_the_declarations_are_what_the_migrations_make(tmp_path: Path) -> None:
    with SimilarCaseIndex(tmp_path, MODEL, durable=False):
        pass
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            assert compare_metadata(context, schema.metadata) == []
            extended = sa.MetaData()
            for table in schema.metadata.tables.values():
                table.to_metadata(extended)
            sa.Table("extra", extended, sa.Column("x", sa.Integer()))
            assert [(d[0], d[1].name) for d in compare_metadata(context, extended)] == [("add_table", "extra")]
    finally:
        engine.dispose()


def test_an_index_a_newer_sonocase_upgraded_is_refused(tmp_path: Path) -> None:
    with SimilarCaseIndex(tmp_path, MODEL, durable=False):
        pass
    db = sqlite3.connect(tmp_path / "index.sqlite3")
    with db:
        db.execute("UPDATE alembic_version SET version_num='i9999'")
    db.close()
    with pytest.raises(RuntimeError, match=r"i9999.*newer Sonocase"):
        SimilarCaseIndex(tmp_path, MODEL, durable=False)
