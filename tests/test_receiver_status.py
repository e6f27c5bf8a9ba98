"""`sonocase status`: the ledger's view of recent studies and of one study."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from service.cli import cli
from service.ledger import InstanceRecord, Ledger, OutboxState, StudyState
from service.results import ImageResult
from tests.support.common import a_result

OPEN, DONE = "1.2.826.0.1.3680043.8.498.10", "1.2.826.0.1.3680043.8.498.20"
US = "1.2.840.10008.5.1.4.1.1.6.1"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A ledger with an open study and one analysed, reported and partly sent."""
    ledger = Ledger(tmp_path / "ledger.sqlite3", durable=False)
    for study, sops, at in ((DONE, ("20.1", "20.2"), 100.0), (OPEN, ("10.1",), 200.0)):
        for sop in sops:
            ledger.record_instance(
                InstanceRecord(
                    f"{study}.{sop}",
                    study,
                    study + ".1",
                    US,
                    "1.2.840.10008.1.2.1",
                    f"spool/{study}/{sop}.dcm",
                    1000,
                    "PACS",
                    "US",
                ),
                now=at,
            )
    ledger.complete_quiet_studies(5, now=150)
    generation = ledger.claim_analysis(DONE, lease_s=60, now=151)
    ledger.finish_analysis(DONE, generation, a_result(DONE, generation, predicted="benign"), now=152)
    ledger.enqueue_outbox(
        DONE,
        generation,
        [("30.1", "1.2.840.10008.5.1.4.1.1.88.22", "out/30.1.dcm")],
        ["PACS@pacs:104", "ARCHIVE@archive:104"],
        now=153,
    )
    ledger.update_outbox("30.1", "PACS@pacs:104", OutboxState.SENT, now=154)
    ledger.update_outbox("30.1", "ARCHIVE@archive:104", OutboxState.PENDING, error="association rejected", now=154)
    assert ledger.transition(DONE, StudyState.REPORTED, generation, now=160)
    ledger.close()
    return tmp_path


def status(data_dir: Path, *args: str, destinations: str = "PACS@pacs:104") -> tuple[int, str]:
    env = {"SONOCASE_DATA_DIR": str(data_dir), "SONOCASE_DESTINATIONS": destinations}
    result = CliRunner().invoke(cli, ["status", *args], env=env)
    return result.exit_code, result.output


def test_table_of_recent_studies(data_dir: Path) -> None:
    code, out = status(data_dir)
    assert code == 0
    header, *rows = out.strip().splitlines()
    assert header.split()[:3] == ["STUDY", "UID", "STATE"]
    assert [row.split()[:3] for row in rows] == [[OPEN, "receiving", "1"], [DONE, "reported", "2"]]


def test_state_filter_and_json(data_dir: Path) -> None:
    code, out = status(data_dir, "--json", "--state", "reported")
    assert code == 0
    [row] = json.loads(out)
    assert (row["study_uid"], row["instances"], row["generation"]) == (DONE, 2, 1)


def test_one_study_with_result_and_outbox(data_dir: Path) -> None:
    code, out = status(data_dir, DONE)
    assert code == 0
    assert f"study {DONE}" in out and "state              reported" in out
    assert "instances (2)" in out and f"{DONE}.20.1  US  1.2.840.10008.1.2.1  1000 bytes  from PACS" in out
    assert '"predicted": "benign"' in out
    assert "30.1 -> PACS@pacs:104: sent" in out
    assert "30.1 -> ARCHIVE@archive:104: pending after 1 attempt(s)  association rejected" in out
    code, out = status(data_dir, OPEN)
    assert "result: none yet" in out and "outbox (0)" in out


def test_one_study_as_json(data_dir: Path) -> None:
    code, out = status(data_dir, DONE, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["result"]["summary"]["predicted"] == "benign"
    assert {row["destination"]: row["state"] for row in doc["outbox"]} == {
        "PACS@pacs:104": "sent",
        "ARCHIVE@archive:104": "pending",
    }
    assert [i["sop_instance_uid"] for i in doc["instances"]] == [f"{DONE}.20.1", f"{DONE}.20.2"]


def test_an_image_not_assessed_is_named_first(data_dir: Path) -> None:
    ledger = Ledger(data_dir / "ledger.sqlite3", durable=False)
    ledger.complete_quiet_studies(5, now=300)
    generation = ledger.claim_analysis(OPEN, lease_s=60, now=301)
    assert generation is not None
    images = [
        ImageResult(
            sop_instance_uid=f"{OPEN}.10.{n}", series_uid=f"{OPEN}.10", sop_class_uid=US, out_of_distribution=ood
        )
        for n, ood in ((1, True), (2, False))
    ]
    ledger.finish_analysis(OPEN, generation, a_result(OPEN, generation, images))
    ledger.close()
    code, out = status(data_dir, OPEN)
    assert code == 0
    assert out.index(f"image {OPEN}.10.1: not assessed: outside the model's training domain") < out.index("result:")
    assert f"image {OPEN}.10.2:" not in out


def test_unknown_study_and_missing_ledger(data_dir: Path, tmp_path: Path) -> None:
    code, out = status(data_dir, "9.9.9")
    assert code == 1 and "study 9.9.9 is not in the ledger" in out
    code, out = status(tmp_path / "nowhere")
    assert code == 1 and "no ledger at" in out
    assert not (tmp_path / "nowhere").exists()  # looking must not create a ledger


def test_empty_ledger_and_no_destination(tmp_path: Path) -> None:
    Ledger(tmp_path / "ledger.sqlite3").close()
    code, out = status(tmp_path, destinations="")
    assert code == 0
    note, header = out.strip().splitlines()
    assert "no destination configured" in note and header.startswith("STUDY UID")
