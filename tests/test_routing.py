"""Routing rules: which complete studies are analysed and where their results go,
on real files (pydicom's echocardiogram, an ultrasound with no body part, our
synthetic breast studies) and a real ledger on both backends."""

from __future__ import annotations

import json
import time

import pydicom
import pytest

from service.datasets.synthetic import synthetic_study
from service.ledger import Ledger, Routing, StudyState
from service.ops.pages import render_status
from service.ops.status import format_table, study_summaries
from service.ops.views import study_view
from service.pipeline.completion import complete_quiet_studies
from service.pipeline.routing import CALLING_AE, Router, decide, facts_of
from service.reports.build import build_reports
from service.settings import RoutingRule, Settings, SettingsError, default_routing_rules, load_settings
from tests.support.reports import analyse, data_file, store_study
from tests.support.worker import receive

DEFAULTS = default_routing_rules()


@pytest.mark.parametrize(
    ("facts", "analyse", "rule"),
    [
        ({"StudyDescription": "Echocardiogram"}, False, "other-body-part"),
        ({"SeriesDescription": "THYROID LEFT LOBE"}, False, "other-body-part"),
        ({"BodyPartExamined": "ABDOMEN"}, False, "other-body-part"),
        ({"ProtocolName": "OB 2nd trimester"}, False, "other-body-part"),
        ({"RequestedProcedureDescription": "US Carotid Doppler"}, False, "other-body-part"),
        ({"AnatomicRegionSequence": "Heart"}, False, "other-body-part"),
        ({"BodyPartExamined": "BREAST"}, True, "breast"),
        ({"StudyDescription": "US MAMMA LINKS"}, True, "breast"),
        ({"StudyDescription": "Gynecomastia, left"}, True, "breast"),
        ({"AnatomicRegionSequence": "76752008"}, True, "breast"),
        # a study naming the breast and another part is analysed: the breast rule comes first
        ({"StudyDescription": "Breast and axilla", "SeriesDescription": "Thyroid"}, True, "breast"),
        ({"StudyDescription": "Ultrasound", "SeriesDescription": "B-mode"}, True, None),  # no hint at all
        ({}, True, None),
        ({"StudyDescription": "Computer-aided review"}, True, None),  # "uter" inside a word is no uterus
    ],
)
def test_default_rules_make_a_breast_node(facts: dict[str, str], analyse: bool, rule: str | None) -> None:
    routing = decide(DEFAULTS, {k: frozenset([v]) for k, v in facts.items()})
    assert (routing.analyse, routing.rule, routing.destinations) == (analyse, rule, None)
    if rule is not None:
        keyword = next(iter(facts)) if len(facts) == 1 else "StudyDescription"
        assert routing.reason is not None and keyword in routing.reason
        for value in facts.values():
            assert value not in routing.reason  # keywords, never values


def test_actions_and_destinations_come_from_the_first_rule_that_holds_for_each() -> None:
    rules = [
        RoutingRule(name="site-b", calling_ae="^SITEB", destinations=["PACSB@10.0.0.2:104"]),
        RoutingRule(name="ct", modality="^CT$", action="skip"),
        *DEFAULTS,
        RoutingRule(name="everything-else", destinations=["PACSA@10.0.0.1:104", "VNA@10.0.0.3:11112+tls"]),
    ]
    site_b_breast = decide(rules, {CALLING_AE: frozenset(["SITEB_US2"]), "BodyPartExamined": frozenset(["BREAST"])})
    assert site_b_breast == Routing(
        True, "breast", "analyse by rule breast: BodyPartExamined; destinations by rule site-b", ("PACSB@10.0.0.2:104",)
    )
    other = decide(rules, {CALLING_AE: frozenset(["PACS"]), "Modality": frozenset(["US"])})
    assert other == Routing(
        True, None, "destinations by rule everything-else", ("PACSA@10.0.0.1:104", "VNA@10.0.0.3:11112+tls")
    )
    ct = decide(rules, {CALLING_AE: frozenset(["PACS"]), "Modality": frozenset(["US", "CT"])})
    assert (ct.analyse, ct.rule) == (False, "ct")
    assert decide([], {}) == Routing()


def test_every_condition_needs_a_match() -> None:
    rule = RoutingRule(name="both", action="skip", modality="US", study_description="thyroid")
    assert decide([rule], {"Modality": frozenset(["US"])}).analyse
    assert not decide([rule], {"Modality": frozenset(["US"]), "StudyDescription": frozenset(["Thyroid"])}).analyse


def test_facts_come_from_each_series_and_the_ledger() -> None:
    echo = pydicom.dcmread(data_file("color-pl.dcm"), stop_before_pixels=True)
    coded = pydicom.Dataset()
    region = pydicom.Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "76752008", "SCT", "Breast"
    coded.AnatomicRegionSequence = [region]
    facts = facts_of([echo, coded], ["PACS"], ["US"])
    assert facts["StudyDescription"] == {"Echocardiogram"}
    assert facts["AnatomicRegionSequence"] == {"76752008", "Breast"}
    assert facts[CALLING_AE] == {"PACS"} and facts["Modality"] == {"US"}


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"name": "x", "action": "skip", "study_description": "(echo"}, "is not a regular expression"),
        ({"name": "x", "modality": "US"}, "needs an action, destinations or both"),
        ({"name": "x", "action": "maybe"}, "routing_rules"),
        ({"name": "x", "action": "skip", "destinations": ["nowhere"]}, "is not AE@host:port"),
    ],
)
def test_bad_rules_are_refused_at_start(rule: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(routing_rules=[rule])


def test_rule_names_must_differ_and_rules_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match="names must differ"):
        load_settings(routing_rules=[{"name": "a", "action": "skip"}, {"name": "a", "action": "analyse"}])
    monkeypatch.setenv("SONOCASE_ROUTING_RULES", json.dumps([{"name": "ct", "action": "skip", "modality": "CT"}]))
    assert load_settings().routing_rules == [RoutingRule(name="ct", action="skip", modality="CT")]


def test_an_echocardiogram_is_stored_and_skipped_a_breast_study_analysed(settings: Settings, ledger: Ledger) -> None:
    """pydicom's color-pl.dcm (Study Description "Echocardiogram") was classified
    as breast; now it is kept and skipped by the default rules, with the rule shown."""
    echo_uid, _ = store_study(settings, ledger, ["color-pl.dcm"])
    plain_uid, _ = store_study(settings, ledger, ["US1_UNCR.dcm"])
    breast_uid = receive(settings, ledger, synthetic_study(1, "benign", seed=3), complete=False)
    router = Router(settings, ledger)
    done = complete_quiet_studies(ledger, 0.0, now=time.time() + 1, route=router.route)
    assert sorted(done) == sorted([echo_uid, plain_uid, breast_uid])
    echo, plain, breast = (ledger.study(uid) for uid in (echo_uid, plain_uid, breast_uid))
    assert (echo.state, echo.routing_rule) == (StudyState.SKIPPED, "other-body-part")
    assert echo.routing_reason == "skip by rule other-body-part: StudyDescription, SeriesDescription"
    assert (plain.state, plain.routing_rule, plain.routing_reason) == (StudyState.COMPLETE, None, None)
    assert (breast.state, breast.routing_rule) == (StudyState.COMPLETE, "breast")
    assert echo_uid not in ledger.due_for_queue(now=time.time() + 10)
    assert ledger.claim_analysis(echo_uid, lease_s=60) is None  # no worker can take it
    table = format_table(study_summaries(ledger, 10))
    assert "other-body-part" in table and "breast" in table
    view = study_view(ledger, settings.results_dir, echo)  # the status page and its JSON API
    assert (view.state, view.routing_rule, view.routing_reason) == (
        "skipped",
        "other-body-part",
        "skip by rule other-body-part: StudyDescription, SeriesDescription",
    )
    assert "skipped by rule other-body-part" in render_status([view], ledger.count_by_state(), "csrf").decode()
    # another instance re-opens a skipped study; its routing is decided again
    store_study(settings, ledger, ["US1_UNCR.dcm"], study_uid=echo_uid)
    assert ledger.study(echo_uid).state == StudyState.RECEIVING
    assert complete_quiet_studies(ledger, 0.0, now=time.time() + 1, route=router.route) == [echo_uid]
    again = ledger.study(echo_uid)
    assert (again.state, again.generation, again.routing_rule) == (StudyState.SKIPPED, 2, "other-body-part")


def test_a_study_that_receives_while_it_is_routed_stays_receiving(settings: Settings, ledger: Ledger) -> None:
    study_uid, _ = store_study(settings, ledger, ["US1_UNCR.dcm"])
    quiet = ledger.quiet_studies(0.0, now=time.time() + 1)
    assert [uid for uid, _ in quiet] == [study_uid]
    store_study(settings, ledger, ["OBXXXX1A.dcm"], study_uid=study_uid)  # arrives while the rules run
    assert ledger.complete_studies([(study_uid, quiet[0][1], Routing())]) == []
    assert ledger.study(study_uid).state == StudyState.RECEIVING


def test_results_go_to_the_destinations_the_rule_chose(settings: Settings, ledger: Ledger) -> None:
    settings = settings.model_copy(
        update={
            "destinations": [],
            "routing_rules": [
                RoutingRule(name="site-b", calling_ae=".", destinations=["PACSB@127.0.0.1:1104", "VNA@127.0.0.1:1105"])
            ],
        }
    )
    study_uid, paths = store_study(settings, ledger, ["US1_UNCR.dcm"])
    complete_quiet_studies(ledger, 0.0, now=time.time() + 1, route=Router(settings, ledger).route)
    study = ledger.study(study_uid)
    assert json.loads(study.destinations) == ["PACSB@127.0.0.1:1104", "VNA@127.0.0.1:1105"]
    generation = ledger.claim_analysis(study_uid, lease_s=60)
    assert generation is not None
    result, references = analyse(settings, study_uid, paths, generation=generation, n_similar=0)
    assert ledger.finish_analysis(study_uid, generation, result)
    assert build_reports(settings, ledger, study_uid, references)
    rows = ledger.outbox(study_uid)
    by_destination: dict[str, set[str]] = {}
    for row in rows:
        by_destination.setdefault(row.destination, set()).add(row.sop_instance_uid)
    assert set(by_destination) == {"PACSB@127.0.0.1:1104", "VNA@127.0.0.1:1105"}
    assert by_destination["PACSB@127.0.0.1:1104"] == by_destination["VNA@127.0.0.1:1105"]  # every object, to each
