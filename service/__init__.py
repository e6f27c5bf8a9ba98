"""Sonocase: a DICOM node for breast-ultrasound AI. Not for primary diagnosis."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
