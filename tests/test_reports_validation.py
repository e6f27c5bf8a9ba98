"""The validation gate: real objects pass; each kind of defect a PACS would refuse
or a reader would misread is caught, with a reason naming it. dciodvfy agrees
about the IOD defects (which also proves the test helper sees its errors)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, EnhancedSRStorage

from service.ledger import Ledger
from service.reports.build import build_objects, read_sources
from service.reports.validation import GateError, check_object
from service.settings import load_settings
from tests.support.reports import analysed_study, dciodvfy_errors, default_template

DISCLAIMER = default_template().disclaimer


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The SR, a heatmap SC, the montage, the overlay SEG and the key-image flag
    of a real study, encoded."""
    settings = load_settings(data_dir=tmp_path_factory.mktemp("gate") / "data", durability="none")
    ledger = Ledger(settings.ledger_path, durable=False)
    study = analysed_study(settings, ledger, files=["US1_UNCR.dcm", "OBXXXX1A.dcm"])
    sources, paths = read_sources(ledger, study.result)
    built = build_objects(settings, default_template(), study.result, sources, paths, study.reference_images.get)
    by_kind = {kind: [o.data for o in built if o.kind == kind] for kind in ("SR", "SC", "SEG", "KO")}
    return {
        "sr": by_kind["SR"][0],
        "sc": by_kind["SC"][0],
        "montage": by_kind["SC"][-1],
        "seg": by_kind["SEG"][0],
        "kos": by_kind["KO"][0],
    }


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _mutated(data: bytes, change: Callable[[Dataset], None]) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    change(ds)
    return _encode(ds)


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["sr", "sc", "montage", "seg", "kos"])
def test_real_objects_pass(objects: dict[str, bytes], kind: str, tmp_path: Path) -> None:
    ds = check_object(objects[kind], DISCLAIMER)
    assert ds.SOPInstanceUID
    path = tmp_path / f"{kind}.dcm"
    path.write_bytes(objects[kind])
    assert dciodvfy_errors(path) == []


def _drop(keyword: str) -> Callable[[Dataset], None]:
    return lambda ds: delattr(ds, keyword)


def _set(keyword: str, value: object) -> Callable[[Dataset], None]:
    return lambda ds: setattr(ds, keyword, value)


@pytest.mark.parametrize(
    ("kind", "change", "reason"),
    [
        ("sr", _drop("PatientID"), "PatientID (Type 2) is missing"),
        ("sr", _set("ContentDate", ""), "ContentDate (Type 1) is empty"),
        ("sr", _set("VerificationFlag", "VERIFIED"), "must be UNVERIFIED"),
        ("sr", _set("PatientID", "X" * 80), "PatientID is not a valid LO (too long)"),
        ("sc", _set("BurnedInAnnotation", "NO"), "Burned In Annotation must be YES"),
        ("sc", _drop("SourceImageSequence"), "SourceImageSequence (Type 1) is missing"),
        ("sc", _set("ImageComments", "AI result"), "the disclaimer is not in Image Comments"),
        ("sc", _set("Rows", 17), "pixels"),
        ("montage", _set("StudyInstanceUID", "1.2.3.abc"), "StudyInstanceUID is not a valid UI"),
        ("sc", _set("SOPClassUID", "1.2.840.10008.5.1.4.1.1.6.1"), "is not one we produce"),
        (
            "seg",
            lambda ds: delattr(ds.SharedFunctionalGroupsSequence[0], "PlaneOrientationSequence"),
            "lack PlaneOrientationSequence, which viewers need",
        ),
        ("seg", _set("ImageComments", "AI result"), "the disclaimer is not in Image Comments"),
        (
            "seg",
            lambda ds: setattr(
                ds.PerFrameFunctionalGroupsSequence[0].SegmentIdentificationSequence[0], "ReferencedSegmentNumber", 9
            ),
            "frame 1 names segment 9",
        ),
        ("seg", _drop("ReferencedSeriesSequence"), "ReferencedSeriesSequence (Type 1) is missing"),
        (
            "seg",
            lambda ds: setattr(ds.SegmentSequence[0], "SegmentLabel", "X" * 80),
            "SegmentSequence[0].SegmentLabel is not a valid LO (too long)",
        ),
        (
            "kos",
            _drop("CurrentRequestedProcedureEvidenceSequence"),
            "CurrentRequestedProcedureEvidenceSequence (Type 1) is missing",
        ),
        ("kos", _set("Modality", "SR"), "Modality is SR, not KO"),
    ],
)
@pytest.mark.parametrize("fast", [False, True], ids=["library", "fast"])
@pytest.mark.filterwarnings(  # pydicom warns about the very defects these objects carry
    "ignore:.*(exceeds the maximum length|Invalid value for VR|number of bytes of pixel data):UserWarning"
)
def test_each_defect_is_caught_with_its_reason(
    objects: dict[str, bytes],
    kind: str,
    change: Callable[[Dataset], None],
    reason: str,
    fast: bool,
) -> None:
    """With ``fast_reports`` the gate remembers the values and sequences it found
    valid: the intact object passes first, so all but the broken value (and the
    sequences holding it) are remembered; the broken one never is."""
    if fast:
        check_object(objects[kind], DISCLAIMER, fast=True)
    broken = _mutated(objects[kind], change)
    for _ in range(2 if fast else 1):
        with pytest.raises(GateError) as info:
            check_object(broken, DISCLAIMER, fast=fast)
        assert any(reason in r for r in info.value.reasons), info.value.reasons


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA:UserWarning")
def test_a_remembered_value_is_checked_again_under_another_vr(objects: dict[str, bytes]) -> None:
    """The gate's memory holds values by VR: text valid as a Long String (the
    manufacturer) is no valid date."""
    manufacturer = pydicom.dcmread(io.BytesIO(objects["sr"])).Manufacturer
    check_object(objects["sr"], DISCLAIMER, fast=True)
    with pytest.raises(GateError, match="PatientBirthDate is not a valid DA"):
        check_object(_mutated(objects["sr"], _set("PatientBirthDate", manufacturer)), DISCLAIMER, fast=True)


def test_sr_content_rules_of_its_class(objects: dict[str, bytes]) -> None:
    def enhanced_with_3d_coordinates(ds: Dataset) -> None:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedSRStorage
        ds.ContentSequence[-1].ContentSequence[0].ValueType = "SCOORD3D"

    with pytest.raises(GateError, match="value type SCOORD3D is not allowed"):
        check_object(_mutated(objects["sr"], enhanced_with_3d_coordinates), DISCLAIMER)

    def no_disclaimer(ds: Dataset) -> None:
        ds.ContentSequence[-1].ContentSequence[0].TextValue = "AI result"

    with pytest.raises(GateError, match="the disclaimer is not in the content"):
        check_object(_mutated(objects["sr"], no_disclaimer), DISCLAIMER)

    def image_without_evidence(ds: Dataset) -> None:  # the regions' images
        del ds.CurrentRequestedProcedureEvidenceSequence

    with pytest.raises(GateError, match="is not listed as evidence"):
        check_object(_mutated(objects["sr"], image_without_evidence), DISCLAIMER)

    def a_group_without_coordinates(ds: Dataset) -> None:
        measurements = next(i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
        for number in measurements.ContentSequence[0].ContentSequence:
            if number.ValueType == "NUM" and "ContentSequence" in number:
                number.ContentSequence = [i for i in number.ContentSequence if i.ValueType != "SCOORD"]

    with pytest.raises(GateError, match="measurement group 1 has no coordinates"):
        check_object(_mutated(objects["sr"], a_group_without_coordinates), DISCLAIMER)


@pytest.mark.parametrize("fast", [False, True], ids=["library", "fast"])
def test_key_image_flag_keeps_the_disclaimer_and_its_evidence(objects: dict[str, bytes], fast: bool) -> None:
    def no_disclaimer(ds: Dataset) -> None:
        for item in ds.ContentSequence:
            if item.ValueType == "TEXT":
                item.TextValue = "Most suspicious image"

    with pytest.raises(GateError, match="the disclaimer is not in the content"):
        check_object(_mutated(objects["kos"], no_disclaimer), DISCLAIMER, fast=fast)

    def sr_not_in_evidence(ds: Dataset) -> None:
        series = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence = [
            s for s in series if s.ReferencedSOPSequence[0].ReferencedSOPClassUID != Comprehensive3DSRStorage
        ]

    with pytest.raises(GateError, match="is not listed as evidence"):
        check_object(_mutated(objects["kos"], sr_not_in_evidence), DISCLAIMER, fast=fast)

    def another_template(ds: Dataset) -> None:
        ds.ContentTemplateSequence[0].TemplateIdentifier = "1500"

    with pytest.raises(GateError, match="highdicom cannot read it as a key object selection"):
        check_object(_mutated(objects["kos"], another_template), DISCLAIMER, fast=fast)


def test_file_meta_must_match_the_data_set(objects: dict[str, bytes]) -> None:
    ds = pydicom.dcmread(io.BytesIO(objects["sr"]))
    ds.file_meta.MediaStorageSOPClassUID = EnhancedSRStorage
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)  # pydicom would otherwise repair the meta
    with pytest.raises(GateError, match="Media Storage SOP Class UID differs"):
        check_object(buffer.getvalue(), DISCLAIMER)


def test_not_dicom_at_all(objects: dict[str, bytes]) -> None:
    with pytest.raises(GateError, match="pydicom cannot read it: InvalidDicomError: File is missing DICOM File Meta"):
        check_object(b"\x00" * 10, DISCLAIMER)
    with pytest.raises(GateError, match="file meta information is missing or cut short"):
        check_object(objects["sr"][:200], DISCLAIMER)
    with pytest.raises(GateError, match="SOPClassUID is missing: the object is truncated"):
        check_object(objects["sr"][:400], DISCLAIMER)


@pytest.mark.integration
def test_dciodvfy_sees_what_the_gate_sees(objects: dict[str, bytes], tmp_path: Path) -> None:
    good, bad = tmp_path / "good.dcm", tmp_path / "bad.dcm"
    good.write_bytes(objects["sr"])
    bad.write_bytes(_mutated(objects["sr"], _drop("CompletionFlag")))
    assert dciodvfy_errors(good) == []
    assert any("<CompletionFlag>" in line for line in dciodvfy_errors(bad))
    with pytest.raises(GateError, match="CompletionFlag"):
        check_object(bad.read_bytes(), DISCLAIMER)
    assert pydicom.dcmread(good).SOPClassUID == Comprehensive3DSRStorage
