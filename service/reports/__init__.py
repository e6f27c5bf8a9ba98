"""Stage 3, reports: turning an analysed study into DICOM objects the PACS stores and viewers show.

``template`` reads the site-adaptable SR wording and codes, ``heatmaps`` turns a
frame's Grad-CAM map into an outline and levels, ``sr`` builds the TID 1500
Structured Report, ``sc`` the Grad-CAM and similar-cases Secondary Captures, ``seg``
the heatmap overlay (Segmentation), ``kos`` the key-image flag (Key Object
Selection), ``validation`` is the gate every object passes before it may leave,
``construction`` the one place that goes round highdicom's internals for speed
(with ``sr_content``, the SR's content items copied from prototypes) and
``encoding`` pydicom's writer (setting ``fast_reports``), and ``build`` ties them
together for the worker: build, check, write to the outbox, queue.
"""

from __future__ import annotations

from dataclasses import dataclass

from highdicom._standard_utils import get_sop_class_iod_map
from pydicom.uid import UltrasoundImageStorage, UltrasoundMultiFrameImageStorage, generate_uid

from service.ingest.rules import UltrasoundImageStorageRetired, UltrasoundMultiFrameImageStorageRetired


def _know_the_retired_ultrasound_classes() -> None:
    """highdicom copies a source's patient and study attributes, and tells whether
    it is multi-frame, through its table of today's IODs, which lacks the two
    retired ultrasound classes older scanners still send (the receiver accepts
    them): it would fail every report of such a study. They hold the modules of
    their successors, so the table gets them under those IODs (highdicom's own
    cached table: private, checked by tests/test_reports_build.py)."""
    iods = get_sop_class_iod_map()
    iods.setdefault(UltrasoundImageStorageRetired, iods[UltrasoundImageStorage])
    iods.setdefault(UltrasoundMultiFrameImageStorageRetired, iods[UltrasoundMultiFrameImageStorage])


_know_the_retired_ultrasound_classes()


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
