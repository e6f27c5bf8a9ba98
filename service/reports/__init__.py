"""Stage 3, reports: turning an analysed study into DICOM objects the PACS stores and viewers show.

``template`` reads the site-adaptable SR wording and codes, ``heatmaps`` turns a
frame's Grad-CAM map into an outline and levels, ``sr`` builds the TID 1500
Structured Report, ``sc`` the Grad-CAM and similar-cases Secondary Captures, ``seg``
the heatmap overlay (Segmentation), ``kos`` the key-image flag (Key Object
Selection), ``validation`` is the gate every object passes before it may leave, and
``build`` ties them together for the worker: build, check, write to the outbox, queue.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.uid import generate_uid


def derived_uid(*parts: object) -> str:
    """A UID fixed by what it names (study, generation, object kind, source...), so
    building the same study's reports again yields the same objects, never copies."""
    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


@dataclass(frozen=True)
class Placement:
    """Where a new object goes and what wrote it: the same for every object of one
    kind in a study but its SOP Instance UID and number."""

    series_uid: str
    sop_uid: str
    instance_number: int
    software_versions: list[str]
