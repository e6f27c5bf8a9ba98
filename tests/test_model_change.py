"""A model change under a running worker: once the similar-case library is re-embedded
for another model, the worker of the old model stops asking it (results carry no
similar studies instead of failing, and no vectors of two models are compared)."""

from __future__ import annotations

import numpy as np
import pytest

from service.datasets.synthetic import synthetic_study
from service.ledger import Ledger
from service.pipeline.tasks import WorkerState, process_study
from service.results import ModelIdentity, StudyResult
from service.settings import Settings
from service.similar.index import SimilarCaseIndex, StoredImage
from tests.support.worker import receive

NEW_MODEL = ModelIdentity(name="sonocase-hybrid", version="9.0.0", sha256="c" * 64)


def _result(ledger: Ledger, study_uid: str) -> StudyResult:
    stored = ledger.result(study_uid)
    assert stored is not None
    return stored


@pytest.mark.heavy
def test_a_worker_of_the_old_model_stops_using_a_rebuilt_index(
    settings: Settings, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    indexing = settings.model_copy(update={"index_analysed_studies": True, "similar_studies": 3})
    state = WorkerState(indexing)
    first = receive(indexing, ledger, synthetic_study(2, "benign", seed=21))
    assert process_study(state, first) == "analysed"
    second = receive(indexing, ledger, synthetic_study(2, "malignant", seed=22))
    assert process_study(state, second) == "analysed"
    assert [s.study_uid for s in _result(ledger, second).similar] == [first]

    def new_model(image: StoredImage) -> np.ndarray:  # the new model's 16-d embeddings
        vector = np.random.default_rng(len(image.sop_instance_uid)).normal(size=16)
        return (vector / np.linalg.norm(vector)).astype(np.float32)

    with SimilarCaseIndex.from_settings(indexing, NEW_MODEL) as index:  # `sonocase index rebuild`
        assert index.rebuild(new_model).embedded == len(index.stored_images()) > 0
    third = receive(indexing, ledger, synthetic_study(2, "normal", seed=23))
    assert process_study(state, third) == "analysed"
    result = _result(ledger, third)
    assert (result.similar, result.index_version) == ([], None)
    assert "holds embeddings of model sonocase-hybrid 9.0.0" in caplog.text
    with SimilarCaseIndex.from_settings(indexing, None) as index:
        assert index.bound_model == NEW_MODEL
        assert {image.study_uid for image in index.stored_images()} == {first, second}  # the old model added none
