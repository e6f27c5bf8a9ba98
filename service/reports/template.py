"""The SR template: every code, concept name and sentence the report builders write.

It lives in ``dicom_sr_templates/`` as JSON so a site can translate the wording or
swap a code without touching Python. It is validated strictly (unknown keys are
errors, format strings are tried with sample values, local coding schemes must be
declared) when the node starts, so a typo stops the node instead of producing
reports that viewers misread.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydicom.sr.coding import Code

from service.reports.birads import CATEGORIES


class TemplateError(ValueError):
    """An SR template that cannot be used; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeSpec(_Strict):
    """A coded concept: (code value, coding scheme designator, code meaning)."""

    value: str = Field(min_length=1, max_length=64)
    scheme: str = Field(min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)
    scheme_version: str | None = None

    def code(self) -> Code:
        return Code(self.value, self.scheme, self.meaning, self.scheme_version)


class CodingSchemeSpec(_Strict):
    """A local ("99...") coding scheme the SR declares in its Coding Scheme
    Identification Sequence, as PS3.16 asks for private codes."""

    designator: str = Field(min_length=1, max_length=16)
    name: str
    responsible_organization: str


#: UCUM units a probability may be written in, and the factor from a fraction 0..1.
PROBABILITY_SCALES = {"%": 100.0, "1": 1.0}


class Concepts(_Strict):
    """Concept names; ``classification`` names the coded finding of each image."""

    classification: CodeSpec
    probability_unit: CodeSpec
    out_of_distribution: CodeSpec
    yes: CodeSpec
    not_assessed: CodeSpec
    ood_score: CodeSpec
    ood_threshold: CodeSpec
    score_unit: CodeSpec
    study_summary: CodeSpec
    summary_rule: CodeSpec
    similar_study: CodeSpec
    not_analysed: CodeSpec
    comment: CodeSpec
    qualitative_evaluations: CodeSpec
    heatmap_image: CodeSpec
    heatmap_segmentation: CodeSpec
    segment_category: CodeSpec
    segment_type: CodeSpec
    key_images_title: CodeSpec
    long_axis: CodeSpec
    short_axis: CodeSpec
    length_unit: CodeSpec
    area: CodeSpec
    area_unit: CodeSpec
    birads_band: CodeSpec

    @model_validator(mode="after")
    def _probability_unit(self) -> Concepts:
        unit = self.probability_unit
        if unit.scheme != "UCUM" or unit.value not in PROBABILITY_SCALES:
            raise ValueError(
                f"probability_unit must be UCUM {' or '.join(map(repr, PROBABILITY_SCALES))}, "
                f"not {unit.scheme} {unit.value!r}"
            )
        return self

    @property
    def probability_scale(self) -> float:
        """What a probability (a fraction 0..1) is multiplied by to be written in the unit."""
        return PROBABILITY_SCALES[self.probability_unit.value]


class ClassSpec(_Strict):
    """How one model class is written: its coded finding, the concept name of its
    probability measurement, and the word people read."""

    display: str = Field(min_length=1)
    finding: CodeSpec
    probability: CodeSpec


class DeviceSpec(_Strict):
    """Our node as the SR's observer device and the objects' equipment."""

    name: str = Field(min_length=1, max_length=64)
    manufacturer: str = Field(min_length=1, max_length=64)
    model_name: str = Field(min_length=1, max_length=64)
    serial_number: str = Field(min_length=1, max_length=64)


class SeriesSpec(_Strict):
    number: int = Field(ge=1, le=2**31 - 1)
    description: str = Field(min_length=1, max_length=64)


#: Sample values each wording entry is formatted with when the template loads.
_WORDING_FIELDS: dict[str, dict[str, Any]] = {
    "study_summary": {"label": "Benign", "probability": 0.5, "instance": 1, "frame": 1},
    "no_summary": {},
    "image_group": {"instance": 1, "frame": 1, "label": "Benign", "probability": 0.5, "band": ", AI BI-RADS 4A"},
    "image_band": {"category": "4A"},
    "similar_line": {
        "rank": 1,
        "study_date": "20240101",
        "accession": "A1",
        "label": "benign",
        "label_source": "biopsy",
        "distance": 0.1,
        "similarity": 0.95,
    },
    "not_analysed_line": {"instance": 1, "reason": "no pixel data"},
    "ood": {},
    "guard_score": {"score": 3.2, "threshold": 2.5},
    "not_assessed_line": {"instance": 1, "frame": 1, "reason": "outside the model's training domain"},
    "not_assessed_summary": {},
    "not_assessed_group": {"instance": 1, "frame": 1},
    "sc_not_assessed": {"reason": "outside the model's training domain"},
    "sc_caption": {"label": "Benign", "probability": 0.5},
    "heatmap_legend": {},
    "montage_title": {},
    "montage_query": {"label": "Benign", "probability": 0.5},
    "montage_case": {"rank": 1, "label": "Benign", "label_source": "biopsy"},
    "montage_distance": {"distance": 0.1, "similarity": 0.95},
    "montage_missing": {},
    "segment_label": {"low": 0.25, "high": 0.5},
    "key_images": {"instances": "1, 2"},
    "image_group_no_lesion": {"instance": 1, "frame": 1, "label": "Benign", "probability": 0.5},
    "unmeasured_line": {"instance": 1, "frame": 1, "reason": "the image has no calibration"},
    "birads_line": {"category": "4B", "band": "moderate suspicion", "probability": 0.3, "instance": 1, "frame": 1},
}


class Wording(_Strict):
    """Sentences with ``str.format`` fields (the fields each may use are listed in
    ``dicom_sr_templates/README.md``)."""

    study_summary: str
    no_summary: str
    image_group: str
    image_band: str
    similar_line: str
    not_analysed_line: str
    ood: str
    guard_score: str
    not_assessed_line: str
    not_assessed_summary: str
    not_assessed_group: str
    sc_not_assessed: str
    sc_caption: str
    heatmap_legend: str
    montage_title: str
    montage_query: str
    montage_case: str
    montage_distance: str
    montage_missing: str
    segment_label: str
    key_images: str
    image_group_no_lesion: str
    unmeasured_line: str
    birads_line: str

    @model_validator(mode="after")
    def _formats(self) -> Wording:
        for key, sample in _WORDING_FIELDS.items():
            text = getattr(self, key)
            try:
                text.format(**sample)
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"wording.{key}: {text!r} cannot be formatted ({exc!r}); allowed fields: {sorted(sample) or 'none'}"
                ) from None
        return self


class BandSpec(_Strict):
    """How one BI-RADS likelihood band is written: its code and the words people read."""

    code: CodeSpec
    display: str = Field(min_length=1)


class SrTemplate(_Strict):
    """The whole template (``dicom_sr_templates/default.json``)."""

    template_version: int = Field(ge=1)
    language: CodeSpec
    title: CodeSpec
    procedure_reported: CodeSpec
    finding_site: CodeSpec
    coding_schemes: list[CodingSchemeSpec] = Field(default_factory=list)
    concepts: Concepts
    classes: dict[str, ClassSpec] = Field(min_length=1)
    birads: dict[str, BandSpec]
    device: DeviceSpec
    sr_series: SeriesSpec
    sc_series: SeriesSpec
    seg_series: SeriesSpec
    kos_series: SeriesSpec
    wording: Wording
    disclaimer: str = Field(min_length=1, max_length=1024)

    @model_validator(mode="after")
    def _every_band(self) -> SrTemplate:
        if sorted(self.birads) != sorted(CATEGORIES):
            raise ValueError(f"birads must have an entry for each of {list(CATEGORIES)}, has {sorted(self.birads)}")
        return self

    @model_validator(mode="after")
    def _local_schemes_declared(self) -> SrTemplate:
        declared = {s.designator for s in self.coding_schemes}
        for path, spec in self._codes():
            if spec.scheme.startswith("99") and spec.scheme not in declared:
                raise ValueError(f"{path}: local coding scheme {spec.scheme!r} is not declared in coding_schemes")
        return self

    def _codes(self) -> list[tuple[str, CodeSpec]]:
        found = [(k, getattr(self, k)) for k in ("language", "title", "procedure_reported", "finding_site")]
        found += [(f"concepts.{k}", v) for k, v in self.concepts]
        for name, cls in self.classes.items():
            found += [(f"classes.{name}.finding", cls.finding), (f"classes.{name}.probability", cls.probability)]
        found += [(f"birads.{name}.code", band.code) for name, band in self.birads.items()]
        return found

    def class_spec(self, label: str) -> ClassSpec:
        """The entry for a model class; a clear error when the template lacks it."""
        try:
            return self.classes[label]
        except KeyError:
            raise TemplateError(
                f"the SR template has no entry classes.{label} (it knows {sorted(self.classes)})"
            ) from None

    def check_classes(self, classes: list[str] | tuple[str, ...]) -> None:
        """Fail at start when the model predicts a class the template cannot code."""
        missing = [c for c in classes if c not in self.classes]
        if missing:
            raise TemplateError(
                f"the SR template has no entry for the model's classes {missing} (add classes.{missing[0]})"
            )


def load_template(path: Path) -> SrTemplate:
    """Read and validate a template; :class:`TemplateError` names the file and bad key."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TemplateError(f"SR template {path} cannot be read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise TemplateError(
            f"SR template {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    try:
        return SrTemplate.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in err['loc']) or 'template'}: {err['msg']}" for err in exc.errors()]
        raise TemplateError(f"SR template {path} is invalid:\n  " + "\n  ".join(lines)) from None


def validate_template_setting(template_path: Path, classes: list[str] | None = None) -> SrTemplate:
    """What the node calls at start: load the configured template and, when the
    model's classes are known, check each has an entry."""
    template = load_template(template_path)
    if classes is not None:
        template.check_classes(classes)
    return template
