"""Recognition (issue 18) on the synthetic engine-test policy extended with the parts it lacks (typos, questions,
concepts and compositions): one order read once from one table of FHIR fields, guesses that never argue against the
order, techniques composed of their parts, refused answers and codes written as text."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from cds_service.engine import InvalidRequest, Policy, Verdict, describe, judge, load_policies, read_order
from cds_service.engine.orders import FIELDS, READ_FIELDS
from cds_service.engine.policy import check_policies
from cds_service.engine.tolerant import well_formed

from .builders import CPT, service_request

ENGINE_TEST = Path(__file__).resolve().parent / "policies" / "engine-test" / "engine-test.yaml"
LOCAL = "http://example.org/fhir/CodeSystem/test-orderables"
BILLING_OPTIONS = "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-billing-options"
EVERYWHERE = ["code", "detail", "body_site", "note", "instruction", "category", "performer", "location"]
EVERYWHERE.append("supporting_info")

EXTENSION: dict[str, Any] = {
    "typos": {"min_length": 5, "max_edits": 1, "two_edits_from": 8, "kinds": ["technique", "anatomy"]},
    "abbreviations": {"zet": "zeta"},
    "context": [
        {"name": "negation", "assertion": "negated", "direction": "forward", "window": 5, "terms": ["no", "not"]},
        {"name": "refusal", "assertion": "negated", "direction": "both", "window": 4, "terms": ["declined"]},
    ],
    "questions": {"yes": ["yes"], "no": ["no"]},
    "concepts": {
        "modality": {"terms": ["fluoroscopy", "fluoroscopic", "image intensifier"]},
        "recording": {"terms": ["video", "loop", "real-time"]},
        "movement": {"terms": ["flexion", "bending"]},
        "static-views": {"terms": ["spot film"]},
        "non-motion-use": {"terms": ["placement", "contrast flow"]},
    },
    "compositions": [
        {
            "name": "fluoroscopy recording motion",
            "technique": "motion imaging",
            "all": ["modality", "recording"],
            "unless": ["non-motion-use"],
        },
        {
            "name": "movement under fluoroscopy",
            "technique": "motion imaging",
            "all": ["modality", "movement"],
            "unless": ["non-motion-use", "static-views"],
        },
    ],
}


def write_policy(folder: Path, change: dict[str, Any] | None = None) -> Path:
    """The engine-test policy with EXTENSION (and `change`) merged into its recognition, written to `folder`."""
    data = yaml.safe_load(ENGINE_TEST.read_text(encoding="utf-8"))
    data["recognition"].update(EXTENSION)
    for kind in ("technique", "ambiguous-technique", "anatomy"):
        data["recognition"]["places"][kind] = list(EVERYWHERE)
    data["recognition"].update(change or {})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "engine-test.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    [only] = load_policies(write_policy(tmp_path_factory.mktemp("recognition"))).policies
    return only


def problems_of(tmp_path: Path, change: dict[str, Any]) -> list[str]:
    _, problems = check_policies(write_policy(tmp_path, change))
    return [str(p) for p in problems]


def judged(policy: Policy, **kwargs: Any) -> Verdict:
    return judge(read_order(service_request(**kwargs)), policy)


# -- one order, read once ----------------------------------------------------------------------------------------


# Each field of the table, as a client writes it, and the place its words are read as.
FIELD_SAMPLES: dict[str, tuple[Any, str]] = {
    "supportingInfo": ([{"reference": "QuestionnaireResponse/q", "display": "Form: zeta scan"}], "supporting_info"),
    "performer": ([{"reference": "Organization/o", "display": "Zeta Scan Centre"}], "performer"),
    "locationCode": ([{"coding": [{"system": "urn:x", "code": "Z", "display": "Zeta scan suite"}]}], "location"),
    "locationReference": ([{"reference": "Location/l", "display": "Zeta scan room 2"}], "location"),
    "location": ([{"concept": {"text": "Zeta scan unit"}}], "location"),
    "category": ([{"text": "Zeta scan imaging"}], "category"),
    "performerType": ([{"text": "Zeta scan technologist"}], "performer"),
    "bodyStructure": ({"reference": "BodyStructure/b", "display": "Left arm zeta scan site"}, "body_site"),
    "reasonReference": ([{"reference": "Condition/c", "display": "Arm pain, zeta scan requested"}], "reason"),
}


def test_one_table_names_every_field_each_step_reads() -> None:
    names = [f.name for f in FIELDS]
    assert len(names) == len(set(names))
    assert set(FIELD_SAMPLES) <= set(names)
    assert set(READ_FIELDS) == set(names) | {"status", "intent", "doNotPerform"}


@pytest.mark.parametrize("name", sorted(FIELD_SAMPLES))
def test_each_field_is_read_with_its_place_and_fixed_by_the_tolerant_reader(name: str) -> None:
    value, place = FIELD_SAMPLES[name]
    resource = service_request(text="XR arm", **{name: value})
    order = read_order(well_formed(resource, "resource"))
    assert any(p == place and "zeta scan" in t.lower() for p, t in order.texts), order.texts
    # A boolean where the field's text belongs is refused with the path, never read as nothing.
    bad: Any = {"display": True} if name == "bodyStructure" else [{"text": True}]
    broken = service_request(text="XR arm", **{name: bad})
    with pytest.raises(InvalidRequest) as refused:
        well_formed(broken, "resource")
    assert name in (refused.value.expression or "")


def test_r5_code_reference_display_names_the_order(policy: Policy) -> None:
    resource = service_request(body_site="arm")
    resource["code"] = {"concept": {"text": "Special imaging"}, "reference": {"display": "Zeta scan of the arm"}}
    verdict = judge(read_order(resource), policy)
    assert verdict.flagged and verdict.rule == "technique-named"


def test_a_technique_named_only_by_the_attached_form_is_judged(policy: Policy) -> None:
    form = [{"reference": "QuestionnaireResponse/q", "display": "Request form: zeta scan"}]
    assert judged(policy, text="Imaging request", body_site="arm", supportingInfo=form).flagged
    assert not judged(policy, text="Imaging request", body_site="arm").flagged


def test_the_order_is_immutable_and_read_once() -> None:
    order = read_order(service_request(text="Zeta scan arm"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        order.status = "active"  # type: ignore[misc]
    assert order.places is order.places
    # OrderView fills its fields by hand (a hot path): every field of the dataclass must be set.
    assert all(f.name in order.__dict__ for f in dataclasses.fields(order))


def test_an_order_without_the_policys_words_is_decided_by_the_first_pass_alone(policy: Policy) -> None:
    order = read_order(service_request(text="Complete blood count", note=[{"text": "fasting"}]))
    verdict = judge(order, policy)
    assert verdict.rule == "no-evidence" and "places" not in order.__dict__
    # One of the policy's words (a comparator) and the table names the rule the full judgement names.
    assert judged(policy, text="Stress views of the knee").rule == "comparator-only"


# -- CRD billing options, codes written as text --------------------------------------------------------------------


def billing_options(*codings: dict[str, str]) -> list[dict[str, Any]]:
    return [{"url": BILLING_OPTIONS, "extension": [{"url": "code", "valueCoding": c} for c in codings]}]


def test_billing_options_codes_are_the_orders_codes(policy: Policy) -> None:
    resource = service_request(text="Arm imaging, special", body_site="arm")
    assert not judge(read_order(resource), policy).flagged
    resource["code"]["extension"] = billing_options({"system": LOCAL, "code": "ZS-100", "display": "descriptor"})
    verdict = judge(read_order(resource), policy)
    assert verdict.flagged and verdict.rule == "billing-code-on-limb"
    # The option's display is the code's descriptor, not words of the order.
    assert all("descriptor" not in text for _, text in read_order(resource).texts)


@pytest.mark.parametrize(
    "code",
    [
        {"text": "CPT 76499 arm"},
        {"text": "76499"},
        {"coding": [{"code": "76499^UNLISTED RADIOGRAPHIC^CPT"}], "text": "Arm study"},
        {"coding": [{"code": "76499"}]},
    ],
    ids=["cpt-in-text", "bare-number", "hl7-v2-remnant", "no-system"],
)
def test_a_policy_code_written_as_text_is_that_code(policy: Policy, code: dict[str, Any]) -> None:
    verdict = judged(policy, body_site="arm", code=code)
    assert verdict.flagged and verdict.rule == "billing-code-on-limb", describe(verdict)


@pytest.mark.parametrize("text", ["Accession 764990 arm", "76499-1 arm", "XR arm 2.76499"])
def test_a_number_that_only_contains_a_code_is_not_it(policy: Policy, text: str) -> None:
    assert not judged(policy, text=text, body_site="arm").flagged


def test_a_code_listed_by_two_systems_stays_ambiguous_when_written_as_text(policy: Policy) -> None:
    # 55555 is a billing code in CPT and a body site in SNOMED: written without a system it is neither.
    assert judged(policy, text="55555 arm").rule != "billing-code-on-limb"


# -- safe guessing -------------------------------------------------------------------------------------------------


def test_a_typo_may_name_the_technique(policy: Policy) -> None:
    verdict = judged(policy, text="Zetagrapy of the arm")
    assert verdict.flagged and "read as zetagraphy" in describe(verdict)


def test_a_typo_never_reads_as_a_look_alike(policy: Policy) -> None:
    # "injectoin" is one edit from the look-alike "injection": a guess, so no evidence against the order.
    verdict = judged(policy, text="Zeta scan of the arm, no injectoin")
    assert verdict.flagged and verdict.rule == "technique-named"
    assert all("injectoin" not in e.label for e in verdict.evidence_against)
    # Written plainly, the look-alike decides.
    assert judged(policy, text="Zeta scan of the arm injection").rule == "look-alike-named"


def test_a_word_is_read_as_cut_only_at_the_end_of_a_field(policy: Policy) -> None:
    assert judged(policy, text="Left arm zetagra").flagged
    # The same fragment inside the field is a word of its own, not a cut one.
    assert not judged(policy, text="Left arm zetagra study").flagged
    # A fragment of a look-alike word at the end is never read as the look-alike.
    assert judged(policy, text="Zeta scan arm injec").rule == "technique-named"


def test_a_typo_is_read_as_the_word_that_makes_a_term_with_its_neighbours(tmp_path: Path) -> None:
    techniques = yaml.safe_load(ENGINE_TEST.read_text(encoding="utf-8"))["recognition"]["techniques"]
    techniques.append({"name": "zeta analysis", "terms": ["zeta analysis", {"term": "analisis zeta", "lang": "es"}]})
    [only] = load_policies(write_policy(tmp_path, {"techniques": techniques})).policies
    # "analisys" is one edit from the Spanish "analisis" and two from "analysis": only "analysis" makes a term here.
    verdict = judge(read_order(service_request(text="Zeta analisys of the arm")), only)
    assert verdict.flagged and "read as Zeta analysis" in describe(verdict), describe(verdict)


def test_the_loader_refuses_a_typo_kind_that_argues_against_the_order(tmp_path: Path) -> None:
    typos = {"min_length": 5, "max_edits": 1, "kinds": ["technique", "look-alike"]}
    found = problems_of(tmp_path, {"typos": typos})
    assert any("typos.kinds[1]" in p and "argue against the order" in p for p in found), found


# -- concepts, composed --------------------------------------------------------------------------------------------


def test_a_modality_with_a_recording_names_the_technique_and_says_how(policy: Policy) -> None:
    verdict = judged(policy, text="Fluoroscopic video of the arm")
    assert verdict.flagged and verdict.rule == "technique-on-limb"
    assert "fluoroscopy recording motion: 'Fluoroscopic' with 'video' and 'arm' in the order name" in describe(verdict)


def test_a_movement_under_the_modality_names_it_but_static_views_do_not(policy: Policy) -> None:
    assert judged(policy, text="Image intensifier views of the arm in flexion").flagged
    assert not judged(policy, text="Fluoroscopic spot film of the arm in flexion").flagged
    # The movement alone is the comparator's business, not the technique.
    assert not judged(policy, text="Arm radiograph in flexion").flagged


def test_a_non_motion_use_in_the_sentence_stops_the_composition(policy: Policy) -> None:
    assert not judged(policy, text="Fluoroscopy real-time for line placement, arm").flagged
    assert not judged(policy, text="Fluoroscopy of contrast flow, arm, video").flagged


def test_parts_compose_within_one_sentence_only(policy: Policy) -> None:
    assert not judged(policy, text="Fluoroscopy of the arm. Patient keeps a video diary").flagged
    assert judged(policy, text="Fluoroscopy of the arm with video").flagged


def test_a_composed_technique_keeps_its_parts_assertion(policy: Policy) -> None:
    verdict = judged(policy, text="XR arm", note=[{"text": "not fluoroscopic video"}])
    assert not verdict.flagged
    assert any(e.assertion == "negated" for e in verdict.evidence_against)


def test_a_composition_reads_every_field_of_the_table(policy: Policy) -> None:
    location = [{"reference": "Location/l", "display": "Fluoroscopy video suite"}]
    assert judged(policy, text="Arm study", locationReference=location).flagged


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"compositions": [{"name": "x", "technique": "no such", "all": ["modality", "recording"]}]}, "no technique"),
        ({"compositions": [{"name": "x", "technique": "motion imaging", "all": ["modality", "nope"]}]}, "no concept"),
        (
            {"compositions": [{"name": "x", "technique": "motion imaging", "all": ["modality", "recording"]}]},
            "used by no composition",
        ),
        (
            {"compositions": [{"name": "x", "technique": "motion imaging", "all": ["modality"], "unless": []}]},
            "at least 2",
        ),
        (
            {
                "compositions": [
                    {"name": "x", "technique": "motion imaging", "all": ["modality", "recording"], "when": "always"}
                ]
            },
            "when",
        ),
    ],
    ids=["unknown-technique", "unknown-concept", "unused-concept", "one-part", "unknown-key"],
)
def test_compositions_are_checked_like_the_rest_of_the_policy(
    tmp_path: Path, change: dict[str, Any], expected: str
) -> None:
    found = problems_of(tmp_path, change)
    assert any(expected in p for p in found), found


# -- answers -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", ["Patient declined", "Not at this time", "No"])
def test_a_refusal_or_deferral_answers_no(policy: Policy, answer: str) -> None:
    verdict = judged(policy, text="XR arm", orderDetail=[{"text": f"Zeta scan? {answer}"}])
    assert not verdict.flagged, describe(verdict)


def test_a_negation_farther_in_the_answer_is_about_something_else(policy: Policy) -> None:
    verdict = judged(policy, text="XR arm", orderDetail=[{"text": "Zeta scan: left arm, pain not improving"}])
    assert verdict.flagged


def test_r5_answers_read_alike(policy: Policy) -> None:
    detail = [{"parameter": [{"code": {"text": "Zeta scan"}, "valueString": "Declined by patient"}]}]
    assert not judged(policy, text="XR arm", r5=True, orderDetail=detail).flagged


def test_the_cpt_is_taken_from_the_order_code_only(policy: Policy) -> None:
    # A code number in a note is history, not the order's code.
    verdict = judged(policy, text="XR arm", note=[{"text": "prior 76499 elsewhere"}])
    assert not verdict.flagged
    assert judged(policy, cpt="76499", text="XR arm").flagged and CPT
