"""The node's similar-case index as the analysis uses it: bound to one model, and the
query of an analysed study's judged frames.

Used by a worker on the node's data folder and, for workers without it
(``data_access = "http"``), by the node's worker routes (service.ops.worker_api):
one implementation of which index a model may use and how a study is matched.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np

from service.results import ImageResult, ModelIdentity, SimilarStudy
from service.settings import Settings
from service.similar.index import SimilarCaseIndex

LOG = logging.getLogger(__name__)


class ModelIndex:
    """The similar-case index for the model at hand, opened once and checked on every
    call: ``sonocase index rebuild`` may swap models under a running process, and two
    models' vectors are never compared. Thread-safe (the node's routes share one)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._index: SimilarCaseIndex | None = None
        self._lock = threading.Lock()

    def current(self) -> SimilarCaseIndex | None:
        """The index last opened, if any."""
        return self._index

    def close(self) -> None:
        with self._lock:
            if self._index is not None:
                self._index.close()
                self._index = None

    def for_model(self, model: ModelIdentity) -> SimilarCaseIndex | None:
        """The index for ``model``, or None while there is none (nor should be:
        ``index_analysed_studies`` creates it) or it holds another model's embeddings."""
        with self._lock:
            if self._index is not None:
                bound = self._index.bound_model
                if bound is None or bound.sha256 != model.sha256:
                    self._index.close()
                    self._index = None
            if self._index is None:
                try:
                    existing = SimilarCaseIndex.from_settings(self.settings, None)
                except FileNotFoundError:
                    if not self.settings.index_analysed_studies:
                        return None
                else:
                    bound = existing.bound_model
                    existing.close()
                    if bound is not None and bound.sha256 != model.sha256:
                        LOG.warning(
                            "similar-case index %s holds embeddings of model %s %s, not %s %s: similar "
                            "cases stay empty until 'sonocase index rebuild'",
                            self.settings.effective_index_dir,
                            bound.name,
                            bound.version,
                            model.name,
                            model.version,
                        )
                        return None
                self._index = SimilarCaseIndex.from_settings(self.settings, model)
            return self._index


def similar_studies(
    settings: Settings, index: SimilarCaseIndex, study_uid: str, images: Sequence[ImageResult], patient_key: str
) -> list[SimilarStudy]:
    """The diagnosed studies nearest the study's in-distribution frames, none of this
    study or of its patient (``patient_key``, the index's keyed hash)."""
    judged = [(image, f) for image in images for f in image.frames if not f.out_of_distribution]
    if not judged or settings.similar_studies <= 0:
        return []
    return index.query(
        np.asarray([f.embedding for _, f in judged], np.float32),
        settings.similar_studies,
        exclude_study_uid=study_uid,
        exclude_patient_key=patient_key or None,
        confirmed_only=settings.similar_confirmed_only,
        query_sop_instance_uids=[image.sop_instance_uid for image, _ in judged],
    )
