"""The documents say what the code does: every setting is documented (and the
example file's values are the real defaults), the conformance statement's SOP
classes, transfer syntaxes, statuses and constants are the receiver's, sender's and
report builder's, and the guides quote the shipped model card and SR template."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest
from pydicom.uid import UID

from service.ingest import rules, server
from service.model_card import ModelCard
from service.reports.build import SENT_CLASSES
from service.reports.template import load_template
from service.settings import ENV_PREFIX, Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLE = DOCS / "sonocase.example.toml"
CONFORMANCE = (DOCS / "conformance.md").read_text()
IT_GUIDE = (DOCS / "it-guide.md").read_text()
RADIOLOGIST = (DOCS / "radiologist-guide.md").read_text()


def _flat(text: str) -> str:
    """Prose with its line breaks undone, to look for phrases across wrapped lines."""
    return " ".join(text.split())


SETTINGS = list(Settings.model_fields)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)


def _key_lines() -> dict[str, list[tuple[int, bool]]]:
    """setting -> [(line number, commented out)] for every ``key = value`` line."""
    found: dict[str, list[tuple[int, bool]]] = {}
    for number, line in enumerate(EXAMPLE.read_text().splitlines()):
        match = re.match(r"^(#\s*)?([a-z0-9_]+)\s*=", line)
        if match:
            found.setdefault(match[2], []).append((number, bool(match[1])))
    return found


def test_example_toml_documents_every_setting_line_by_line() -> None:
    keys = _key_lines()
    assert set(keys) == set(SETTINGS), "every setting, and nothing else, in the example file"
    lines = EXAMPLE.read_text().splitlines()
    for key, occurrences in keys.items():
        first = occurrences[0][0]
        assert lines[first - 1].startswith("#"), f"{key}: no explanation above it"


def test_example_toml_values_are_the_defaults(clean_env: None) -> None:
    written = tomllib.loads(EXAMPLE.read_text())
    loaded = load_settings(EXAMPLE)
    defaults = Settings()
    assert written, "the example sets the plain settings to their defaults"
    for key in written:
        assert getattr(loaded, key) == getattr(defaults, key), key
    commented = {k for k, occ in _key_lines().items() if all(c for _, c in occ)}
    assert commented == set(SETTINGS) - set(written)
    for key in commented:  # only settings whose default is unset or a path of the installation
        assert getattr(defaults, key) is None or isinstance(getattr(defaults, key), Path), key


def test_it_guide_lists_every_setting_and_no_other() -> None:
    expected = {ENV_PREFIX + name.upper() for name in SETTINGS} | {ENV_PREFIX + "CONFIG"}
    table = IT_GUIDE[IT_GUIDE.index("## 4. Settings") : IT_GUIDE.index("## 5.")]
    rows = set(re.findall(r"^\| `(SONOCASE_[A-Z0-9_]+)` \|", table, re.M))
    assert rows == expected
    for text in (IT_GUIDE, CONFORMANCE, RADIOLOGIST, EXAMPLE.read_text()):
        assert set(re.findall(r"\bSONOCASE_[A-Z][A-Z0-9_]*[A-Z0-9]\b", text)) <= expected


def _uids(section: str) -> list[str]:
    start = CONFORMANCE.index(f"<!-- {section}:")
    block = CONFORMANCE[start : CONFORMANCE.index("<!-- end -->", start)]
    rows = re.findall(r"^\| ([^|]+) \| `([0-9.]+)` \|", block, re.M)
    for name, uid in rows:
        assert name.replace(" (Retired)", "") == UID(uid).name, f"{uid} is not {name}"
    return [uid for _, uid in rows]


def test_conformance_sop_classes_and_transfer_syntaxes_are_the_code_s() -> None:
    assert _uids("sop-classes-accepted") == list(rules.STORAGE_SOP_CLASSES)
    assert _uids("transfer-syntaxes-accepted") == list(rules.TRANSFER_SYNTAXES)
    assert _uids("sop-classes-sent") == list(SENT_CLASSES)


def test_conformance_constants_and_statuses_are_the_receiver_s() -> None:
    assert f"`{rules.IMPLEMENTATION_CLASS_UID}`" in CONFORMANCE
    assert f"`{rules.IMPLEMENTATION_VERSION_NAME}`" in CONFORMANCE
    assert f"{server.MAX_PDU_BYTES:,} bytes" in CONFORMANCE
    statuses = CONFORMANCE[CONFORMANCE.index("| Status | Meaning | When |") :]
    statuses = statuses[: statuses.index("\n\n")]
    documented = {int(code, 16) for code in re.findall(r"^\| `([0-9A-F]{4})` \|", statuses, re.M)}
    assert documented == {int(s) for s in rules.StoreStatus}
    for reason in rules.RejectReason:
        assert f"reason {int(reason)} ({reason.name.lower().replace('_', ' ').replace('ae', 'AE')})" in CONFORMANCE


def test_docs_quote_the_shipped_sr_template(clean_env: None) -> None:
    template = load_template(Settings().sr_template)
    conformance = _flat(CONFORMANCE)
    for series in (template.sr_series, template.sc_series, template.seg_series, template.kos_series):
        assert f'Series Number {series.number}, "{series.description}"' in conformance
        assert f'| {series.number} "{series.description}" |' in RADIOLOGIST
    for cls in template.classes.values():
        assert f'{cls.finding.value} {cls.finding.scheme} "{cls.finding.meaning}"' in conformance
    concepts = template.concepts
    for code in (template.title, template.procedure_reported, concepts.probability_unit, concepts.classification):
        assert f'({code.value}, {code.scheme}, "{code.meaning}")' in conformance


def test_radiologist_guide_matches_the_shipped_model_card(clean_env: None) -> None:
    card = ModelCard.load(Settings().model_path)
    guide = _flat(RADIOLOGIST)
    assert f"than {card.ood.percentile:g} % of the validation images" in guide
    assert " / ".join(f"**{c}**" for c in card.classes) in guide.replace(", ", " / ")
    assert f"up to {Settings().max_cine_frames} evenly spaced" in guide
    assert f"Up to {Settings().similar_studies} studies" in guide
    assert "not for primary diagnosis" in guide.lower() and "not for primary diagnosis" in CONFORMANCE.lower()


def test_relative_links_resolve() -> None:
    for doc in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"
    assert "## 4. Settings" in IT_GUIDE  # the #settings anchor the other documents use
