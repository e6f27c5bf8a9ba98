"""Source instances made fit to copy into what we write.

Lenient with what arrives, strict with what leaves. highdicom copies attributes of a
source instance into every object we write (the SR takes the Patient and Study
modules of the study's first image, each SC the same of its own image and the
acquisition equipment), and pydicom, highdicom and our validation gate rightly refuse
values their VR does not allow. Archives are full of them: ACR-NEMA dates
(``1994.11.05``), times with colons (``11:20:00``), ISO dates (``1962-08-24``),
accession numbers longer than 16 characters, names longer than 64.

:func:`repair_values` makes every value of a data set valid for its VR, in place:
repaired where the meaning is unambiguous (a date or time written with separators, a
code string in lower case, a name or a description cut to its VR's length), left
empty where it is not. An identifier (an accession number, a patient ID) is never
cut: a shortened one could name another study or patient. Each change is listed by
attribute keyword and what was done, never with the value, so it can be logged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pydicom
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import format_number_as_ds, validate_value

#: Value representations held as bytes or numbers: nothing to repair there.
_BINARY = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "AT", "FL", "FD", "SL", "SS", "SV", "UL", "US", "UV"})
#: Text VRs and their maximum length in characters (PS3.5 Table 6.2-1; None: no limit to cut to).
_TEXT_LENGTHS: dict[str, int | None] = {
    "AE": 16,
    "CS": 16,
    "LO": 64,
    "LT": 10240,
    "SH": 16,
    "ST": 1024,
    "UC": None,
    "UR": None,
    "UT": None,
}
_DATE_SEPARATED = re.compile(r"(\d{4})[.\-/](\d{2})[.\-/](\d{2})")
_TIME_SEPARATED = re.compile(r"(\d{2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?")
_DATETIME_ISO = re.compile(r"(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?([+-]\d{4})?")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1a\x1c-\x1f\x7f]")
#: A person name's component group (alphabetic, ideographic, phonetic) holds 64 characters.
_PN_GROUP = 64


@dataclass(frozen=True)
class Repair:
    """One change to a source value: where (a keyword path), its VR and what was done."""

    where: str
    vr: str
    action: str

    def __str__(self) -> str:
        return f"{self.where} ({self.vr}): {self.action}"


def is_identifier(keyword: str) -> bool:
    """Attributes whose value identifies something (never shortened, only left out)."""
    return keyword.endswith(("ID", "IDs", "Number", "Numbers", "Identifier", "UID")) or "Number" in keyword


def _valid(vr: str, value: object) -> bool:
    try:
        validate_value(vr, value, config.RAISE)
    except ValueError:
        return False
    return True


def _real_date(text: str) -> bool:
    try:
        date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return False
    return True


def _repaired(vr: str, keyword: str, text: str) -> tuple[str, str] | None:
    """``text`` made valid for ``vr`` and what was done, or None when it cannot be
    without guessing."""
    if vr == "DA" and (match := _DATE_SEPARATED.fullmatch(text.strip())) and _real_date("".join(match.groups())):
        return "".join(match.groups()), "date rewritten as YYYYMMDD"
    if vr == "TM" and (match := _TIME_SEPARATED.fullmatch(text.strip())):
        hours, minutes, seconds, fraction = match.groups()
        return f"{hours}{minutes}{seconds or ''}{fraction or ''}", "time rewritten as HHMMSS"
    if vr == "DT" and (match := _DATETIME_ISO.fullmatch(text.strip())):
        *parts, offset = match.groups()
        return "".join(p for p in parts if p) + (offset or ""), "date and time rewritten as YYYYMMDDHHMMSS"
    if vr == "CS" and _valid(vr, text.strip().upper()):
        return text.strip().upper(), "code string in upper case"
    if vr == "DS":
        try:
            return format_number_as_ds(float(text)), "decimal string shortened"
        except (ValueError, OverflowError):
            return None
    if vr == "PN":
        groups = [group[:_PN_GROUP].rstrip("^ ") for group in _CONTROL.sub(" ", text).split("=")]
        return "=".join(groups).rstrip("="), f"name cut to {_PN_GROUP} characters per component group"
    if vr in _TEXT_LENGTHS and not is_identifier(keyword):
        limit = _TEXT_LENGTHS[vr]
        cleaned = _CONTROL.sub(" ", text) if vr in ("AE", "CS", "LO", "PN", "SH", "UC") else text
        return cleaned[
            :limit
        ] if limit else cleaned, f"cut to {limit} characters" if limit else "control characters removed"
    return None


def _text(value: object) -> str:
    """What a value was written as (pydicom's number classes keep it; a name is its
    decoded text)."""
    original = getattr(value, "original_string", None)
    return original if isinstance(original, str) and original else str(value)


def _repair_element(elem: DataElement, where: str) -> Repair | None:
    values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
    kept, actions = [], set()
    for value in values:
        if value is None or value == "" or _valid(elem.VR, _text(value)):
            kept.append(value)
            continue
        repaired = _repaired(elem.VR, elem.keyword, _text(value))
        if repaired is not None and _valid(elem.VR, repaired[0]):
            kept.append(repaired[0])
            actions.add(repaired[1])
        else:
            kept.append("")  # an empty value keeps the others in their positions
            actions.add(f"left out: not a valid {elem.VR}")
    if not actions:
        return None
    elem.value = (kept if len(kept) > 1 else kept[0]) if any(v not in (None, "") for v in kept) else None
    return Repair(where, elem.VR, "; ".join(sorted(actions)))


def repair_values(ds: Dataset, path: str = "") -> list[Repair]:
    """Make every public value of ``ds`` (and of its sequences' items) valid for its
    VR, in place; return what was changed (see the module's docstring)."""
    repairs = []
    for elem in ds:
        if elem.tag.is_private or elem.tag.group == 0x0002 or elem.tag.element == 0:
            continue
        where = f"{path}{elem.keyword or elem.tag}"
        if elem.VR == "SQ":
            for n, item in enumerate(elem.value):
                repairs += repair_values(item, f"{where}[{n}].")
        elif elem.VR not in _BINARY and elem.value is not None:
            repair = _repair_element(elem, where)
            if repair is not None:
                repairs.append(repair)
    return repairs


def read_source(path: Path, stop_before_pixels: bool = True) -> tuple[Dataset, list[Repair]]:
    """A source instance from the spool with every value valid (see :func:`repair_values`)."""
    ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    return ds, repair_values(ds)
