"""The log handler keeps patient identifiers out of log lines, however they arrive."""

from __future__ import annotations

import http.client
import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset

from service.common.logs import JsonFormatter, PhiFilter, TextFormatter
from service.ledger import StudyState
from service.settings import load_settings
from tests.support.common import free_port
from tests.support.reports import start_storescp
from tests.support.worker import serve, storescu, wait_for_state

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


# --- a whole node in json mode --------------------------------------------------------------
def _not_json(text: str) -> list[str]:
    """The lines of ``text`` that are not one JSON object each."""
    bad = []
    for line in text.splitlines():
        try:
            if not isinstance(json.loads(line), dict):
                bad.append(line)
        except ValueError:
            bad.append(line)
    return bad


@pytest.mark.integration
@pytest.mark.slow
def test_a_node_in_json_mode_prints_nothing_but_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sonocase serve` with its worker, HTTP side and every library, from start to
    stop with a study received, analysed and sent: every line on stdout and stderr is
    a JSON object (no Celery banner or shutdown notice, no Python warning, no ONNX
    Runtime telemetry notice), and ONNX Runtime wrote no telemetry files."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("ORT_DISABLE_TELEMETRY", raising=False)
    pacs_port = free_port()
    settings = load_settings(
        data_dir=tmp_path / "data",
        host="127.0.0.1",
        port=free_port(),
        http_host="127.0.0.1",
        http_port=free_port(),
        quiet_period_s=1.0,
        durability="none",
        workers=1,
        destinations=f"STORESCP@127.0.0.1:{pacs_port}",
        log_format="json",
        log_level="DEBUG",
        web_token="json-log-test-token",
    )
    pacs = start_storescp(tmp_path / "pacs", pacs_port)
    node = serve(settings, tmp_path / "node.log")
    try:
        ds = dcmread(get_testdata_file("US1_UNCR.dcm", download=False))
        storescu(settings, [Path(ds.filename)])
        wait_for_state(settings, ds.StudyInstanceUID, StudyState.SENT, timeout=120)
        url = f"127.0.0.1:{settings.http_port}"
        for headers in ({}, {"Authorization": "Bearer wrong"}):  # an access line and a warning
            conn = http.client.HTTPConnection(url, timeout=10)
            conn.request("GET", "/status", headers=headers)
            assert conn.getresponse().status == 401
            conn.close()
    finally:
        assert node.stop() == 0
        pacs.stop()
    text = node.log()
    assert _not_json(text) == []
    records = [json.loads(line) for line in text.splitlines()]
    loggers = {r["logger"] for r in records}
    assert {"service.node", "service.pipeline.tasks", "celery.apps.worker", "uvicorn.access"} <= loggers, loggers
    assert any(r["message"].startswith("listening as SONOCASE") for r in records)
    assert any(r["message"] == "worker: Warm shutdown (MainProcess)" for r in records)
    assert any("wrong token" in r["message"] for r in records)
    assert list(home.iterdir()) == []  # no ~/.cache/Microsoft/DeveloperTools/.onnxruntime
    assert str(ds.PatientName) not in text and ds.PatientID not in text  # not even at DEBUG


def test_a_library_warning_quoting_a_patient_name_is_masked(captured: Captured) -> None:
    logger, stream = captured
    logger.warning(
        'highdicom/sc/sop.py:220: UserWarning: The string "Doe" is unlikely to represent the '
        "intended person name since it contains only a single component."
    )
    message = json.loads(stream.getvalue())["message"]
    assert "Doe" not in message and "patient attribute removed" in message and "UserWarning" in message


@pytest.mark.integration
def test_uncaught_exceptions_and_warnings_are_json_records(tmp_path: Path) -> None:
    script = (
        "import threading, warnings\n"
        "from service.common.logs import configure_logging\n"
        "configure_logging('INFO', 'json')\n"
        "warnings.warn('a library warns')\n"
        "thread = threading.Thread(target=lambda: 1 / 0, name='doomed'); thread.start(); thread.join()\n"
        "raise RuntimeError('the end')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert _not_json(done.stderr) == []
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert [r["logger"] for r in records] == ["py.warnings", "uncaught", "uncaught"]
    assert "ZeroDivisionError" in records[1]["exception"] and "doomed" in records[1]["message"]
    assert "RuntimeError: the end" in records[2]["exception"]
