"""Training data: every source yields :class:`training.records.Record` objects.

Sources: the BUSI folder layout (:func:`load_busi`), a folder of DICOM files with a
label CSV (:func:`load_dicom_labels`) and the synthetic phantom
(:func:`generate_records`, :func:`write_busi_layout`, :func:`write_dicom_dataset`,
:func:`synthetic_study`). Splits that keep patients and near-duplicates together:
:func:`stratified_split`, :func:`stratified_group_kfold`.
"""

from training.data.busi import load_busi
from training.data.dicom_csv import load_dicom_labels
from training.data.splits import (
    near_duplicate_groups,
    stratified_group_kfold,
    stratified_split,
)
from training.data.synthetic import (
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
