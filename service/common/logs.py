"""Logging set-up, done once in the entry points.

Log lines name studies by UID (``extra={"study_uid": ...}``). Patient names, IDs and
birth dates never reach a log: the :class:`PhiFilter` drops any record that carries
them as extras and masks data-set dumps, as a second line of defence behind the
habit of never passing them.

In ``json`` mode every line is one JSON object: the libraries' loggers (Celery,
uvicorn, pynetdicom) reach the one root handler, Python warnings and uncaught
exceptions become records too, and what a process says on stdout for scripts
(:func:`announce`) is a JSON object as well.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from types import TracebackType
from typing import Any

import click

from service.common.errors import format_exception

#: Extras that must never appear in a log record.
PHI_KEYS = frozenset(
    {"patient_name", "patient_id", "patient_birth_date", "PatientName", "PatientID", "PatientBirthDate"}
)
_PHI_TEXT = re.compile(
    r"\((0010),\s*(0010|0020|0030)\)[^\n]*|Patient(?:'s)? (?:Name|ID|Birth Date)\s+[A-Z]{2}:[^\n]*"
    # highdicom's warning about a one-component person name quotes the name
    r'|The string "[^"\n]*" is unlikely to represent the intended person name'
    # pydicom quoting a value it refuses
    r"|(?<=Invalid value for VR [A-Z]{2}: )'[^\n]*"
)


class PhiFilter(logging.Filter):
    """Strip patient identifiers from records (extras and data-set dumps)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key in PHI_KEYS & record.__dict__.keys():
            setattr(record, key, "<removed>")
        # The dump usually arrives as an argument (``LOG.debug("%s", ds)``), so the
        # message is checked as it will be printed, not the format string alone.
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # bad arguments: the handler reports them
            return True
        if _PHI_TEXT.search(message):
            record.msg, record.args = mask_phi(message), None
        return True


def mask_phi(text: str) -> str:
    """``text`` with the lines of a data-set dump that show patient attributes masked."""
    return _PHI_TEXT.sub("<patient attribute removed>", text)


class _MaskedTracebacks(logging.Formatter):
    """A traceback is text the filter never sees (an exception's message can hold a
    data-set dump or a value): a library's exception text is left out of it
    (service.common.errors), and what remains is masked the same way."""

    def formatException(self, ei: Any) -> str:
        return mask_phi(format_exception(ei[1]) if ei[1] is not None else super().formatException(ei))


class JsonFormatter(_MaskedTracebacks):
    """One JSON object per line, with the study/instance UIDs as fields."""

    FIELDS = ("study_uid", "sop_instance_uid", "calling_ae", "status", "stage", "destination")

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update({k: getattr(record, k) for k in self.FIELDS if hasattr(record, k)})
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


class TextFormatter(_MaskedTracebacks):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s%(uid)s")

    def format(self, record: logging.LogRecord) -> str:
        study = getattr(record, "study_uid", None)
        record.uid = f" [study {study}]" if study else ""
        return super().format(record)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Install one stderr handler on the root logger (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_sonocase", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._sonocase = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(PhiFilter())
    root.addHandler(handler)
    root.setLevel(level)
    # pynetdicom (every PDU), highdicom (every copied module) and uvicorn's access log
    # (every scrape of /metrics) are chatty at INFO: keep their warnings, all at DEBUG.
    for chatty in ("pynetdicom", "highdicom", "uvicorn.access"):
        quiet = max(logging.WARNING, logging.getLevelName(level))
        logging.getLogger(chatty).setLevel(level if level == "DEBUG" else quiet)
    logging.captureWarnings(True)
    if fmt == "json":
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger("uncaught").critical("uncaught %s", kind.__name__, exc_info=(kind, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is not None:
        name = args.thread.name if args.thread is not None else "?"
        logging.getLogger("uncaught").critical(
            "uncaught %s in thread %s",
            args.exc_type.__name__,
            name,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )


def announce(message: str, fmt: str, logger: str = "sonocase") -> None:
    """A line on stdout for people and scripts (e.g. 'listening as ...'): the text
    itself, or in ``json`` mode a JSON log object whose message is that text."""
    if fmt == "json":
        record = logging.LogRecord(logger, logging.INFO, "", 0, message, None, None)
        message = JsonFormatter().format(record)
    click.echo(message)
