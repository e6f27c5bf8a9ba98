"""A worker without the node's files (setting ``data_access = "http"``).

A worker on another host, with no shared volume, still claims and leases its study
in the ledger (PostgreSQL) and takes its messages from Redis, but reaches the
node's files only through the node's HTTP side (service.ops.worker_api), with the
``worker_token`` as Bearer:

1. each instance by WADO-RS (``dicomweb-client``'s retrieve instance, as stored),
   one at a time as the analysis reads them; the header of each is kept for the
   reports;
2. the analysis (service.pipeline.analysis) keeps the heatmaps in memory; the
   node's similar-case index finds the similar cases of the result (its judged
   frames' embeddings go to the node, the matches come back) and serves the
   reference images the montage shows; the report objects are built and gated
   here, from the frames and heatmaps in memory and the SRs of an earlier
   generation (fetched, for the predecessor references);
3. the result, the heatmaps and the gated objects go back in one
   ``multipart/form-data`` request; the node writes the heatmap files, stores the
   result, writes the objects to its outbox and queues them, so it alone writes
   its data folder. A repeated upload (a retry, or a second worker after a lease
   ran out) changes nothing: the node answers ``stale``.

With ``index_analysed_studies`` the node adds the study to its index when the
result comes back (when it was analysed by the node's own model).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
from dicomweb_client.api import DICOMwebClient
from pydantic import BaseModel
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from service.common.dicomweb import BearerAuth, SiteCaAdapter
from service.common.errors import error_text
from service.ledger import InstanceRecord
from service.model.inference import OnnxModel
from service.pipeline.analysis import Analysis, Heatmaps, analyse_study
from service.reports.build import REPORT_ERRORS, OutputObject, ReportError, build_objects, gate, source_headers
from service.reports.heatmaps import as_heat
from service.reports.sc import ReferenceImages
from service.reports.source import Repair, repair_values
from service.reports.template import load_template
from service.results import SimilarStudy, StudyResult
from service.settings import Settings

LOG = logging.getLogger(__name__)

#: The node's worker routes (service.ops.worker_api) under its HTTP side.
API_PREFIX = "/worker/v1"
#: The first tag a header (``stop_before_pixels``) leaves out.
_PIXEL_DATA = Tag(0x7FE0, 0x0010)


class SimilarOut(BaseModel):
    """The similar cases of a worker's result, and what the result records of the
    index (the node's answer to ``POST .../studies/{study}/similar``)."""

    index_version: str | None
    patient_key: str
    similar: list[SimilarStudy]


class NodeUnavailable(RuntimeError):
    """The node did not answer as it should (down, overloaded, a server error): the
    study fails this attempt and is retried, rather than analysed without its images."""


def heatmap_key(sop_instance_uid: str, frame_number: int) -> str:
    """A frame's heatmap's name in the upload's ``.npz``."""
    return f"{sop_instance_uid}-f{frame_number}"


def _session(settings: Settings) -> requests.Session:
    session = requests.Session()
    session.auth = BearerAuth(settings.worker_token)
    if settings.dicomweb_ca is not None:
        session.mount("https://", SiteCaAdapter(settings.dicomweb_ca))
    return session


@dataclass(frozen=True)
class HandedBack:
    """What the node did with an upload: ``reported``, ``failed`` (the report could
    not be built; the result is stored) or ``stale`` (the study moved on, or another
    worker handed it back first)."""

    outcome: str


class NodeClient:
    """The node's files over HTTP for one worker process. Each instance read keeps its
    header (no pixels) for the reports of the same study."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._session = _session(settings)
        self._base = settings.node_url + API_PREFIX
        self._spool = self._dicomweb(f"{self._base}/spool")
        self._records: dict[str, InstanceRecord] = {}
        self._headers: dict[str, Dataset] = {}

    def _dicomweb(self, url: str) -> DICOMwebClient:
        web = DICOMwebClient(url, session=self._session, timeout=self.settings.dicomweb_timeout_s)
        web.set_http_retry_params(retry=False)  # a failed attempt is retried as a whole study, with backoff
        return web

    def begin(self, instances: Sequence[InstanceRecord]) -> None:
        """A new study: its instances, and none of the last study's headers."""
        self._records = {rec.sop_instance_uid: rec for rec in instances}
        self._headers.clear()

    def read(self, rec: InstanceRecord) -> Dataset:
        """One instance by WADO-RS. An instance the node no longer has (404) is an
        OSError, skipped like a spool file that is gone; any other failure is
        :class:`NodeUnavailable`."""
        try:
            ds = self._spool.retrieve_instance(rec.study_uid, rec.series_uid, rec.sop_instance_uid)
        except requests.HTTPError as exc:
            if exc.response is not None and exc.response.status_code == 404:
                raise FileNotFoundError(f"the node has no instance {rec.sop_instance_uid}") from None
            raise NodeUnavailable(f"the node answered {error_text(exc)}") from exc
        except requests.RequestException as exc:
            raise NodeUnavailable(f"the node cannot be reached: {error_text(exc)}") from exc
        header = Dataset({elem.tag: elem for elem in ds if elem.tag < _PIXEL_DATA})
        header.file_meta = ds.file_meta
        self._headers[rec.sop_instance_uid] = header
        return ds

    def header(self, sop_instance_uid: str) -> tuple[Dataset, list[Repair]]:
        """The header of an instance of this study, made valid as
        :func:`service.reports.source.read_source` makes a spool file's: kept from
        the analysis, or fetched now (an instance the analysis did not read, e.g. one
        stored but not analysed)."""
        if sop_instance_uid not in self._headers:
            if sop_instance_uid not in self._records:
                raise ReportError(f"instance {sop_instance_uid} of the result is not in the ledger")
            self.read(self._records[sop_instance_uid])
        ds = self._headers[sop_instance_uid]
        return ds, repair_values(ds)

    def predecessors(self, study_uid: str, generation: int) -> list[Dataset]:
        """The SRs of the latest earlier generation that produced any (none for the first)."""
        if generation <= 1:
            return []
        try:
            return list(self._dicomweb(f"{self._base}/earlier/{generation}").retrieve_study(study_uid))
        except requests.HTTPError as exc:
            if exc.response is not None and exc.response.status_code == 404:
                return []
            raise NodeUnavailable(f"the earlier SRs could not be fetched: {error_text(exc)}") from exc
        except requests.RequestException as exc:
            raise NodeUnavailable(f"the earlier SRs could not be fetched: {error_text(exc)}") from exc

    def with_similar(self, result: StudyResult) -> StudyResult:
        """``result`` with the similar cases the node's index finds for it, the index
        version and the patient's keyed hash (as a worker with the index records them)."""
        url = f"{self._base}/studies/{result.study_uid}/similar"
        try:
            response = self._session.post(
                url, json=result.model_dump(mode="json"), timeout=self.settings.dicomweb_timeout_s
            )
            response.raise_for_status()
        except requests.RequestException as exc:
            raise NodeUnavailable(f"the similar cases could not be fetched: {error_text(exc)}") from exc
        found = SimilarOut.model_validate_json(response.content)
        return result.model_copy(
            update={
                "similar": found.similar,
                "index_version": found.index_version,
                "study": result.study.model_copy(update={"patient_key": found.patient_key}),
            }
        )

    def reference_images(self, folder: Path) -> ReferenceImages:
        """The montage's reference images, each fetched from the node into ``folder``
        when asked for; None for one the index does not hold."""

        def fetch(sop_instance_uid: str) -> Path | None:
            try:
                response = self._session.get(
                    f"{self._base}/index/images/{sop_instance_uid}", timeout=self.settings.dicomweb_timeout_s
                )
                if response.status_code == 404:
                    return None
                response.raise_for_status()
            except requests.RequestException as exc:
                raise NodeUnavailable(f"a reference image could not be fetched: {error_text(exc)}") from exc
            path = folder / f"{sop_instance_uid}.dcm"
            path.write_bytes(response.content)
            return path

        return fetch

    def hand_back(
        self, result: StudyResult, heatmaps: Heatmaps, objects: Sequence[OutputObject], report_error: str | None
    ) -> HandedBack:
        """Upload the result, its heatmaps and the gated objects (or why there are none)."""
        buffer = io.BytesIO()
        arrays = {heatmap_key(uid, frame): heat for (uid, frame), heat in heatmaps.items()}
        np.savez(buffer, allow_pickle=False, **arrays)
        files: list[tuple[str, tuple[str, bytes, str]]] = [
            ("result", ("result.json", result.model_dump_json().encode(), "application/json")),
            ("heatmaps", ("heatmaps.npz", buffer.getvalue(), "application/octet-stream")),
            *(("object", (f"{obj.kind}.{obj.sop_instance_uid}.dcm", obj.data, "application/dicom")) for obj in objects),
        ]
        url = f"{self._base}/studies/{result.study_uid}/generations/{result.generation}/result"
        try:
            response = self._session.post(
                url,
                files=files,
                data={"report_error": report_error} if report_error else None,
                timeout=self.settings.dicomweb_timeout_s,
            )
            response.raise_for_status()
        except requests.RequestException as exc:
            raise NodeUnavailable(f"the result could not be handed back: {error_text(exc)}") from exc
        return HandedBack(str(json.loads(response.content)["outcome"]))


def analyse_remotely(
    settings: Settings,
    node: NodeClient,
    model: OnnxModel,
    study_uid: str,
    generation: int,
    instances: list[InstanceRecord],
) -> tuple[Analysis, HandedBack]:
    """Analyse the study from the node's instances, add the similar cases the node's
    index finds, build and gate its objects here, and hand everything back (the
    analysis returned holds the result as handed back). A report that cannot be built
    is handed back as its reason (the node stores the result and fails the study at
    stage ``report``, as a worker with the shared volume does); a node that cannot be
    reached raises."""
    node.begin(instances)
    try:
        analysed = analyse_study(
            settings, model, study_uid, generation, instances, read=node.read, write_heatmaps=False
        )
        analysis = dataclasses.replace(analysed, result=node.with_similar(analysed.result))
        earlier = node.predecessors(study_uid, generation)
        objects: list[OutputObject] = []
        report_error = None
        try:
            template = load_template(settings.sr_template)
            sources = source_headers(analysis.result, node.header)
            heats = {key: as_heat(heat) for key, heat in analysis.heatmaps.items()}
            with tempfile.TemporaryDirectory(prefix="sonocase-references-") as folder:
                references = node.reference_images(Path(folder))
                objects = build_objects(
                    settings, template, analysis.result, sources, {}, references, analysis.frames, heats, earlier
                )
            gate(template, objects, fast=settings.fast_reports)
        except REPORT_ERRORS as exc:
            objects, report_error = [], error_text(exc)
            LOG.error("report failed: %s", report_error, extra={"study_uid": study_uid, "stage": "report"})
        return analysis, node.hand_back(analysis.result, analysis.heatmaps, objects, report_error)
    finally:
        node.begin([])
