"""Labelled ultrasound images: every source yields :class:`service.datasets.records.Record` objects.

Sources: the BUSI folder layout (:func:`load_busi`), a folder of DICOM files with a
label CSV (:func:`load_dicom_labels`) and the synthetic phantom
(:func:`generate_records`, :func:`write_busi_layout`, :func:`write_dicom_dataset`,
:func:`synthetic_study`). Splits that keep patients and near-duplicates together:
:func:`stratified_split`, :func:`stratified_group_kfold`.

Shared by ``training`` (which imports ``service``, never the reverse) and by the
node itself: the demo's synthetic studies, ``sonocase index build --busi``.
"""

from service.datasets.busi import load_busi
from service.datasets.dicom_csv import load_dicom_labels
from service.datasets.splits import (
    near_duplicate_groups,
    stratified_group_kfold,
    stratified_split,
)
from service.datasets.synthetic import (
    generate_records,
    synthetic_study,
    write_busi_layout,
    write_dicom_dataset,
    write_dicom_study,
)

__all__ = [
    "generate_records",
    "load_busi",
    "load_dicom_labels",
    "near_duplicate_groups",
    "stratified_group_kfold",
    "stratified_split",
    "synthetic_study",
    "write_busi_layout",
    "write_dicom_dataset",
    "write_dicom_study",
]
