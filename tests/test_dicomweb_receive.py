"""STOW-RS receiving: real ultrasound files POSTed by dicomweb-client and by curl are
stored exactly as the C-STORE receiver stores them (same spool, ledger, checks);
bad input gets the right HTTP status and Failure Reason and leaves nothing partial
on disk, while the node goes on serving C-STORE; a study received partly over DIMSE
and partly over STOW-RS completes as one study."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from prometheus_client import CollectorRegistry
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from service.common.metrics import STOW_INSTANCES
from service.ingest.rules import StoreStatus
from service.ingest.store import StoreSCP
from service.ingest.stow import (
    InstanceResult,
    PartMeta,
    PartRefused,
    StowError,
    StowFailure,
    StowUpload,
    read_part_meta,
    request_boundary,
    store_response,
    summary,
    upfront_refusal,
)
from service.ledger import Ledger, StudyState, open_ledger
from service.settings import Settings
from tests.support.common import dcmtk, wait_for
from tests.support.dicom_peers import data_set_offset, split_file, ultrasound_files
from tests.support.dicomweb import BOUNDARY, MULTIPART, TOKEN, ReceivingNode, curl, multipart

US_FILES = ("US1_UNCR.dcm", "OBXXXX1A.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "OBXXXX1A_expb.dcm")


@pytest.fixture
def stow_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"web_token": TOKEN, "min_free_disk_mb": 1})


@pytest.fixture
def node(stow_settings: Settings) -> Iterator[ReceivingNode]:
    ledger = open_ledger(stow_settings, durable=False)
    receiving = ReceivingNode(stow_settings, ledger)
    yield receiving
    receiving.stop()
    ledger.close()


def copy_into(name: str, study_uid: str, out: Path) -> Path:
    """A real ultrasound file as a new instance of ``study_uid`` (Part 10, as a
    modality writes it)."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.StudyInstanceUID = study_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = out / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def assert_stored_as_sent(node: ReceivingNode, sent: list[Path]) -> None:
    """Each sent file's data set is in the spool byte for byte, recorded as received over STOW-RS."""
    ledger = node.receiver.ledger
    for path in sent:
        original = split_file(path)
        (rec,) = [r for r in ledger.instances(original.study_uid) if r.sop_instance_uid == original.sop_instance_uid]
        spooled = Path(rec.path).read_bytes()
        assert spooled[data_set_offset(spooled) :] == original.data_set
        assert (rec.calling_ae, rec.transfer_syntax, rec.size) == ("STOW-RS", original.transfer_syntax, len(spooled))
    assert node.incoming() == []


def c_store(settings: Settings, path: Path) -> subprocess.CompletedProcess[str]:
    """DCMTK's storescu sends one file to the node's C-STORE port."""
    return subprocess.run(
        [dcmtk("storescu"), "-v", "-aec", settings.ae_title, "127.0.0.1", str(settings.port), str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- pure parts -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["US1_UNCR.dcm", "OBXXXX1A_expb.dcm", "examples_ybr_color.dcm"])
def test_file_meta_is_read_as_soon_as_it_is_complete(name: str) -> None:
    data = Path(get_testdata_file(name)).read_bytes()
    offset = data_set_offset(data)
    ds = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)
    expected = PartMeta(
        ds.file_meta.MediaStorageSOPClassUID,
        ds.file_meta.MediaStorageSOPInstanceUID,
        ds.file_meta.TransferSyntaxUID,
        offset,
    )
    for size in range(offset + 12):
        assert read_part_meta(data[:size]) is None, size  # more bytes needed
    assert read_part_meta(data[: offset + 12]) == expected
    assert read_part_meta(data[:offset], complete=True) == expected


@pytest.mark.parametrize(
    ("head", "status", "why"),
    [
        (b"hello, not DICOM", StoreStatus.CANNOT_UNDERSTAND, "is not a DICOM file"),
        (b"\0" * 128 + b"NOPE" + b"\0" * 64, StoreStatus.CANNOT_UNDERSTAND, "no DICM prefix"),
        (
            b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x14\x00" + b"1.2.840.10008.1.2.1\0",
            StoreStatus.INVALID_UID,
            "Media Storage SOP Class UID is missing",
        ),
        (
            b"\0" * 128 + b"DICM" + b"\x02\x00\x02\x00UI\x08\x001.2.3.4\0",
            StoreStatus.CANNOT_UNDERSTAND,
            "no Transfer Syntax UID",
        ),
        (
            b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x001.2",
            StoreStatus.CANNOT_UNDERSTAND,
            "truncated file meta",
        ),
    ],
)
def test_what_is_not_a_dicom_file_is_refused(head: bytes, status: int, why: str) -> None:
    with pytest.raises(PartRefused, match=why) as refused:
        read_part_meta(head, complete=True)
    assert refused.value.status == status


def test_request_media_types() -> None:
    assert request_boundary('multipart/related; type="application/dicom"; boundary="b-1"') == b"b-1"
    assert request_boundary("Multipart/Related; boundary=b-2") == b"b-2"  # type defaults to application/dicom
    for wrong, status in [
        ("application/dicom", 415),
        (None, 415),
        ("multipart/form-data; boundary=x", 415),
        ('multipart/related; type="application/dicom+json"; boundary=x', 415),
        ('multipart/related; type="application/dicom"', 400),
    ]:
        with pytest.raises(StowError) as refused:
            request_boundary(wrong)
        assert refused.value.status == status, wrong


def test_response_status_and_sequences() -> None:
    ok = InstanceResult("1.2.840.10008.5.1.4.1.1.6.1", "1.2.3.1", StoreStatus.SUCCESS)
    bad = InstanceResult("1.2.840.10008.5.1.4.1.1.2", "1.2.3.2", StowFailure.SOP_CLASS_NOT_SUPPORTED, "CT")
    assert store_response([ok])[0] == 200
    status, body = store_response([ok, bad])
    assert status == 202
    assert body["00081199"]["Value"][0]["00081155"]["Value"] == ["1.2.3.1"]
    assert body["00081198"]["Value"][0]["00081197"] == {"vr": "US", "Value": [0x0122]}
    assert store_response([bad])[0] == 409


def test_back_pressure_before_the_body_is_read(stow_settings: Settings) -> None:
    s = stow_settings.model_copy(update={"min_free_disk_mb": 100, "max_pending_studies": 5})
    assert upfront_refusal(500, 100 << 20, 0, s) is None
    too_large = upfront_refusal(150, 100 << 20, 0, s)
    assert too_large is not None and too_large.status == 413 and too_large.headers == {"Retry-After": "60"}
    busy = upfront_refusal(500, 1000, 5, s)
    assert busy is not None and busy.status == 503 and "5 studies wait" in str(busy)
    over = upfront_refusal(1e9, (s.stow_max_request_mb << 20) + 1, 0, s)
    assert over is not None and over.status == 413 and "stow_max_request_mb" in str(over)


def test_a_body_fed_in_small_pieces_stores_the_same_bytes(stow_settings: Settings, tmp_path: Path) -> None:
    """The streaming parse does not depend on where the network splits the body."""
    study = generate_uid()
    sent = [copy_into(name, study, tmp_path) for name in ("OBXXXX1A.dcm", "OBXXXX1A_2frame.dcm")]
    body = multipart([p.read_bytes() for p in sent])
    ledger = open_ledger(stow_settings, durable=False)
    store = StoreSCP(stow_settings, ledger)
    try:
        upload = StowUpload(store, BOUNDARY.encode(), study, max_bytes=len(body), max_parts=10)
        results = [
            upload.store_part(part)
            for offset in range(0, len(body), 997)
            for part in upload.feed(body[offset : offset + 997])
        ]
        assert upload.finish() is None
        assert [r.stored for r in results] == [True, True]
        records = {r.sop_instance_uid: r for r in ledger.instances(study)}
        for path in sent:
            original = split_file(path)
            spooled = Path(records[original.sop_instance_uid].path).read_bytes()
            assert spooled[data_set_offset(spooled) :] == original.data_set
    finally:
        store.close()
        ledger.close()


def test_parts_count_against_the_receivers_size_limit_and_memory_budget(
    stow_settings: Settings, tmp_path: Path
) -> None:
    """A part is held within max_dataset_mb (0xC003) and the memory budget of data
    sets in flight (0xA700), as a C-STORE's data set is; every byte it took is given
    back, and nothing is left in .incoming."""
    study = generate_uid()
    big = copy_into("US1_UNCR.dcm", study, tmp_path)  # 0.92 MB
    small = copy_into("OBXXXX1A.dcm", study, tmp_path)  # 0.49 MB
    body = multipart([big.read_bytes(), small.read_bytes()])
    ledger = open_ledger(stow_settings, durable=False)
    store = StoreSCP(stow_settings, ledger)
    store.max_dataset = 700_000  # smaller than the first part, larger than the second
    try:
        upload = StowUpload(store, BOUNDARY.encode(), study, max_bytes=len(body), max_parts=10)
        results = [upload.store_part(part) for part in upload.feed(body)]
        assert upload.finish() is None
        assert [r.status for r in results] == [StoreStatus.TOO_LARGE, StoreStatus.SUCCESS]
        assert store.budget.used == 0
        assert not list(store.incoming_dir.iterdir())
    finally:
        store.close()
        ledger.close()
    ledger = open_ledger(stow_settings, durable=False)
    store = StoreSCP(stow_settings, ledger)
    try:
        assert store.budget.take("another association", store.budget.limit - 1000)  # the rest is in use
        upload = StowUpload(store, BOUNDARY.encode(), study, max_bytes=len(body), max_parts=10)
        results = [upload.store_part(part) for part in upload.feed(body)]
        assert [r.status for r in results] == [StoreStatus.OUT_OF_RESOURCES, StoreStatus.OUT_OF_RESOURCES]
        store.budget.release("another association")
        assert store.budget.used == 0
        upload = StowUpload(store, BOUNDARY.encode(), study, max_bytes=len(body), max_parts=10)
        assert [upload.store_part(part).stored for part in upload.feed(body)] == [True, True]
        assert store.budget.used == 0
    finally:
        store.close()
        ledger.close()


# --- over HTTP, real clients ------------------------------------------------------------


@pytest.mark.integration
def test_dicomweb_client_stores_every_ultrasound_file(node: ReceivingNode) -> None:
    datasets = [pydicom.dcmread(f.path) for f in ultrasound_files()]
    web = DICOMwebClient(node.url, headers={"Authorization": f"Bearer {TOKEN}"})
    response = web.store_instances(datasets)
    stored = {str(item.ReferencedSOPInstanceUID) for item in response.ReferencedSOPSequence}
    assert stored == {str(ds.SOPInstanceUID) for ds in datasets}
    assert "FailedSOPSequence" not in response
    ledger = node.receiver.ledger
    assert ledger.instance_count() == len(stored)
    for path in node.spooled():
        assert pydicom.dcmread(path).SOPInstanceUID in stored  # a complete Part 10 file
    assert node.incoming() == []


@pytest.mark.integration
def test_curl_upload_is_stored_byte_for_byte(node: ReceivingNode, tmp_path: Path) -> None:
    study = generate_uid()
    sent = [copy_into(name, study, tmp_path) for name in US_FILES]
    body = tmp_path / "body"
    body.write_bytes(multipart([p.read_bytes() for p in sent]))
    answer = curl(f"{node.url}/studies/{study}", body)
    assert answer.status == 200 and answer.headers["content-type"] == ["application/dicom+json"]
    assert sorted(answer.stored()) == sorted(split_file(p).sop_instance_uid for p in sent)
    assert_stored_as_sent(node, sent)
    again = curl(f"{node.url}/studies", body)  # the same instances again: stored once, answered Success
    assert again.status == 200 and len(node.spooled()) == len(sent)


def uid_of(data: bytes) -> str:
    return str(pydicom.dcmread(BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def stow_count(status: str) -> float:
    """Instances counted by /metrics' sonocase_stow_instances_total with this status."""
    registry = CollectorRegistry()
    registry.register(STOW_INSTANCES)
    return registry.get_sample_value("sonocase_stow_instances_total", {"status": status}) or 0.0


@pytest.mark.integration
def test_bad_input_gets_its_status_and_reason_and_leaves_nothing(node: ReceivingNode, tmp_path: Path) -> None:
    counted = {status: stow_count(status) for status in ("0x0000", "0x0122", "0xC000")}
    study = generate_uid()
    good = copy_into("US1_UNCR.dcm", study, tmp_path).read_bytes()
    other = copy_into("OBXXXX1A.dcm", study, tmp_path).read_bytes()
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    foreign = copy_into("OBXXXX1A.dcm", generate_uid(), tmp_path).read_bytes()
    half = other[: len(other) // 2]
    closing = f"--{BOUNDARY}--\r\n".encode()
    related_json = MULTIPART.replace("application/dicom", "application/dicom+json")
    # name: (body, Content-Type, path, HTTP status, {SOP Instance UID: Failure Reason} or None)
    cases: dict[str, tuple[bytes, str, str, int, dict[str, int] | None]] = {
        "wrong content type": (good, "application/dicom", "/studies", 415, None),
        "metadata and bulk data": (multipart([good]), related_json, "/studies", 415, None),
        "no boundary": (multipart([good]), 'multipart/related; type="application/dicom"', "/studies", 400, None),
        "not multipart at all": (b"garbage" * 100, MULTIPART, "/studies", 400, None),
        "no part": (closing, MULTIPART, "/studies", 400, None),
        "body ends inside a part": (
            multipart([good])[: -len(closing)] + multipart([half], close=False)[:-2],
            MULTIPART,
            "/studies",
            202,
            {uid_of(other): 0xC000},
        ),
        "malformed after a good part": (
            multipart([good])[: -len(closing)]
            + f"--{BOUNDARY}\r\nbad header\r\n\r\n".encode()
            + other
            + b"\r\n"
            + closing,
            MULTIPART,
            "/studies",
            202,
            {"": 0xC000},
        ),
        "truncated data set": (multipart([half]), MULTIPART, "/studies", 409, {uid_of(other): 0xC000}),
        "non-DICOM part": (multipart([b"%PDF-1.4 not an image"]), MULTIPART, "/studies", 409, {"": 0xC000}),
        "not ultrasound": (multipart([ct]), MULTIPART, "/studies", 409, {uid_of(ct): 0x0122}),
        "another study": (multipart([foreign]), MULTIPART, f"/studies/{study}", 409, {uid_of(foreign): 0xC001}),
    }
    for name, (data, content_type, path, status, failures) in cases.items():
        body = tmp_path / "body"
        body.write_bytes(data)
        answer = curl(node.url + path, body, content_type)
        assert answer.status == status, (name, answer.body)
        if failures is not None:
            assert answer.failures() == failures, name
            warnings = answer.headers.get("warning", [])
            assert len(warnings) == len(failures) and all(w.startswith("299 sonocase ") for w in warnings), name
        assert node.incoming() == [], name  # nothing partial left on disk
        stored = {uid_of(p.read_bytes()) for p in node.spooled()}
        assert stored <= {uid_of(good)}, name
    assert len(node.spooled()) == 1  # the complete part before the one the body ended in
    assert {status: stow_count(status) - before for status, before in counted.items()} == {
        "0x0000": 2,
        "0x0122": 1,
        "0xC000": 4,
    }
    assert c_store(node.settings, copy_into("OBXXXX1A.dcm", generate_uid(), tmp_path)).returncode == 0
    assert len(node.spooled()) == 2


@pytest.mark.integration
def test_no_or_wrong_token_is_refused(node: ReceivingNode, tmp_path: Path) -> None:
    body = tmp_path / "body"
    body.write_bytes(multipart([copy_into("US1_UNCR.dcm", generate_uid(), tmp_path).read_bytes()]))
    for token in (None, "wrong-token"):
        answer = curl(f"{node.url}/studies", body, MULTIPART, token)
        assert answer.status == 401 and answer.headers["www-authenticate"] == ['Bearer realm="sonocase"']
    assert node.spooled() == [] and node.incoming() == []


@pytest.mark.integration
def test_off_without_a_web_token(settings: Settings) -> None:
    ledger = open_ledger(settings, durable=False)
    receiving = ReceivingNode(settings, ledger)
    try:
        response = requests.post(
            f"{receiving.url}/studies",
            data=multipart([]),
            headers={"Content-Type": MULTIPART, "Authorization": "Bearer "},
            timeout=30,
        )
        assert response.status_code == 404 and "SONOCASE_WEB_TOKEN" in response.text
    finally:
        receiving.stop()
        ledger.close()


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_c_store_is_served_while_a_stow_upload_is_half_way(node: ReceivingNode, tmp_path: Path) -> None:
    study = generate_uid()
    body = multipart([copy_into("US1_UNCR.dcm", study, tmp_path).read_bytes()])
    port = int(node.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(
            f"POST /studies HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: {MULTIPART}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        sock.sendall(body[: len(body) // 2])
        wait_for("the half-sent part's temporary file", node.incoming)
        assert c_store(node.settings, copy_into("OBXXXX1A.dcm", generate_uid(), tmp_path)).returncode == 0
        assert len(node.spooled()) == 1 and len(node.incoming()) == 1  # the upload is still open
        sock.sendall(body[len(body) // 2 :])
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert len(node.spooled()) == 2 and node.incoming() == []


@pytest.mark.integration
def test_a_study_partly_over_dimse_partly_over_stow_completes_as_one(node: ReceivingNode, tmp_path: Path) -> None:
    study = generate_uid()
    by_dimse = [copy_into(name, study, tmp_path) for name in US_FILES[:2]]
    by_stow = [copy_into(name, study, tmp_path) for name in US_FILES[2:]]
    for path in by_dimse:
        assert c_store(node.settings, path).returncode == 0
    body = tmp_path / "body"
    body.write_bytes(multipart([p.read_bytes() for p in by_stow]))
    assert curl(f"{node.url}/studies/{study}", body).status == 200
    ledger: Ledger = node.receiver.ledger
    records = ledger.instances(study)
    assert len(records) == 4 and {r.calling_ae for r in records} == {"STORESCU", "STOW-RS"}
    assert ledger.complete_quiet_studies(node.settings.quiet_period_s, now=time.time() + 60) == [study]
    assert ledger.study(study).state == StudyState.COMPLETE
    assert len(ledger.studies()) == 1


@pytest.mark.integration
def test_an_upload_larger_than_the_free_disk(stow_settings: Settings, small_disk: Path, tmp_path: Path) -> None:
    """A real full disk: the spool on a 6 MiB tmpfs. With a Content-Length the
    upload is refused before it is read (413); without one (chunked, as
    dicomweb-client sends more than 1 MB) each instance that does not fit is
    refused with 0xA700; nothing partial stays, and C-STORE is still answered."""
    s = stow_settings.model_copy(update={"data_dir": small_disk / "data", "min_free_disk_mb": 1})
    study = generate_uid()
    sent = [copy_into("US1_UNCR.dcm", study, tmp_path) for _ in range(8)]  # 8 x 0.9 MB
    ledger = open_ledger(s.model_copy(update={"data_dir": tmp_path / "ledger"}), durable=False)
    node = ReceivingNode(s, ledger)
    try:
        body = tmp_path / "body"
        body.write_bytes(multipart([p.read_bytes() for p in sent]))
        answer = curl(f"{node.url}/studies", body)
        assert answer.status == 413 and answer.headers["retry-after"] == ["60"]
        assert b"would fall below" in answer.body and node.spooled() == [] and node.incoming() == []

        web = DICOMwebClient(node.url, headers={"Authorization": f"Bearer {TOKEN}"})
        response = web.store_instances([pydicom.dcmread(p) for p in sent])  # 202: some stored
        failed = response.FailedSOPSequence
        assert {int(item.FailureReason) for item in failed} == {0xA700}
        stored = node.spooled()
        assert 0 < len(stored) < len(sent) and len(stored) + len(failed) == len(sent)
        assert node.incoming() == []
        for path in stored:  # every stored instance complete, and recorded with its size
            (rec,) = [r for r in ledger.instances(study) if Path(r.path) == path]
            assert rec.size == path.stat().st_size and pydicom.dcmread(path).SOPInstanceUID
        assert ledger.instance_count() == len(stored)
        refused = c_store(s, copy_into("US1_UNCR.dcm", study, tmp_path))  # C-STORE is answered, not dropped
        assert "Refused: OutOfResources" in refused.stdout + refused.stderr, refused.stdout + refused.stderr
    finally:
        node.stop()
        ledger.close()


@pytest.mark.integration
def test_a_busy_node_refuses_before_reading_or_per_instance(stow_settings: Settings, tmp_path: Path) -> None:
    """The C-STORE receiver's back-pressure (max_pending_studies): 503 with
    Retry-After while the body is still unread, or 0xA700 per instance when the
    request names no length (chunked)."""
    s = stow_settings.model_copy(update={"max_pending_studies": 1})
    ledger = open_ledger(s, durable=False)
    node = ReceivingNode(s, ledger)
    try:
        body = tmp_path / "body"
        body.write_bytes(multipart([copy_into("OBXXXX1A.dcm", generate_uid(), tmp_path).read_bytes()]))
        assert curl(f"{node.url}/studies", body).status == 200
        assert len(ledger.complete_quiet_studies(0.0, now=time.time() + 60)) == 1  # one study waits for analysis
        body.write_bytes(multipart([copy_into("OBXXXX1A.dcm", generate_uid(), tmp_path).read_bytes()]))
        busy = curl(f"{node.url}/studies", body)
        assert (busy.status, busy.headers["retry-after"]) == (503, ["60"]) and b"wait for analysis" in busy.body
        chunked = curl(f"{node.url}/studies", body, MULTIPART, TOKEN, "-H", "Transfer-Encoding: chunked")
        assert chunked.status == 409 and set(chunked.failures().values()) == {0xA700}
        assert len(node.spooled()) == 1 and node.incoming() == []
    finally:
        node.stop()
        ledger.close()


@pytest.mark.integration
def test_a_request_of_many_empty_parts_is_bounded(
    stow_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 24, attack 2 (1,000,000 empty parts took 312 s, 2.8 GB, an 85 MB answer
    and a log line each): up to stow_max_parts each is answered, in one log line;
    past it the request is answered 413 at once, and the node goes on storing."""
    settings = stow_settings.model_copy(update={"stow_max_parts": 100})
    ledger = open_ledger(settings, durable=False)
    node = ReceivingNode(settings, ledger)
    try:
        for count, status, logged in (
            (100, 409, "0 of 100 instance(s) stored; refused: 100 with 0xC000"),
            (200_000, 413, "HTTP 413: more than 100 parts"),
        ):
            body = tmp_path / "empty-parts"
            body.write_bytes(multipart([b""] * count))
            caplog.clear()
            started = time.monotonic()
            with caplog.at_level("INFO", logger="service.ingest.stow"):
                answer = curl(node.url + "/studies", body)
            assert answer.status == status and time.monotonic() - started < 10
            assert len(answer.body) < 200 * settings.stow_max_parts  # bounded by the parts it answers
            assert len(caplog.records) == 1 and logged in caplog.text, [r.getMessage() for r in caplog.records[:3]]
        assert curl(node.url + "/studies", _one_part(tmp_path)).status == 200
    finally:
        node.stop()
        ledger.close()


def test_the_summary_counts_refusals_by_reason() -> None:
    results = [
        InstanceResult("1.2", "1.2.3", 0),
        InstanceResult("", "", 0xC000, "empty part"),
        InstanceResult("", "", 0xC000, "not DICOM"),
        InstanceResult("1.2", "1.2.4", 0x0122, "not US"),
    ]
    assert summary(results) == ("1 of 4 instance(s) stored; refused: 1 with 0x0122, 2 with 0xC000 (first: empty part)")


def _one_part(tmp_path: Path) -> Path:
    body = tmp_path / "one-part"
    body.write_bytes(multipart([copy_into("OBXXXX1A.dcm", generate_uid(), tmp_path).read_bytes()]))
    return body
