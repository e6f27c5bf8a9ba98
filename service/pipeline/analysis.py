"""Analysis of one study: its stored instances in, a :class:`StudyResult` out.

The work of the worker, without the queue: read each instance from the spool,
prepare its pixels (service.model.imaging), run the model on all frames of the study in
batches (service.model.inference), keep each frame's Grad-CAM heatmap as a ``.npy`` file
for the reports, summarise per instance and per study (``SUMMARY_RULE``), and ask
the similar-case index for the nearest diagnosed studies. Nothing here touches the
ledger or the queue; the task shell (service.pipeline.tasks) claims the study and stores what
this returns. Where the instances come from is the caller's choice (:data:`InstanceReader`):
the spool by default, the node over HTTP for a worker without its files
(service.pipeline.remote), which also keeps the heatmaps in memory for the node to write.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from service.common.deflate import read_instance
from service.common.errors import error_text
from service.common.spool import instance_path, write_atomic_all
from service.ledger import InstanceRecord
from service.model.imaging import PreparedInstance, prepare_instance, resize_map
from service.model.inference import OnnxModel, Prediction
from service.model_card import ModelCard
from service.pipeline.measurement import calibration_header, frame_lesion
from service.pipeline.similar import similar_studies
from service.results import NO_LESION, FrameResult, ImageResult, StudyAttributes, StudyResult, StudySummary
from service.settings import Settings
from service.similar.index import IndexEntry, SimilarCaseIndex

LOG = logging.getLogger(__name__)

#: Reads one stored instance (pixels included); raises OSError, InvalidDicomError,
#: ValueError or EOFError when it cannot, and the instance is skipped with the reason.
InstanceReader = Callable[[InstanceRecord], Dataset]
#: Frames' heatmaps (float32, the size of the frame's crop) by (SOP Instance UID, frame number).
Heatmaps = dict[tuple[str, int], np.ndarray]


@dataclass(frozen=True)
class Analysis:
    """What analysing a study produced: the result to store; when analysed studies
    are indexed (setting ``index_analysed_studies``), the index entries to add once
    the result is stored; each analysed frame's decoded grayscale pixels by
    (SOP Instance UID, frame number), which the reports draw on instead of decoding
    the source again; and each frame's heatmap as written to its ``heatmap_path``
    (or, for a worker without the node's files, to be sent to the node)."""

    result: StudyResult
    index_entries: list[IndexEntry]
    frames: dict[tuple[str, int], np.ndarray]
    heatmaps: Heatmaps


class _Stopwatch:
    """Seconds spent per stage, for ``StudyResult.timings_s``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 6)


def suspicion(classes: Sequence[str], predicted: str) -> int:
    """Rank of a class in the summary rule: the model card lists its classes from
    least to most suspicious (normal, benign, malignant)."""
    return list(classes).index(predicted)


def decisive_frame(frames: Sequence[FrameResult], classes: Sequence[str]) -> FrameResult | None:
    """The most suspicious in-distribution frame (SUMMARY_RULE); ties go to the
    higher probability. Frames outside the model's training domain (not assessed) never decide."""
    judged = [f for f in frames if not f.out_of_distribution]
    if not judged:
        return None
    return max(judged, key=lambda f: (suspicion(classes, f.predicted), f.probabilities[f.predicted]))


def summarise_study(images: Sequence[ImageResult], classes: Sequence[str]) -> StudySummary:
    """The study's answer by SUMMARY_RULE. When images were analysed but every one
    is outside the model's training domain, there is no class: ``predicted`` is None and
    ``out_of_distribution`` says why."""
    decided = [i for i in images if i.predicted is not None and i.probability is not None]
    if not decided:
        analysed = any(i.frames for i in images)
        return StudySummary(
            predicted=None, probability=None, decisive_sop_instance_uid=None, out_of_distribution=analysed
        )
    best = max(decided, key=lambda i: (suspicion(classes, i.predicted or ""), i.probability or 0.0))
    return StudySummary(
        predicted=best.predicted,
        probability=best.probability,
        decisive_sop_instance_uid=best.sop_instance_uid,
        out_of_distribution=False,
    )


def spool_reader(settings: Settings) -> InstanceReader:
    """Instances from this process's own spool folder (so worker hosts may mount a
    shared volume anywhere). A deflated data set inflates within ``max_dataset_mb``
    (InflatedTooLarge is a ValueError), as the receiver judged it."""

    def read(rec: InstanceRecord) -> Dataset:
        path = instance_path(settings.spool_dir, rec.study_uid, rec.sop_instance_uid)
        return read_instance(path, settings.max_dataset_mb << 20)

    return read


def _read(rec: InstanceRecord, read: InstanceReader) -> Dataset | str:
    """The stored instance, or why it cannot be read."""
    try:
        return read(rec)
    except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
        return f"cannot read the stored instance ({error_text(exc)})"


def heatmap_file(folder: Path, sop_instance_uid: str, frame_number: int) -> Path:
    """Where a frame's heatmap lives in the node's ``results_dir/<study>/<generation>`` folder."""
    return (folder / f"{sop_instance_uid}-f{frame_number}.npy").resolve()


def _npy(heatmap: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, heatmap.astype(np.float32), allow_pickle=False)
    return buffer.getvalue()


def lesion_maps(card: ModelCard, prediction: Prediction) -> tuple[np.ndarray, float] | None:
    """The lesion maps (one per input row) and the card's threshold for them when the
    model outlines lesions (its card names a segmentation, its prediction holds the
    maps), else None."""
    spec = getattr(card, "segmentation", None)
    maps = getattr(prediction, "lesion_mask", None)
    if spec is None or maps is None:
        return None
    return maps, float(spec.threshold)


def _frame_results(
    prepared: PreparedInstance,
    prediction: Prediction,
    first_row: int,
    card: ModelCard,
    heatmap_dir: Path,
    sop_instance_uid: str,
    heatmaps: Heatmaps,
    header: Dataset,
) -> list[FrameResult]:
    """Each frame's outputs; the guard's threshold goes beside its score, so a report
    can say "score against threshold" for a frame it does not assess. A frame the
    model assesses and finds a lesion in gets the lesion outlined and measured on its
    image (``header``: its calibration)."""
    classes = card.classes
    segmentation = lesion_maps(card, prediction)
    frames = []
    for k, frame in enumerate(prepared.frames):
        row = first_row + k
        x0, y0, x1, y1 = frame.crop
        heatmap_path = heatmap_file(heatmap_dir, sop_instance_uid, frame.frame_number)
        heatmaps[(sop_instance_uid, frame.frame_number)] = resize_map(prediction.gradcam[row], x1 - x0, y1 - y0).astype(
            np.float32
        )
        probabilities = {c: round(float(p), 6) for c, p in zip(classes, prediction.probabilities[row], strict=True)}
        predicted = classes[int(prediction.predicted[row])]
        out_of_distribution = bool(prediction.out_of_distribution[row])
        lesion = None
        if segmentation is not None and not out_of_distribution and predicted != NO_LESION:
            maps, threshold = segmentation
            lesion = frame_lesion(maps[row], frame.crop, threshold, header)
        frames.append(
            FrameResult(
                frame_number=frame.frame_number,
                probabilities=probabilities,
                predicted=predicted,
                out_of_distribution=out_of_distribution,
                ood_distance=round(float(prediction.ood_distance[row]), 6),
                ood_threshold=card.ood.threshold,
                heatmap_path=str(heatmap_path),
                crop=frame.crop,
                embedding=[round(float(v), 7) for v in prediction.embedding[row]],
                lesion_threshold=segmentation[1] if segmentation is not None else None,
                lesion=lesion,
            )
        )
    return frames


def _image_result(
    rec: InstanceRecord, n_frames: int, frames: list[FrameResult], skipped: str | None, classes: Sequence[str]
) -> ImageResult:
    """One instance: its frames and the most suspicious in-distribution one as its answer."""
    decisive = decisive_frame(frames, classes)
    return ImageResult(
        sop_instance_uid=rec.sop_instance_uid,
        series_uid=rec.series_uid,
        sop_class_uid=rec.sop_class_uid,
        skipped=skipped,
        frames=frames,
        number_of_frames=n_frames,
        predicted=decisive.predicted if decisive else None,
        probability=decisive.probabilities[decisive.predicted] if decisive else None,
        out_of_distribution=bool(frames) and decisive is None,
    )


def analyse_study(
    settings: Settings,
    model: OnnxModel,
    study_uid: str,
    generation: int,
    instances: Sequence[InstanceRecord],
    index: SimilarCaseIndex | None = None,
    *,
    read: InstanceReader | None = None,
    write_heatmaps: bool = True,
) -> Analysis:
    """Analyse every instance of one study (generation ``generation``).

    An instance that cannot or should not be judged is kept in the result with its
    skip reason; it never fails the study. ``index`` (None: no similar-case index is
    configured yet) is queried with the in-distribution frames' embeddings.
    ``read``: where the instances come from (default: the spool);
    ``write_heatmaps``: False keeps them in memory only (``Analysis.heatmaps``).
    """
    read = read or spool_reader(settings)
    clock = _Stopwatch()
    classes = model.card.classes
    prepared: dict[str, PreparedInstance | str] = {}
    calibrations: dict[str, Dataset] = {}  # what measuring a lesion needs of each image
    study: StudyAttributes | None = None
    for rec in instances:  # one instance in memory at a time: cine loops can be large
        if rec.ignored_reason:
            prepared[rec.sop_instance_uid] = rec.ignored_reason
            continue
        with clock.stage("read_s"):
            ds = _read(rec, read)
        if isinstance(ds, str):
            prepared[rec.sop_instance_uid] = ds
            continue
        if study is None:
            study = study_attributes(ds, index)
        calibrations[rec.sop_instance_uid] = calibration_header(ds)
        with clock.stage("prepare_s"):
            prepared[rec.sop_instance_uid] = prepare_instance(ds, model.card.input, settings.max_cine_frames)
    study = study or StudyAttributes()
    tensors = [f.tensor for p in prepared.values() if isinstance(p, PreparedInstance) for f in p.frames]
    with clock.stage("inference_s"):
        prediction = model.run(np.stack(tensors) if tensors else np.zeros((0, 1, 1, 1), np.float32))
    heatmaps: Heatmaps = {}
    with clock.stage("heatmaps_s"):
        images = _image_results(
            instances,
            prepared,
            prediction,
            model.card,
            calibrations,
            settings.results_dir / study_uid / str(generation),
            heatmaps,
        )
        if write_heatmaps:
            save_heatmaps(images, heatmaps, settings.durability == "fsync")
    for image in images:
        if image.skipped:
            LOG.info("instance %s skipped: %s", image.sop_instance_uid, image.skipped, extra={"study_uid": study_uid})
    similar, index_version, entries = [], None, []
    if index is not None:
        with clock.stage("similar_s"):
            index_version = index.version
            similar = similar_studies(settings, index, study_uid, images, study.patient_key)
        if settings.index_analysed_studies:
            entries = index_entries(study_uid, images, classes, study, settings.spool_dir)
    clock.seconds["total_s"] = round(sum(clock.seconds.values()), 6)
    result = StudyResult(
        study_uid=study_uid,
        generation=generation,
        model=model.identity,
        study=study,
        index_version=index_version,
        images=images,
        summary=summarise_study(images, classes),
        similar=similar,
        timings_s=clock.seconds,
        execution_provider=model.provider,
    )
    frames = {
        (uid, f.frame_number): f.gray
        for uid, p in prepared.items()
        if isinstance(p, PreparedInstance)
        for f in p.frames
    }
    return Analysis(result, entries, frames, heatmaps)


def save_heatmaps(images: Sequence[ImageResult], heatmaps: Heatmaps, durable: bool) -> None:
    """Write each analysed frame's heatmap to its ``heatmap_path`` (temp file, rename;
    with ``durable`` one fsync of the study's folder for all of them)."""
    write_atomic_all(
        [
            (Path(frame.heatmap_path), _npy(heatmaps[(image.sop_instance_uid, frame.frame_number)]))
            for image in images
            for frame in image.frames
        ],
        durable,
    )


def _image_results(
    instances: Sequence[InstanceRecord],
    prepared: dict[str, PreparedInstance | str],
    prediction: Prediction,
    card: ModelCard,
    calibrations: dict[str, Dataset],
    heatmap_dir: Path,
    heatmaps: Heatmaps,
) -> list[ImageResult]:
    """Per instance, in ledger order: its frames' results (rows of ``prediction`` in
    the order the frames were stacked) or its skip reason."""
    images, row = [], 0
    for rec in instances:
        item = prepared[rec.sop_instance_uid]
        if isinstance(item, str):
            images.append(_image_result(rec, 1, [], item, card.classes))
            continue
        frames = _frame_results(
            item, prediction, row, card, heatmap_dir, rec.sop_instance_uid, heatmaps, calibrations[rec.sop_instance_uid]
        )
        row += len(frames)
        images.append(_image_result(rec, item.number_of_frames, frames, item.skipped, card.classes))
    return images


def study_attributes(ds: Dataset, index: SimilarCaseIndex | None) -> StudyAttributes:
    """The study's attributes from one of its instances; the patient only as the
    index's keyed hash (none without an index)."""
    key = index.patient_key(str(ds.get("PatientID", "")), str(ds.get("IssuerOfPatientID", ""))) if index else ""
    return StudyAttributes(
        accession_number=str(ds.get("AccessionNumber", "")),
        study_date=str(ds.get("StudyDate", "")),
        manufacturer=str(ds.get("Manufacturer", "")),
        model_name=str(ds.get("ManufacturerModelName", "")),
        patient_key=key,
    )


def index_entries(
    study_uid: str, images: Sequence[ImageResult], classes: Sequence[str], study: StudyAttributes, spool_dir: Path
) -> list[IndexEntry]:
    """The analysed study as reference images labelled by the AI (unconfirmed): one
    entry per judged instance, from its decisive frame, since the index keys images
    by SOP Instance UID."""
    entries = []
    for image in images:
        frame = decisive_frame(image.frames, classes)
        if frame is None:
            continue
        entries.append(
            IndexEntry(
                embedding=np.asarray(frame.embedding, np.float32),
                sop_instance_uid=image.sop_instance_uid,
                series_uid=image.series_uid,
                study_uid=study_uid,
                sop_class_uid=image.sop_class_uid,
                label=frame.predicted,
                label_source="ai",
                confirmed=False,
                image_path=instance_path(spool_dir, study_uid, image.sop_instance_uid),
                accession_number=study.accession_number,
                study_date=study.study_date,
                patient_key=study.patient_key,
                frame_number=frame.frame_number,
            )
        )
    return entries
