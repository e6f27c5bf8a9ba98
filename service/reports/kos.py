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

from collections.abc import Hashable, Sequence

import highdicom as hd
from pydicom.dataset import Dataset

from service.reports import Placement
from service.reports.construction import (
    Prototypes,
    filled_copy,
    library_equipment,
    patient_and_study,
    prototype_of,
    source_key,
)
from service.reports.sr import device_observer, instance_label
from service.reports.template import SrTemplate
from service.results import StudyResult

#: The class whose every image is flagged, besides the deciding one.
ALWAYS_FLAGGED = "malignant"
#: TID 2010 rows 8 and 10 forbid a Purpose of Reference (a concept name) on the
#: referenced images and documents; highdicom names them "Source", which we take off.
_UNNAMED = ("IMAGE", "COMPOSITE")
#: Key-image flags built by highdicom, by :func:`_prototype_key` (setting ``fast_reports``).
_PROTOTYPES = Prototypes()


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
    fast: bool = False,
) -> Dataset:
    """The study's key-image flag over ``sources`` (the study's headers, the first
    with the patient's attributes) and the SR ``sr`` (its header). ``fast`` (setting
    ``fast_reports``): highdicom builds the first flag of a :func:`_prototype_key`
    and the others are filled copies of it (element for element the library's;
    :func:`service.reports.construction.filled_copy`)."""
    flagged = key_images(result)
    if not flagged:
        raise ValueError("no analysed image to flag")
    headers = {ds.SOPInstanceUID: ds for ds in sources}
    images = [headers[uid] for uid in flagged]
    description = template.wording.key_images.format(
        instances=", ".join(instance_label(headers, uid) for uid in flagged)
    )
    description = f"{description}. {template.disclaimer}"[:1024]
    evidence = [sources[0], *(ds for ds in images if ds is not sources[0]), sr]
    if not fast:
        return _document(template, evidence, [*images, sr], description, placement)
    roles = _roles(evidence, description, placement)
    prototype = _PROTOTYPES.get(
        _prototype_key(template, evidence, images),
        lambda: prototype_of(_document(template, evidence, [*images, sr], description, placement), roles),
    )
    return filled_copy(
        prototype,
        roles,
        sources[0],
        {
            **patient_and_study(sources[0]),
            "InstanceNumber": placement.instance_number,
            "SoftwareVersions": list(placement.software_versions),
            "ContributingEquipmentSequence": [library_equipment(prototype)],
        },
    )


def _roles(evidence: Sequence[Dataset], description: str, placement: Placement) -> dict[str, str]:
    """The values of a flag that change by role: its own UIDs, the study's, each
    evidence instance's and each of their series' (in order of appearance), and
    the description (which names the images and occurs once)."""
    series = list(dict.fromkeys(str(ds.SeriesInstanceUID) for ds in evidence))
    return {
        "series": placement.series_uid,
        "sop": placement.sop_uid,
        "study": str(evidence[0].StudyInstanceUID),
        "description": description,
        **{f"instance {n}": str(ds.SOPInstanceUID) for n, ds in enumerate(evidence)},
        **{f"series {n}": uid for n, uid in enumerate(series)},
    }


def _prototype_key(template: SrTemplate, evidence: Sequence[Dataset], images: Sequence[Dataset]) -> Hashable:
    """What a flag's content depends on besides the values a filled copy takes (the
    UIDs and description of :func:`_roles`, the first source's patient and study,
    numbers, the clock): the first source's character set; each evidence instance's
    SOP class, which of the evidence's series it is in and whether it is flagged
    (the evidence and content trees' shape: the flagged images are referenced in
    the evidence's order, then the SR); and the template's values the flag holds."""
    series = list(dict.fromkeys(str(ds.SeriesInstanceUID) for ds in evidence))
    flagged = {id(ds) for ds in images}
    return (
        source_key(evidence[0], ("SpecificCharacterSet",), copies=False),
        tuple((str(ds.SOPClassUID), series.index(str(ds.SeriesInstanceUID)), id(ds) in flagged) for ds in evidence),
        template.concepts.key_images_title,
        template.device,
        template.kos_series,
    )


def _document(
    template: SrTemplate,
    evidence: Sequence[Dataset],
    referenced: Sequence[Dataset],
    description: str,
    placement: Placement,
) -> hd.ko.KeyObjectSelectionDocument:
    """The flag by highdicom."""
    device = template.device
    document = hd.ko.KeyObjectSelectionDocument(
        evidence=evidence,
        content=hd.ko.KeyObjectSelection(
            document_title=template.concepts.key_images_title.code(),
            referenced_objects=referenced,
            observer_device_context=device_observer(template),
            description=description,
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
