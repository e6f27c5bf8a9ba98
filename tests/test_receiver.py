"""The receiver's pure functions and its store, without a network: real ultrasound
files from pydicom/pydicom-data, a real ledger and a real spool on disk."""

from __future__ import annotations

import os
import shutil
import threading
import time
import warnings
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from service.ingest.fast import encode_store_response
from service.ingest.rules import (
    InvalidInstance,
    RejectReason,
    StoreStatus,
    capacity_problem,
    check_association,
    check_request,
    encode_file_meta,
    modality_policy,
    parse_instance,
)
from service.ingest.store import (
    IncomingFile,
    InstanceRecorder,
    StoreSCP,
    write_new_file,
)
from service.ledger import InstanceRecord, Ledger, StudyState
from service.pipeline.completion import CompletionLoop, complete_quiet_studies
from service.settings import Settings, load_settings
from tests.support.common import force_state, wait_for
from tests.support.dicom_peers import ULTRASOUND_FILES, UsFile, rewrite, ultrasound_files
from tests.support.fuzz import SMALL, Mutation, mutations

US_FILES = {f.name: f for f in ultrasound_files()}
MAX_DATASET = 256 << 20


@pytest.fixture
def ledger(settings: Settings) -> Ledger:
    led = Ledger(settings.ledger_path, durable=False)
    yield led
    led.close()


@pytest.fixture
def scp(settings: Settings, ledger: Ledger) -> StoreSCP:
    store = StoreSCP(settings, ledger)
    yield store
    store.close()


def store(scp: StoreSCP, f: UsFile, raw: bytes | None = None) -> StoreStatus:
    return scp.store(
        f.data_set if raw is None else raw, f.transfer_syntax, f.sop_class_uid, f.sop_instance_uid, "TESTSCU"
    ).status


# --- parsing -------------------------------------------------------------------


def test_every_shipped_ultrasound_file_is_found() -> None:
    assert set(US_FILES) == ULTRASOUND_FILES


@pytest.mark.parametrize("name", sorted(ULTRASOUND_FILES))
def test_parse_reads_the_uids_pydicom_reads(name: str) -> None:
    f = US_FILES[name]
    ds = dcmread(f.path, stop_before_pixels=True)
    inst = parse_instance(f.data_set, f.transfer_syntax, MAX_DATASET)
    assert (inst.sop_class_uid, inst.sop_instance_uid, inst.study_uid, inst.series_uid, inst.modality) == (
        ds.SOPClassUID,
        ds.SOPInstanceUID,
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        ds.Modality,
    )


@pytest.mark.parametrize("syntax", [DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_parse_handles_every_uncompressed_encoding(tmp_path: Path, syntax: str) -> None:
    f = rewrite(tmp_path, "OBXXXX1A.dcm", transfer_syntax=syntax)
    assert f.transfer_syntax == syntax
    assert parse_instance(f.data_set, syntax, MAX_DATASET).sop_instance_uid == US_FILES["OBXXXX1A.dcm"].sop_instance_uid


def test_empty_data_set_cannot_be_understood() -> None:
    with pytest.raises(InvalidInstance, match="empty data set") as err:
        parse_instance(b"", "1.2.840.10008.1.2.1", MAX_DATASET)
    assert err.value.status == StoreStatus.CANNOT_UNDERSTAND


@pytest.mark.parametrize("name", ["US1_UNCR.dcm", "OBXXXX1A_rle.dcm", "examples_jpeg2k.dcm", "ExplVR_BigEnd.dcm"])
@pytest.mark.parametrize("keep", [0.5, 0.999, -1, -7])
def test_truncated_data_set_is_refused(name: str, keep: float) -> None:
    """Cut inside the pixel data (defined length and encapsulated) or in the last bytes."""
    f = US_FILES[name]
    cut = int(len(f.data_set) * keep) if keep > 0 else len(f.data_set) + int(keep)
    with pytest.raises(InvalidInstance) as err:
        parse_instance(f.data_set[:cut], f.transfer_syntax, MAX_DATASET)
    assert err.value.status == StoreStatus.CANNOT_UNDERSTAND
    assert "truncated" in str(err.value) or "unparsable" in str(err.value)


def test_garbage_is_refused() -> None:
    with pytest.raises(InvalidInstance) as err:
        parse_instance(b"\x08\x00\x18\x00UI\xff\xff" + b"1" * 40, "1.2.840.10008.1.2.1", MAX_DATASET)
    assert err.value.status == StoreStatus.CANNOT_UNDERSTAND


@pytest.mark.parametrize(
    "keyword,label",
    [
        ("SOPInstanceUID", "SOP Instance UID"),
        ("StudyInstanceUID", "Study Instance UID"),
        ("SOPClassUID", "SOP Class UID"),
    ],
)
def test_missing_uid_is_named(tmp_path: Path, keyword: str, label: str) -> None:
    f = rewrite(tmp_path, "OBXXXX1A_rle.dcm", **{keyword: None})
    with pytest.raises(InvalidInstance, match=f"{label} is missing") as err:
        parse_instance(f.data_set, f.transfer_syntax, MAX_DATASET)
    assert err.value.status == StoreStatus.INVALID_UID


@pytest.mark.parametrize("bad", ["../../etc/passwd", "1.2.abc", "1." + "2" * 70])
def test_malformed_uid_is_refused(tmp_path: Path, bad: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid value we write on purpose
        with pydicom_config.disable_value_validation():
            f = rewrite(tmp_path, "OBXXXX1A_rle.dcm", StudyInstanceUID=bad)
    with pytest.raises(InvalidInstance, match="not a valid UID") as err:
        parse_instance(f.data_set, f.transfer_syntax, MAX_DATASET)
    assert err.value.status == StoreStatus.INVALID_UID


def test_request_must_announce_the_data_set() -> None:
    f = US_FILES["OBXXXX1A_rle.dcm"]
    inst = parse_instance(f.data_set, f.transfer_syntax, MAX_DATASET)
    check_request(inst, f.sop_class_uid, f.sop_instance_uid)
    with pytest.raises(InvalidInstance) as err:
        check_request(inst, "1.2.840.10008.5.1.4.1.1.7", f.sop_instance_uid)
    assert err.value.status == StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    with pytest.raises(InvalidInstance) as err:
        check_request(inst, f.sop_class_uid, "1.2.3")
    assert err.value.status == StoreStatus.INVALID_UID


# --- policies --------------------------------------------------------------------


def test_modality_policy(tmp_path: Path) -> None:
    us = parse_instance(
        US_FILES["OBXXXX1A_rle.dcm"].data_set, US_FILES["OBXXXX1A_rle.dcm"].transfer_syntax, MAX_DATASET
    )
    ct = rewrite(tmp_path, "OBXXXX1A_rle.dcm", Modality="CT")
    ct_inst = parse_instance(ct.data_set, ct.transfer_syntax, MAX_DATASET)
    assert modality_policy(us, "refuse") is None
    assert modality_policy(ct_inst, "store-ignore") == "modality CT is not US"
    with pytest.raises(InvalidInstance, match="accepts ultrasound only") as err:
        modality_policy(ct_inst, "refuse")
    assert err.value.status == StoreStatus.MODALITY_REFUSED


def test_capacity_problem(settings: Settings) -> None:
    limits = settings.model_copy(update={"min_free_disk_mb": 100, "max_pending_studies": 3})
    assert capacity_problem(1000, 2**20, 2, limits) is None
    assert "watermark" in (capacity_problem(100.5, 2**20, 0, limits) or "")
    assert "3 studies wait" in (capacity_problem(1000, 0, 3, limits) or "")


def test_check_association(settings: Settings) -> None:
    assert check_association("ANY", "SONOCASE", settings) is None
    wrong = check_association("ANY", "OTHER", settings)
    assert wrong is not None and wrong.reason == RejectReason.CALLED_AE_TITLE_NOT_RECOGNIZED
    strict = settings.model_copy(update={"allowed_callers": ["PACS"]})
    assert check_association("PACS", "SONOCASE", strict) is None
    caller = check_association("INTRUDER", "SONOCASE", strict)
    assert caller is not None and caller.reason == RejectReason.CALLING_AE_TITLE_NOT_RECOGNIZED


def test_file_meta_reads_back_with_pydicom(tmp_path: Path) -> None:
    f = US_FILES["ExplVR_BigEnd.dcm"]
    path = tmp_path / "x.dcm"
    path.write_bytes(encode_file_meta(f.sop_class_uid, f.sop_instance_uid, f.transfer_syntax, "ODD") + f.data_set)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = dcmread(path)
    meta = ds.file_meta
    assert (meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID) == (
        f.sop_class_uid,
        f.sop_instance_uid,
        f.transfer_syntax,
    )
    assert meta.SourceApplicationEntityTitle == "ODD"
    assert meta.FileMetaInformationVersion == b"\0\1"
    assert ds.pixel_array.shape == dcmread(f.path).pixel_array.shape


@pytest.mark.parametrize(
    "status,comment",
    [
        (StoreStatus.SUCCESS, ""),
        (StoreStatus.OUT_OF_RESOURCES, "free disk 90 MB would fall below the 100 MB watermark"),
        (StoreStatus.CANNOT_UNDERSTAND, "odd length: x" * 10),  # longer than LO's 64 characters
    ],
)
def test_store_response_is_what_pynetdicom_encodes(status: StoreStatus, comment: str) -> None:
    sop_class, sop_instance = "1.2.840.10008.5.1.4.1.1.6.1", "1.2.826.0.1.3680043.8.498.1234567890123"
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 4711
    rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = sop_class, sop_instance
    rsp.Status = int(status)
    if comment:
        rsp.ErrorComment = comment[:64]
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    [pdata] = message.encode_msg(1, 16384)
    assert pdata.presentation_data_value_list == [
        (1, b"\x03" + encode_store_response(4711, sop_class, sop_instance, status, comment))
    ]


# --- the store -----------------------------------------------------------------


def stored_path(settings: Settings, f: UsFile) -> Path:
    return settings.spool_dir / f.study_uid / f"{f.sop_instance_uid}.dcm"


def test_store_writes_the_received_bytes_and_records_them(scp: StoreSCP, settings: Settings, ledger: Ledger) -> None:
    f = US_FILES["OBXXXX1A_rle.dcm"]
    assert store(scp, f) == StoreStatus.SUCCESS
    data = stored_path(settings, f).read_bytes()
    assert data.endswith(f.data_set) and data[128:132] == b"DICM"
    [rec] = ledger.instances(f.study_uid)
    assert (rec.sop_instance_uid, rec.size, rec.calling_ae, rec.ignored_reason) == (
        f.sop_instance_uid,
        len(data),
        "TESTSCU",
        None,
    )
    assert ledger.study(f.study_uid).state == StudyState.RECEIVING


def test_duplicate_is_success_without_rewrite(scp: StoreSCP, settings: Settings, ledger: Ledger) -> None:
    f = US_FILES["OBXXXX1A_rle.dcm"]
    assert store(scp, f) == StoreStatus.SUCCESS
    before = stored_path(settings, f).stat()
    assert store(scp, f) == StoreStatus.SUCCESS
    after = stored_path(settings, f).stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert ledger.instance_count() == 1


def test_removed_study_folder_is_made_again(scp: StoreSCP, settings: Settings, tmp_path: Path) -> None:
    """A clean-up may remove a handled study's folder; a late instance re-creates it."""
    f = US_FILES["OBXXXX1A_rle.dcm"]
    assert store(scp, f) == StoreStatus.SUCCESS
    shutil.rmtree(settings.spool_dir / f.study_uid)
    late = rewrite(tmp_path, f.name, SOPInstanceUID="1.2.3.4.5.7")
    assert store(scp, late) == StoreStatus.SUCCESS
    assert stored_path(settings, late).read_bytes().endswith(late.data_set)


def test_write_leaves_only_the_complete_file_with_its_checksum(tmp_path: Path) -> None:
    size, crc = write_new_file(tmp_path / "a.dcm", [b"meta", b"data set"])
    assert size == 12 and (tmp_path / "a.dcm").read_bytes() == b"metadata set"
    assert crc == zlib.crc32(b"metadata set")
    assert [p.name for p in tmp_path.iterdir()] == ["a.dcm"]


def spooled(scp: StoreSCP, f: UsFile, calling_ae: str = "TESTSCU") -> IncomingFile:
    """``f`` spooled as the network shell does: file meta, then the data set in pieces."""
    incoming = scp.open_incoming(f.sop_class_uid, f.sop_instance_uid, f.transfer_syntax, calling_ae)
    for start in range(0, len(f.data_set), 16384):
        incoming.append(f.data_set[start : start + 16384])
    return incoming


@pytest.mark.parametrize("durability", ["none", "fsync"])
def test_store_keeps_the_file_spooled_while_the_data_set_arrived(
    settings: Settings,
    ledger: Ledger,
    durability: str,
) -> None:
    scp = StoreSCP(settings.model_copy(update={"durability": durability}), ledger)
    f = US_FILES["US1_UNCR.dcm"]
    incoming = spooled(scp, f)
    inode = os.fstat(incoming.fd).st_ino
    try:
        outcome = scp.store(f.data_set, f.transfer_syntax, f.sop_class_uid, f.sop_instance_uid, "TESTSCU", incoming)
    finally:
        incoming.close()
        scp.close()
    assert outcome.status == StoreStatus.SUCCESS
    path = stored_path(settings, f)
    assert path.stat().st_ino == inode, "the spooled file itself was renamed into place"
    expected = encode_file_meta(f.sop_class_uid, f.sop_instance_uid, f.transfer_syntax, "TESTSCU") + f.data_set
    assert path.read_bytes() == expected
    [rec] = ledger.instances(f.study_uid)
    # the CRC-32 is for the torn-file check after a power loss, which "none" does not promise
    assert (rec.size, rec.crc32) == (len(expected), zlib.crc32(expected) if durability == "fsync" else None)
    assert not list(scp.incoming_dir.iterdir())


@pytest.mark.parametrize("case", ["other file meta", "duplicate", "refused"])
def test_spooled_file_that_is_not_kept_is_removed(scp: StoreSCP, settings: Settings, ledger: Ledger, case: str) -> None:
    f = US_FILES["OBXXXX1A_rle.dcm"]
    if case == "duplicate":
        assert store(scp, f) == StoreStatus.SUCCESS
    incoming = spooled(scp, f, calling_ae="OTHER" if case == "other file meta" else "TESTSCU")
    raw = f.data_set[:-100] if case == "refused" else f.data_set
    try:
        outcome = scp.store(raw, f.transfer_syntax, f.sop_class_uid, f.sop_instance_uid, "TESTSCU", incoming)
    finally:
        incoming.close()
    assert outcome.status == (StoreStatus.CANNOT_UNDERSTAND if case == "refused" else StoreStatus.SUCCESS)
    assert not list(scp.incoming_dir.iterdir())
    if case != "refused":  # written from the data set, with the calling AE of the request
        data = stored_path(settings, f).read_bytes()
        assert data == encode_file_meta(f.sop_class_uid, f.sop_instance_uid, f.transfer_syntax, "TESTSCU") + f.data_set
    with pytest.raises(ValueError, match="closed"):
        incoming.append(b"late")


def test_a_restart_forgets_instances_whose_file_a_power_loss_tore(settings: Settings, ledger: Ledger) -> None:
    """A power loss cannot be caused here: tearing the file by hand stands in for one
    (the record committed, the file's blocks never written)."""
    durable = settings.model_copy(update={"durability": "fsync"})
    scp = StoreSCP(durable, ledger)
    torn, intact = US_FILES["OBXXXX1A_rle.dcm"], US_FILES["ExplVR_BigEnd.dcm"]
    for f in (torn, intact):
        assert store(scp, f) == StoreStatus.SUCCESS
    path = stored_path(settings, torn)
    data = path.read_bytes()
    path.write_bytes(data[:-4096] + bytes(4096))  # same size, last blocks zero
    StoreSCP(durable, ledger).close()
    assert not ledger.has_instance(torn.sop_instance_uid) and not path.exists()
    assert ledger.has_instance(intact.sop_instance_uid) and stored_path(settings, intact).exists()
    assert store(StoreSCP(durable, ledger), torn) == StoreStatus.SUCCESS  # the peer's retry is stored again
    assert path.read_bytes() == data


def test_low_disk_refuses_out_of_resources(settings: Settings, ledger: Ledger) -> None:
    full = StoreSCP(settings.model_copy(update={"min_free_disk_mb": 10**9}), ledger)
    f = US_FILES["OBXXXX1A_rle.dcm"]
    outcome = full.store(f.data_set, f.transfer_syntax, f.sop_class_uid, f.sop_instance_uid, "X")
    assert outcome.status == StoreStatus.OUT_OF_RESOURCES and "watermark" in outcome.comment
    assert not stored_path(settings, f).exists() and ledger.instance_count() == 0


def test_pending_studies_limit_refuses_out_of_resources(settings: Settings, ledger: Ledger) -> None:
    busy = StoreSCP(settings.model_copy(update={"max_pending_studies": 1}), ledger)
    first, second = US_FILES["OBXXXX1A_rle.dcm"], US_FILES["ExplVR_BigEnd.dcm"]
    assert store(busy, first) == StoreStatus.SUCCESS
    ledger.complete_quiet_studies(0, now=time.time() + 1)
    assert ledger.pending_analysis_count() == 1
    assert store(busy, second) == StoreStatus.OUT_OF_RESOURCES
    assert ledger.study(second.study_uid) is None


@pytest.mark.parametrize("policy", ["store-ignore", "refuse"])
def test_non_ultrasound_under_both_policies(tmp_path: Path, settings: Settings, ledger: Ledger, policy: str) -> None:
    ct = rewrite(tmp_path, "OBXXXX1A_rle.dcm", Modality="CT")
    status = store(StoreSCP(settings.model_copy(update={"non_ultrasound": policy}), ledger), ct)
    if policy == "refuse":
        assert status == StoreStatus.MODALITY_REFUSED and ledger.instance_count() == 0
    else:
        assert status == StoreStatus.SUCCESS
        assert [r.ignored_reason for r in ledger.instances(ct.study_uid)] == ["modality CT is not US"]


def test_storage_error_is_a_failure_status(scp: StoreSCP, settings: Settings, ledger: Ledger) -> None:
    """A file where the study folder belongs: the write fails for real."""
    f = US_FILES["OBXXXX1A_rle.dcm"]
    settings.spool_dir.mkdir(parents=True, exist_ok=True)
    (settings.spool_dir / f.study_uid).write_bytes(b"in the way")
    outcome = scp.store(f.data_set, f.transfer_syntax, f.sop_class_uid, f.sop_instance_uid, "X")
    assert outcome.status == StoreStatus.PROCESSING_FAILURE and "storage error" in outcome.comment
    assert ledger.instance_count() == 0


@pytest.mark.parametrize("full", ["spool", "ledger"])
@pytest.mark.parametrize("durability", ["fsync", "none"])
def test_a_full_disk_refuses_out_of_resources_and_loses_nothing(
    tmp_path: Path,
    small_disk: Path,
    durability: str,
    full: str,
) -> None:
    """The spool's disk, or the ledger's, fills up while instances arrive (watermark
    off): every instance is either stored and recorded or refused with 0xA700,
    nothing half-written or unrecorded stays, and once there is room again the
    peer's retry is stored."""
    data_dir = small_disk if full == "spool" else tmp_path / "data"
    settings = load_settings(data_dir=data_dir, durability=durability, min_free_disk_mb=0)
    ledger = Ledger(small_disk / "ledger.sqlite3", durable=durability == "fsync")
    scp = StoreSCP(settings, ledger)
    room = small_disk / "room"  # given back at the end
    room.write_bytes(bytes((2 << 20) if full == "spool" else (6 << 20) - (400 << 10)))
    study_uid = "1.2.826.0.1.3680043.8.498.7"
    outcomes: list[tuple[UsFile, StoreStatus]] = []
    try:
        for n in range(12 if full == "spool" else 60):
            name = SMALL[1] if n % 2 or full == "ledger" else "US1_UNCR.dcm"  # 7 KB and 0.9 MB
            f = rewrite(tmp_path, name, StudyInstanceUID=study_uid, SOPInstanceUID=f"1.2.826.0.1.3680043.8.498.7.{n}")
            outcomes.append((f, store(scp, f)))
        stored = [f for f, status in outcomes if status == StoreStatus.SUCCESS]
        refused = [f for f, status in outcomes if status != StoreStatus.SUCCESS]
        assert stored and refused, "the disk never filled"
        assert {status for f, status in outcomes if f in refused} == {StoreStatus.OUT_OF_RESOURCES}
        records = {rec.sop_instance_uid: rec for rec in ledger.instances(study_uid)}
        assert set(records) == {f.sop_instance_uid for f in stored}
        for f in stored:
            data, rec = stored_path(settings, f).read_bytes(), records[f.sop_instance_uid]
            assert data.endswith(f.data_set)
            assert (len(data), rec.crc32) == (rec.size, zlib.crc32(data) if durability == "fsync" else None)
        for f in refused:
            assert not stored_path(settings, f).exists(), "a file without a record"
        assert not list(settings.spool_dir.rglob(".tmp-*")), "half-written files left"
        room.unlink()
        assert store(scp, refused[0]) == StoreStatus.SUCCESS, "the retry was refused with room on the disk"
        assert ledger.has_instance(refused[0].sop_instance_uid)
    finally:
        scp.close()
        ledger.close()


def test_internal_error_is_a_failure_status(scp: StoreSCP, ledger: Ledger) -> None:
    ledger.close()  # every ledger call now raises ResourceClosedError
    f = US_FILES["OBXXXX1A_rle.dcm"]
    outcome = scp.store(f.data_set, f.transfer_syntax, f.sop_class_uid, f.sop_instance_uid, "X")
    assert outcome.status == StoreStatus.PROCESSING_FAILURE and outcome.comment == "internal error: ResourceClosedError"


@pytest.mark.heavy
@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=mutations())
def test_fuzzed_real_files_never_escape_the_store(tmp_path_factory: pytest.TempPathFactory, mutation: Mutation) -> None:
    f, raw = US_FILES[mutation.name], mutation.apply()
    data_dir = tmp_path_factory.mktemp("fuzz")
    settings = load_settings(data_dir=data_dir, durability="none", min_free_disk_mb=0)
    ledger = Ledger(settings.ledger_path, durable=False)
    try:
        outcome = StoreSCP(settings, ledger).store(raw, f.transfer_syntax, f.sop_class_uid, f.sop_instance_uid, "FUZZ")
        assert outcome.status in set(StoreStatus) - {StoreStatus.PROCESSING_FAILURE, StoreStatus.OUT_OF_RESOURCES}
        if outcome.status == StoreStatus.SUCCESS:
            [rec] = ledger.instances(outcome.study_uid or "")
            assert Path(rec.path).read_bytes().endswith(raw)
        else:
            assert outcome.comment and ledger.instance_count() == 0
    finally:
        ledger.close()


# --- group commit ----------------------------------------------------------------


def record(n: int, study: str = "1.2.3") -> InstanceRecord:
    return InstanceRecord(
        f"{study}.{n}",
        study,
        study + ".1",
        "1.2.840.10008.5.1.4.1.1.6.1",
        "1.2.840.10008.1.2.1",
        f"{n}.dcm",
        1,
        "X",
        "US",
    )


class SlowLedger(Ledger):
    """A real ledger whose first batch commit waits for a signal, so the test can
    queue records behind it deterministically (timing cannot be caused otherwise)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, durable=False)
        self.batches: list[int] = []
        self.entered, self.release = threading.Event(), threading.Event()

    def record_instances(self, recs: list[InstanceRecord], now: float | None = None) -> list[bool]:
        self.batches.append(len(recs))
        if len(self.batches) == 1:
            self.entered.set()
            self.release.wait(10)
        return super().record_instances(recs, now)


def test_concurrent_records_share_one_commit(tmp_path: Path) -> None:
    ledger = SlowLedger(tmp_path / "ledger.sqlite3")
    recorder = InstanceRecorder(ledger)
    results: dict[int, bool] = {}

    def store(n: int) -> None:
        results[n] = recorder.record(record(n % 5))  # 0-4 twice: the second of each is a duplicate

    first = threading.Thread(target=store, args=(100,))
    first.start()
    assert ledger.entered.wait(10)
    others = [threading.Thread(target=store, args=(n,)) for n in range(10)]
    for t in others:
        t.start()
    wait_for("ten records queued behind the slow commit", lambda: len(recorder._queue) == 10)
    ledger.release.set()
    for t in [first, *others]:
        t.join(10)
    assert ledger.batches == [1, 10]
    assert sorted(results) == [*range(10), 100]
    assert sum(results[n] for n in range(10)) == 4  # record(0) came with the first thread
    assert ledger.instance_count() == 5
    ledger.close()


def test_failed_group_commit_fails_every_store_in_it(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3", durable=False)
    recorder = InstanceRecorder(ledger)
    ledger.close()
    with pytest.raises(RuntimeError, match="ledger commit failed"):
        recorder.record(record(1))


# --- completion ------------------------------------------------------------------


def test_quiet_study_completes_and_reopens_after_handled(scp: StoreSCP, ledger: Ledger, tmp_path: Path) -> None:
    """Completion is decided on the ledger's clock (``now=``), not by sleeping."""
    f = US_FILES["OBXXXX1A_rle.dcm"]
    assert store(scp, f) == StoreStatus.SUCCESS
    last = ledger.study(f.study_uid).last_received
    assert complete_quiet_studies(ledger, 5.0, now=last + 4.9) == []
    assert ledger.study(f.study_uid).state == StudyState.RECEIVING
    assert complete_quiet_studies(ledger, 5.0, now=last + 5.0) == [f.study_uid]
    assert ledger.study(f.study_uid).state == StudyState.COMPLETE
    force_state(ledger, f.study_uid, StudyState.SENT)  # handled by the later stages
    later = rewrite(tmp_path, "OBXXXX1A_rle.dcm", SOPInstanceUID="1.2.3.4.5.6")
    assert store(scp, later) == StoreStatus.SUCCESS
    study = ledger.study(f.study_uid)
    assert (study.state, study.generation) == (StudyState.RECEIVING, 2)
    assert complete_quiet_studies(ledger, 5.0, now=study.last_received + 4.9) == []
    assert complete_quiet_studies(ledger, 5.0, now=study.last_received + 5.0) == [f.study_uid]
    assert len(ledger.instances(f.study_uid)) == 2


def test_completion_sleeps_until_the_earliest_quiet_period_ends(scp: StoreSCP, ledger: Ledger, tmp_path: Path) -> None:
    loop = CompletionLoop(ledger, quiet_period_s=5.0, interval_s=0.5)
    assert loop.next_wait() == 0.5  # nothing receiving: look again after the interval
    f = US_FILES["OBXXXX1A_rle.dcm"]
    assert store(scp, f) == StoreStatus.SUCCESS
    last = ledger.study(f.study_uid).last_received
    assert loop.next_wait(now=last + 1.0) == 0.5  # its deadline is further than the interval
    assert loop.next_wait(now=last + 4.8) == pytest.approx(0.2)  # wakes exactly at the deadline
    assert loop.next_wait(now=last + 9.0) == CompletionLoop.MIN_WAIT_S  # overdue: at once
    assert CompletionLoop(ledger, quiet_period_s=0.2, interval_s=0.5).next_wait(now=last - 1) == 0.2


def test_completion_loop_completes_quiet_studies(scp: StoreSCP, ledger: Ledger) -> None:
    f = US_FILES["OBXXXX1A_rle.dcm"]
    assert store(scp, f) == StoreStatus.SUCCESS
    woken = threading.Event()
    loop = CompletionLoop(ledger, quiet_period_s=0.2, interval_s=0.05, on_complete=woken.set)
    loop.start()
    try:
        wait_for("the study to complete", lambda: ledger.study(f.study_uid).state == StudyState.COMPLETE, 10)
        assert woken.wait(10), "the scheduler was not woken"
    finally:
        loop.stop()
