"""The analysis result of a study, as the worker stores it in the ledger.

Typed, with extra fields forbidden, because three later stages read it: retrieval
fills ``similar``, the report builders turn it into SR and SC objects, and
``sonocase status`` / the web page show it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

#: How the study summary is chosen from its images (also written into the SR).
SUMMARY_RULE = (
    "The most suspicious analysed image decides: malignant if any image is malignant, "
    "else benign if any is benign, else normal; its probability is that image's."
)

#: What the status views say of an image or study the domain guard flagged (the
#: reports take their words from the SR template).
NOT_ASSESSED = "not assessed: outside the model's training domain"


#: The class without a lesion: its frames get no outline and no likelihood band above "negative".
NO_LESION = "normal"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelIdentity(_Strict):
    name: str
    version: str
    sha256: str


class SimilarStudy(_Strict):
    """A previously diagnosed study that looks like the query (best image decides)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str = Field(description="the matching reference image")
    sop_class_uid: str
    accession_number: str = ""
    study_date: str = ""
    label: str
    label_source: str = Field(description="biopsy | radiologist | synthetic | ai")
    distance: float = Field(description="Euclidean distance of L2-normalised embeddings, 0..2")
    similarity: float = Field(description="1 - distance/2, 0..1, for people")
    query_sop_instance_uid: str = ""


class AxisResult(_Strict):
    """A lesion diameter: end points in image coordinates (column, row) and its length."""

    start: tuple[float, float]
    end: tuple[float, float]
    length_mm: float


class LesionResult(_Strict):
    """The lesion the model outlined in a frame (the largest, when it outlined several),
    measured as :mod:`service.pipeline.measurement` measures it."""

    outline: list[tuple[float, float]] = Field(
        description="closed outline (first point = last) in image coordinates (column, row) of the source image"
    )
    components: int = Field(description="how many separate lesions the mask held; the largest is this one")
    long_axis: AxisResult | None = None
    short_axis: AxisResult | None = None
    area_mm2: float | None = None
    unmeasured: str | None = Field(None, description="why there are no millimetres (the image has no calibration)")


class FrameResult(_Strict):
    """The model's output for one analysed frame (frame 1 for single-frame images)."""

    frame_number: int
    probabilities: dict[str, float]
    predicted: str
    out_of_distribution: bool = Field(description="the domain guard flagged it: not assessed, no class is reported")
    ood_distance: float = Field(description="the domain guard's score, higher = more foreign")
    ood_threshold: float | None = Field(
        None,
        description="the model card's threshold the score was held against (None: a result stored before "
        "it was recorded)",
    )
    heatmap_path: str = Field(description="float32 .npy in [0, 1], the size of crop")
    crop: tuple[int, int, int, int] = Field(description="x0, y0, x1, y1 of the analysed region in the source pixels")
    embedding: list[float]
    lesion_threshold: float | None = Field(
        None,
        description="the segmentation threshold the lesion mask was cut at (None: the model outlines no "
        "lesion, or a result stored before it did)",
    )
    lesion: LesionResult | None = Field(None, description="the lesion above the threshold; None: none outlined")


class ImageResult(_Strict):
    """One instance: its analysed frames and a summary, or why it was skipped."""

    sop_instance_uid: str
    series_uid: str
    sop_class_uid: str
    skipped: str | None = None
    frames: list[FrameResult] = Field(default_factory=list)
    predicted: str | None = None
    probability: float | None = None
    out_of_distribution: bool = False
    number_of_frames: int = 1


class StudySummary(_Strict):
    predicted: str | None
    probability: float | None
    decisive_sop_instance_uid: str | None
    out_of_distribution: bool
    rule: str = SUMMARY_RULE


class StudyAttributes(_Strict):
    """The study's headers that monitoring needs: the accession number to match
    outcomes, the date and scanner to group performance by month and scanner; the
    patient only as a keyed hash (service.similar.index), never name, ID or birth date."""

    accession_number: str = ""
    study_date: str = Field("", description="YYYYMMDD as in the header")
    manufacturer: str = ""
    model_name: str = Field("", description="Manufacturer's Model Name")
    patient_key: str = ""


class StudyResult(_Strict):
    study_uid: str
    generation: int
    model: ModelIdentity
    study: StudyAttributes = Field(default_factory=StudyAttributes)
    index_version: str | None = None
    images: list[ImageResult]
    summary: StudySummary
    similar: list[SimilarStudy] = Field(default_factory=list)
    timings_s: dict[str, float] = Field(default_factory=dict)
    execution_provider: str = "CPUExecutionProvider"

    def image_counts(self) -> tuple[int, int]:
        """(images analysed, how many of them the domain guard flagged): what the
        ledger keeps beside the result for ``/metrics``."""
        analysed = [image for image in self.images if image.frames]
        return len(analysed), sum(image.out_of_distribution for image in analysed)
