"""Copy labelled reference studies out of a DICOMweb archive, for the similar-case index.

For ``sonocase index add --pacs URL``, the DICOMweb counterpart of
:mod:`service.similar.pacs_copy`: a QIDO-RS search for the study's instances says
whether the study is there and which instances are images, and WADO-RS fetches each
image, in the transfer syntax the archive holds it in (no transcoding asked), into
a folder the index then fills from. As with C-GET, only image SOP classes are
fetched: the study's reports (our AI results among them) stay in the archive.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from io import BytesIO
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmwrite
from pydicom.dataset import Dataset

from service.common import dicomweb, spool
from service.ingest.rules import STORAGE_SOP_CLASSES, is_valid_uid
from service.settings import DicomWebDestination, Settings
from service.similar.pacs_copy import PacsUnavailable, StudyCopy

LOG = logging.getLogger(__name__)

#: WADO-RS: each instance as the archive holds it.
_AS_STORED = (("application/dicom", "*"),)
_REFUSED = (401, 403)


def _unavailable(archive: DicomWebDestination, exc: requests.RequestException) -> PacsUnavailable:
    response = exc.response if isinstance(exc, requests.HTTPError) else None
    if response is not None:
        return PacsUnavailable(f"{archive} answered HTTP {response.status_code} {response.reason}")
    return PacsUnavailable(f"cannot reach {archive}: {type(exc).__name__}")


def _image_instances(web: DICOMwebClient, study_uid: str) -> tuple[list[Dataset], int]:
    """QIDO-RS: the study's image instances (series and SOP UIDs) and how many
    others it holds; a study the archive does not know has none."""
    try:
        found = [
            Dataset.from_json(item)
            for item in web.search_for_instances(study_instance_uid=study_uid, get_remaining=True)
        ]
    except requests.HTTPError as exc:
        if exc.response is not None and exc.response.status_code == 404:
            return [], 0
        raise
    images = [ds for ds in found if str(ds.get("SOPClassUID", "")) in STORAGE_SOP_CLASSES]
    return images, len(found) - len(images)


def _copy_one(web: DICOMwebClient, study_uid: str, folder: Path) -> StudyCopy:
    images, others = _image_instances(web, study_uid)
    if not images and not others:
        return StudyCopy(study_uid, problem="not found in the archive")
    copy = StudyCopy(study_uid)
    failed = 0
    for found in images:
        sop_uid, series_uid = str(found.get("SOPInstanceUID", "")), str(found.get("SeriesInstanceUID", ""))
        if not (is_valid_uid(sop_uid) and is_valid_uid(series_uid)):
            failed += 1  # it would not name a file, nor a WADO-RS URL
            continue
        try:
            ds = web.retrieve_instance(study_uid, series_uid, sop_uid, media_types=_AS_STORED)
        except requests.HTTPError as exc:
            if exc.response is not None and exc.response.status_code in _REFUSED:
                raise
            failed += 1
            continue
        buffer = BytesIO()
        dcmwrite(buffer, ds)
        path = folder / study_uid / f"{sop_uid}.dcm"
        spool.write_atomic(path, buffer.getvalue(), durable=False)
        copy.files.append(path)
    problems = [f"{others} instance(s) not copied (not images)"] if others else []
    problems += [f"{failed} image(s) could not be fetched"] if failed else []
    copy.problem = "; ".join(problems)
    return copy


def copy_studies_web(
    archive: DicomWebDestination, study_uids: Sequence[str], folder: Path, settings: Settings
) -> Iterator[StudyCopy]:
    """Copy each study's images into ``folder/<study UID>/``; yield each study's
    outcome as it is done. Raises :class:`PacsUnavailable` when the archive cannot
    be reached or refuses our credentials."""
    try:
        web = dicomweb.client(settings, archive)
    except ValueError as exc:  # an unreadable secret file
        raise PacsUnavailable(str(exc)) from None
    for study_uid in study_uids:
        try:
            outcome = _copy_one(web, study_uid, folder)
        except requests.RequestException as exc:
            raise _unavailable(archive, exc) from None
        LOG.info(
            "copied %d instance(s) from %s%s",
            len(outcome.files),
            archive,
            f": {outcome.problem}" if outcome.problem else "",
            extra={"study_uid": study_uid},
        )
        yield outcome
