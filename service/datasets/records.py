"""The one record type every data source yields, so training never cares where
images came from (BUSI folder, DICOM + CSV, synthetic generator)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASSES: tuple[str, ...] = ("normal", "benign", "malignant")


@dataclass(frozen=True)
class Record:
    """One labelled image.

    ``image`` is uint8 grayscale H x W; ``mask`` is bool H x W (lesion) or None;
    ``group`` keys images that must stay in the same split (same patient/study or
    near-duplicates); ``source`` says where it came from (a path or UID).
    """

    image: np.ndarray
    label: int
    mask: np.ndarray | None
    group: str
    source: str

    @property
    def label_name(self) -> str:
        return CLASSES[self.label]
