"""The validation gate: real objects pass; each kind of defect a PACS would refuse
or a reader would misread is caught, with a reason naming it. dciodvfy agrees
about the IOD defects (which also proves the test helper sees its errors)."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, EnhancedSRStorage

from service.datasets.synthetic import synthetic_study
from service.ledger import Ledger
from service.reports.build import build_objects, read_sources
from service.reports.shapes import content_shapes, image_shape
from service.reports.validation import GateError, _is_empty, check_object
from service.settings import load_settings
from tests.support.reports import analyse, analysed_study, dciodvfy_errors, default_template, store_datasets

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


@pytest.mark.parametrize("fast", [False, True], ids=["library", "fast"])
def test_sr_content_rules_of_its_class(objects: dict[str, bytes], fast: bool) -> None:
    check_object(objects["sr"], DISCLAIMER, fast=fast)  # fast: the intact tree's shapes are remembered

    def enhanced_with_3d_coordinates(ds: Dataset) -> None:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedSRStorage
        ds.ContentSequence[-1].ContentSequence[0].ValueType = "SCOORD3D"

    with pytest.raises(GateError, match="value type SCOORD3D is not allowed"):
        check_object(_mutated(objects["sr"], enhanced_with_3d_coordinates), DISCLAIMER, fast=fast)

    def no_disclaimer(ds: Dataset) -> None:
        ds.ContentSequence[-1].ContentSequence[0].TextValue = "AI result"

    with pytest.raises(GateError, match="the disclaimer is not in the content"):
        check_object(_mutated(objects["sr"], no_disclaimer), DISCLAIMER, fast=fast)

    def image_without_evidence(ds: Dataset) -> None:  # the regions' images
        del ds.CurrentRequestedProcedureEvidenceSequence

    with pytest.raises(GateError, match="is not listed as evidence"):
        check_object(_mutated(objects["sr"], image_without_evidence), DISCLAIMER, fast=fast)

    def a_group_without_coordinates(ds: Dataset) -> None:
        measurements = next(i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
        for number in measurements.ContentSequence[0].ContentSequence:
            if number.ValueType == "NUM" and "ContentSequence" in number:
                number.ContentSequence = [i for i in number.ContentSequence if i.ValueType != "SCOORD"]

    with pytest.raises(GateError, match="measurement group 1 has no coordinates"):
        check_object(_mutated(objects["sr"], a_group_without_coordinates), DISCLAIMER, fast=fast)


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


@pytest.mark.parametrize("fast", [False, True], ids=["library", "fast"])
def test_file_meta_must_match_the_data_set(objects: dict[str, bytes], fast: bool) -> None:
    ds = pydicom.dcmread(io.BytesIO(objects["sr"]))
    ds.file_meta.MediaStorageSOPClassUID = EnhancedSRStorage
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)  # pydicom would otherwise repair the meta
    with pytest.raises(GateError, match="Media Storage SOP Class UID differs"):
        check_object(buffer.getvalue(), DISCLAIMER, fast=fast)


@pytest.mark.parametrize("fast", [False, True], ids=["library", "fast"])
def test_not_dicom_at_all(objects: dict[str, bytes], fast: bool) -> None:
    with pytest.raises(GateError, match="pydicom cannot read it: InvalidDicomError: File is missing DICOM File Meta"):
        check_object(b"\x00" * 10, DISCLAIMER, fast=fast)
    with pytest.raises(GateError, match="file meta information is missing or cut short"):
        check_object(objects["sr"][:200], DISCLAIMER, fast=fast)
    with pytest.raises(GateError, match="SOPClassUID is missing: the object is truncated"):
        check_object(objects["sr"][:400], DISCLAIMER, fast=fast)


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


# --- the fast gate's memory of content-tree shapes (service/reports/shapes.py) ------


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[list[bytes]]:
    """The encoded objects of three synthetic studies: no finding; findings with
    lesion outlines (of other lengths in each study); all three classes."""
    settings = load_settings(data_dir=tmp_path_factory.mktemp("studies") / "data", durability="none")
    ledger = Ledger(settings.ledger_path, durable=False)
    built = []
    for n, classes in enumerate((["normal", "normal"], ["benign", "malignant"], ["malignant", "benign", "normal"])):
        study_uid, paths = store_datasets(settings, ledger, synthetic_study(len(classes), classes[0], seed=n, index=n))
        result, references = analyse(settings, study_uid, paths, classes=classes, lesion_peak=1.0 - 0.1 * n)
        sources, source_paths = read_sources(ledger, result)
        objects = build_objects(settings, default_template(), result, sources, source_paths, references.get)
        built.append([o.data for o in objects])
    return built


def _verdict(data: bytes, fast: bool) -> list[str]:
    """The gate's reasons against an object; none where it passes."""
    try:
        check_object(data, DISCLAIMER, fast=fast)
    except GateError as exc:
        return exc.reasons
    return []


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The names of highdicom's SR, key object selection and image readers as they are called."""
    called: list[str] = []
    for owner, name in (
        (hd.sr.Comprehensive3DSR, "from_dataset"),
        (hd.ko.KeyObjectSelection, "from_sequence"),
        (hd.Image, "from_dataset"),
    ):
        library = getattr(owner, name)

        def spy(
            *args: object, _library: Callable[..., object] = library, _name: str = name, **kwargs: object
        ) -> object:
            called.append(_name)
            return _library(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)
    yield called


def test_both_settings_agree_on_the_objects_of_several_studies(studies: list[list[bytes]], reads: list[str]) -> None:
    """Each object passes with and without the memory; highdicom reads the fast
    gate's SRs and key-image flags while their shapes are new only."""
    for objects in studies:
        for data in objects:
            assert _verdict(data, fast=False) == []
    library_reads = len(reads)
    for objects in studies:
        for data in objects:
            assert _verdict(data, fast=True) == []
    assert len(reads) - library_reads < library_reads  # the studies repeat each other's shapes


def _uid_ref(ds: Dataset) -> Dataset:
    return next(item for item in ds.ContentSequence if item.ValueType == "UIDREF")


def _no_disclaimer(ds: Dataset) -> None:
    for item in ds.ContentSequence[-1].ContentSequence if ds.Modality == "SR" else ds.ContentSequence:
        if item.ValueType == "TEXT" and DISCLAIMER in item.TextValue:
            item.TextValue = "AI result"


def _no_sr_evidence(ds: Dataset) -> None:
    series = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence = [
        s for s in series if s.ReferencedSOPSequence[0].ReferencedSOPClassUID != Comprehensive3DSRStorage
    ]


@pytest.mark.parametrize(
    ("kind", "change", "reason"),
    [
        ("sr", lambda ds: setattr(_uid_ref(ds), "UID", "1.2.3.abc"), "UID is not a valid UI"),
        ("sr", _drop("CurrentRequestedProcedureEvidenceSequence"), "is not listed as evidence"),
        ("sr", _no_disclaimer, "the disclaimer is not in the content"),
        ("kos", _no_disclaimer, "the disclaimer is not in the content"),
        ("kos", _no_sr_evidence, "is not listed as evidence"),
        ("sc", _set("ImageComments", "AI result"), "the disclaimer is not in Image Comments"),
        ("montage", _set("BurnedInAnnotation", "NO"), "Burned In Annotation must be YES"),
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")
def test_a_broken_value_in_a_known_shape_fails_as_without_the_memory(
    objects: dict[str, bytes], reads: list[str], kind: str, change: Callable[[Dataset], None], reason: str
) -> None:
    """The shape was accepted before (the intact object as pydicom encodes it, like
    the broken one), so highdicom does not read it again; the values and our own
    checks fail it all the same."""
    check_object(_mutated(objects[kind], lambda ds: None), DISCLAIMER, fast=True)
    broken = _mutated(objects[kind], change)
    before = len(reads)
    fast = _verdict(broken, fast=True)
    assert len(reads) == before
    assert any(reason in r for r in fast), fast
    assert fast == _verdict(broken, fast=False)


def _first_child(kind: str) -> Callable[[Dataset], Dataset]:
    """A content item below the root: a measurement group's first item, or the flag's first."""
    if kind == "sr":
        return lambda ds: ds.ContentSequence[-2].ContentSequence[0].ContentSequence[0]
    return lambda ds: ds.ContentSequence[0]


@pytest.mark.parametrize(
    ("kind", "change"),
    [
        ("sr", lambda ds: delattr(_first_child("sr")(ds), "RelationshipType")),
        ("sr", lambda ds: setattr(_first_child("sr")(ds), "RelationshipType", "NO RELATION")),
        ("sr", lambda ds: delattr(_first_child("sr")(ds).ConceptNameCodeSequence[0], "CodingSchemeDesignator")),
        ("kos", lambda ds: delattr(_first_child("kos")(ds), "RelationshipType")),
    ],
)
def test_a_new_shape_highdicom_rejects_fails_as_without_the_memory(
    objects: dict[str, bytes], reads: list[str], kind: str, change: Callable[[Dataset], None]
) -> None:
    check_object(objects[kind], DISCLAIMER, fast=True)
    broken = _mutated(objects[kind], change)
    before = len(reads)
    fast = _verdict(broken, fast=True)
    assert len(reads) == before + 1  # highdicom read the new shape
    assert any("highdicom cannot" in r for r in fast), fast
    assert fast == _verdict(broken, fast=False)


def test_an_item_of_a_new_shape_is_read_alone(objects: dict[str, bytes], reads: list[str]) -> None:
    """A known tree with one item of a new shape (another language): highdicom's
    content reader reads that item, not the whole document, and accepts it."""
    check_object(objects["sr"], DISCLAIMER, fast=True)

    def another_language(ds: Dataset) -> None:
        (code,) = ds.ContentSequence[0].ConceptCodeSequence
        code.CodeValue, code.CodeMeaning = "de-AT", "German (Austria)"

    changed = _mutated(objects["sr"], another_language)
    before = len(reads)
    assert _verdict(changed, fast=True) == []
    assert len(reads) == before
    assert _verdict(changed, fast=False) == []


def test_a_tree_with_converted_elements_has_no_shape(objects: dict[str, bytes]) -> None:
    """Its encoded bytes are gone: the gate lets highdicom read it."""
    ds = pydicom.dcmread(io.BytesIO(objects["sr"]))
    assert content_shapes(ds) is not None
    ds = pydicom.dcmread(io.BytesIO(objects["sr"]))
    assert ds.ContentSequence[0].ValueType == "CODE"  # converts the item's value type
    assert content_shapes(ds) is None


@pytest.mark.parametrize("kind", ["sr", "sc", "seg", "kos"])
def test_emptiness_read_from_the_bytes_is_pydicoms(objects: dict[str, bytes], kind: str) -> None:
    """The fast gate judges a raw element empty from its bytes where they say: as
    pydicom does converting it (Type 2 values left empty among them)."""
    raw = pydicom.dcmread(io.BytesIO(objects[kind]))
    converted = pydicom.dcmread(io.BytesIO(objects[kind]))
    keywords = [elem.keyword for elem in converted if elem.keyword]
    assert [_is_empty(raw, k, fast=True) for k in keywords] == [converted[k].is_empty for k in keywords]
    assert any(converted[k].is_empty for k in keywords)


def test_an_image_whose_reader_decides_on_values_has_no_shape(objects: dict[str, bytes]) -> None:
    """Positions on a frame of reference and an instance referenced twice go into
    the image reader's tables: such an image is read each time."""
    assert image_shape(pydicom.dcmread(io.BytesIO(objects["sc"]))) is not None

    def on_a_frame_of_reference(ds: Dataset) -> None:
        ds.FrameOfReferenceUID = ds.StudyInstanceUID

    def its_source_twice(ds: Dataset) -> None:
        instances = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence
        instances.append(instances[0])

    for change in (on_a_frame_of_reference, its_source_twice):
        assert image_shape(pydicom.dcmread(io.BytesIO(_mutated(objects["sc"], change)))) is None
