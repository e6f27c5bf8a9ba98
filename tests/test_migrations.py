"""Schema migrations (Alembic) on a real SQLite file and the real PostgreSQL: a ledger
made by the node before it had migrations is adopted and upgraded with every row
intact, a fresh one gets the same schema, a newer one is refused, and several
processes opening an old ledger at once upgrade it once."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from service import migrations
from service.ledger import Ledger, StudyState, Verdict, schema

#: The ledger's DDL exactly as the node created it before migrations (main at
#: dcf87e4, service/ledger.py _SCHEMA); PostgreSQL got it through _pg_schema below.
LEGACY_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 1,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    completed_at REAL,
    queued_at REAL,
    analysis_started REAL,
    lease_until REAL,
    analysed_at REAL,
    reported_at REAL,
    sent_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    failed_stage TEXT,
    error TEXT,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS studies_state ON studies(state);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL REFERENCES studies(study_uid),
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    calling_ae TEXT NOT NULL,
    modality TEXT NOT NULL,
    ignored_reason TEXT,
    received_at REAL NOT NULL,
    crc32 INTEGER
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS results (
    study_uid TEXT NOT NULL REFERENCES studies(study_uid),
    generation INTEGER NOT NULL,
    result TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (study_uid, generation)
);
CREATE TABLE IF NOT EXISTS outbox (
    sop_instance_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    study_uid TEXT NOT NULL REFERENCES studies(study_uid),
    generation INTEGER NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    error TEXT,
    sent_at REAL,
    PRIMARY KEY (sop_instance_uid, destination)
);
CREATE INDEX IF NOT EXISTS outbox_state ON outbox(state, next_attempt_at);
"""


def _pg_schema(schema: str) -> str:
    """main's conversion of the schema to PostgreSQL's types, verbatim."""
    schema = re.sub(r"\bREAL\b", "DOUBLE PRECISION", schema)
    schema = re.sub(r"\bINTEGER\b", "BIGINT", schema)
    return re.sub(r"\bTEXT\b", 'TEXT COLLATE "C"', schema)


#: Rows as the old node wrote them: every state, retries, a failure, two generations.
STUDIES = [
    ("1.2.3.1", "receiving", 1, 100.0, 101.5, None, None, None, None, None, None, None, 0, None, None, None, 101.5),
    ("1.2.3.2", "queued", 1, 110.0, 111.0, 116.0, 116.5, None, 716.5, None, None, None, 0, None, None, None, 116.5),
    ("1.2.3.3", "sent", 2, 120.0, 125.0, 130.0, 130.1, 130.2, None, 131.0, 131.5, 132.25, 1, None, None, None, 132.25),
    (
        "1.2.3.4",
        "failed",
        1,
        140.0,
        140.0,
        145.0,
        145.0,
        146.0,
        None,
        None,
        None,
        None,
        3,
        None,
        "analysis",
        "ModelError: the model cannot be loaded",
        160.0,
    ),
]
INSTANCES = [
    (
        "1.2.3.1.1",
        "1.2.3.1",
        "1.2.3.1.9",
        "1.2.840.10008.5.1.4.1.1.6.1",
        "1.2.840.10008.1.2.1",
        "spool/a/1.dcm",
        1000,
        "PACS",
        "US",
        None,
        100.0,
        12345,
    ),
    (
        "1.2.3.1.2",
        "1.2.3.1",
        "1.2.3.1.9",
        "1.2.840.10008.5.1.4.1.1.6.1",
        "1.2.840.10008.1.2.1",
        "spool/a/2.dcm",
        2500,
        "PACS",
        "US",
        None,
        101.5,
        None,
    ),
    (
        "1.2.3.2.1",
        "1.2.3.2",
        "1.2.3.2.9",
        "1.2.840.10008.5.1.4.1.1.6.1",
        "1.2.840.10008.1.2",
        "spool/b/1.dcm",
        700,
        "SCANNER",
        "US",
        None,
        111.0,
        4294967295,
    ),
    (
        "1.2.3.3.1",
        "1.2.3.3",
        "1.2.3.3.9",
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.1.2.4.50",
        "spool/c/1.dcm",
        64,
        "PACS",
        "OT",
        "modality OT is not US",
        120.0,
        None,
    ),
    (
        "1.2.3.4.1",
        "1.2.3.4",
        "1.2.3.4.9",
        "1.2.840.10008.5.1.4.1.1.6.1",
        "1.2.840.10008.1.2.1",
        "spool/d/1.dcm",
        5,
        "PACS",
        "US",
        None,
        140.0,
        0,
    ),
]
RESULTS = [
    ("1.2.3.3", 1, json.dumps({"study_uid": "1.2.3.3", "generation": 1}), 131.0),
    (
        "1.2.3.3",
        2,
        json.dumps(
            {
                "study_uid": "1.2.3.3",
                "generation": 2,
                "ü": "ß",
                "images": [
                    {"frames": [{}], "out_of_distribution": True},
                    {"frames": [{}, {}], "out_of_distribution": False},
                    {"frames": [], "skipped": "mostly blank", "out_of_distribution": False},
                ],
            }
        ),
        131.0,
    ),
]
OUTBOX = [
    (
        "1.2.3.3.100",
        "PACS@127.0.0.1:104",
        "1.2.3.3",
        2,
        "1.2.840.10008.5.1.4.1.1.88.34",
        "outbox/c/2/SR.dcm",
        "sent",
        1,
        131.5,
        None,
        132.0,
    ),
    (
        "1.2.3.3.101",
        "PACS@127.0.0.1:104",
        "1.2.3.3",
        2,
        "1.2.840.10008.5.1.4.1.1.7",
        "outbox/c/2/SC.dcm",
        "sent",
        0,
        131.5,
        "C-STORE status 0xA700",
        132.25,
    ),
]
TABLES = {"studies": STUDIES, "instances": INSTANCES, "results": RESULTS, "outbox": OUTBOX}


class Backend:
    """One database to make a legacy ledger in, on either backend."""

    def __init__(self, kind: str, path: Path, url: str) -> None:
        self.kind, self.path, self.url = kind, path, url

    def open(self) -> Ledger:
        return Ledger(url=self.url) if self.url else Ledger(self.path)

    def execute(self, script: str, rows: dict[str, list[tuple[Any, ...]]] | None = None) -> None:
        """Run raw DDL and inserts, as the old node did (no Alembic involved)."""
        if self.url:
            with psycopg.connect(self.url, autocommit=True) as db:
                db.execute(_pg_schema(script))
                for table, values in (rows or {}).items():
                    for row in values:
                        db.execute(f"INSERT INTO {table} VALUES ({','.join(['%s'] * len(row))})", row)
            return
        db = sqlite3.connect(self.path)
        try:
            db.executescript(script)
            for table, values in (rows or {}).items():
                db.executemany(f"INSERT INTO {table} VALUES ({','.join('?' * len(values[0]))})", values)
            db.commit()
        finally:
            db.close()

    def fetch(self, sql: str) -> list[tuple[Any, ...]]:
        if self.url:
            with psycopg.connect(self.url) as db:
                return [tuple(r) for r in db.execute(sql).fetchall()]
        db = sqlite3.connect(self.path)
        try:
            return [tuple(r) for r in db.execute(sql).fetchall()]
        finally:
            db.close()

    def schema(self) -> dict[str, Any]:
        """Tables -> columns (name, type, nullable, default), indexes, keys: what a
        migration must get right, read back by SQLAlchemy's inspector."""
        engine = migrations._engine(None if self.url else self.path, self.url)
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
                        sorted(
                            (tuple(f["constrained_columns"]), f["referred_table"])
                            for f in inspector.get_foreign_keys(table)
                        ),
                    )
                    for table in sorted(inspector.get_table_names())
                    if table != "alembic_version"
                }
        finally:
            engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else ""
    return Backend(request.param, tmp_path / "ledger.sqlite3", url)


@pytest.fixture
def second_backend(backend: Backend, tmp_path: Path) -> Iterator[Backend]:
    """Another empty database on the same backend (PostgreSQL: a schema of its own)."""
    if not backend.url:
        yield Backend(backend.kind, tmp_path / "other.sqlite3", "")
        return
    database, schema = backend.url.split("?")[0], f"t{os.urandom(6).hex()}"
    with psycopg.connect(database, autocommit=True) as db:
        db.execute(f"CREATE SCHEMA {schema}")
    yield Backend(backend.kind, tmp_path / "unused", f"{database}?options=-csearch_path%3D{schema}")
    with psycopg.connect(database, autocommit=True) as db:
        db.execute(f"DROP SCHEMA {schema} CASCADE")


def test_head_is_alembics_only_head() -> None:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    assert ScriptDirectory.from_config(config).get_heads() == [migrations.HEAD]


def test_a_legacy_ledger_is_upgraded_with_every_row_intact(backend: Backend) -> None:
    backend.execute(LEGACY_SCHEMA, TABLES)
    ledger = backend.open()
    try:
        assert ledger.revision() == migrations.HEAD
        for table, rows in TABLES.items():
            columns = len(rows[0])
            stored = sorted(r[:columns] for r in backend.fetch(f"SELECT * FROM {table}"))
            assert stored == sorted(rows), table
        for row in STUDIES:  # the new columns: unset, and the spool's size from the instances
            study = ledger.study(row[0])
            assert study is not None
            assert (study.routing_rule, study.routing_reason, study.destinations) == (None, None, None)
            assert study.spool_bytes == sum(i[6] for i in INSTANCES if i[1] == row[0])
        assert ledger.purges("1.2.3.3") == []
        # and the ledger works on the upgraded rows as on its own
        assert ledger.count_by_state() == {"receiving": 1, "queued": 1, "sent": 1, "failed": 1}
        assert {(row.study_uid, row.generation, row.result) for row in ledger.latest_results()} == {RESULTS[1][:3]}
        assert ledger.image_totals() == (2, 1)  # counted from the stored results: analysed, not assessed
        assert [i.crc32 for i in ledger.instances("1.2.3.1")] == [12345, None]
        assert ledger.complete_quiet_studies(5, now=200) == ["1.2.3.1"]
        assert [c.study_uid for c in ledger.purge_candidates()] == ["1.2.3.3"]
    finally:
        ledger.close()
    reopened = backend.open()  # at HEAD now: opening again changes nothing
    try:
        assert reopened.study("1.2.3.1").state == StudyState.COMPLETE
    finally:
        reopened.close()


def test_a_ledger_from_before_the_crc32_column_is_adopted(backend: Backend) -> None:
    backend.execute(
        LEGACY_SCHEMA.replace(",\n    crc32 INTEGER", ""),
        {"studies": STUDIES[:1], "instances": [i[:-1] for i in INSTANCES[:2]]},
    )
    ledger = backend.open()
    try:
        assert [(i.sop_instance_uid, i.crc32) for i in ledger.instances("1.2.3.1")] == [
            ("1.2.3.1.1", None),
            ("1.2.3.1.2", None),
        ]
    finally:
        ledger.close()


def test_migrations_make_the_schema_a_legacy_ledger_is_upgraded_to(backend: Backend, second_backend: Backend) -> None:
    backend.execute(LEGACY_SCHEMA)
    backend.open().close()
    second_backend.open().close()
    assert backend.schema() == second_backend.schema()
    assert {"purges", "studies", "instances", "results", "outbox", "outcomes", "hl7_messages", "verdicts"} == set(
        backend.schema()
    )


def test_the_table_declarations_are_what_the_migrations_make(backend: Backend) -> None:
    """The tables the ledger's queries are built on (service.ledger.schema) match,
    column for column and index for index, what the migrations made: Alembic's
    autogenerate finds nothing to add, drop or change."""
    backend.open().close()
    engine = migrations._engine(None if backend.url else backend.path, backend.url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            diff = compare_metadata(context, schema.metadata)
    finally:
        engine.dispose()
    # PostgreSQL makes a primary key NOT NULL whatever the declaration (nullable, as SQLite had it) says
    keys = {(t.name, c.name) for t in schema.metadata.tables.values() for c in t.primary_key}
    forced = [d for d in diff if backend.url and d[0][0] == "modify_nullable" and d[0][2:4] in keys]
    assert [d for d in diff if d not in forced] == []


def test_a_column_the_migrations_lack_is_found(backend: Backend) -> None:
    """The comparison above can fail: a declared column no migration made shows."""
    backend.open().close()
    extended = sa.MetaData()
    for table in schema.metadata.tables.values():
        table.to_metadata(extended)
    extended.tables["studies"].append_column(sa.Column("priority", sa.Integer()))
    engine = migrations._engine(None if backend.url else backend.path, backend.url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), extended)
    finally:
        engine.dispose()
    added = [(d[2], d[3].name) for d in diff if isinstance(d, tuple) and d[0] == "add_column"]
    assert added == [("studies", "priority")]


def test_verdicts_given_before_roles_are_kept_without_one(backend: Backend) -> None:
    """0005 adds the verdict's reader role: a ledger at 0004 keeps its verdicts, with
    no role (not known), and records the role of those given after."""
    backend.execute(LEGACY_SCHEMA, {"studies": STUDIES[:1]})
    with migrations.write_locked(None if backend.url else backend.path, backend.url) as connection:
        migrations._adopt_unversioned(connection)
        command.upgrade(migrations._config(connection), "0004")
        connection.exec_driver_sql(
            "INSERT INTO verdicts (study_uid, finding, verdict, corrected_class, comment, reader, recorded_at)"
            " VALUES ('1.2.3.1', '', 'agree', NULL, '', 'Dr A', 1.0)"
        )
    ledger = backend.open()
    try:
        assert ledger.revision() == migrations.HEAD == "0005"
        ledger.record_verdict(Verdict("1.2.3.1", "", "disagree", None, "", "Dr B", "reviewer"), now=2.0)
        assert [(v.reader, v.reader_role) for v in ledger.verdicts("1.2.3.1")] == [
            ("Dr A", None),
            ("Dr B", "reviewer"),
        ]
    finally:
        ledger.close()


@pytest.mark.integration
def test_a_ledger_upgraded_by_a_newer_sonocase_is_refused(backend: Backend, tmp_path: Path) -> None:
    backend.open().close()
    backend.execute("UPDATE alembic_version SET version_num='9999'")
    with pytest.raises(migrations.SchemaTooNew, match=r"revision 9999, which this Sonocase does not know"):
        backend.open()
    assert backend.fetch("SELECT version_num FROM alembic_version") == [("9999",)]
    env = {"SONOCASE_DATA_DIR": str(tmp_path), "SONOCASE_LEDGER_URL": backend.url}
    done = _sonocase(env, "migrate")
    assert done.returncode == 1 and "does not know (it knows up to" in done.stderr


@pytest.mark.integration
def test_migrate_command_upgrades_and_says_so(backend: Backend, tmp_path: Path) -> None:
    if not backend.url:
        backend.path = tmp_path / "data" / "ledger.sqlite3"
        backend.path.parent.mkdir()
    backend.execute(LEGACY_SCHEMA, {"studies": STUDIES})
    env = {"SONOCASE_DATA_DIR": str(tmp_path / "data"), "SONOCASE_LEDGER_URL": backend.url}
    dry = _sonocase(env, "migrate", "--dry-run")
    every = ", ".join(f"{n:04d}" for n in range(1, int(migrations.HEAD) + 1))
    assert dry.returncode == 0 and f"revision none; would apply {every}" in dry.stdout, dry.stderr
    assert backend.fetch("SELECT COUNT(*) FROM studies") == [(len(STUDIES),)]
    done = _sonocase(env, "migrate")
    assert done.returncode == 0 and f"from schema revision 0001 to {migrations.HEAD}" in done.stdout, done.stderr
    again = _sonocase(env, "migrate")
    assert f"at schema revision {migrations.HEAD} (current)" in again.stdout


def test_processes_opening_a_legacy_ledger_at_once_upgrade_it_once(backend: Backend) -> None:
    backend.execute(LEGACY_SCHEMA, TABLES)
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_and_close() -> None:
        try:
            start.wait()
            backend.open().close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_and_close) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert backend.fetch("SELECT version_num FROM alembic_version") == [(migrations.HEAD,)]
    assert backend.fetch("SELECT COUNT(*) FROM instances") == [(len(INSTANCES),)]


def _sonocase(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SONOCASE_")}
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        check=False,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
