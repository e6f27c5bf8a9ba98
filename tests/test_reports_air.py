"""IHE AI Results: PixelMed's DicomSRValidator (the validator AIR sample objects must
pass) finds no error, and no warning but the counted ones, in the SR and the key-image flag of every kind
of study the node reports: normal, benign and malignant synthetic studies (lesions
outlined and measured), a finding without a lesion above the segmentation threshold,
a model that outlines no lesion, a study not assessed, a cine loop; dciodvfy agrees.

Needs Java with its compiler and Debian's libpixelmed-java (scripts/setup.sh installs
both); skipped, saying so, only where they are missing."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from service.datasets.synthetic import synthetic_cine, synthetic_study
from service.ledger import Ledger
from service.reports.build import build_objects, read_sources
from service.settings import Settings, load_settings
from tests.support.reports import (
    analyse,
    dciodvfy_errors,
    default_template,
    measurement_groups,
    store_datasets,
    store_study,
)

PIXELMED = Path("/usr/share/java/pixelmed.jar")
VALIDATOR = Path(__file__).with_name("PixelmedValidate.java")
#: The XPath limits of recent JDKs stop PixelMed's template checks; the issue's command line.
JAVA_OPTIONS = ["-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0", "-Djdk.xml.xpathTotalOpLimit=0"]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("javac") is None or not PIXELMED.is_file(),
        reason="PixelMed's validator needs a JDK and libpixelmed-java (scripts/setup.sh installs them)",
    ),
    pytest.mark.slow,
    pytest.mark.timeout(900),
]


def pixelmed(paths: list[Path]) -> dict[Path, list[str]]:
    """PixelMed's findings per file: its "Error" and "Warning" lines (one JVM for all)."""
    proc = subprocess.run(
        ["java", *JAVA_OPTIONS, "-cp", str(PIXELMED), str(VALIDATOR), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=800,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    found: dict[Path, list[str]] = {}
    current: list[str] = []
    for line in proc.stdout.splitlines():
        if line.startswith("=== "):
            current = found.setdefault(Path(line[4:]), [])
        elif re.match(r"^(Error|Warning)", line):
            current.append(line)
    assert set(found) == set(paths), proc.stdout[-2000:]
    return found


#: Each kind: the study's data sets, and how analyse() judges it.
KINDS = {
    "normal": (lambda: synthetic_study(1, "normal", variant="mono"), {"classes": ["normal"], "lesion_peak": 1.0}),
    "benign": (lambda: synthetic_study(1, "benign", variant="mono"), {"classes": ["benign"], "lesion_peak": 1.0}),
    "malignant": (
        lambda: synthetic_study(2, "malignant", variant="ybr_jpeg"),
        {"classes": ["malignant", "benign"], "lesion_peak": 1.0},
    ),
    "no lesion above threshold": (
        lambda: synthetic_study(1, "malignant", variant="mono"),
        {"classes": ["malignant"], "lesion_peak": 0.3},
    ),
    "model without segmentation": (lambda: synthetic_study(1, "benign", variant="mono"), {"classes": ["benign"]}),
    "not assessed": (lambda: synthetic_study(1, "benign", variant="mono"), {"ood_images": [0]}),
    "cine": (lambda: [synthetic_cine(6, "malignant")], {"classes": ["malignant"], "lesion_peak": 1.0}),
}


def _objects(settings: Settings, ledger: Ledger, kind: str, folder: Path) -> list[Path]:
    make, judged = KINDS[kind]
    study_uid, paths = store_datasets(settings, ledger, make())
    result, references = analyse(settings, study_uid, paths, n_similar=2, **judged)  # type: ignore[arg-type]
    sources, spooled = read_sources(ledger, result)
    written = []
    for obj in build_objects(settings, default_template(), result, sources, spooled, references.get):
        if obj.kind in ("SR", "KO"):
            path = folder / f"{kind.replace(' ', '-')}-{obj.kind}.dcm"
            path.write_bytes(obj.data)
            written.append(path)
    return written


@pytest.fixture(scope="module")
def validated(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, list[str]]:
    folder = tmp_path_factory.mktemp("air")
    settings = load_settings(data_dir=folder / "data", durability="none")
    ledger = Ledger(settings.ledger_path, durable=False)
    paths = [path for kind in KINDS for path in _objects(settings, ledger, kind, folder)]
    # real scanner files without a tissue region in cm: lesions outlined, not measured
    study_uid, files = store_study(settings, ledger, ["US1_UNCR.dcm", "OBXXXX1A.dcm"])
    result, references = analyse(settings, study_uid, files, classes=["malignant", "normal"], lesion_peak=1.0)
    sources, spooled = read_sources(ledger, result)
    for obj in build_objects(settings, default_template(), result, sources, spooled, references.get):
        if obj.kind in ("SR", "KO"):
            paths.append(folder / f"uncalibrated-{obj.kind}.dcm")
            paths[-1].write_bytes(obj.data)
    return pixelmed(paths)


def test_every_kind_of_study_has_its_sr_and_key_image_flag(validated: dict[Path, list[str]]) -> None:
    names = {path.name for path in validated}
    for kind in [*KINDS, "uncalibrated"]:
        assert f"{kind.replace(' ', '-')}-SR.dcm" in names
        # a study not assessed gets no key-image flag: nothing to point at
        assert (f"{kind.replace(' ', '-')}-KO.dcm" in names) == (kind != "not assessed")


#: Warnings PixelMed keeps: one per lesion outlined, its label for OHIF's measurement
#: panel (image, frame, class, probability, BI-RADS band) as a Comment (DCM 121106)
#: in the group that lists its axes (else its contour): OHIF takes a measurement's
#: label from that item alone, and TID 1501 has no row for it. Benign: one lesion;
#: malignant: two images, two lesions; a model without segmentation: the heatmap
#: outline of its one finding; cine: three analysed frames; uncalibrated: the
#: malignant image's lesion (the other is called normal). Every other finding is gone
#: (the not-assessed SR had 5, children of its "Impression: Not Evaluated" items).
KNOWN_WARNINGS = {
    "benign-SR.dcm": 1,
    "malignant-SR.dcm": 2,
    "model-without-segmentation-SR.dcm": 1,
    "cine-SR.dcm": 3,
    "uncalibrated-SR.dcm": 1,
}


def _labels(path: Path) -> int:
    """How many lesion labels (group-level Comments) an SR holds."""
    import pydicom

    groups = measurement_groups(pydicom.dcmread(path))
    return sum(
        i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "121106"
        for g in groups
        for i in g.ContentSequence
    )


def test_pixelmed_finds_no_error_and_only_the_known_warnings(validated: dict[Path, list[str]]) -> None:
    errors = {path.name: [line for line in lines if line.startswith("Error")] for path, lines in validated.items()}
    warnings = {path.name: len(lines) - len(errors[path.name]) for path, lines in validated.items()}
    assert {name: found for name, found in errors.items() if found} == {}
    assert warnings == {name: KNOWN_WARNINGS.get(name, 0) for name in warnings}, [
        line for lines in validated.values() for line in lines
    ]
    for path, lines in validated.items():  # each warning is a lesion's label, and nothing else
        assert all(line.endswith('TEXT (121106,DCM,"Comment"): Content Item not in template') for line in lines)
        assert len(lines) == _labels(path) if path.name.endswith("-SR.dcm") else not lines


def test_the_validator_sees_what_the_issue_reported(validated: dict[Path, list[str]], tmp_path: Path) -> None:
    """The check can fail: a key-image flag with highdicom's concept names back on its
    references, and an SR whose procedure is not in CID 100, are the issue's errors."""
    import pydicom

    kos = pydicom.dcmread(next(p for p in validated if p.name == "malignant-KO.dcm"))
    for item in kos.ContentSequence:
        if item.ValueType in ("IMAGE", "COMPOSITE"):
            item.ConceptNameCodeSequence = [pydicom.Dataset()]
            item.ConceptNameCodeSequence[0].update(
                {"CodeValue": "260753009", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Source"}
            )
    sr = pydicom.dcmread(next(p for p in validated if p.name == "malignant-SR.dcm"))
    procedure = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058")
    procedure.ConceptCodeSequence[0].CodeValue = "47079000"
    procedure.ConceptCodeSequence[0].CodeMeaning = "Ultrasonography of breast"
    kos.save_as(tmp_path / "kos.dcm")
    sr.save_as(tmp_path / "sr.dcm")
    found = pixelmed([tmp_path / "kos.dcm", tmp_path / "sr.dcm"])
    assert any("Purpose of Reference (Concept) is forbidden for IMAGE" in line for line in found[tmp_path / "kos.dcm"])
    assert any("not found in context group 100" in line for line in found[tmp_path / "sr.dcm"])


def test_dciodvfy_finds_no_error_either(validated: dict[Path, list[str]]) -> None:
    assert {path.name: dciodvfy_errors(path) for path in validated} == {path.name: [] for path in validated}
