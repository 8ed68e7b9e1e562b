"""The engine judged against a synthetic policy (tests/policies/engine-test): evidence, the decision table, regions."""

from __future__ import annotations

from datetime import date
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from cds_service.engine import (
    Policy,
    Verdict,
    assess,
    describe,
    explain_lines,
    judge,
    load_policies,
    parse_hook_request,
    read_order,
    respond,
)

from .builders import CPT, ICD10, SNOMED, hook_request, service_request

POLICY_DIR = Path(__file__).resolve().parent / "policies" / "engine-test"
LOCAL = "http://example.org/fhir/CodeSystem/test-orderables"
ARM = ("1000001", "Arm structure")
LEG = ("1000003", "Leg structure")
LIMB = ("1000009", "Limb structure")
TECHNIQUES = ("technique", "ambiguous-technique")
SUMMARY = "Zeta Scan of the Limbs is investigational under policy T-01; order plain radiographs instead"


@cache
def policy() -> Policy:
    [only] = load_policies(POLICY_DIR).policies
    return only


def judged(resource: dict[str, Any]) -> Verdict:
    return judge(read_order(resource), policy())


def coded(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def labels(verdict: Verdict) -> tuple[list[str], list[str]]:
    return [e.label for e in verdict.evidence_for], [e.label for e in verdict.evidence_against]


def kinds(verdict: Verdict) -> list[str]:
    return [e.kind for e in verdict.deciding]


# --- the synthetic policy itself ------------------------------------------------------------------------------------


def test_the_synthetic_policy_loads_with_its_services_rules_and_text() -> None:
    policies = load_policies(POLICY_DIR)
    assert set(policies.services) == {"test-order-select", "test-order-sign"}
    p = policy()
    assert p.id == "engine-test" and p.covered == "not-covered"
    assert [r.id for r in p.rules][:3] == ["not-judged", "do-not-perform", "another-service"]
    assert p.rules[-1].id == "no-evidence" and p.rules[-1].when is None
    assert set(p.alternatives) == {"arm", "leg"}
    assert p.alternatives["arm"].suggestion_label == "Replace with plain radiographs of the arm"
    # Placeholders are filled from the policy's facts when it is loaded.
    assert p.card.summary == SUMMARY
    assert p.card.footer.startswith("Policy T-01 (version 1.2.3).")
    assert p.coverage_reason == "Investigational: Zeta Scan of the Limbs (policy T-01, version 1.2.3)"
    assert p.replacement_note == "Replaces {order}: the zeta scan is investigational under policy T-01."


# --- billing codes need anatomy -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("system", "code", "display"),
    [
        (LOCAL, "ZS-100", "Zeta scan, any limb"),
        (CPT, "76499", "Unlisted diagnostic radiographic procedure"),
        ("urn:oid:2.16.840.1.113883.6.12", "76499", "Unlisted diagnostic radiographic procedure"),
    ],
)
def test_a_billing_code_with_a_limb_body_site_is_flagged(system: str, code: str, display: str) -> None:
    verdict = judged(service_request(code=coded(system, code), body_site=LEG))
    assert verdict.flagged and verdict.rule == "billing-code-on-limb"
    assert verdict.reason == "a billing code of the policy with limb evidence"
    assert kinds(verdict) == ["billing-code", "anatomy"]
    # The canonical URI (the first one listed) is what CRD's billingCode names.
    canonical = LOCAL if system == LOCAL else CPT
    assert verdict.billing_code is not None
    assert (verdict.billing_code.system, verdict.billing_code.code, verdict.billing_code.display) == (
        canonical,
        code,
        display,
    )
    assert verdict.region == "leg"


def test_a_billing_code_alone_is_not_enough() -> None:
    verdict = judged(service_request(code=coded(LOCAL, "ZS-100")))
    assert not verdict.flagged and verdict.rule == "billing-code-alone"
    assert verdict.reason == "billing code without limb evidence"
    assert verdict.billing_code is None and verdict.region is None


def test_a_billing_code_for_another_body_region_is_not_flagged() -> None:
    verdict = judged(service_request(cpt="76499", body_site="Chest"))
    assert not verdict.flagged and verdict.rule == "billing-code-other-region"
    assert verdict.reason == "billing code for a body region other than the limb"
    assert labels(verdict)[1] == ["'Chest' in the body site"]


def test_limb_words_in_a_note_do_not_turn_a_head_study_into_a_limb_study() -> None:
    resource = service_request(cpt="76499", text="XR head", note=[{"text": "History of arm fracture"}])
    verdict = judged(resource)
    assert not verdict.flagged and verdict.rule == "billing-code-other-region"


def test_the_orders_own_limb_field_outweighs_another_region_named_beside_it() -> None:
    verdict = judged(service_request(cpt="76499", text="Fluoroscopy head and arm"))
    assert verdict.flagged and verdict.rule == "billing-code-on-limb"
    assert labels(verdict)[1] == ["'head' in the order name"]
    assert verdict.region == "arm"


def test_a_billing_code_counts_only_where_the_policy_reads_it() -> None:
    # billing-code: [code]; the same CPT code among the reasons is not what is ordered.
    verdict = judged(service_request(body_site="arm", reasonCode=[coded(CPT, "76499")]))
    assert verdict.rule == "no-evidence" and verdict.billing_code is None


# --- coded diagnoses: ranges and prefixes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("system", "code", "region", "label"),
    [
        (ICD10, "S40.0", "arm", "Injury of shoulder and upper arm (ICD-10-CM S40.0)"),  # first category of the range
        (ICD10, "S49.91XA", "arm", "Injury of shoulder and upper arm (ICD-10-CM S49.91XA)"),  # last, extended
        ("urn:oid:2.16.840.1.113883.6.90", "S4900", "arm", "Injury of shoulder and upper arm (ICD-10-CM S4900)"),
        (ICD10, "S83.200A", "leg", "Tear of meniscus (ICD-10-CM S83.200A)"),  # prefix S83.2
        (ICD10, "M79.605", None, "Pain in limb (ICD-10-CM M79.605)"),  # prefix M79.6, no region
        # The most specific entry decides: M79.62 within M79.6, and without its dot.
        (ICD10, "M79.621", "arm", "Pain in upper arm or forearm (ICD-10-CM M79.621)"),
        (ICD10, "M79631", "arm", "Pain in upper arm or forearm (ICD-10-CM M79631)"),
        (SNOMED, "1000010", None, "Limb pain (SNOMED 1000010)"),
    ],
)
def test_a_limb_diagnosis_is_limb_evidence_with_its_region(
    system: str, code: str, region: str | None, label: str
) -> None:
    verdict = judged(service_request(cpt="76499", reasonCode=[coded(system, code)]))
    assert verdict.flagged and verdict.rule == "billing-code-on-limb", describe(verdict)
    assert verdict.region == region
    assert explain_lines(verdict) == [f"CPT 76499 Unlisted diagnostic radiographic procedure with reason {label}"]


@pytest.mark.parametrize(
    ("system", "code"),
    [(ICD10, "S39.9"), (ICD10, "S50.0"), (ICD10, "S83.3"), (ICD10, "M79.7"), (ICD10, "M79"), (SNOMED, "1000011")],
)
def test_codes_beside_the_limb_diagnoses_are_not_limb_evidence(system: str, code: str) -> None:
    verdict = judged(service_request(cpt="76499", reasonCode=[coded(system, code)]))
    assert verdict.rule == "billing-code-alone"


def test_an_r5_reason_concept_counts_like_an_r4_reason_code() -> None:
    verdict = judged(service_request(cpt="76499", r5=True, reason=[{"concept": coded(ICD10, "S42.1")}]))
    assert verdict.flagged and verdict.region == "arm"


# --- code systems as clients write them -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "system",
    [
        "https://www.ama-assn.org/go/cpt",
        "http://www.ama-assn.org/go/cpt/",
        "HTTP://WWW.AMA-ASSN.ORG/GO/CPT",
        "2.16.840.1.113883.6.12",
        " urn:oid:2.16.840.1.113883.6.12 ",
        "http://ama-assn.org/go/cpt",
    ],
)
def test_variants_of_a_known_system_uri_are_accepted(system: str) -> None:
    verdict = judged(service_request(code=coded(system, "76499"), body_site="arm"))
    assert verdict.flagged and verdict.billing_code is not None and verdict.billing_code.system == CPT


@pytest.mark.parametrize("system", [LOCAL, SNOMED, "http://example.org/cpt"])
def test_the_same_digits_in_another_system_are_not_the_billing_code(system: str) -> None:
    assert judged(service_request(code=coded(system, "76499"), body_site="arm")).rule == "no-evidence"


def test_local_codes_compare_without_case() -> None:
    assert judged(service_request(code=coded(LOCAL, "zs-100"), body_site="arm")).rule == "billing-code-on-limb"


def test_a_systemless_code_counts_when_exactly_one_system_of_the_policy_lists_it() -> None:
    local = judged(service_request(code={"coding": [{"code": "ZS-100"}]}, body_site="arm"))
    assert local.flagged and local.billing_code is not None and local.billing_code.system == LOCAL
    site = judged(service_request(text="Cine", bodySite=[{"coding": [{"code": "1000003"}]}]))
    assert site.flagged and site.region == "leg"
    assert labels(site)[0][1] == "body site Leg structure (SNOMED 1000003)"
    # 55555 is a CPT billing code and a SNOMED body site: without a system it is neither.
    both = judged(service_request(code={"coding": [{"code": "55555"}]}, body_site="arm"))
    assert both.rule == "no-evidence" and labels(both) == (["body site 'arm'"], [])


@pytest.mark.parametrize("code", [{"coding": [{}]}, {"coding": [{"system": CPT}]}, {"coding": "76499"}, {}, []])
def test_empty_and_half_filled_codings_are_read_without_harm(code: Any) -> None:
    assert judged(service_request(body_site="arm", code=code)).rule == "no-evidence"


def test_a_code_sent_as_bare_text_is_read_as_the_orders_name() -> None:
    verdict = judged(service_request(code="Zeta scan arm"))
    assert verdict.rule == "technique-named" and verdict.region == "arm"


# --- techniques ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "written", "reason"),
    [
        ("Zeta scan", "Zeta scan", "names zeta scan"),
        ("ZETA-SCAN", "ZETA-SCAN", "names zeta scan"),
        ("zetascans of the arm", "zetascan", "names zeta scan"),  # written together, plural
        ("Zetagraphy", "Zetagraphy", "names zeta scan"),
        ("ZS", "ZS", "names zeta scan"),
        # A needs_anatomy technique's term that says needs_anatomy: false names the service on its own.
        ("Orbitrack", "Orbitrack", "names motion imaging"),
    ],
)
def test_a_standalone_technique_is_flagged_by_its_name(text: str, written: str, reason: str) -> None:
    verdict = judged(service_request(text=text))
    assert verdict.flagged and verdict.rule == "technique-named" and verdict.reason == reason
    [item] = verdict.deciding
    assert (item.kind, item.place, item.label) == (
        "technique",
        "code",
        f"the order text names '{written}' (in the order name)",
    )


@pytest.mark.parametrize(
    ("text", "group"),
    [
        ("Cine", "motion imaging"),
        ("Motion imaging", "motion imaging"),
        # A standalone technique's term with needs_anatomy: true (an acronym with other meanings).
        ("ZVA", "zeta scan"),
    ],
)
def test_a_technique_shared_with_other_organs_needs_limb_evidence(text: str, group: str) -> None:
    alone = judged(service_request(text=text))
    assert not alone.flagged and alone.rule == "technique-without-limb"
    assert alone.reason == "names the technique but nothing says the study is of a limb"
    assert [(e.kind, e.group) for e in alone.deciding] == [("ambiguous-technique", group)]
    with_site = judged(service_request(text=text, body_site=ARM))
    assert with_site.flagged and with_site.rule == "technique-on-limb"
    assert with_site.reason == f"names {group} with limb evidence"
    assert judged(service_request(text=text, reasonCode=[coded(ICD10, "S83.211A")])).flagged


def test_a_case_sensitive_term_matches_only_in_its_case() -> None:
    assert judged(service_request(text="ZS arm")).flagged
    lower = judged(service_request(text="zs arm"))
    assert lower.rule == "no-evidence" and labels(lower) == (["'arm' in the order name"], [])


def test_a_term_with_its_own_places_counts_only_there() -> None:
    # "zeta survey" lists places: [code]; the technique's other terms are also read in the detail.
    assert judged(service_request(text="Zeta survey arm")).rule == "technique-named"
    assert judged(service_request(text="Imaging", orderDetail=[{"text": "zeta survey arm"}])).rule == "no-evidence"
    assert judged(service_request(text="Imaging", orderDetail=[{"text": "zeta scan arm"}])).rule == "technique-named"


def test_a_named_technique_for_another_body_region_is_not_flagged() -> None:
    verdict = judged(service_request(text="Zeta scan of the head"))
    assert not verdict.flagged and verdict.rule == "technique-on-other-region"
    assert verdict.reason == "names the technique for a body region other than the limb"
    assert labels(verdict) == (
        ["the order text names 'Zeta scan' (in the order name)"],
        ["'head' in the order name"],
    )
    assert sorted(kinds(verdict)) == ["other-anatomy", "technique"]


def test_other_anatomy_is_read_only_in_the_orders_own_fields() -> None:
    assert judged(service_request(text="Zeta scan", note=[{"text": "head injury last year"}])).flagged
    # {term: TMJ, case: true}
    assert judged(service_request(text="Zeta scan tmj")).flagged
    assert judged(service_request(text="Zeta scan TMJ")).rule == "technique-on-other-region"


@pytest.mark.parametrize(
    ("place", "fields"),
    [
        ("detail", {"orderDetail": [{"text": "Zeta scan of the forearm"}]}),
        ("note", {"note": [{"text": "Zeta scan of the forearm"}]}),
        ("instruction", {"patientInstruction": "Zeta scan of the forearm"}),
        ("body_site", {"bodySite": [{"text": "Zeta scan of the forearm"}]}),
    ],
)
def test_techniques_are_read_in_every_place_the_policy_lists(place: str, fields: dict[str, Any]) -> None:
    verdict = judged(service_request(text="Imaging referral", **fields))
    assert verdict.flagged and verdict.rule == "technique-named"
    assert verdict.deciding[0].place == place


def test_a_technique_among_the_reasons_is_not_an_order_for_it() -> None:
    # technique places leave out the reasons: "prior zeta scan" is history.
    verdict = judged(service_request(text="Office visit", reasonCode=[{"text": "Prior zeta scan"}]))
    assert verdict.rule == "no-evidence" and labels(verdict) == ([], [])


# --- combinations -----------------------------------------------------------------------------------------------------


def test_a_combination_in_one_field() -> None:
    verdict = judged(service_request(text="Fluoroscopy of the knee, moving"))
    assert verdict.flagged and verdict.rule == "technique-on-limb"
    [combo] = [e for e in verdict.deciding if e.kind in TECHNIQUES]
    assert (combo.kind, combo.group, combo.combo) == ("ambiguous-technique", "motion imaging", True)
    assert explain_lines(verdict) == [
        "the order text names 'Fluoroscopy' with 'moving' (in the order name)",
        "limb evidence: 'knee' in the order name",
    ]


def test_a_combination_split_over_the_orders_name_and_detail() -> None:
    verdict = judged(service_request(text="FL knee", orderDetail=[{"text": "kinetic sequences"}]))
    assert verdict.flagged
    assert explain_lines(verdict)[0] == "the order text names 'FL' with 'kinetic' (in the order name and order detail)"


def test_r5_order_detail_parameters_are_read() -> None:
    resource = service_request(
        text="Fluoroscopy arm",
        r5=True,
        orderDetail=[{"parameter": [{"code": {"text": "Positioning"}, "valueString": "moving"}]}],
    )
    assert judged(resource).rule == "technique-on-limb"


def test_a_combination_is_not_assembled_from_the_orders_name_and_a_note() -> None:
    verdict = judged(service_request(text="Fluoro knee", note=[{"text": "pain when moving"}]))
    assert verdict.rule == "no-evidence"


def test_a_combination_inside_one_note_counts() -> None:
    verdict = judged(service_request(text="Imaging", note=[{"text": "fluoroscopy of the knee while moving"}]))
    assert verdict.flagged
    assert explain_lines(verdict)[0] == "the order text names 'fluoroscopy' with 'moving' (in the order note)"
    assert verdict.region == "leg"


def test_combination_words_count_inside_a_longer_comparator_phrase() -> None:
    verdict = judged(service_request(text="Spot fluoroscopy of the knee, moving"))
    assert verdict.flagged and verdict.rule == "technique-on-limb"
    assert labels(verdict)[1] == ["plain radiographs ('Spot fluoroscopy' in the order name)"]
    still = judged(service_request(text="Spot fluoroscopy of the knee"))
    assert still.rule == "comparator-only" and still.reason == "only plain radiographs, the covered comparator"


def test_a_named_technique_is_not_repeated_as_a_combination_of_its_words() -> None:
    verdict = judged(service_request(text="Fluoroscopy motion imaging knee"))
    assert explain_lines(verdict) == [
        "the order text names 'motion imaging' (in the order name)",
        "limb evidence: 'knee' in the order name",
    ]
    assert not any(e.combo for e in verdict.evidence_for)


# --- look-alikes, billing explanations, comparators, other services -------------------------------------------------


@pytest.mark.parametrize(
    ("code", "label"),
    [
        (coded(CPT, "78300"), "bone scan (CPT 78300)"),
        (coded(CPT, "78320"), "bone scan (CPT 78320)"),
        (coded(LOCAL, "BS-1"), "bone scan (LOCAL BS-1)"),
    ],
)
def test_a_look_alike_code_excludes_the_order(code: dict[str, Any], label: str) -> None:
    verdict = judged(service_request(code={**code, "text": "Cine arm"}))
    assert not verdict.flagged and verdict.rule == "look-alike-named"
    assert verdict.reason == "the order is a bone scan"
    assert [e.label for e in verdict.deciding] == [label]
    assert label in labels(verdict)[1]


@pytest.mark.parametrize("code", ["78299", "78321"])
def test_codes_beside_a_look_alike_range_are_not_look_alikes(code: str) -> None:
    assert judged(service_request(cpt=code, text="Cine arm")).rule == "technique-on-limb"


def test_a_look_alike_in_the_name_decides_even_beside_a_standalone_technique() -> None:
    verdict = judged(service_request(text="Zeta scan arm, guided injection"))
    assert verdict.rule == "look-alike-named" and verdict.reason == "the order is a guided injection"


def test_a_look_alike_outside_the_name_does_not_outweigh_a_standalone_technique_in_the_name() -> None:
    zeta = judged(service_request(text="Zeta scan arm", orderDetail=[{"text": "s/p injection"}]))
    assert zeta.flagged and zeta.rule == "technique-named"
    assert labels(zeta)[1] == ["guided injection ('injection' in the order detail)"]
    # A shared technique does not get that benefit: the detail says what the cine study is.
    cine = judged(service_request(text="Cine arm", orderDetail=[{"text": "s/p injection"}]))
    assert cine.rule == "look-alike-described" and cine.reason == "the order describes a guided injection"


def test_look_alike_words_in_a_note_do_not_exclude() -> None:
    verdict = judged(service_request(text="Zeta scan arm", note=[{"text": "Prior bone scan was normal"}]))
    assert verdict.flagged and labels(verdict)[1] == []


def test_a_look_alike_reads_its_own_places_the_bone_scan_reads_the_reasons() -> None:
    bone = judged(service_request(text="Cine", body_site="arm", reasonCode=[{"text": "Osteomyelitis"}]))
    assert bone.rule == "look-alike-described"
    assert labels(bone)[1] == ["bone scan ('Osteomyelitis' in the reason for the order)"]
    # The guided injection keeps the default places: "failed injection" as a reason is history.
    history = judged(service_request(text="Cine arm", reasonCode=[{"text": "Failed injection"}]))
    assert history.flagged and history.rule == "technique-on-limb"


def test_a_billing_explanation_discounts_the_billing_code_but_not_a_named_technique() -> None:
    explained = judged(service_request(cpt="76499", text="Outside film review, arm"))
    assert not explained.flagged and explained.rule == "billing-code-explained"
    assert explained.reason == "the billing code is explained by outside film review"
    assert kinds(explained) == ["billing-code", "billing-explanation"]
    assert judged(service_request(cpt="76499", text="Zeta scan arm, second opinion")).rule == "technique-named"
    assert judged(service_request(cpt="76499", text="Cine arm, second opinion")).rule == "technique-on-limb"


def test_a_comparator_is_shown_but_changes_nothing() -> None:
    verdict = judged(service_request(cpt="76499", text="Plain film arm"))
    assert verdict.flagged and verdict.rule == "billing-code-on-limb"
    assert labels(verdict)[1] == ["plain radiographs ('Plain film' in the order name)"]
    coded_comparator = judged(service_request(cpt="73562", text="Cine knee"))
    assert coded_comparator.flagged and labels(coded_comparator)[1] == ["plain radiographs (CPT 73562)"]


def test_a_comparator_alone_decides_only_the_rule_that_names_it() -> None:
    verdict = judged(service_request(text="Stress views of the knee"))
    assert verdict.rule == "comparator-only"
    assert verdict.reason == "only plain radiographs, the covered comparator"


@pytest.mark.parametrize(
    "fields",
    [{"category": [{"text": "Laboratory"}]}, {"performerType": [{"text": "LAB"}]}],
    ids=["category", "performer"],
)
def test_another_service_line_is_read_from_category_and_performer(fields: dict[str, Any]) -> None:
    verdict = judged(service_request(text="Zeta scan arm", **fields))
    assert verdict.rule == "another-service" and verdict.reason == "the order belongs to laboratory test"
    # Its words count only there: "laboratory" in the order's name is not the service line.
    assert judged(service_request(text="Zeta scan arm, laboratory")).rule == "technique-named"


# --- status, doNotPerform, intent, a rule referring to another ------------------------------------------------------


@pytest.mark.parametrize("status", ["revoked", "entered-in-error"])
def test_listed_statuses_are_not_judged(status: str) -> None:
    verdict = judged(service_request(text="Zeta scan arm", status=status))
    assert not verdict.flagged and verdict.rule == "not-judged"
    assert verdict.reason == f"status {status}: not judged"
    assert verdict.deciding == [] and verdict.region is None


@pytest.mark.parametrize("status", ["draft", "active", "on-hold", None])
def test_other_statuses_are_judged(status: str | None) -> None:
    assert judged(service_request(text="Zeta scan arm", status=status)).rule == "technique-named"


def test_do_not_perform_is_never_flagged_and_only_the_boolean_counts() -> None:
    verdict = judged(service_request(text="Zeta scan arm", doNotPerform=True))
    assert verdict.rule == "do-not-perform" and verdict.reason == "the order says do not perform"
    assert judged(service_request(text="Zeta scan arm", doNotPerform=False)).flagged
    assert judged(service_request(text="Zeta scan arm", doNotPerform="true")).flagged


@pytest.mark.parametrize("intent", ["plan", "proposal"])
def test_a_rule_can_refer_to_a_later_rule(intent: str) -> None:
    # plan-naming-technique holds when the intent is a plan and technique-named's `when:` holds.
    verdict = judged(service_request(text="Zeta scan arm", intent=intent))
    assert not verdict.flagged and verdict.rule == "plan-naming-technique"
    assert verdict.reason == f"intent {intent}: a plan for zeta scan is not an order"
    # The referenced rule's `unless:` is part of it: another region is not technique-named.
    other = judged(service_request(text="Zeta scan head", intent=intent))
    assert other.rule == "technique-on-other-region"
    # Only the referenced rule is reused: an ambiguous technique with limb evidence is still flagged.
    assert judged(service_request(text="Cine arm", intent=intent)).rule == "technique-on-limb"


# --- the region chosen for the alternative ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "region"),
    [
        ({"body_site": ARM}, "arm"),
        ({"body_site": ("1000002", "Upper limb structure")}, "arm"),
        ({"body_site": "Left forearm"}, "arm"),
        ({"text": "Cine A1-A3"}, "arm"),  # a pattern
        ({"body_site": "upper"}, "arm"),  # a body-site-only word
        ({"body_site": "lower"}, "leg"),
        ({"text": "Cine forearm and knee"}, None),  # two regions: none
        ({"body_site": LIMB}, None),  # the region named like the anatomy is no region
        ({"body_site": "limb"}, None),
        ({"reasonCode": [coded(ICD10, "M79.621")]}, "arm"),  # from the reasons when the order names none
        ({"reasonCode": [{"text": "knee pain"}], "body_site": "arm"}, "arm"),  # the order's own field first
        ({"reasonCode": [{"text": "knee pain"}], "body_site": "limb"}, "leg"),
        ({"reasonCode": [{"text": "arm and knee pain"}]}, None),
    ],
)
def test_the_region_comes_from_the_order_then_from_its_reasons(fields: dict[str, Any], region: str | None) -> None:
    verdict = judged(service_request(**{"text": "Cine", **fields}))
    assert verdict.flagged and verdict.region == region


def test_a_body_site_only_word_names_nothing_elsewhere() -> None:
    verdict = judged(service_request(text="Zeta scan upper"))
    assert (
        verdict.flagged
        and verdict.region is None
        and labels(verdict)[0] == ["the order text names 'Zeta scan' (in the order name)"]
    )
    assert judged(service_request(text="Cine upper")).rule == "technique-without-limb"


def test_an_unflagged_order_has_no_region_and_no_billing_code() -> None:
    verdict = judged(service_request(cpt="76499", text="Cine head"))
    assert not verdict.flagged and verdict.region is None and verdict.billing_code is None


def test_a_flagged_order_without_a_policy_billing_code_names_its_own_cpt_code() -> None:
    verdict = judged(service_request(cpt="99999", text="Zeta scan arm"))
    assert verdict.billing_code is not None and (verdict.billing_code.system, verdict.billing_code.code) == (
        CPT,
        "99999",
    )


# --- explanations ----------------------------------------------------------------------------------------------------


def test_explain_lines_name_the_code_with_its_limb_evidence() -> None:
    verdict = judged(service_request(cpt="76499", body_site=ARM))
    assert explain_lines(verdict) == [
        "CPT 76499 Unlisted diagnostic radiographic procedure with body site Arm structure (SNOMED 1000001)"
    ]


def test_explain_lines_join_every_piece_of_limb_evidence() -> None:
    verdict = judged(
        service_request(cpt="76499", text="76499 arm", reasonCode=[coded(ICD10, "M79.621", "Pain in right upper arm")])
    )
    assert explain_lines(verdict) == [
        "CPT 76499 Unlisted diagnostic radiographic procedure with 'arm' in the order name, "
        "reason Pain in right upper arm (ICD-10-CM M79.621)"
    ]


def test_explain_lines_quote_the_technique_as_written_and_list_limb_evidence() -> None:
    verdict = judged(service_request(text="CINE L-KNEE"))
    assert explain_lines(verdict) == [
        "the order text names 'CINE' (in the order name)",
        "limb evidence: 'KNEE' in the order name",
    ]


def test_the_same_words_in_two_cases_are_one_piece_of_evidence() -> None:
    resource = service_request(code={"coding": [{"system": CPT, "code": "76499", "display": "ARM"}], "text": "arm"})
    verdict = judged(resource)
    # Which spelling is quoted does not matter; that "ARM" and "arm" are one fact does.
    assert [line.casefold() for line in explain_lines(verdict)] == [
        "cpt 76499 unlisted diagnostic radiographic procedure with 'arm' in the order name"
    ]
    assert len([e for e in verdict.evidence_for if e.kind == "anatomy"]) == 1


def test_a_coded_body_site_speaks_for_its_display_words() -> None:
    verdict = judged(service_request(cpt="76499", body_site=ARM))
    assert labels(verdict) == (
        ["CPT 76499 Unlisted diagnostic radiographic procedure", "body site Arm structure (SNOMED 1000001)"],
        [],
    )
    [site] = [e for e in verdict.evidence_for if e.kind == "anatomy"]
    assert (site.place, site.region, site.coded) == ("body_site", "arm", True)


def test_describe_prints_the_verdict_its_rule_and_every_piece_of_evidence() -> None:
    text = describe(judged(service_request("sr9", cpt="76499", text="Cine head", note=[{"text": "knee pain"}])))
    assert text.splitlines() == [
        "ServiceRequest/sr9: not flagged by engine-test 1.2.3, rule technique-on-other-region",
        "  order:   Cine head",
        "  rule:    technique-on-other-region",
        "  reason:  names the technique for a body region other than the limb",
        "  decided: 'head' in the order name",
        "  decided: the order text names 'Cine' (in the order name)",
        "  for:     CPT 76499 Unlisted diagnostic radiographic procedure",
        "  for:     'knee' in the order note",
    ]
    flagged = describe(judged(service_request(text="Zeta scan")))
    assert "FLAGGED by engine-test 1.2.3, rule technique-named" in flagged
    assert flagged.endswith("region:  not named (no replacement offered)")


# --- the answer a clinician sees comes from the policy ---------------------------------------------------------------


def test_a_hook_call_answers_with_the_policys_card_and_replacement() -> None:
    service = load_policies(POLICY_DIR).services["test-order-sign"]
    body = hook_request("order-sign", [service_request("z1", text="Zeta scan", body_site="Left forearm")])
    outcome = respond(assess(parse_hook_request(body, service), service), None, date(2026, 12, 1))
    [card] = outcome.response()["cards"]
    assert card["summary"] == SUMMARY
    assert card["source"]["label"] == "Test Payer"
    assert card["detail"].endswith("*Policy T-01 (version 1.2.3). Report a false alarm with the reason not-zeta.*")
    assert "Order plain radiographs of the arm instead" in card["detail"]
    # One card per order, of one CRD card type: the alternative (one delete-and-create suggestion, no links).
    assert [s["label"] for s in card["suggestions"]] == ["Replace with plain radiographs of the arm"]
    assert "links" not in card
    [_, create] = card["suggestions"][0]["actions"]
    assert create["resource"]["code"]["coding"][0]["code"] == "XR-ARM"
    assert create["resource"]["note"] == [
        {"text": "Replaces Zeta scan: the zeta scan is investigational under policy T-01."}
    ]
    assert [r["code"] for r in card["overrideReasons"]] == ["not-zeta", "research-study"]
