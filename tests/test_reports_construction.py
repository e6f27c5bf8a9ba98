"""service.reports.construction: the fast path builds, element for element, the
objects highdicom's own constructors build (setting ``fast_reports``), the SR byte
for byte (service.reports.sr_content) on studies of every shape, its objects keep
what the library's `content` and the gate read, and the library is left as it was
outside a build."""

from __future__ import annotations

import io
from collections.abc import Sequence

import highdicom._standard_utils
import highdicom.base
import highdicom.sr.content
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sr.coding import Code
from pydicom.uid import (
    Comprehensive3DSRStorage,
    SegmentationStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
)

from service.datasets.synthetic import synthetic_study
from service.ledger import Ledger
from service.reports.build import build_objects, heatmap_references, read_sources
from service.reports.construction import iod_lookups_cached, key_object_selection
from service.reports.encoding import lean_encode, library_encode
from service.reports.heatmaps import load_heats
from service.reports.sr import SR_CLASSES, build_sr
from service.reports.sr_content import FastContent, LibraryContent
from service.reports.validation import check_object
from service.settings import Settings
from tests.support.reports import (
    CLOCK_KEYWORDS,
    analyse,
    analysed_study,
    default_template,
    store_datasets,
    store_study,
)

#: What the library takes from the clock or draws at random (the SEG's dimension
#: organization): the only values two builds may differ in.
VARYING = (*CLOCK_KEYWORDS, "ContributionDateTime", "DimensionOrganizationUID")


def _steady(data: bytes) -> Dataset:
    """The object read back, with the :data:`VARYING` values blanked."""
    ds = pydicom.dcmread(io.BytesIO(data))

    def blank(item: Dataset) -> None:
        for elem in item:
            if elem.keyword in VARYING:
                elem.value = ""
            elif elem.VR == "SQ":
                for child in elem.value:
                    blank(child)

    blank(ds)
    return ds


def test_every_object_of_a_study_is_the_same_on_both_paths(settings: Settings, ledger: Ledger) -> None:
    study = analysed_study(settings, ledger)
    sources, paths = read_sources(ledger, study.result)
    built = {
        fast: build_objects(
            settings.model_copy(update={"fast_reports": fast}),
            default_template(),
            study.result,
            sources,
            paths,
            study.reference_images.get,
        )
        for fast in (False, True)
    }
    assert [o.kind for o in built[True]] == [o.kind for o in built[False]]
    assert {"SR", "SC", "SEG", "KO"} <= {o.kind for o in built[True]}
    for library, fast in zip(built[False], built[True], strict=True):
        assert library_encode(_steady(fast.data)) == library_encode(_steady(library.data)), fast.kind
        check_object(fast.data, default_template().disclaimer)


@pytest.mark.parametrize("sop_class", SR_CLASSES)
def test_each_sr_class_is_the_same_and_keeps_its_content(settings: Settings, ledger: Ledger, sop_class: str) -> None:
    study = analysed_study(settings, ledger)
    sources, _ = read_sources(ledger, study.result)
    heats = load_heats(study.result)
    references = heatmap_references(study.result, sources, heats)
    library, fast = (
        build_sr(study.result, default_template(), sources, sop_class, "0.1.0", heats, references, fast=fast)
        for fast in (False, True)
    )
    assert library_encode(_steady(library_encode(fast))) == library_encode(_steady(library_encode(library)))
    assert len(fast.content) == len(library.content) == 1
    assert fast.content[0].name == library.content[0].name
    assert len(fast.content[0].ContentSequence) == len(library.content[0].ContentSequence) > 1


def test_iod_lookups_are_remembered_inside_only_and_answer_as_the_library() -> None:
    library = highdicom._standard_utils.is_attribute_in_iod
    questions = [
        ("PixelData", SegmentationStorage, ["IconImageSequence"]),
        ("ContentDate", Comprehensive3DSRStorage, None),
        ("NumberOfFrames", UltrasoundImageStorage, None),
        ("NumberOfFrames", UltrasoundMultiFrameImageStorage, None),
    ]
    expected = [library(*q) for q in questions]
    with iod_lookups_cached(True):
        remembered = highdicom.base.is_attribute_in_iod
        assert remembered is not library and highdicom.sr.content.is_attribute_in_iod is remembered
        assert [remembered(*q) for q in questions] * 2 == [*expected, *expected]
        with iod_lookups_cached(True):  # nested: the outer one restores
            pass
        assert highdicom.base.is_attribute_in_iod is remembered
    with iod_lookups_cached(False):
        assert highdicom.base.is_attribute_in_iod is library
    for module in (highdicom._standard_utils, highdicom.base, highdicom.sr.content):
        assert module.is_attribute_in_iod is library


def test_a_key_image_flag_reads_as_the_library_reads_it(settings: Settings, ledger: Ledger) -> None:
    study = analysed_study(settings, ledger)
    sources, paths = read_sources(ledger, study.result)
    built = build_objects(settings, default_template(), study.result, sources, paths, study.reference_images.get)
    data = next(o.data for o in built if o.kind == "KO")
    library, fast = (key_object_selection(pydicom.dcmread(io.BytesIO(data)), fast) for fast in (False, True))
    assert type(fast) is type(library)
    selected = [[r.referenced_sop_instance_uid for r in content.get_references()] for content in (library, fast)]
    assert selected[0] == selected[1] and len(selected[0]) >= 2  # the key image(s) and the SR
    assert _encoded_tree(fast) == _encoded_tree(library)


def _encoded_tree(content: Sequence[Dataset]) -> bytes:
    """A content tree encoded as it stands in a document's Content Sequence."""
    ds = Dataset()
    ds.ContentSequence = list(content)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


#: Studies of every shape the SR takes: (files of pydicom's or a synthetic study, analyse's arguments).
SHAPES = {
    "heatmap outlines, a frame outside the domain, a skipped image": ((), {"skip": [3], "ood_images": [1]}),
    "lesions measured and unmeasured": (
        "synthetic",
        {"classes": ["malignant", "benign", "normal"], "lesion_peak": 1.0, "n_similar": 1},
    ),
    "lesions without calibration": ((), {"lesion_peak": 1.0, "ood_images": [2]}),
    "no finding": (("US1_UNCR.dcm", "examples_ybr_color.dcm"), {"classes": ["normal", "normal"], "ood_images": [1]}),
    "all outside the domain": (("US1_UNCR.dcm", "examples_ybr_color.dcm"), {"ood_images": [0, 1], "n_similar": 0}),
    "nothing analysed": (("US1_UNCR.dcm",), {"skip": [0], "n_similar": 0}),
}
#: The SR's values from the clock: the only ones two builds may differ in.
CLOCK = ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime", "ContributionDateTime")


def _same_clock(fast: Dataset, library: Dataset) -> None:
    """``fast`` given ``library``'s clock values (the two trees in step)."""
    for elem in library:
        if elem.keyword in CLOCK:
            fast[elem.tag].value = elem.value
        elif elem.VR == "SQ":
            for fast_item, library_item in zip(fast[elem.tag].value, elem.value, strict=True):
                _same_clock(fast_item, library_item)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sop_class", SR_CLASSES)
def test_the_sr_is_the_librarys_byte_for_byte(settings: Settings, ledger: Ledger, shape: str, sop_class: str) -> None:
    files, judged = SHAPES[shape]
    if files == "synthetic":
        study_uid, paths = store_datasets(settings, ledger, synthetic_study(3, "malignant", variant="mono"))
    else:
        study_uid, paths = store_study(settings, ledger, *([files] if files else []))
    result, _ = analyse(settings, study_uid, paths, **judged)  # type: ignore[arg-type]
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    heats = load_heats(result)
    references = heatmap_references(result, sources, heats)
    earlier = build_sr(result, default_template(), sources, sop_class, "0.1.0", heats, references)
    library, fast = (
        build_sr(result, default_template(), sources, sop_class, "0.1.0", heats, references, [earlier], fast=fast)
        for fast in (False, True)
    )
    _same_clock(fast, library)
    data = lean_encode(fast)  # the bytes that leave on the fast path
    assert data is not None and data == library_encode(fast) == library_encode(library)
    check_object(data, default_template().disclaimer)


def test_fast_items_are_copies_of_their_own_codes() -> None:
    """A prototype is the code's value, scheme, meaning and version (pydicom's Code
    equality ignores the meaning), and no copy shares what another may change."""
    fast, library = FastContent(), LibraryContent()
    names = [Code("121106", "DCM", "Comment"), Code("121106", "DCM", "Remark"), Code("121106", "DCM", "Comment", "1")]
    made = [(fast.text(name, "words"), library.text(name, "words")) for name in names]
    for (copy, own), name in zip(made, names, strict=True):
        assert _encoded_tree([copy]) == _encoded_tree([own])
        assert copy.name.meaning == name.meaning and copy.name.scheme_version == name.scheme_version
    first, second = (fast.text(names[0], "words") for _ in range(2))
    first.TextValue = "other words"
    first.ConceptNameCodeSequence[0].CodeMeaning = "Changed"
    assert (second.TextValue, second.name.meaning) == ("words", "Comment")
    assert fast.text(names[0], "words").name.meaning == "Comment"
