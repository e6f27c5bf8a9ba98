"""Outcomes coming back (service.outcomes): CSV rows and HL7 ORU^R01 messages over a
real MLLP connection (the ``hl7`` package's client), stored in the real ledger on
both backends and matched to studies by accession number or Study Instance UID,
also when the study arrives after its outcome."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import hl7
import pytest
from hl7.client import MLLPClient

from service.datasets.synthetic import synthetic_study
from service.ledger import InstanceRecord, Ledger, Outcome
from service.node import node_services
from service.outcomes.hl7_oru import receive
from service.outcomes.mllp import MllpService
from service.outcomes.records import parse_csv
from service.pipeline.analysis import study_attributes
from service.results import StudyAttributes
from service.settings import Settings
from tests.support.common import a_result, free_port
from tests.support.worker import child_env


def analysed_study(ledger: Ledger, study_uid: str, accession: str) -> None:
    """A study received and analysed, its result naming its accession number."""
    ledger.record_instance(
        InstanceRecord(
            f"{study_uid}.1",
            study_uid,
            f"{study_uid}.2",
            "1.2.840.10008.5.1.4.1.1.6.1",
            "1.2.840.10008.1.2.1",
            "x.dcm",
            10,
            "PACS",
            "US",
        )
    )
    ledger.complete_quiet_studies(0.0, now=2e9)
    generation = ledger.claim_analysis(study_uid, 60.0)
    assert generation is not None
    study = StudyAttributes(accession_number=accession, study_date="20261201", manufacturer="ACME", model_name="Sono 9")
    assert ledger.finish_analysis(study_uid, generation, a_result(study_uid, generation, study=study))


def oru(
    control_id: str, accession: str = "", finding: str = "Malignant: invasive ductal carcinoma", study_uid: str = ""
) -> str:
    """An ORU^R01 as a pathology system sends it (the PID names a made-up patient)."""
    segments = [
        f"MSH|^~\\&|PATHLAB|HOSP|SONOCASE|HOSP|20261205120000||ORU^R01^ORU_R01|{control_id}|P|2.5.1",
        "PID|1||PAT123^^^HOSP||TEST^PATIENT||19700101|F",
        f"OBR|1|PLC1|PATH9|88305^Surgical pathology^CPT|||20261203|||||||||||{accession}",
        f"OBX|1|ST|22637-3^Pathology report final diagnosis^LN||{finding}||||||F",
        "OBX|2|CWE|272741003^Laterality^SCT||R^Right^HL70495||||||F",
        "OBX|3|NM|CLOCK^Clock position^L||10||||||F",
    ]
    if study_uid:
        segments.append(f"OBX|4|UI|110180^Study Instance UID^DCM||{study_uid}||||||F")
    return "\r".join(segments)


def test_csv_rows_become_outcomes_and_bad_rows_are_named() -> None:
    good = (
        "accession_number,study_instance_uid,outcome,laterality,clock_position,outcome_date\n"
        "ACC1,,malignant,left,10:00,2026-12-01\nACC2,,stable,,,20261130\n,1.2.3,benign,R,3,\n"
    )
    outcomes, problems = parse_csv(good)
    assert not problems
    assert [
        (o.accession_number, o.study_uid, o.finding, o.laterality, o.clock_position, o.outcome_date) for o in outcomes
    ] == [
        ("ACC1", "", "malignant", "L", "10", "20261201"),
        ("ACC2", "", "stable", "", "", "20261130"),
        ("", "1.2.3", "benign", "R", "3", ""),
    ]
    bad = "accession_number,outcome,laterality\nACC1,malignant,up\n,benign,L\nACC3,maybe,\n"
    _, problems = parse_csv(bad)
    assert [(p.line, p.message.split(" ")[0]) for p in problems] == [(2, "laterality"), (3, "an"), (4, "outcome")]
    assert parse_csv("id,result\n1,benign\n")[1][0].line == 1


def test_outcomes_match_by_accession_or_uid_also_when_the_study_comes_later(ledger: Ledger) -> None:
    analysed_study(ledger, "1.2.3.1", "ACC1")
    early = Outcome("csv", "a", "malignant", accession_number="ACC1")
    waiting = Outcome("csv", "b", "benign", accession_number="ACC2", laterality="L")
    by_uid = Outcome("csv", "c", "stable", study_uid="1.2.3.3")
    assert ledger.record_outcomes([early, waiting, by_uid]) == [True, True, True]
    assert ledger.record_outcomes([early]) == [False]  # the same outcome again adds nothing
    assert {o.reference for o in ledger.outcomes(unmatched=True)} == {"b", "c"}
    analysed_study(ledger, "1.2.3.2", "ACC2")  # the studies arrive after their outcomes
    analysed_study(ledger, "1.2.3.3", "")
    matched = {o.reference: o.matched_study_uid for o in ledger.outcomes()}
    assert matched == {"a": "1.2.3.1", "b": "1.2.3.2", "c": "1.2.3.3"}
    assert ledger.study("1.2.3.2").manufacturer == "ACME"  # type: ignore[index]


def test_ack_codes_follow_hl7() -> None:
    assert receive(oru("M1", accession="ACC1")).ack_code == "AA"
    rejected = receive(oru("M2", accession="ACC1").replace("ORU^R01^ORU_R01", "ADT^A01^ADT_A01"))
    assert rejected.ack_code == "AR" and "ADT^A01" in str(rejected.error)
    wrong = receive(oru("M3", accession="ACC1", finding="see report"))
    assert wrong.ack_code == "AE" and not wrong.outcomes
    reply = hl7.parse(wrong.ack)
    assert str(reply.segment("MSA")(1)) == "AE" and str(reply.segment("MSA")(2)) == "M3"
    assert str(reply.segment("ERR")(3)).startswith("103^")
    assert receive("not hl7 at all").ack_code == "AR"
    assert receive(oru("M4")).ack_code == "AE"  # neither accession number nor Study Instance UID


@pytest.mark.integration
def test_oru_over_a_real_mllp_connection_is_stored_before_its_ack(settings: Settings, ledger: Ledger) -> None:
    service = MllpService(settings, ledger, port=0)
    service.start()
    try:
        with MLLPClient("127.0.0.1", service.port) as client:
            first = hl7.parse(client.send_message(oru("MSG1", accession="ACC7")).decode().strip("\x0b\x1c\r"))
            assert str(first.segment("MSA")(1)) == "AA"
            # stored when the ACK came: nothing to wait for
            assert [
                (o.reference, o.finding, o.laterality, o.clock_position, o.outcome_date) for o in ledger.outcomes()
            ] == [("MSG1/1", "malignant", "R", "10", "20261203")]
            again = client.send_message(oru("MSG1", accession="ACC7"))  # a resend after a lost ACK
            assert b"MSA|AA|MSG1" in again and len(ledger.outcomes()) == 1
            malformed = client.send_message(oru("MSG2", accession="ACC8", finding="pending"))
            assert b"MSA|AE|MSG2" in malformed
            by_uid = client.send_message(oru("MSG3", study_uid="1.2.3.9", finding="benign"))
            assert b"MSA|AA|MSG3" in by_uid
        assert ledger.outcome_totals() == (0, 2, {"AA": 3, "AE": 1})
        kept = ledger.hl7_messages(("AE",))
        assert [(m.control_id, m.ack_code) for m in kept] == [("MSG2", "AE")]
        assert "pending" in kept[0].message and "no OBX 22637-3" in kept[0].error
        assert len(ledger.hl7_messages()) == 4
        analysed_study(ledger, "1.2.3.9", "")
        assert {o.reference: o.matched_study_uid for o in ledger.outcomes()} == {
            "MSG1/1": None,
            "MSG3/1": "1.2.3.9",
        }
    finally:
        service.stop()


@pytest.mark.integration
@pytest.mark.parametrize("ledger", ["sqlite"], indirect=True)  # PostgreSQL reconnects a closed handle
def test_a_message_that_cannot_be_stored_gets_ar(settings: Settings, ledger: Ledger) -> None:
    service = MllpService(settings, ledger, port=0)
    service.start()
    ledger.close()  # the database is gone
    try:
        with MLLPClient("127.0.0.1", service.port) as client:
            assert b"MSA|AR|MSG5" in client.send_message(oru("MSG5", accession="ACC1"))
    finally:
        service.stop()


@pytest.mark.integration
@pytest.mark.parametrize("ledger", ["sqlite"], indirect=True)
def test_cli_imports_a_csv_once_and_lists_what_waits(settings: Settings, ledger: Ledger, tmp_path: Path) -> None:
    analysed_study(ledger, "1.2.3.1", "ACC1")
    csv_file = tmp_path / "pathology.csv"
    csv_file.write_text("accession_number,outcome,laterality,clock_position\nACC1,malignant,L,2\nACC9,benign,R,\n")

    def sonocase(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service", "outcomes", *args],
            env=child_env(settings),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    done = sonocase("import", str(csv_file))
    assert done.returncode == 0 and "2 new outcomes of 2 rows" in done.stdout and "1 outcomes wait" in done.stdout
    assert "0 new outcomes of 2 rows" in sonocase("import", str(csv_file)).stdout
    waiting = sonocase("list", "--unmatched").stdout.splitlines()
    assert len(waiting) == 1 and "ACC9" in waiting[0]
    bad = tmp_path / "bad.csv"
    bad.write_text("accession_number,outcome\nACC2,malignant\nACC3,perhaps\n")
    refused = sonocase("import", str(bad))
    assert refused.returncode == 1 and "bad.csv:3:" in refused.stderr and "nothing imported" in refused.stderr
    assert len(ledger.outcomes()) == 2


def test_analysis_keeps_the_headers_outcomes_are_matched_on() -> None:
    ds = synthetic_study(1, "benign", size=64)[0]
    ds.Manufacturer, ds.ManufacturerModelName = "ACME", "Sono 9"
    got = study_attributes(ds, None)
    assert (got.accession_number, got.study_date) == (ds.AccessionNumber, ds.StudyDate)
    assert (got.manufacturer, got.model_name, got.patient_key) == ("ACME", "Sono 9", "")


@pytest.mark.integration
@pytest.mark.parametrize("ledger", ["sqlite"], indirect=True)
def test_the_node_runs_the_hl7_listener_only_when_its_port_is_set(settings: Settings, ledger: Ledger) -> None:
    assert not [s for s in node_services(settings, ledger) if isinstance(s, MllpService)]
    with_hl7 = settings.model_copy(update={"hl7_port": free_port(), "hl7_host": "127.0.0.1"})
    (listener,) = [s for s in node_services(with_hl7, ledger) if isinstance(s, MllpService)]
    listener.start()
    try:
        with MLLPClient("127.0.0.1", with_hl7.hl7_port) as client:
            assert b"MSA|AA|N1" in client.send_message(oru("N1", accession="ACC1"))
    finally:
        listener.stop()
    assert [o.reference for o in ledger.outcomes()] == ["N1/1"]
