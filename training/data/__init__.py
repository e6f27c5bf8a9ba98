"""Training data: every source yields :class:`training.records.Record` objects.

Sources: the BUSI folder layout (:func:`load_busi`), a folder of DICOM files with a
label CSV (:func:`load_dicom_labels`) and the synthetic phantom
(:func:`generate_records`, :func:`write_busi_layout`, :func:`write_dicom_dataset`,
:func:`synthetic_study`). Splits that keep near-duplicates together live in
:mod:`training.data.splits`.
"""

from training.data.synthetic import (
    generate_records,
    synthetic_study,
    write_busi_layout,
    write_dicom_dataset,
    write_dicom_study,
)

__all__ = [
    "generate_records",
    "synthetic_study",
    "write_busi_layout",
    "write_dicom_dataset",
    "write_dicom_study",
]
