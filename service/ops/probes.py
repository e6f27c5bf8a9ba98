"""Readiness: the checks ``/readyz`` runs (disk, broker, ledger) and the probes of the
model file and the similar-case index that also feed their info metrics. Each is
quick and never raises: a failure is a :class:`CheckResult` that says why."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from kombu.connection import Connection

from service.common.spool import free_disk_mb
from service.ledger import Ledger
from service.model_card import ModelCard
from service.similar.index import SimilarCaseIndex


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str


#: A readiness check: quick (it runs on every /readyz), never raises.
Check = Callable[[], CheckResult]


def disk_check(data_dir: Path, min_free_mb: int) -> Check:
    """Ready while the data disk has more free space than the receiver's watermark
    (below it the receiver refuses C-STORE with 'out of resources')."""

    def check() -> CheckResult:
        free = free_disk_mb(data_dir)
        return CheckResult(free >= min_free_mb, f"{free:.0f} MB free, watermark {min_free_mb} MB")

    return check


def broker_check(connection: Callable[[], Connection], timeout_s: float = 2.0) -> Check:
    """Ready while the Celery broker accepts a connection (``connection`` makes a
    kombu connection as the Celery app would, transport options included)."""

    def check() -> CheckResult:
        try:
            with connection() as conn:
                conn.ensure_connection(max_retries=0, timeout=timeout_s)
                transport = conn.transport.driver_type
        except Exception as exc:  # noqa: BLE001 - any failure to connect means not ready
            return CheckResult(False, f"broker unreachable: {exc}")
        return CheckResult(True, f"broker reachable ({transport})")

    return check


def ledger_check(ledger: Ledger) -> Check:
    """Ready while the ledger answers a query (not locked out, not corrupt)."""

    def check() -> CheckResult:
        try:
            return CheckResult(True, f"{sum(ledger.count_by_state().values())} studies")
        except Exception as exc:  # noqa: BLE001 - sqlite3 raises several kinds
            return CheckResult(False, f"ledger unreadable: {exc}")

    return check


def readiness(checks: Mapping[str, Check]) -> tuple[bool, dict[str, Any]]:
    """Run every check: ready when all pass; the document ``/readyz`` answers."""
    results = {name: check() for name, check in checks.items()}
    ready = all(r.ok for r in results.values())
    return ready, {"ready": ready, "checks": {n: {"ok": r.ok, "detail": r.detail} for n, r in results.items()}}


class ModelProbe:
    """Loads and verifies the model card (and the ONNX file's sha256) the way the
    workers do, again only when the file changes: the readiness check and the
    ``sonocase_model`` info metric."""

    def __init__(self, model_path: Path) -> None:
        self._path = model_path
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._card: ModelCard | None = None
        self._error = "not checked yet"

    def _refresh(self) -> None:
        with self._lock:
            try:
                stat = self._path.stat()
            except OSError as exc:
                self._seen, self._card, self._error = None, None, f"model file unreadable: {exc}"
                return
            key = (stat.st_mtime_ns, stat.st_size)
            if key == self._seen:
                return
            self._seen = key
            try:
                self._card, self._error = ModelCard.load(self._path), ""
            except (OSError, ValueError) as exc:
                self._card, self._error = None, str(exc)

    def check(self) -> CheckResult:
        self._refresh()
        if self._card is None:
            return CheckResult(False, self._error)
        return CheckResult(True, f"{self._card.name} {self._card.version}")

    def info(self) -> dict[str, str]:
        self._refresh()
        card = self._card
        return {} if card is None else {"name": card.name, "version": card.version, "sha256": card.sha256}


class IndexProbe:
    """The similar-case index as the workers will find it: the readiness check and
    the ``sonocase_index`` info metric. No index yet is ready (similar cases are off
    until one is built); an index of another model's embeddings is not."""

    def __init__(self, index_dir: Path, model: ModelProbe) -> None:
        self._dir = index_dir
        self._model = model
        self._lock = threading.Lock()
        self._index: SimilarCaseIndex | None = None

    def _open(self) -> SimilarCaseIndex | None:
        with self._lock:
            if self._index is None and (self._dir / "index.sqlite3").is_file():
                self._index = SimilarCaseIndex(self._dir, None)
            return self._index

    def check(self) -> CheckResult:
        try:
            index = self._open()
            if index is None:
                return CheckResult(True, f"no similar-case index in {self._dir}: similar cases are off")
            bound, version = index.bound_model, index.version
        except (OSError, ValueError, sa.exc.SQLAlchemyError) as exc:
            return CheckResult(False, f"similar-case index unreadable: {exc}")
        model_sha = self._model.info().get("sha256")
        if bound is not None and model_sha is not None and bound.sha256 != model_sha:
            return CheckResult(
                False,
                f"the index holds embeddings of model {bound.name} {bound.version}, not of the"
                " configured model: run 'sonocase index rebuild'",
            )
        return CheckResult(True, f"index version {version}")

    def info(self) -> dict[str, str]:
        try:
            index = self._open()
            return {} if index is None else {"version": index.version}
        except (OSError, ValueError, sa.exc.SQLAlchemyError):
            return {}

    def close(self) -> None:
        with self._lock:
            if self._index is not None:
                self._index.close()
            self._index = None
