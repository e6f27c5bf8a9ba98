"""service.reports.encoding: the lean writer gives pydicom's bytes, byte for byte,
for every object a study's report is made of, for hand-made data sets of every VR
and for files read from disk (raw elements written as read); what it does not
cover it leaves to pydicom, with the same bytes."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pydicom.valuerep import DA, DT, TM, DSfloat

import service.reports.build as build
from service.datasets.synthetic import synthetic_cine, synthetic_study
from service.ledger import Ledger
from service.reports.build import build_objects, read_sources
from service.reports.encoding import encode, lean_encode, library_encode
from service.settings import Settings
from tests.support.reports import analyse, analysed_study, data_file, default_template, store_datasets

#: Each data set build_objects encodes, the lean writer's bytes of it as built, and
#: the bytes build_objects got.
Encoded = list[tuple[Dataset, bytes | None, bytes]]


@pytest.fixture
def encoded(monkeypatch: pytest.MonkeyPatch) -> Iterator[Encoded]:
    """What build_objects encodes (:data:`Encoded`); the lean writer sees each data
    set first, as built (pydicom's writer changes some of it)."""
    seen: Encoded = []
    original = build._encode

    def recording(ds: Dataset, fast: bool) -> bytes:
        lean = lean_encode(ds)
        data = original(ds, fast)
        seen.append((ds, lean, data))
        return data

    monkeypatch.setattr(build, "_encode", recording)
    yield seen


def _build(settings: Settings, ledger: Ledger, study_uid: str, paths: list[Path], **judged: object) -> list[str]:
    result, references = analyse(settings, study_uid, paths, **judged)  # type: ignore[arg-type]
    sources, spooled = read_sources(ledger, result)
    objects = build_objects(settings, default_template(), result, sources, spooled, references.get)
    return [o.kind for o in objects]


def _real_files(settings: Settings, ledger: Ledger) -> list[str]:
    """Real scanner files (RGB, palette, a 30-frame JPEG cine, JPEG lossless; two
    in ISO_IR 100), one outside the training domain, similar cases (the montage)."""
    study = analysed_study(settings, ledger, ood_images=[1], lesion_peak=1.0)
    sources, paths = read_sources(ledger, study.result)
    objects = build_objects(settings, default_template(), study.result, sources, paths, study.reference_images.get)
    return [o.kind for o in objects]


def _synthetic(settings: Settings, ledger: Ledger) -> list[str]:
    """Two synthetic images and a synthetic cine, lesions outlined and measured."""
    study_uid, paths = store_datasets(
        settings, ledger, [*synthetic_study(2, "malignant", seed=3), synthetic_cine(6, "malignant", seed=4)]
    )
    return _build(settings, ledger, study_uid, paths, classes=["malignant", "benign", "malignant"], lesion_peak=1.0)


def _not_assessed(settings: Settings, ledger: Ledger) -> list[str]:
    """Every image outside the training domain: an SR and captures only."""
    study_uid, paths = store_datasets(settings, ledger, synthetic_study(2, "benign", seed=5, variant="mono"))
    return _build(settings, ledger, study_uid, paths, ood_images=[0, 1], n_similar=0)


STUDIES: dict[str, Callable[[Settings, Ledger], list[str]]] = {
    "real files": _real_files,
    "synthetic": _synthetic,
    "not assessed": _not_assessed,
}


@pytest.mark.parametrize("sc_transfer_syntax", ["explicit-little-endian", "jpeg-baseline"])
@pytest.mark.parametrize("study", STUDIES)
def test_every_object_of_a_study_is_encoded_as_pydicom_encodes_it(
    settings: Settings, ledger: Ledger, encoded: Encoded, study: str, sc_transfer_syntax: str
) -> None:
    chosen = settings.model_copy(update={"sc_transfer_syntax": sc_transfer_syntax, "fast_reports": True})
    kinds = STUDIES[study](chosen, ledger)
    assert len(encoded) == len(kinds) and {"SR", "SC"} <= set(kinds)
    if study == "real files":
        assert kinds.count("SC") == 5 and {"SEG", "KO"} <= set(kinds)  # 4 heatmaps and the montage
    for ds, lean, data in encoded:
        assert lean is not None, f"{type(ds).__name__} left to pydicom"
        assert data == lean == library_encode(ds), type(ds).__name__


def test_without_fast_reports_pydicom_encodes(settings: Settings, ledger: Ledger, encoded: Encoded) -> None:
    library = settings.model_copy(update={"fast_reports": False})
    _not_assessed(library, ledger)
    assert encoded and all(data == library_encode(ds) for ds, _, data in encoded)


def _file_meta(transfer_syntax: str = ExplicitVRLittleEndian) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = transfer_syntax
    return meta


def _every_vr(charset: str | None = None) -> Dataset:
    """A data set with an element of every VR the lean writer covers: single and
    multiple values, empty ones, odd lengths to pad, nested and empty sequences,
    items and sequences of undefined length, a private block, a group length."""
    ds = Dataset()
    ds.file_meta = _file_meta()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.3.4.5"  # odd: padded with a NUL
    ds.add_new(0x00080000, "UL", 123)  # a group length: not written
    ds.RetrieveAETitle = ["AE1", "AE22"]  # AE
    ds.PatientAge = "045Y"  # AS
    ds.FrameIncrementPointer = 0x00181063  # AT
    ds.add_new(0x00209165, "AT", [0x00209056, 0x00209057])  # AT, multiple
    ds.ImageType = ["DERIVED", "SECONDARY", ""]  # CS, multiple, one empty
    ds.Modality = "US"
    ds.StudyDate = "20240105"  # DA as text
    ds.SeriesDate = DA(datetime.date(2024, 1, 6))  # DA as an object
    ds.AcquisitionDate = ""  # empty
    ds.ContentDate = None  # empty
    ds.CalibrationDate = ["20240101", DA("20240102")]  # DA, multiple
    ds.AcquisitionDateTime = DT(datetime.datetime(2024, 1, 5, 10, 11, 12, 500))  # DT
    ds.StudyTime = TM(datetime.time(10, 11, 12))  # TM
    ds.SeriesTime = "101112.5"  # odd
    ds.SliceThickness = DSfloat("1.50")  # DS kept as written
    ds.PixelSpacing = [DSfloat(0.25), DSfloat("0.250")]  # DS, multiple
    ds.InstanceNumber = 7  # IS
    ds.ReferencedFrameNumber = [1, 22, 333]  # IS, multiple
    ds.InstitutionName = "Odd"  # LO, padded
    ds.SeriesDescription = ""  # empty
    ds.OtherPatientIDs = ["A", "BB"]  # LO, multiple
    ds.AdditionalPatientHistory = "line one\r\nline two"  # LT
    ds.PatientName = "Doe^Jane^^Dr"  # PN
    ds.OtherPatientNames = ["Doe^J", "Roe^R"]  # PN, multiple
    ds.ReferringPhysicianName = ""  # PN, empty
    ds.StationName = "ST1"  # SH
    ds.DerivationDescription = "A short text, odd"  # ST
    ds.TextValue = "unlimited text"  # UT
    ds.add_new(0x00400441, "SQ", [])  # an empty sequence
    ds.StrainAdditionalInformation = "UC value"  # UC
    ds.RetrieveURL = "https://example.org/x"  # UR
    ds.Rows = 2  # US
    ds.add_new(0x00281201, "OW", b"\x01\x02\x03\x04")  # OW
    ds.add_new(0x00189219, "SS", -5)  # SS
    ds.add_new(0x00189218, "SL", [-1, 2])  # SL, multiple
    ds.add_new(0x00660040, "OL", b"\x01\x00\x00\x00")  # OL
    ds.add_new(0x00660030, "OF", b"\x00\x00\x80\x3f")  # OF
    ds.add_new(0x00701A05, "OD", b"\x00" * 8)  # OD
    ds.add_new(0x00720082, "SV", [-(2**40), 3])  # SV
    ds.add_new(0x00720083, "UV", 2**40)  # UV
    ds.add_new(0x00720081, "OV", b"\x00" * 8)  # OV
    ds.ReferencePixelX0 = -3  # SL
    ds.SimpleFrameList = [1, 2**31]  # UL, multiple
    ds.RecommendedDisplayFrameRate = 30  # IS
    ds.add_new(0x00189089, "FD", [0.0, 1.0, -0.5])  # FD, multiple
    ds.add_new(0x00189152, "FL", 2.5)  # FL
    ds.add_new(0x00700060, "FL", [])  # FL, empty
    ds.add_new(0x00091010, "UN", b"\x01\x02\x03")  # UN, odd and not padded
    ds.private_block(0x0011, "SONOCASE TEST", create=True).add_new(0x01, "LO", "private")
    ds.BitsAllocated = 8
    ds.PixelData = b"\x00\x01\x02"  # odd: padded
    ds["PixelData"].VR = "OB"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "121322", "DCM", "Source image"
    nested = Dataset()
    nested.ConceptNameCodeSequence = [code]
    nested.ContentSequence = []  # empty, inside an item
    undefined_item = Dataset()
    undefined_item.is_undefined_length_sequence_item = True
    undefined_item.TextValue = "in an item of undefined length"
    ds.ContentSequence = Sequence([nested, undefined_item])
    ds.ConceptNameCodeSequence = [code]
    ds["ConceptNameCodeSequence"].is_undefined_length = True
    return ds


@pytest.mark.parametrize(
    ("charset", "text"),
    [
        (None, "plain ASCII"),
        ("", "plain ASCII"),
        ("ISO_IR 6", "plain ASCII"),
        (None, "Müller"),  # the default repertoire as pydicom writes it (Latin-1)
        ("ISO_IR 100", "Müller^Zoë"),
        ("ISO_IR 192", "Wang^XiaoDong=王^小東"),
    ],
)
def test_every_vr_is_written_as_pydicom_writes_it(charset: str | None, text: str) -> None:
    ds = _every_vr(charset)
    ds.PatientName = text
    ds.InstitutionName = text
    ds.ContentSequence[0].PatientName = text  # an item in its parent's character set
    lean = lean_encode(ds)
    assert lean is not None
    assert lean == library_encode(ds)
    assert pydicom.dcmread(pydicom.filebase.DicomBytesIO(lean)).PatientName == text


def test_an_item_with_its_own_character_set() -> None:
    ds = _every_vr("ISO_IR 192")
    ds.ContentSequence[0].SpecificCharacterSet = "ISO_IR 100"
    ds.ContentSequence[0].PatientName = "Zoë"
    ds.ContentSequence[1].TextValue = "小東"  # inherits ISO_IR 192
    lean = lean_encode(ds)
    assert lean is not None and lean == library_encode(ds)


@pytest.mark.parametrize(
    ("bits_allocated", "transfer_syntax", "vr"),
    [(8, ExplicitVRLittleEndian, "OB"), (16, ExplicitVRLittleEndian, "OW"), (8, JPEGBaseline8Bit, "OB")],
)
def test_pixel_data_of_vr_ob_or_ow_gets_pydicom_s_vr(bits_allocated: int, transfer_syntax: str, vr: str) -> None:
    """highdicom leaves Pixel Data's VR 'OB or OW'; pydicom picks it when writing."""
    ds = _every_vr()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.BitsAllocated = bits_allocated
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"]) if transfer_syntax == JPEGBaseline8Bit else b"\x00\x01" * 4
    ds["PixelData"].VR = "OB or OW"
    lean = lean_encode(ds)
    assert lean is not None and lean == library_encode(ds)
    read_back = pydicom.dcmread(pydicom.filebase.DicomBytesIO(lean))
    assert vr == ds["PixelData"].VR == read_back["PixelData"].VR  # pydicom's writer left it so


def test_pixel_data_of_vr_ob_or_ow_without_bits_allocated_is_left_to_pydicom() -> None:
    ds = _every_vr()
    del ds.BitsAllocated
    ds["PixelData"].VR = "OB or OW"
    assert lean_encode(ds) is None
    with pytest.raises(AttributeError):  # pydicom cannot pick the VR either
        encode(ds)


def _read_with_fresh_meta(name: str) -> Dataset:
    """A real file as read (raw elements), with the file meta a builder would make;
    ``name``: of pydicom's test data, or a path."""
    ds = pydicom.dcmread(name if Path(name).is_absolute() else data_file(name), force=True)
    meta = FileMetaDataset()
    for elem in ds.file_meta:
        meta[elem.tag] = elem
    ds.file_meta = meta
    return ds


FILES = ("CT_small.dcm", "US1_UNCR.dcm", "OBXXXX1A.dcm", "examples_ybr_color.dcm", "MR_small.dcm")


@pytest.mark.parametrize("name", FILES)
def test_a_file_read_from_disk_is_written_as_read(name: str) -> None:
    """Raw elements of a data set written in its own encoding go out as read; empty
    ones (no value read) are converted, as pydicom does. examples_ybr_color: an
    encapsulated JPEG cine."""
    ds = _read_with_fresh_meta(name)
    lean = lean_encode(ds)
    assert lean is not None and lean == library_encode(ds)


@pytest.mark.parametrize("name", FILES)
def test_a_read_data_set_inside_a_new_one(name: str) -> None:
    """A source's item in our object: pydicom reads its raw sequences (the new data
    set is re-encoded) and writes its other raw elements as read."""
    source = _read_with_fresh_meta(name)
    del source.file_meta, source.PixelData
    ds = Dataset()
    ds.file_meta = _file_meta()
    ds.SOPClassUID, ds.SOPInstanceUID = source.SOPClassUID, generate_uid()
    ds.SourceImageSequence = [source]
    lean = lean_encode(ds)
    assert lean is not None and lean == library_encode(ds)


def test_every_file_pydicom_ships_is_pydicom_s_bytes_where_the_lean_writer_writes_it() -> None:
    """A sweep of real-world encodings: each of pydicom's test files, as read and as
    an item of a new data set, gets pydicom's bytes or is left to pydicom."""
    written = 0
    for path in get_testdata_files("*.dcm"):
        source = pydicom.dcmread(path, force=True)
        if "TransferSyntaxUID" not in source.get("file_meta", {}):
            continue
        as_read = _read_with_fresh_meta(path)
        source.pop("PixelData", None)
        del source.file_meta
        inside = Dataset()
        inside.file_meta = _file_meta()
        inside.SOPClassUID, inside.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
        inside.ContentSequence = [source]
        for ds in (as_read, inside):
            lean = lean_encode(ds)
            if lean is not None:
                assert lean == library_encode(ds), path
                written += 1
    assert written > 200


def _japanese(ds: Dataset) -> None:
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎"


def _implicit(ds: Dataset) -> None:
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian


def _deflated(ds: Dataset) -> None:
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian


def _ambiguous(ds: Dataset) -> None:
    ds.PixelRepresentation = 1
    ds.add_new(0x00280106, "US or SS", -1)


def _numpy_number(ds: Dataset) -> None:
    ds.add_new(0x00189152, "FL", np.float32(2.5))


def _latin1_not_enough(ds: Dataset) -> None:
    ds.InstitutionName = "小東"  # not in the default repertoire: pydicom replaces it


def _too_long(ds: Dataset) -> None:
    ds.add_new(0x00091011, "LO", "x" * 0x10002)  # pydicom writes it as UN


@pytest.mark.filterwarnings("ignore:Failed to encode value")
@pytest.mark.filterwarnings("ignore:The value for the data element")
@pytest.mark.parametrize(
    "change",
    [_japanese, _implicit, _deflated, _ambiguous, _numpy_number, _latin1_not_enough, _too_long],
    ids=lambda f: f.__name__,
)
def test_what_it_does_not_cover_is_left_to_pydicom(change: Callable[[Dataset], None]) -> None:
    ds = _every_vr()
    change(ds)
    assert lean_encode(ds) is None
    assert encode(ds) == library_encode(ds)


def test_missing_file_meta_is_made_as_pydicom_makes_it() -> None:
    """The media storage UIDs follow the data set, the version and the
    implementation's UID and name are added; a stale group length is replaced."""
    ds = _every_vr()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.3"
    ds.file_meta.FileMetaInformationGroupLength = 999
    ds.file_meta.FileMetaInformationVersion = b""
    lean = lean_encode(ds)
    assert lean is not None and lean == library_encode(ds)
    assert "ImplementationClassUID" not in ds.file_meta  # the caller's meta is left as it was


def test_an_element_of_undefined_length_other_than_pixel_data_is_left_to_pydicom() -> None:
    ds = _every_vr()
    ds.add_new(0x00091012, "OB", b"\xfe\xff\x00\xe0\x00\x00\x00\x00")
    ds[0x00091012].is_undefined_length = True
    assert lean_encode(ds) is None
    assert encode(ds) == library_encode(ds)
    assert isinstance(ds[0x00091012], DataElement)
