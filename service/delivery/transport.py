"""One interface for every kind of destination: the sender picks a :class:`Transport`
by the destination's type (``Sender``'s registry) instead of branching per kind.

A transport knows its network side only: what it reads of an outbox file, and how a
study's objects go to one destination. Each object's outcome is handed to an
:class:`OutcomeRecorder`, which keeps the ledger's outbox (the sender's), so every
transport retries, falls back and gives up the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Generic, Protocol, TypeVar

from pydicom.dataset import Dataset

from service.settings import Destination, DicomWebDestination, Peer

#: An outbox row as the ledger returns it.
Row = dict[str, Any]
D = TypeVar("D", Destination, DicomWebDestination)


class OutcomeRecorder(Protocol):
    """What became of each object, in the ledger's outbox."""

    def accepted(self, dest: Peer, row: Row, warning: str) -> int:
        """The destination stored it (with ``warning``, if any); 1."""

    def skipped(self, dest: Peer, row: Row) -> int:
        """An optional object the destination does not take; 0."""

    def failed(self, row: Row, reason: str) -> None:
        """Not stored: another try later, or FAILED after the last."""

    def fallback(self, dest: Peer, row: Row, accepted_classes: set[str]) -> tuple[Row, str] | None:
        """The SR rebuilt in a later class ``dest`` accepts: the new row and its
        transfer syntax (None: recorded as failed)."""


class Transport(ABC, Generic[D]):
    """Sends a study's outbox objects to one kind of destination."""

    @abstractmethod
    def read(self, path: str) -> Dataset:
        """What the transport needs of an outbox file (OSError, InvalidDicomError if
        it cannot be read: a failed try of its row)."""

    @abstractmethod
    def deliver(
        self, dest: D, study_uid: str, rows: list[Row], read: dict[str, Dataset], outcomes: OutcomeRecorder
    ) -> int:
        """Send ``rows`` (the SR first; ``read`` holds each one's :meth:`read` by SOP
        Instance UID), record every row's outcome, return how many were accepted."""
