"""The log handler keeps patient identifiers out of log lines, however they arrive."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset

from service.common.logs import JsonFormatter, PhiFilter, TextFormatter

Captured = tuple[logging.Logger, io.StringIO]


@contextmanager
def capture(formatter: type[logging.Formatter] = JsonFormatter) -> Iterator[Captured]:
    """A logger writing through the node's filter and a formatter into a buffer."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter())
    handler.addFilter(PhiFilter())
    logger = logging.getLogger(f"sonocase.test_logs.{formatter.__name__}")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def captured() -> Iterator[Captured]:
    with capture() as logged:
        yield logged


def _patient_dataset() -> FileDataset:
    ds = dcmread(get_testdata_file("US1_UNCR.dcm"), stop_before_pixels=True)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "MRN-4711", "19700101"
    return ds


@pytest.mark.parametrize("style", ["argument", "in the message"])
def test_a_dumped_data_set_loses_its_patient_lines(captured: Captured, style: str) -> None:
    logger, stream = captured
    ds = _patient_dataset()
    if style == "argument":
        logger.warning("received %s", ds, extra={"study_uid": ds.StudyInstanceUID})
    else:
        logger.warning(f"received {ds}", extra={"study_uid": ds.StudyInstanceUID})
    line = stream.getvalue()
    for value in ("Doe^Jane", "MRN-4711", "19700101"):
        assert value not in line
    assert "patient attribute removed" in line and ds.StudyInstanceUID in line
    assert "Modality" in line  # the rest of the dump stays


def test_patient_extras_are_removed() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "stored", None, None)
    record.patient_name, record.PatientID, record.study_uid = "Doe^Jane", "MRN-4711", "1.2.3"
    assert PhiFilter().filter(record)
    assert (record.patient_name, record.PatientID, record.study_uid) == ("<removed>", "<removed>", "1.2.3")


@pytest.mark.parametrize("formatter", [JsonFormatter, TextFormatter])
def test_a_traceback_loses_its_patient_lines(formatter: type[logging.Formatter]) -> None:
    ds = _patient_dataset()
    with capture(formatter) as (logger, stream):
        try:
            raise ValueError(f"cannot handle {ds}")
        except ValueError:
            logger.exception("handler failed", extra={"study_uid": ds.StudyInstanceUID})
    text = stream.getvalue()
    for value in ("Doe^Jane", "MRN-4711", "19700101"):
        assert value not in text
    assert "ValueError: cannot handle" in text and "patient attribute removed" in text
