"""Error texts that may be kept: no data-set value in the ledger, the log or the page.

A library raising on a data set may quote the value it choked on (pydicom's
``Invalid value for VR DA: '1962-08-24'``), and that value may be a patient's birth
date. Our own code names attributes, never their values (``PatientBirthDate is not
a valid DA``); so the text of an exception raised in our code is kept, and that of
one raised inside a library is reduced to its type and the module that raised it.
Tracebacks in the log get the same reduction (service.common.logs).
"""

from __future__ import annotations

import sysconfig
import traceback

from pydicom.errors import InvalidDicomError

#: Packages whose exception texts we write ourselves (installed or not).
_OURS = ("service", "training")
#: Where libraries live: code anywhere else is ours too (tests, scripts).
_LIBRARIES = tuple(sorted({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}))
#: Library exceptions whose texts describe structure or files, never values.
_STRUCTURAL: tuple[type[BaseException], ...] = (OSError, EOFError, InvalidDicomError)


def _raising_frame(exc: BaseException) -> tuple[str, str] | None:
    """(module, file) of the code that raised ``exc``; None: created, never raised."""
    tb = exc.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "?")), tb.tb_frame.f_code.co_filename


def raised_in(exc: BaseException) -> str | None:
    """The module whose code raised ``exc`` (None: created, never raised)."""
    frame = _raising_frame(exc)
    return frame[0] if frame else None


def is_ours(exc: BaseException) -> bool:
    """Whether ``exc``'s text was written by our code (or cannot quote a value)."""
    frame = _raising_frame(exc)
    if frame is None or isinstance(exc, _STRUCTURAL):
        return True
    module, filename = frame
    return module.split(".")[0] in _OURS or not filename.startswith(_LIBRARIES)


def error_text(exc: BaseException) -> str:
    """``Type: text`` for the ledger, a log line or the page (see the module's docstring)."""
    if is_ours(exc):
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__} raised in {raised_in(exc)} (its text is not kept: it may quote a data-set value)"


def format_exception(exc: BaseException) -> str:
    """A traceback with every exception of the chain given by :func:`error_text`."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    parts = []
    for n, link in enumerate(reversed(chain)):
        if n:
            caused = link.__cause__ is chain[len(chain) - n]
            parts.append(
                "\nThe above exception was the direct cause of the following exception:\n\n"
                if caused
                else "\nDuring handling of the above exception, another exception occurred:\n\n"
            )
        parts.append("Traceback (most recent call last):\n" + "".join(traceback.format_tb(link.__traceback__)))
        parts.append(error_text(link) + "\n")
    return "".join(parts).rstrip("\n")
