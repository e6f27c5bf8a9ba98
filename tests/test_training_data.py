"""Training data: the synthetic phantom, the BUSI and DICOM+CSV loaders, leak-free
splits and augmentation. Real files throughout: PNGs and DICOM written to disk,
decoded by Pillow/pydicom, validated by dicom3tools' dciodvfy."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from service.datasets.busi import load_busi
from service.datasets.dicom_csv import load_dicom_labels
from service.datasets.dicom_writer import VARIANTS
from service.datasets.phantom import Scanner
from service.datasets.records import CLASSES, Record
from service.datasets.splits import (
    MAX_HAMMING,
    hamming,
    near_duplicate_groups,
    perceptual_hash,
    stratified_group_kfold,
    stratified_split,
)
from service.datasets.synthetic import (
    generate_records,
    patient_views,
    synthetic_cine,
    synthetic_study,
    write_busi_layout,
    write_dicom_dataset,
    write_dicom_study,
)
from service.model.imaging import to_grayscale, ultrasound_region
from training.augment import augment

SIZE = 64


@pytest.fixture(scope="module")
def records() -> list[Record]:
    return generate_records(20, SIZE, seed=1)


@pytest.fixture
def busi(tmp_path: Path) -> Path:
    return write_busi_layout(tmp_path, 20, SIZE, seed=0)


# --- synthetic generator ----------------------------------------------------------


def test_generate_records_gives_each_class_with_masks_and_patient_groups(records: list[Record]) -> None:
    labels = np.array([r.label for r in records])
    assert np.bincount(labels).tolist() == [20, 20, 20]
    for r in records:
        assert r.image.dtype == np.uint8 and r.image.shape == (SIZE, SIZE)
        if r.label_name == "normal":
            assert r.mask is None
        else:
            assert r.mask is not None and r.mask.dtype == bool and r.mask.shape == r.image.shape
            assert r.mask.any()
    groups = [r.group for r in records]
    assert len(set(groups)) < len(groups), "patients should contribute several views"
    for group in set(groups):
        assert len({r.label for r in records if r.group == group}) == 1


def test_same_seed_same_images_other_seed_other_images() -> None:
    first, again, other = (generate_records(3, SIZE, seed=s) for s in (5, 5, 6))
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, again, strict=True))
    assert all(
        (a.mask is None and b.mask is None) or np.array_equal(a.mask, b.mask) for a, b in zip(first, again, strict=True)
    )
    assert not any(np.array_equal(a.image, b.image) for a, b in zip(first, other, strict=True))


def test_a_probe_swap_changes_the_speckle_and_contrast_not_the_breast() -> None:
    """service.datasets.phantom.Scanner: a coarser point-spread function gives a
    coarser speckle grain (smaller pixel-to-pixel steps), a wider dynamic range a
    flatter picture; the anatomy and lesion stay where they were."""
    (default,) = patient_views(0, CLASSES.index("benign"), 0, n_views=1)
    (coarse,) = patient_views(0, CLASSES.index("benign"), 0, n_views=1, scanner=Scanner(speckle_scale=1.5))
    (flat,) = patient_views(0, CLASSES.index("benign"), 0, n_views=1, scanner=Scanner(dynamic_range_db=10.0))

    def grain(image: np.ndarray) -> float:
        return float(np.abs(np.diff(image.astype(np.float64), axis=1)).mean())

    assert grain(coarse.image) < 0.85 * grain(default.image)
    assert flat.image.std() < 0.9 * default.image.std()
    assert np.array_equal(default.masks[0], coarse.masks[0]) and np.array_equal(default.masks[0], flat.masks[0])


@pytest.mark.heavy
def test_lesions_follow_their_class_descriptors() -> None:
    """Benign lesions are wider than tall with posterior enhancement; malignant ones
    taller than wide with posterior shadowing (medians over many lesions)."""
    size = 96
    aspect: dict[int, list[float]] = {1: [], 2: []}
    posterior: dict[int, list[float]] = {1: [], 2: []}
    for r in generate_records(40, size, seed=2):
        if r.mask is None:
            continue
        rows, cols = np.nonzero(r.mask)
        aspect[r.label].append((np.ptp(rows) + 1) / (np.ptp(cols) + 1))
        bottom, left, right = rows.max(), cols.min(), cols.max()
        band = slice(bottom + 3, min(size, bottom + 3 + size // 6))
        centre = slice(left + (right - left) // 4, right - (right - left) // 4 + 1)
        if band.start >= size or centre.stop <= centre.start:
            continue
        behind = r.image[band, centre].mean()
        beside = np.delete(r.image[band], np.arange(left - 3, right + 4).clip(0, size - 1), axis=1)
        posterior[r.label].append(behind / max(beside.mean(), 1.0))
    assert np.median(aspect[1]) < 0.9 and np.median(aspect[2]) > 1.0
    assert np.median(posterior[1]) > 1.05 and np.median(posterior[2]) < 0.9


def test_synthetic_study_is_one_patient_and_reproducible() -> None:
    study = synthetic_study(3, "malignant", seed=4)
    again = synthetic_study(3, 2, seed=4)
    assert len({ds.StudyInstanceUID for ds in study}) == 1
    assert len({ds.SOPInstanceUID for ds in study}) == 3
    assert [ds.InstanceNumber for ds in study] == [1, 2, 3]
    for ds, twin in zip(study, again, strict=True):
        assert str(ds.PatientName).startswith("SYNTHETIC^PATIENT^")
        one, two = io.BytesIO(), io.BytesIO()
        ds.save_as(one, enforce_file_format=True)
        twin.save_as(two, enforce_file_format=True)
        assert one.getvalue() == two.getvalue()
    with pytest.raises(ValueError, match="unknown class"):
        synthetic_study(1, "cyst")
    with pytest.raises(ValueError, match="n_images"):
        synthetic_study(0, "benign")


@pytest.mark.integration
@pytest.mark.parametrize("variant", VARIANTS)
def test_dicom_variants_pass_dciodvfy_and_decode_to_the_image(variant: str, tmp_path: Path) -> None:
    study = synthetic_study(1, "benign", seed=7, size=SIZE, variant=variant)
    (path,) = write_dicom_study(tmp_path, study)
    report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    problems = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith(("Error", "Warning"))]
    assert problems == [], f"{variant}: {problems}"

    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.6.1" and ds.Modality == "US"
    assert ds.BodyPartExamined == "BREAST" and ds.ImageLaterality in ("L", "R")
    x0, y0, x1, y1 = ultrasound_region(ds)
    gray = to_grayscale(ds, 0)
    assert gray.shape == (ds.Rows, ds.Columns) and (x1 - x0, y1 - y0) == (SIZE, SIZE)
    assert gray.shape[0] > SIZE and gray.shape[1] > SIZE, "the image sits inside a larger screen"
    (expected,) = [r.image for r in generate_records(1, SIZE, seed=7) if r.label_name == "benign"]
    error = np.abs(gray[y0:y1, x0:x1].astype(int) - expected).mean()
    assert error == 0 if variant in ("mono", "rgb") else error < 4.0


@pytest.mark.integration
@pytest.mark.parametrize("variant", ["mono", "ybr_jpeg"])
def test_a_synthetic_cine_loop_is_a_valid_multiframe_object_of_one_patients_views(variant: str, tmp_path: Path) -> None:
    cine = synthetic_cine(5, "malignant", seed=7, size=SIZE, variant=variant)
    (path,) = write_dicom_study(tmp_path, [cine])
    report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    assert [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")] == []
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.3.1" and int(ds.NumberOfFrames) == 5
    x0, y0, x1, y1 = ultrasound_region(ds)
    views = patient_views(7, CLASSES.index("malignant"), 0, SIZE, n_views=5)
    for k, view in enumerate(views):
        error = np.abs(to_grayscale(ds, k)[y0:y1, x0:x1].astype(int) - view.image).mean()
        assert error == 0 if variant == "mono" else error < 4.0
    assert not np.array_equal(views[0].image, views[1].image), "the frames are different views"
    with pytest.raises(ValueError, match="at least two frames"):
        synthetic_cine(1, "benign")


# --- BUSI layout --------------------------------------------------------------------


def test_busi_loader_reads_what_the_writer_wrote(busi: Path) -> None:
    expected = generate_records(20, SIZE, seed=0)
    for root in (busi, busi.parent):  # the data set folder or the folder above it
        loaded = load_busi(root)
        assert len(loaded) == len(expected)
        for got, want in zip(loaded, expected, strict=True):
            assert got.label == want.label and np.array_equal(got.image, want.image)
            assert (got.mask is None) == (want.mask is None)
            if want.mask is not None:
                assert np.array_equal(got.mask, want.mask)


def test_busi_second_masks_are_merged_by_or(busi: Path) -> None:
    second = sorted(busi.glob("*/* (*)_mask_1.png"))
    assert second, "the writer should produce some _mask_1 files"
    image_path = second[0].with_name(second[0].name.replace("_mask_1", ""))
    first = np.asarray(Image.open(image_path.with_name(image_path.stem + "_mask.png"))) > 127
    extra = np.asarray(Image.open(second[0])) > 127
    (record,) = [r for r in load_busi(busi) if r.source == str(image_path)]
    assert np.array_equal(record.mask, first | extra)
    assert not np.array_equal(record.mask, first)


def test_busi_corrupt_image_is_named(busi: Path) -> None:
    victim = busi / "benign" / "benign (3).png"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated mid-file
    with pytest.raises(ValueError, match=r"benign \(3\)\.png"):
        load_busi(busi)


def test_busi_missing_mask_is_named(busi: Path) -> None:
    (busi / "malignant" / "malignant (2)_mask.png").unlink()
    (busi / "malignant" / "malignant (2)_mask_1.png").unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"malignant \(2\)\.png: no mask"):
        load_busi(busi)


def test_busi_empty_or_missing_class_folder(busi: Path) -> None:
    for path in (busi / "normal").iterdir():
        path.unlink()
    with pytest.raises(ValueError, match="normal holds no images"):
        load_busi(busi)
    shutil.rmtree(busi / "normal")
    with pytest.raises(ValueError, match="normal is missing"):
        load_busi(busi)


# --- DICOM + CSV --------------------------------------------------------------------


def test_dicom_dataset_loads_as_the_generated_records(tmp_path: Path) -> None:
    paths, labels_csv = write_dicom_dataset(tmp_path, 6, seed=3, size=SIZE)
    assert {pydicom.dcmread(p, stop_before_pixels=True).PhotometricInterpretation for p in paths} == {
        "MONOCHROME2",
        "RGB",
        "YBR_FULL_422",
    }
    loaded = load_dicom_labels(tmp_path, labels_csv)
    expected = generate_records(6, SIZE, seed=3)
    assert len(loaded) == len(expected) == len(paths)
    for record in loaded:
        errors = [np.abs(record.image.astype(int) - e.image).mean() for e in expected]
        best = int(np.argmin(errors))
        assert errors[best] < 4.0 and expected[best].label == record.label
        assert record.mask is None and record.group.startswith("patient:")
        assert "SYN" not in record.group, "the patient ID is hashed, never kept"
    studies = {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in paths}
    assert len({r.group for r in loaded}) == len(studies)
    with pytest.raises(ValueError, match="variants"):
        write_dicom_dataset(tmp_path / "other", 1, variants=("rgb_jpeg",))


def test_instance_label_beats_study_label(tmp_path: Path) -> None:
    paths = write_dicom_study(tmp_path / "dicom", synthetic_study(2, "benign", seed=9, size=SIZE))
    first, second = (pydicom.dcmread(p, stop_before_pixels=True) for p in paths)
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "study_instance_uid,sop_instance_uid,label,label_source\n"
        f"{first.StudyInstanceUID},,benign,pathology\n"
        f",{second.SOPInstanceUID},malignant,second reading\n"
    )
    loaded = {Path(r.source).name: r.label_name for r in load_dicom_labels(tmp_path / "dicom", labels)}
    assert loaded == {paths[0].name: "benign", paths[1].name: "malignant"}
    # A study row whose every instance is relabelled still matched files: no error.
    labels.write_text(
        "study_instance_uid,sop_instance_uid,label\n"
        f"{first.StudyInstanceUID},,benign\n"
        f",{first.SOPInstanceUID},normal\n,{second.SOPInstanceUID},malignant\n"
    )
    loaded = {Path(r.source).name: r.label_name for r in load_dicom_labels(tmp_path / "dicom", labels)}
    assert loaded == {paths[0].name: "normal", paths[1].name: "malignant"}


@pytest.mark.parametrize(
    ("csv_text", "message"),
    [
        ("study_instance_uid,label\n1.2.3.4,benign\n", "match no file"),
        ("study_instance_uid,label\n{study},cancer\n", r"labels.csv:2: unknown label 'cancer'"),
        ("patient,label\nX,benign\n", "needs a 'label' column"),
        ("study_instance_uid,label\n{study},benign\n{study},normal\n", "line 2 says benign"),
        ("study_instance_uid,label\n", "no labelled rows"),
    ],
)
def test_bad_label_csv_gives_clear_errors(tmp_path: Path, csv_text: str, message: str) -> None:
    (path,) = write_dicom_study(tmp_path / "dicom", synthetic_study(1, "normal", seed=2, size=SIZE))
    study = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
    labels = tmp_path / "labels.csv"
    labels.write_text(csv_text.format(study=study))
    with pytest.raises(ValueError, match=message):
        load_dicom_labels(tmp_path / "dicom", labels)


def test_real_multiframe_ultrasound_is_cropped_to_its_region(tmp_path: Path) -> None:
    """pydicom's own YBR_FULL_422 JPEG cine loop with an ultrasound region."""
    source = Path(get_testdata_file("examples_ybr_color.dcm"))
    folder = tmp_path / "dicom"
    folder.mkdir()
    shutil.copy(source, folder / source.name)
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    labels = tmp_path / "labels.csv"
    labels.write_text(f"sop_instance_uid,label\n{ds.SOPInstanceUID},benign\n")
    loaded = load_dicom_labels(folder, labels, max_frames=3)
    x0, y0, x1, y1 = ultrasound_region(ds)
    assert [r.source.rsplit("#", 1)[1] for r in loaded] == ["frame1", "frame15", "frame30"]
    assert all(r.image.shape == (y1 - y0, x1 - x0) for r in loaded)


def test_labelled_but_broken_dicom_is_named(tmp_path: Path) -> None:
    (path,) = write_dicom_study(tmp_path / "dicom", synthetic_study(1, "benign", seed=2, size=SIZE, variant="ybr_jpeg"))
    ds = pydicom.dcmread(path)
    study = ds.StudyInstanceUID
    ds.PixelData = ds.PixelData[:200]  # a JPEG cut short: the decoder fails
    ds.save_as(path)
    labels = tmp_path / "labels.csv"
    labels.write_text(f"study_instance_uid,label\n{study},benign\n")
    with pytest.raises(ValueError, match=str(path.name)):
        load_dicom_labels(tmp_path / "dicom", labels)


# --- splits -------------------------------------------------------------------------


def _near_copy(image: np.ndarray) -> np.ndarray:
    """Brightened, re-encoded as JPEG and re-cropped by 1 pixel: a BUSI-like duplicate."""
    brighter = np.clip(image.astype(int) * 1.1 + 8, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(brighter[1:-1, 1:-1]).resize(image.shape[::-1]).save(buffer, "JPEG", quality=70)
    return np.asarray(Image.open(buffer))


def test_near_duplicates_are_close_and_distinct_images_far(records: list[Record]) -> None:
    hashes = [perceptual_hash(r.image) for r in records]
    copies = [hamming(h, perceptual_hash(_near_copy(r.image))) for h, r in zip(hashes, records, strict=True)]
    assert max(copies) <= MAX_HAMMING
    other_patients = [
        hamming(hashes[i], hashes[j])
        for i in range(len(records))
        for j in range(i)
        if records[i].group != records[j].group
    ]
    assert np.mean(np.array(other_patients) <= MAX_HAMMING) < 0.01


def _planted(records: list[Record]) -> list[Record]:
    """The records plus a near-copy of every fifth one under a different group key."""
    copies = [
        Record(_near_copy(r.image), r.label, r.mask, f"copy-{i}", f"copy of {r.source}")
        for i, r in enumerate(records[::5])
    ]
    return records + copies


def _groups_never_span(groups: list[str], train: np.ndarray, test: np.ndarray) -> None:
    assert not {groups[i] for i in train} & {groups[i] for i in test}


def test_stratified_split_keeps_groups_and_near_duplicates_together(records: list[Record]) -> None:
    data = _planted(records)
    groups = near_duplicate_groups(data)
    for i in range(len(data) - len(records)):  # each planted copy joined its original's group
        assert groups[len(records) + i] == groups[5 * i]
    train, test = stratified_split(data, test_fraction=0.2, seed=0)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(data)))
    _groups_never_span(groups, train, test)
    _groups_never_span([r.group for r in data], train, test)
    labels = np.array([r.label for r in data])
    for c in range(len(CLASSES)):
        share = np.mean(labels[test] == c) / np.mean(labels == c) * len(test) / len(data)
        assert 0.1 <= share <= 0.3, f"class {CLASSES[c]}: {share:.2f} of it in test"
    again = stratified_split(data, test_fraction=0.2, seed=0)
    assert np.array_equal(again[1], test)
    assert not np.array_equal(stratified_split(data, test_fraction=0.2, seed=1)[1], test)


def test_stratified_group_kfold_tests_everything_once(records: list[Record]) -> None:
    data = _planted(records)
    groups = near_duplicate_groups(data)
    folds = stratified_group_kfold(data, k=4, seed=0)
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested.tolist()) == list(range(len(data)))
    labels = np.array([r.label for r in data])
    for train, test in folds:
        _groups_never_span(groups, train, test)
        assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == len(data)
        counts = np.bincount(labels[test], minlength=len(CLASSES))
        assert counts.min() >= 0.5 * np.bincount(labels).min() / 4
    with pytest.raises(ValueError, match="independent groups"):
        stratified_group_kfold(data[:3], k=5)


# --- augmentation -------------------------------------------------------------------


def test_augment_is_seeded_and_keeps_shape(records: list[Record]) -> None:
    image = records[30].image
    one = [augment(image, np.random.default_rng(11)) for _ in range(2)]
    assert np.array_equal(one[0], one[1])
    assert one[0].shape == image.shape and one[0].dtype == np.uint8
    assert not np.array_equal(one[0], augment(image, np.random.default_rng(12)))
    assert not np.array_equal(one[0], image)


def test_augment_flip_alone_mirrors_exactly(records: list[Record]) -> None:
    image = records[45].image
    flipped = augment(
        image,
        np.random.default_rng(0),
        max_rotation_deg=0.0,
        scale_range=(1.0, 1.0),
        flip_probability=1.0,
        gamma_range=(1.0, 1.0),
        contrast_range=(1.0, 1.0),
    )
    assert np.array_equal(flipped, image[:, ::-1])
    with pytest.raises(ValueError, match="2-D uint8"):
        augment(image.astype(np.float32), np.random.default_rng(0))


def test_augment_gamma_darkens_or_brightens_monotonically(records: list[Record]) -> None:
    image = records[10].image
    kwargs = {"max_rotation_deg": 0.0, "scale_range": (1.0, 1.0), "flip_probability": 0.0, "contrast_range": (1.0, 1.0)}
    darker = augment(image, np.random.default_rng(0), gamma_range=(1.3, 1.3), **kwargs)
    brighter = augment(image, np.random.default_rng(0), gamma_range=(0.77, 0.77), **kwargs)
    assert darker.mean() < image.mean() < brighter.mean()
    order = np.argsort(image, axis=None, kind="stable")
    assert np.all(np.diff(darker.ravel()[order].astype(int)) >= 0)
