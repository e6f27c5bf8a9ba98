"""Lesion measurement benchmark: the long axis measured on the phantom's true masks
against the truth of its lesion parameters.

For every benign and malignant synthetic view (patients 0..n-1 of each class, one
seed), each lesion wholly inside the picture: its true mask is placed in the DICOM
image the node would receive (Sequence of Ultrasound Regions in cm, the synthetic
study's depth over the picture's height), measured as the node measures it
(service.pipeline.measurement.measure_lesion), and compared with the same definition
(farthest pair of margin points; widest perpendicular extent) applied to the
phantom's exact margin (service.datasets.phantom.lesion_outline). A lesion cut by
the picture's edge is left out and counted: its mask does not hold the whole lesion.

Prints per class and overall the median and 90th percentile of the absolute error,
in mm and %, and the target: median long-axis error within 1 mm and 10 %.

    python bench/measurement.py                     # 60 patients per class, 256 px
    python bench/measurement.py --patients 200 --size 512
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.datasets.dicom_writer import ultrasound_image
from service.datasets.phantom import lesion_outline
from service.datasets.records import CLASSES
from service.datasets.synthetic import patient_views, study_info
from service.model.imaging import ultrasound_region
from service.pipeline.measurement import long_axis, measure_lesion, short_axis

TARGET_MEDIAN_MM = 1.0
TARGET_MEDIAN_PERCENT = 10.0


@dataclass(frozen=True)
class Case:
    """One lesion: true and measured axes in mm."""

    label: str
    true_long: float
    long: float
    true_short: float
    short: float

    @property
    def long_error_mm(self) -> float:
        return abs(self.long - self.true_long)

    @property
    def long_error_percent(self) -> float:
        return 100.0 * self.long_error_mm / self.true_long

    @property
    def short_error_mm(self) -> float:
        return abs(self.short - self.true_short)


def true_axes(margin_px: np.ndarray, mm_per_px: float) -> tuple[float, float]:
    """Long and short axis (mm) of the exact margin, by the measurement's own definition."""
    mm = np.vstack([margin_px, margin_px[:1]]) * mm_per_px
    i, j = long_axis(mm)
    low, high = short_axis(mm, mm[i], mm[j], step_mm=mm_per_px / 20)
    return float(np.linalg.norm(mm[j] - mm[i])), float(np.linalg.norm(high - low))


def cases(patients: int, size: int, seed: int) -> tuple[list[Case], int]:
    """Every lesion of the benign and malignant patients measured, and how many were
    left out because the picture's edge cuts them."""
    found, cut = [], 0
    for label in ("benign", "malignant"):
        index = CLASSES.index(label)
        for patient in range(patients):
            info = study_info(seed, index, patient)
            mm_per_px = 10.0 * info.depth_cm / size
            for number, view in enumerate(patient_views(seed, index, patient, size), start=1):
                header = ultrasound_image(
                    view.image, info, instance_number=number, sop_instance_uid=f"2.25.{number}", variant="mono"
                )
                region = ultrasound_region(header)
                assert region is not None, "a synthetic image always has its picture's region"
                for lesion, mask in zip(view.lesions, view.masks, strict=True):
                    margin = lesion_outline(lesion, size, points=1024)
                    if margin.min() < 0 or margin.max() > size - 1:
                        cut += 1
                        continue
                    measured = measure_lesion(mask, (region[0], region[1]), header)
                    assert measured is not None and measured.long_axis and measured.short_axis, measured
                    true_long, true_short = true_axes(margin, mm_per_px)
                    found.append(
                        Case(label, true_long, measured.long_axis.length_mm, true_short, measured.short_axis.length_mm)
                    )
    return found, cut


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def report(found: list[Case], cut: int, size: int, seed: int) -> str:
    lines = [
        f"# lesion measurement benchmark: phantom {size} px, seed {seed}, true masks; "
        f"{len(found)} lesions measured, {cut} cut by the picture's edge left out",
        "",
        "| lesions | n | true long axis mm (median) | long-axis error mm median / p90 | % median / p90 "
        "| short-axis error mm median / p90 |",
        "|---" * 6 + "|",
    ]
    groups = {
        "benign": [c for c in found if c.label == "benign"],
        "malignant": [c for c in found if c.label == "malignant"],
        "all": found,
    }
    for name, group in groups.items():
        if not group:
            continue
        long_mm = [c.long_error_mm for c in group]
        long_pc = [c.long_error_percent for c in group]
        short_mm = [c.short_error_mm for c in group]
        lines.append(
            f"| {name} | {len(group)} | {statistics.median(c.true_long for c in group):.1f} "
            f"| {statistics.median(long_mm):.2f} / {_percentile(long_mm, 90):.2f} "
            f"| {statistics.median(long_pc):.1f} / {_percentile(long_pc, 90):.1f} "
            f"| {statistics.median(short_mm):.2f} / {_percentile(short_mm, 90):.2f} |"
        )
    median_mm = statistics.median(c.long_error_mm for c in found)
    median_pc = statistics.median(c.long_error_percent for c in found)
    met = median_mm <= TARGET_MEDIAN_MM and median_pc <= TARGET_MEDIAN_PERCENT
    lines += [
        "",
        f"median long-axis error {median_mm:.2f} mm, {median_pc:.1f} % "
        f"(target <= {TARGET_MEDIAN_MM} mm and <= {TARGET_MEDIAN_PERCENT} %: {'met' if met else 'MISSED'})",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=60, help="patients per class (benign, malignant)")
    parser.add_argument("--size", type=int, default=256, help="phantom picture size in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    found, cut = cases(args.patients, args.size, args.seed)
    print(report(found, cut, args.size, args.seed))


if __name__ == "__main__":
    main()
