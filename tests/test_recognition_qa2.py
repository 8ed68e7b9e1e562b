"""Recognition, QA's second round (issue 18) on the synthetic engine-test policy: order questions in every field
that can hold one, a clause cut by ";" or a dash, another service that never outweighs what the order names, a site
that names the technique, and reasons read for the technique."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from cds_service.engine import Policy, Verdict, describe, judge, load_policies, read_order

from .builders import service_request
from .test_recognition import write_policy

LOCAL = "http://example.org/fhir/CodeSystem/test-orderables"
# Payer workflow words, reaching back over the clause they close.
CONTEXT: list[dict[str, Any]] = [
    {"name": "negation", "assertion": "negated", "direction": "forward", "window": 5, "terms": ["no", "not"]},
    {"name": "refusal", "assertion": "negated", "direction": "both", "window": 4, "terms": ["declined", "deferred"]},
    {
        "name": "not indicated",
        "assertion": "negated",
        "direction": "backward",
        "window": 6,
        "terms": ["not indicated", "explained not indicated", "withdrawn", "request withdrawn", "not authorized"],
    },
]
# The engine-test table with the two rules of this round: another service decides only when the order names
# nothing of the policy itself, and a site naming the technique never outweighs a standard study the order names.
ANOTHER_SERVICE: dict[str, Any] = {
    "id": "another-service",
    "when": {
        "all": [{"evidence": "other-service"}],
        "unless": [
            {"evidence": "technique", "in": ["code", "detail"]},
            {"all": [{"evidence": "billing-code"}, {"condition": "limb-in-order"}]},
        ],
    },
    "verdict": "not-flagged",
    "reason": "the order belongs to {other-service}",
}
AT_SITE: dict[str, Any] = {
    "id": "technique-only-at-site",
    "when": {
        "all": [{"evidence": "comparator", "in": ["code"]}],
        "any": [{"evidence": "technique", "in": ["performer", "location"]}],
        "unless": [{"evidence": "technique", "in": ["code", "detail", "body_site", "note", "reason"]}],
    },
    "verdict": "not-flagged",
    "review": True,
    "reason": "the order is {comparator}; the technique names only where it is done",
}


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    folder = write_policy(tmp_path_factory.mktemp("qa2"), {"context": CONTEXT})
    path = folder / "engine-test.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    for kind in ("technique", "anatomy"):
        data["recognition"]["places"][kind].append("reason")
    data["recognition"]["places"]["other-service"] = ["category", "performer", "location"]
    rules = data["decision"]
    at = next(i for i, r in enumerate(rules) if r["id"] == "another-service")
    rules[at] = ANOTHER_SERVICE
    at = next(i for i, r in enumerate(rules) if r["id"] == "technique-named")
    rules.insert(at, AT_SITE)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    [only] = load_policies(folder).policies
    return only


def judged(policy: Policy, **kwargs: Any) -> Verdict:
    return judge(read_order(service_request(**kwargs)), policy)


def form(display: str) -> list[dict[str, Any]]:
    return [{"reference": "QuestionnaireResponse/q1", "display": display}]


# -- order questions in every field that can hold one ----------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "flagged"),
    [
        ({"supportingInfo": form("Intake form: zeta scan of the arm wanted? Declined by patient")}, False),
        ({"supportingInfo": form("Intake form: zeta scan of the arm wanted? Yes")}, True),
        ({"orderDetail": [{"text": "Q: Zeta scan of the arm? A: No"}]}, False),
        ({"orderDetail": [{"text": "Q: Zeta scan of the arm? A: Yes"}]}, True),
        ({"note": [{"text": "Q: zeta scan of the arm requested A: declined"}]}, False),
        ({"orderDetail": [{"text": "Protocol Q: add zeta scan? Deferred - plain films"}]}, False),
        ({"note": [{"text": "Zeta scan of the arm offered? Not at this time"}]}, False),
        ({"reasonReference": [{"display": "Arm pain; zeta scan wanted? No"}]}, False),
    ],
)
def test_a_question_naming_the_technique_is_answered_by_its_answer(
    policy: Policy, fields: dict[str, Any], flagged: bool
) -> None:
    verdict = judged(policy, text="XR special study", **fields)
    assert verdict.flagged is flagged, describe(verdict)


def test_a_form_answers_after_a_dash_only_with_an_answer(policy: Policy) -> None:
    refused = judged(policy, text="XR arm", supportingInfo=form("Perform zeta scan of the arm - Declined"))
    assert not refused.flagged, describe(refused)
    said_no = judged(policy, text="XR arm", orderDetail=[{"text": "Zeta scan of the arm - No"}])
    assert not said_no.flagged, describe(said_no)
    # "no contrast" after a dash is no answer to the item: the item still orders the scan.
    detail = judged(policy, text="XR arm", orderDetail=[{"text": "Zeta scan of the arm - no contrast"}])
    assert detail.flagged, describe(detail)


def test_a_note_is_no_question_without_a_question_mark(policy: Policy) -> None:
    # "Zeta scan: no contrast" in a note says how, not whether: only a form answers after a colon.
    verdict = judged(policy, text="XR arm", note=[{"text": "Zeta scan: no contrast"}])
    assert verdict.flagged, describe(verdict)


def test_the_order_name_is_no_question(policy: Policy) -> None:
    verdict = judged(policy, text="Zeta scan arm: no sedation")
    assert verdict.flagged, describe(verdict)


# -- payer and referral negation over a clause ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["Zeta scan arm; explained not indicated", "Zeta scan arm - request withdrawn", "Zeta scan arm; not authorized"],
)
def test_a_trigger_opening_the_next_clause_negates_the_one_before(policy: Policy, text: str) -> None:
    verdict = judged(policy, text=text)
    assert not verdict.flagged, describe(verdict)


def test_a_clause_with_its_own_subject_keeps_its_negation(policy: Policy) -> None:
    verdict = judged(policy, text="Zeta scan arm; sedation not indicated")
    assert verdict.flagged, describe(verdict)


# -- another service, a site --------------------------------------------------------------------------------------


def test_another_service_never_outweighs_the_technique_the_order_names(policy: Policy) -> None:
    category = [{"text": "Laboratory"}]
    assert judged(policy, text="Zeta scan of the arm", category=category).flagged
    named_in_detail = judged(policy, text="Special study", orderDetail=[{"text": "zetagraphy, arm"}], category=category)
    assert named_in_detail.flagged, describe(named_in_detail)
    code = {"coding": [{"system": LOCAL, "code": "ZS-100"}]}
    billed = judged(policy, code=code, bodySite=[{"text": "left arm"}], category=category)
    assert billed.flagged, describe(billed)
    # Nothing of the policy in the order itself: the service line decides.
    unnamed = judged(policy, text="Special study", category=category, reasonReference=[{"display": "arm pain"}])
    assert unnamed.rule == "another-service", describe(unnamed)


def test_a_site_naming_the_technique_is_where_not_what(policy: Policy) -> None:
    site = [{"reference": "Organization/o", "display": "Lakeside Zeta Scan Centre"}]
    standard = judged(policy, cpt="73060", text="XR knee 2 views", performer=site)
    assert not standard.flagged and standard.rule == "technique-only-at-site", describe(standard)
    unspecific = judged(policy, text="Special study of the arm", performer=site)
    assert unspecific.flagged, describe(unspecific)


def test_a_reason_that_asks_for_the_technique_names_it(policy: Policy) -> None:
    verdict = judged(policy, text="XR special study", reasonReference=[{"display": "Arm pain, for zeta scan"}])
    assert verdict.flagged and verdict.rule == "technique-named", describe(verdict)
    history = judged(policy, text="XR special study", reasonCode=[{"text": "Arm pain; zeta scan not indicated"}])
    assert not history.flagged, describe(history)
