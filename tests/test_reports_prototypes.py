"""service.reports.construction's prototypes: with ``fast_reports`` the heatmap
SEG (and its kin) is a filled copy of an object highdicom built for another image
of the same key, and it encodes byte for byte as the library's own object for the
same inputs, across studies, sources, sizes and calibrations; what the clock or
chance gives is fresh in each copy."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, generate_uid

from service.datasets.synthetic import synthetic_cine, synthetic_study
from service.ledger import Ledger
from service.reports import Placement
from service.reports import kos as kos_module
from service.reports import sc as sc_module
from service.reports import seg as seg_module
from service.reports.build import OutputObject, build_objects, read_sources
from service.reports.construction import Prototypes, binary_pixels
from service.reports.encoding import library_encode
from service.reports.kos import build_kos
from service.reports.template import SrTemplate
from service.reports.validation import check_object
from service.settings import Settings
from tests.support.reports import CLOCK_KEYWORDS, analyse, default_template, store_datasets, store_study


def _aligned(fast: bytes, library: bytes) -> tuple[bytes, bytes]:
    """Both objects encoded again, the fast one given the library one's values that
    come from the clock or chance (each build draws its own): the top-level times,
    highdicom's own contributing-equipment time and the dimension organization UID.
    Everything else, the source's equipment time included, is compared as built."""
    ours, theirs = (pydicom.dcmread(io.BytesIO(data)) for data in (fast, library))
    for keyword in CLOCK_KEYWORDS:
        if keyword in theirs:
            setattr(ours, keyword, theirs[keyword].value)
    for mine, its in zip(
        ours.get("ContributingEquipmentSequence", []), theirs.get("ContributingEquipmentSequence", []), strict=True
    ):
        if its.get("ManufacturerModelName") == "highdicom":
            mine.ContributionDateTime = its.ContributionDateTime
    for sequence in ("DimensionOrganizationSequence", "DimensionIndexSequence"):
        for mine, its in zip(ours.get(sequence, []), theirs.get(sequence, []), strict=True):
            mine.DimensionOrganizationUID = its.DimensionOrganizationUID
    return library_encode(ours), library_encode(theirs)


def _without_spacing(datasets: list[Dataset]) -> list[Dataset]:
    """The study with its images' calibration taken off (no overlay for them)."""
    for ds in datasets:
        for keyword in ("PixelSpacing", "SequenceOfUltrasoundRegions"):
            if keyword in ds:
                delattr(ds, keyword)
    return datasets


def _with_spacing(datasets: list[Dataset], spacing: float) -> list[Dataset]:
    for ds in datasets:
        ds.PixelSpacing = [spacing, spacing]
    return datasets


#: Studies in an order where most images find a prototype an earlier one made:
#: (the study's data sets, images outside the training domain).
STUDIES: list[tuple[Callable[[], list[Dataset]], tuple[int, ...]]] = [
    (lambda: synthetic_study(3, "malignant", seed=1, index=1), ()),
    (lambda: synthetic_study(4, "benign", seed=2, index=2), (1,)),
    (lambda: synthetic_study(2, "normal", seed=3, index=3, size=320, variant="mono"), ()),
    (lambda: _with_spacing(synthetic_study(3, "malignant", seed=4, index=4, variant="rgb"), 0.1), ()),
    (lambda: _without_spacing(synthetic_study(2, "benign", seed=5, index=5)), ()),
    (lambda: [*synthetic_study(2, "malignant", seed=6, index=6), synthetic_cine(4, "malignant", seed=6, index=6)], ()),
    (lambda: synthetic_study(3, "malignant", seed=7, index=7, size=320, variant="mono"), (2,)),
]


@pytest.fixture
def prototypes(monkeypatch: pytest.MonkeyPatch) -> dict[str, Prototypes]:
    """Fresh caches of prototypes by object kind, as a new worker starts with."""
    fresh = {"SEG": Prototypes(), "SC": Prototypes(), "KO": Prototypes()}
    monkeypatch.setattr(seg_module, "_PROTOTYPES", fresh["SEG"])
    monkeypatch.setattr(sc_module, "_PROTOTYPES", fresh["SC"])
    monkeypatch.setattr(kos_module, "_PROTOTYPES", fresh["KO"])
    return fresh


def _both_paths(
    settings: Settings, ledger: Ledger, stored: tuple[str, list[Path]], ood: tuple[int, ...] = ()
) -> list[tuple[OutputObject, OutputObject]]:
    """The objects of a stored study, (library, fast) pairs."""
    study_uid, paths = stored
    result, references = analyse(settings, study_uid, paths, ood_images=ood)
    sources, spool = read_sources(ledger, result)
    library, fast = (
        build_objects(
            settings.model_copy(update={"fast_reports": fast}),
            default_template(),
            result,
            sources,
            spool,
            references.get,
        )
        for fast in (False, True)
    )
    assert [o.kind for o in fast] == [o.kind for o in library]
    return list(zip(library, fast, strict=True))


@pytest.mark.parametrize("transfer_syntax", ["explicit-little-endian", "jpeg-baseline"])
def test_filled_copies_encode_as_the_library_objects(
    settings: Settings, ledger: Ledger, prototypes: dict[str, Prototypes], transfer_syntax: str
) -> None:
    settings = settings.model_copy(update={"sc_transfer_syntax": transfer_syntax})
    compared: dict[str, int] = {}
    for make, ood in STUDIES:
        for library, fast in _both_paths(settings, ledger, store_datasets(settings, ledger, make()), ood):
            ours, theirs = _aligned(fast.data, library.data)
            assert ours == theirs, fast.kind
            assert fast.data.startswith(library.data[:132])  # preamble and DICM prefix
            check_object(fast.data, default_template().disclaimer, True)
            compared[fast.kind] = compared.get(fast.kind, 0) + 1
    assert compared["SEG"] >= 12 and compared["SC"] >= 20
    assert 2 <= len(prototypes["SEG"]) < compared["SEG"] // 2  # most overlays were filled copies
    assert 2 <= len(prototypes["SC"]) < compared["SC"] // 4  # and most heatmap SCs
    assert 1 <= len(prototypes["KO"]) < compared["KO"]  # and studies of the same shape share a flag


def test_real_files_fill_copies_of_each_other(
    settings: Settings, ledger: Ledger, prototypes: dict[str, Prototypes]
) -> None:
    """The real ultrasound files (palette, MONOCHROME2 JPEG lossless, calibrated
    by their regions) as two studies: the second's overlays copy the first's."""
    for _ in range(2):
        pairs = _both_paths(settings, ledger, store_study(settings, ledger))
        for library, fast in pairs:
            ours, theirs = _aligned(fast.data, library.data)
            assert ours == theirs, fast.kind
    segs = sum(fast.kind == "SEG" for _, fast in pairs)
    assert segs >= 1 and len(prototypes["SEG"]) == segs
    assert len(prototypes["SC"]) == sum(fast.kind == "SC" for _, fast in pairs) - 1  # each heatmap SC; not the montage
    assert len(prototypes["KO"]) == 1


def test_a_copy_gets_its_own_clock_and_dimension_organization(
    settings: Settings, ledger: Ledger, prototypes: dict[str, Prototypes]
) -> None:
    datasets = synthetic_study(2, "malignant", seed=11, index=11)
    first, second = (
        pydicom.dcmread(io.BytesIO(fast.data))
        for _, fast in _both_paths(settings, ledger, store_datasets(settings, ledger, datasets))
        if fast.kind == "SEG"
    )
    assert len(prototypes["SEG"]) == 1
    uids = [ds.DimensionOrganizationSequence[0].DimensionOrganizationUID for ds in (first, second)]
    assert uids[0] != uids[1]
    assert [ds.DimensionIndexSequence[0].DimensionOrganizationUID for ds in (first, second)] == uids
    assert (second.InstanceCreationDate, second.InstanceCreationTime) >= (
        first.InstanceCreationDate,
        first.InstanceCreationTime,
    )
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert second.file_meta.MediaStorageSOPInstanceUID == second.SOPInstanceUID


def test_a_flag_copy_names_its_own_images_and_patient(
    settings: Settings, ledger: Ledger, prototypes: dict[str, Prototypes]
) -> None:
    """Two studies of one shape whose images have other numbers and another patient:
    the second flag is a copy of the first's prototype, with its own description."""
    study_uid, paths = store_study(settings, ledger)
    result, _ = analyse(settings, study_uid, paths)
    sources, _ = read_sources(ledger, result)
    template = default_template()
    built = []
    for n, (name, birth, sex) in enumerate([("Test^Patient", "", "M"), ("Other^Name^Jr", "19700101", "F")]):
        headers = [copy.deepcopy(ds) for ds in sources]
        for ds in headers:
            ds.InstanceNumber = int(ds.InstanceNumber) + 10 * n
            ds.PatientName, ds.PatientBirthDate, ds.PatientSex = name, birth, sex
        sr = Dataset()
        sr.StudyInstanceUID, sr.SeriesInstanceUID = study_uid, generate_uid()
        sr.SOPClassUID, sr.SOPInstanceUID = Comprehensive3DSRStorage, generate_uid()
        placement = Placement(generate_uid(), generate_uid(), 1, ["sonocase test"])
        library, fast = (build_kos(result, template, headers, sr, placement, fast=fast) for fast in (False, True))
        ours, theirs = _aligned(library_encode(fast), library_encode(library))
        assert ours == theirs
        built.append(pydicom.dcmread(io.BytesIO(ours)))
    assert len(prototypes["KO"]) == 1
    texts = [[i.TextValue for i in ds.ContentSequence if "TextValue" in i][-1] for ds in built]
    assert texts[0] != texts[1] and texts[1].startswith("Most suspicious image(s) by the AI: 1")
    assert built[1].PatientName == "Other^Name^Jr" and built[1].PatientSex == "F"


def _variants() -> list[tuple[str, SrTemplate]]:
    """The default template and one with each value a prototype holds changed."""
    base = default_template()

    def changed(field: str, **update: object) -> SrTemplate:
        return base.model_copy(update={field: getattr(base, field).model_copy(update=update)})

    concepts = base.concepts
    return [
        ("default", base),
        ("device", changed("device", manufacturer="Other maker", serial_number="X-2")),
        ("series", changed("sc_series", number=7001)),
        ("seg series", changed("seg_series", description="Other overlay")),
        ("kos series", changed("kos_series", number=7003)),
        ("title", changed("concepts", key_images_title=concepts.segment_type)),
        ("segments", changed("concepts", segment_type=concepts.key_images_title)),
        ("label", changed("wording", segment_label="Heat {low:.0%}-{high:.0%}")),
        ("disclaimer", base.model_copy(update={"disclaimer": "Another disclaimer, as long as it needs to be."})),
    ]


def test_another_template_or_model_never_gets_an_earlier_prototype(
    settings: Settings, ledger: Ledger, prototypes: dict[str, Prototypes]
) -> None:
    study_uid, paths = store_datasets(settings, ledger, synthetic_study(3, "malignant", seed=21, index=21))
    result, _ = analyse(settings, study_uid, paths)
    sources, spool = read_sources(ledger, result)
    other_model = result.model_copy(update={"model": result.model.model_copy(update={"version": "2.0.0"})})
    runs = [(name, template, result) for name, template in _variants()] + [("model", default_template(), other_model)]
    for name, template, analysed in runs:
        library, fast = (
            build_objects(
                settings.model_copy(update={"fast_reports": fast}), template, analysed, sources, spool, lambda _: None
            )
            for fast in (False, True)
        )
        for theirs, ours in zip(library, fast, strict=True):
            assert _aligned(ours.data, theirs.data)[0] == _aligned(ours.data, theirs.data)[1], (name, ours.kind)
    assert len(prototypes["SEG"]) >= 5 and len(prototypes["SC"]) >= 4 and len(prototypes["KO"]) >= 4


@pytest.mark.parametrize("shape", [(5, 9), (4, 6), (3, 3)])
def test_binary_pixels_are_highdicoms_for_odd_and_even_lengths(shape: tuple[int, int]) -> None:
    rows, columns = shape
    source = synthetic_study(1, "benign", seed=31, index=31)[0]
    del source.PixelData
    source.Rows, source.Columns = rows, columns
    labels = np.random.default_rng(rows * columns).integers(0, 4, shape).astype(np.uint8)
    labels[0, 0] = 2  # segment 2 present; segment 1 is left out where the draw has none
    labels[labels == 1] = 0 if rows == 3 else 1
    segments = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=f"band {n}",
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for n in (1, 2, 3)
    ]
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=labels[None],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=generate_uid(),
        series_number=1,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
        pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=(0.1, 0.1), slice_thickness=None),
    )
    present = [n for n in (1, 2, 3) if (labels == n).any()]
    assert int(seg.NumberOfFrames) == len(present)
    assert binary_pixels(np.stack([labels == n for n in present])) == seg.PixelData
