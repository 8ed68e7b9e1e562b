"""Recognition, round 3 on the synthetic engine-test policy: an order question's answer with a trigger of its own,
and a question whose trigger only qualifies the question's own label (a dated referral letter)."""

from __future__ import annotations

from typing import Any

import pytest

from cds_service.engine import Policy, Verdict, describe, judge, load_policies, read_order

from .builders import service_request
from .test_recognition import write_policy

CONTEXT: list[dict[str, Any]] = [
    {"name": "history", "assertion": "historical", "direction": "forward", "window": 5, "terms": ["prior", "had"]},
    {"name": "history after", "assertion": "historical", "direction": "backward", "window": 4, "terms": ["elsewhere"]},
    {
        "name": "dated",
        "assertion": "historical",
        "direction": "backward",
        "window": 2,
        "terms": [{"pattern": "\\(?\\b(?:19|20)\\d\\d\\b"}],
    },
    {
        "name": "someone else",
        "assertion": "other-experiencer",
        "direction": "backward",
        "window": 5,
        "terms": ["mentioned"],
    },
    {"name": "request", "assertion": "requested", "direction": "forward", "window": 8, "terms": ["order"]},
]


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    [only] = load_policies(write_policy(tmp_path_factory.mktemp("round3"), {"context": CONTEXT})).policies
    return only


def judged(policy: Policy, **kwargs: Any) -> Verdict:
    return judge(read_order(service_request(**kwargs)), policy)


def form(display: str) -> list[dict[str, Any]]:
    return [{"reference": "DocumentReference/letter-1", "display": display}]


def test_a_date_that_dates_the_label_does_not_make_the_answer_history(policy: Policy) -> None:
    verdict = judged(
        policy, text="Imaging other", supportingInfo=form("Referral letter 11/20/2026: zeta scan of the arm")
    )
    assert verdict.flagged, describe(verdict)


@pytest.mark.parametrize(
    "detail",
    [
        # A forward trigger reaching the question's end speaks of the answer.
        "Prior study: zeta scan of the arm",
        # A trigger that qualifies what the question names qualifies the answer too.
        "Zeta scan done elsewhere? Yes - zeta scan of the arm",
        # A date dating the question's mention still dates the answer's.
        "Zeta scan 2024? Yes - zeta scan of the arm",
    ],
)
def test_a_question_that_qualifies_what_it_asks_qualifies_the_answer(policy: Policy, detail: str) -> None:
    verdict = judged(policy, text="Imaging other", orderDetail=[{"text": detail}])
    assert not verdict.flagged, describe(verdict)


def test_the_answers_own_trigger_is_nearer_than_the_questions(policy: Policy) -> None:
    asked = "pt msg: 'can I get the zeta scan the dr mentioned?' Per Dr. -"
    ordered = judged(policy, text="Imaging other", note=[{"text": f"{asked} order zeta scan arm"}])
    assert ordered.flagged, describe(ordered)
    # Without the clinician's own instruction the answer speaks of what the question relays.
    relayed = judged(policy, text="Imaging other", note=[{"text": f"{asked} zeta scan arm"}])
    assert not relayed.flagged, describe(relayed)


def test_a_clause_set_off_by_a_dash_completes_a_composition(policy: Policy) -> None:
    # A catalog's or a note's dash adds to the study it describes: the parts may stand on either side of it.
    named = judged(policy, text="Fluoroscopy arm - the video one, not plain films")
    assert named.flagged, describe(named)
    noted = judged(policy, text="XR arm", note=[{"text": "fluoroscopic study of the arm - recorded as video loop"}])
    assert noted.flagged, describe(noted)
    # A full stop or a ";" still ends the sentence, and a non-motion use across the dash still stops it.
    assert not judged(policy, text="Fluoroscopy arm; video on file").flagged
    assert not judged(policy, text="Fluoroscopy arm - video of line placement").flagged


def test_a_parameter_value_that_asks_and_answers_is_read_as_its_question(policy: Policy) -> None:
    comment = {"parameter": [{"code": {"text": "Order comment"}, "valueString": "Zeta scan of the arm? - No"}]}
    refused = judged(policy, text="XR arm", orderDetail=[comment])
    assert not refused.flagged, describe(refused)
    wanted = {"parameter": [{"code": {"text": "Order comment"}, "valueString": "Zeta scan of the arm? Yes"}]}
    assert judged(policy, text="XR arm", orderDetail=[wanted]).flagged
