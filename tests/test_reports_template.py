"""The SR template: the shipped one is valid, and every kind of mistake a site can
make is refused with a message that names the file and the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.model_card import DISCLAIMER
from service.reports.template import (
    TemplateError,
    load_template,
    validate_template_setting,
)
from service.settings import load_settings
from tests.support.reports import DEFAULT_TEMPLATE


def _edited(tmp_path: Path, edit: object) -> Path:
    raw = json.loads(DEFAULT_TEMPLATE.read_text())
    edit(raw)  # type: ignore[operator]
    path = tmp_path / "site.json"
    path.write_text(json.dumps(raw))
    return path


def test_shipped_template_is_the_default_setting_and_valid() -> None:
    settings = load_settings()
    assert settings.sr_template.resolve() == DEFAULT_TEMPLATE
    template = validate_template_setting(settings.sr_template, ["normal", "benign", "malignant"])
    assert template.disclaimer == DISCLAIMER
    assert {c.finding.scheme for c in template.classes.values()} == {"SCT"}
    assert template.classes["malignant"].finding.value == "254837009"
    assert template.concepts.probability_scale == 100.0  # percent, as OHIF labels read it


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda t: t.update(colour="red"), "colour: Extra inputs are not permitted"),
        (lambda t: t["classes"]["benign"]["finding"].pop("value"), "classes.benign.finding.value: Field required"),
        (lambda t: t["device"].update(name=""), "device.name"),
        (lambda t: t["concepts"]["classification"].update(meaning="x" * 65), "concepts.classification.meaning"),
        (lambda t: t["wording"].update(similar_line="{rank} {patient_name}"), "wording.similar_line"),
        (lambda t: t["wording"].update(sc_caption="{probability:.0%"), "wording.sc_caption"),
        (lambda t: t.update(coding_schemes=[]), "concepts.out_of_distribution: local coding scheme '99SONOCASE'"),
        (lambda t: t.update(disclaimer=""), "disclaimer"),
        (
            lambda t: t["concepts"]["probability_unit"].update(value="mm"),
            "concepts: Value error, probability_unit must be UCUM '%' or '1', not UCUM 'mm'",
        ),
        (lambda t: t["wording"].update(segment_label="{level}"), "wording.segment_label"),
        (lambda t: t["birads"].pop("4B"), "birads must have an entry for each of ['1', '3', '4A', '4B', '4C', '5']"),
        (lambda t: t["wording"].update(birads_line="{category} {patient}"), "wording.birads_line"),
    ],
)
def test_bad_template_names_the_key(tmp_path: Path, edit: object, named: str) -> None:
    path = _edited(tmp_path, edit)
    with pytest.raises(TemplateError) as info:
        load_template(path)
    assert str(path) in str(info.value)
    assert named in str(info.value)


def test_unreadable_or_broken_json_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="cannot be read"):
        load_template(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"template_version": 1,\n "title": }')
    with pytest.raises(TemplateError, match=r"not valid JSON: .* line 2"):
        load_template(broken)


def test_model_classes_the_template_cannot_code_stop_the_start() -> None:
    with pytest.raises(TemplateError, match=r"classes\.cyst"):
        validate_template_setting(DEFAULT_TEMPLATE, ["normal", "cyst"])
    template = load_template(DEFAULT_TEMPLATE)
    with pytest.raises(TemplateError, match=r"no entry classes.cyst"):
        template.class_spec("cyst")
