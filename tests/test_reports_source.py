"""Lenient with what arrives, strict with what leaves: source values that are not
valid for their VR are repaired or left out of our objects, the report is still
built and passes the gate, the repair is logged once per study by keyword, and no
value of the data set reaches the log or the ledger's error text."""

from __future__ import annotations

import io
import logging
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value

from service.common.errors import error_text, format_exception
from service.common.logs import JsonFormatter, PhiFilter
from service.ledger import Ledger, StudyState
from service.reports.build import build_reports
from service.reports.source import read_source, repair_values
from service.reports.template import load_template
from service.reports.validation import check_object
from service.settings import Settings
from tests.support.reports import DEFAULT_TEMPLATE, analyse, data_file, store_study

#: keyword, VR, value as archives hold it, what we write (None: left empty), what the log says
CASES = [
    ("StudyDate", "DA", "1994.11.05", "19941105", "date rewritten as YYYYMMDD"),
    ("PatientBirthDate", "DA", "1962-08-24", "19620824", "date rewritten as YYYYMMDD"),
    ("ContentDate", "DA", "2020-02-31", None, "left out: not a valid DA"),
    ("StudyTime", "TM", "11:20:00", "112000", "time rewritten as HHMMSS"),
    ("AcquisitionTime", "TM", "14:04:38.25", "140438.25", "time rewritten as HHMMSS"),
    ("AcquisitionDateTime", "DT", "2011-05-25T14:28:25", "20110525142825", "date and time rewritten"),
    ("AccessionNumber", "SH", "ACC-2024-000000012345", None, "left out: not a valid SH"),
    ("PatientID", "LO", "9" * 70, None, "left out: not a valid LO"),
    ("PatientName", "PN", "DOE" * 22 + "^JANE", "DOE" * 21 + "D", "name cut to 64 characters per component group"),
    ("StudyDescription", "LO", "Breast " * 12, ("Breast " * 12)[:64], "cut to 64 characters"),
    ("PatientSex", "CS", "f", "F", "code string in upper case"),
    ("PatientAge", "AS", "45", None, "left out: not a valid AS"),
    ("PatientWeight", "DS", "72.123456789012345", "72.1234567890124", "decimal string shortened"),
]


def _with(values: list[tuple[str, str, str, object, str]]) -> Dataset:
    ds = Dataset()
    for keyword, vr, value, _, _ in values:
        ds.add_new(keyword, vr, value)
    return ds


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns as the bad values are set up
@pytest.mark.parametrize(("keyword", "vr", "value", "written", "action"), CASES, ids=[c[0] for c in CASES])
def test_each_kind_of_bad_value_is_repaired_or_left_out(
    keyword: str,
    vr: str,
    value: str,
    written: object,
    action: str,
) -> None:
    ds = _with([(keyword, vr, value, written, action)])
    (repair,) = repair_values(ds)
    assert (repair.where, repair.vr) == (keyword, vr) and action in repair.action
    assert value not in str(repair)
    stored = ds[keyword].value
    assert (str(stored) if stored not in (None, "") else None) == written
    if written is not None:
        validate_value(vr, written, config.RAISE)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sequences_and_multiple_values_keep_their_shape() -> None:
    ds = Dataset()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOM/RAD", "0001"]
    other = Dataset()
    other.PatientID = "X" * 70
    ds.OtherPatientIDsSequence = [other]
    repairs = {str(r) for r in repair_values(ds)}
    assert repairs == {
        "ImageType (CS): left out: not a valid CS",
        "OtherPatientIDsSequence[0].PatientID (LO): left out: not a valid LO",
    }
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "", "0001"]  # value 4 stays value 4
    assert ds.OtherPatientIDsSequence[0].PatientID in (None, "")


def test_valid_values_are_left_alone() -> None:
    ds, repairs = read_source(data_file("US1_UNCR.dcm"))
    assert repairs == []
    assert ds == pydicom.dcmread(data_file("US1_UNCR.dcm"), stop_before_pixels=True)


@pytest.mark.heavy
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_study_with_bad_source_values_is_reported_with_valid_ones(
    settings: Settings,
    ledger: Ledger,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 15's failures: a birth date as 1962-08-24, a time as 11:20:00, an
    accession number of 21 characters, a name of 66: the SR and SCs are built, pass
    the gate, and carry valid values; nothing of them is logged or stored as an error."""
    study_uid, paths = store_study(settings, ledger, ["US1_UNCR.dcm", "OBXXXX1A.dcm"])
    bad = [c for c in CASES if c[0] in ("PatientBirthDate", "StudyTime", "AccessionNumber", "PatientName", "StudyDate")]
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, vr, value, _, _ in bad:
            ds.add_new(keyword, vr, value)
        ds.save_as(path, enforce_file_format=True)
    ledger.complete_quiet_studies(0.0, now=time.time() + 1)
    generation = ledger.claim_analysis(study_uid, lease_s=60)
    assert generation is not None
    result, references = analyse(settings, study_uid, paths, generation=generation)
    assert ledger.finish_analysis(study_uid, generation, result)
    caplog.clear()  # pydicom's warnings about setting up the bad values
    with caplog.at_level(logging.INFO):
        written = build_reports(settings, ledger, study_uid, references)
    study = ledger.study(study_uid)
    assert (study.state, study.error) == (StudyState.REPORTED, None), study.error
    assert {pydicom.dcmread(p, stop_before_pixels=True).Modality for p in written} >= {"SR", "OT"}
    disclaimer = load_template(DEFAULT_TEMPLATE).disclaimer
    for path in written:
        ds = check_object(path.read_bytes(), disclaimer)
        assert (ds.PatientBirthDate, ds.StudyTime, ds.StudyDate) == ("19620824", "112000", "19941105")
        assert ds.AccessionNumber in ("", None) and len(str(ds.PatientName)) == 64
    repaired = [r for r in caplog.records if "repaired or left out" in r.getMessage()]
    assert len(repaired) == 1 and repaired[0].study_uid == study_uid  # once for the study
    message = repaired[0].getMessage()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for keyword, _, value, _, _ in bad:
        assert keyword in message
        assert value not in logged and value[:20] not in logged


def test_a_library_error_keeps_its_type_and_place_not_its_text() -> None:
    birth_date = "1962-08-24"
    try:
        validate_value("DA", birth_date, config.RAISE)
    except ValueError as exc:
        text = error_text(exc)
        assert birth_date not in text
        assert text.startswith("ValueError raised in pydicom.") and "data-set value" in text
    try:
        raise ValueError("PatientBirthDate is not a valid DA")
    except ValueError as exc:
        assert error_text(exc) == "ValueError: PatientBirthDate is not a valid DA"
    try:
        Path("/nonexistent/1.2.3/4.dcm").read_bytes()
    except OSError as exc:
        assert "/nonexistent/1.2.3/4.dcm" in error_text(exc)


def test_a_logged_traceback_leaves_out_a_library_text() -> None:
    birth_date = "1962-08-24"  # a traceback shows source lines: the value is not in one

    def build() -> None:
        try:
            validate_value("DA", birth_date, config.RAISE)
        except ValueError as exc:
            raise RuntimeError("report failed") from exc

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(PhiFilter())
    logger = logging.getLogger("sonocase-test-source")
    logger.addHandler(handler)
    try:
        build()
    except RuntimeError:
        logger.exception("building failed")
        text = format_exception(sys.exc_info()[1])
    finally:
        logger.removeHandler(handler)
    for out in (stream.getvalue(), text):
        assert birth_date not in out
        assert "RuntimeError: report failed" in out and "ValueError raised in pydicom." in out
        assert "direct cause" in out
    pydicom_line = logging.LogRecord(
        "pydicom", logging.WARNING, __file__, 1, "Invalid value for VR DA: '%s'.", (birth_date,), None
    )
    assert PhiFilter().filter(pydicom_line) and birth_date not in pydicom_line.getMessage()
