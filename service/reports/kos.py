"""The key-image flag: a Key Object Selection document (highdicom ``ko``, TID 2010)
that marks the study's most suspicious image(s) and the SR.

PACS worklists and most viewers show such a flag on the images it names. The key
images are the image that decides the study summary (see
:data:`service.results.SUMMARY_RULE`) and every other image the model calls
malignant, in the study's order; the document's title is the template's
(DCM 113000 "Of Interest"), its description names the images by Instance Number
and carries the disclaimer. A study with no analysed image gets no flag.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset

from service.reports import Placement
from service.reports.sr import device_observer, instance_label
from service.reports.template import SrTemplate
from service.results import StudyResult

#: The class whose every image is flagged, besides the deciding one.
ALWAYS_FLAGGED = "malignant"
#: TID 2010 rows 8 and 10 forbid a Purpose of Reference (a concept name) on the
#: referenced images and documents; highdicom names them "Source", which we take off.
_UNNAMED = ("IMAGE", "COMPOSITE")


def key_images(result: StudyResult) -> list[str]:
    """SOP Instance UIDs of the images to flag (see module doc), in the study's order."""
    decisive = result.summary.decisive_sop_instance_uid
    return [
        image.sop_instance_uid
        for image in result.images
        if image.frames and (image.sop_instance_uid == decisive or image.predicted == ALWAYS_FLAGGED)
    ]


def build_kos(
    result: StudyResult,
    template: SrTemplate,
    sources: Sequence[Dataset],
    sr: Dataset,
    placement: Placement,
) -> hd.ko.KeyObjectSelectionDocument:
    """The study's key-image flag over ``sources`` (the study's headers, the first
    with the patient's attributes) and the SR ``sr`` (its header)."""
    flagged = key_images(result)
    if not flagged:
        raise ValueError("no analysed image to flag")
    headers = {ds.SOPInstanceUID: ds for ds in sources}
    images = [headers[uid] for uid in flagged]
    description = template.wording.key_images.format(
        instances=", ".join(instance_label(headers, uid) for uid in flagged)
    )
    device = template.device
    document = hd.ko.KeyObjectSelectionDocument(
        evidence=[sources[0], *(ds for ds in images if ds is not sources[0]), sr],
        content=hd.ko.KeyObjectSelection(
            document_title=template.concepts.key_images_title.code(),
            referenced_objects=[*images, sr],
            observer_device_context=device_observer(template),
            description=f"{description}. {template.disclaimer}"[:1024],
        ),
        series_instance_uid=placement.series_uid,
        series_number=template.kos_series.number,
        sop_instance_uid=placement.sop_uid,
        instance_number=placement.instance_number,
        manufacturer=device.manufacturer,
        series_description=template.kos_series.description,
        manufacturer_model_name=device.model_name,
        software_versions=list(placement.software_versions),
        device_serial_number=device.serial_number,
    )
    for item in document.ContentSequence:
        if item.ValueType in _UNNAMED:
            del item.ConceptNameCodeSequence
    return document
