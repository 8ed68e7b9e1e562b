"""The decision rules: billing codes with spine evidence, techniques, combinations, look-alike effects, regions,
statuses, and the explanation a card and `evaluate --explain` show."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from cds_service.matching import Verdict, describe, explain_lines, judge
from cds_service.orders import read_order
from cds_service.policy import Policy, PolicyError, load_policies, load_policy

from .builders import CPT, ICD10, SNOMED, service_request
from .conftest import ROOT

POLICY_FILE = ROOT / "cards" / "dynamic-spinal-visualization.yaml"
CERVICAL = ("122494005", "Cervical spine")
LUMBAR = ("122496007", "Lumbar spine")
LOCAL = "urn:oid:1.2.840.114350.1.13.284.2.7.2.696580"


@cache
def packaged() -> Policy:
    return next(p for p in load_policies().policies if p.id == "dynamic-spinal-visualization")


def changed_policy(tmp_path: Path, change: Any) -> Policy:
    """The packaged policy with one edit to its data, loaded as an analyst's file would be."""
    data = yaml.safe_load(POLICY_FILE.read_text())
    change(data["recognition"])
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_policy(path)


def judged(resource: dict[str, Any], policy: Policy | None = None) -> Verdict:
    return judge(read_order(resource), policy or packaged())


def coded(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def labels(verdict: Verdict) -> tuple[list[str], list[str]]:
    return [e.label for e in verdict.evidence_for], [e.label for e in verdict.evidence_against]


# --- billing codes need spine evidence ---------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["76120", "76125", "76496", "76499"])
@pytest.mark.parametrize("system", [CPT, "urn:oid:2.16.840.1.113883.6.12"])
def test_each_billing_code_with_a_spine_body_site_is_flagged(code: str, system: str) -> None:
    resource = service_request(body_site=CERVICAL, code={"coding": [{"system": system, "code": code}]})
    verdict = judged(resource)
    assert verdict.flagged and verdict.reason == "a billing code of the policy with spine evidence"
    assert verdict.billing_code is not None and verdict.billing_code.code == code
    assert verdict.billing_code.system == CPT  # the canonical URI is what CRD's billingCode names
    assert verdict.region == "cervical"


def test_a_billing_code_alone_is_not_enough() -> None:
    verdict = judged(service_request(cpt="76496"))
    assert not verdict.flagged and verdict.reason == "billing code without spine evidence"
    assert verdict.billing_code is None and verdict.region is None


def test_a_billing_code_for_another_body_region_is_not_flagged() -> None:
    verdict = judged(service_request(cpt="76120", body_site="Right wrist"))
    assert not verdict.flagged and verdict.reason == "billing code for a body region other than the spine"
    assert labels(verdict)[1] == ["'wrist' in the body site"]


def test_spine_words_in_a_note_do_not_turn_a_knee_study_into_a_spine_study() -> None:
    resource = service_request(cpt="76120", text="Cine knee", note=[{"text": "History of lumbar fusion"}])
    assert not judged(resource).flagged


def test_the_orders_own_spine_field_outweighs_another_region_named_beside_it() -> None:
    assert judged(service_request(cpt="76496", text="Fluoroscopy, head and cervical spine")).flagged


@pytest.mark.parametrize(
    ("system", "code"),
    [
        (ICD10, "M54.2"),
        (ICD10, "M5412"),  # sent without its dot
        (ICD10, "M40.00"),  # first category of the block
        (ICD10, "M54.9"),  # last category of the block
        (ICD10, "S13.4XXA"),
        (ICD10, "S33.5XXD"),
        ("http://hl7.org/fhir/sid/icd-10", "M54.5"),  # WHO ICD-10
        ("urn:oid:2.16.840.1.113883.6.90", "M43.16"),
        (SNOMED, "279039007"),
    ],
)
def test_a_spine_diagnosis_is_spine_evidence(system: str, code: str) -> None:
    resource = service_request(cpt="76496", reasonCode=[coded(system, code)])
    verdict = judged(resource)
    assert verdict.flagged, describe(verdict)
    assert any(code in label for label in labels(verdict)[0])


@pytest.mark.parametrize("code", ["S13.5", "S33.6", "M25.5", "M39", "M55"])
def test_codes_beside_the_spine_diagnoses_are_not_spine_evidence(code: str) -> None:
    assert not judged(service_request(cpt="76496", reasonCode=[coded(ICD10, code)])).flagged


def test_an_r5_reason_concept_counts_like_an_r4_reason_code() -> None:
    resource = service_request(cpt="76499", r5=True, reason=[{"concept": coded(ICD10, "M53.2X2")}])
    assert judged(resource).flagged


# --- code systems as clients write them --------------------------------------------------------------------------


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
    assert judged(service_request(body_site=LUMBAR, code=coded(system, "76120"))).flagged


def test_a_coding_without_a_system_counts_when_the_policy_knows_its_code_in_one_system() -> None:
    resource = service_request(body_site=CERVICAL, code={"coding": [{"code": "76496"}]})
    assert judged(resource).flagged
    site_only = service_request(cpt="76120", bodySite=[{"coding": [{"code": "122496007"}]}])
    assert judged(site_only).region == "lumbar"


@pytest.mark.parametrize("system", [LOCAL, "http://example.org/cpt", "http://snomed.info/sct"])
def test_the_same_digits_in_another_system_are_not_the_cpt_code(system: str) -> None:
    assert not judged(service_request(body_site=CERVICAL, code=coded(system, "76496"))).flagged


def test_empty_and_half_filled_codings_are_read_without_harm() -> None:
    for code in ({"coding": [{}]}, {"coding": [{"system": CPT}]}, {"coding": "76496"}, {}, []):
        assert not judged(service_request(body_site=CERVICAL, code=code)).flagged


def test_a_code_sent_as_bare_text_is_read_as_the_orders_name() -> None:
    assert judged(service_request(code="DMX cervical spine")).flagged


# --- techniques --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "DMX",
        "C-DMX",
        "Digital motion x-ray",
        "KineGraph VMA",
        "vertebral motion analysis",
        "Dynamic spinal visualization",
        "Motion Normalizer",
    ],
)
def test_a_spine_only_technique_is_flagged_by_its_name(text: str) -> None:
    verdict = judged(service_request(text=text))
    assert verdict.flagged and verdict.reason.startswith("names ")


@pytest.mark.parametrize("text", ["Videofluoroscopy", "Cineradiography", "VMA", "Dynamic MRI", "kMRI", "Cine"])
def test_a_technique_shared_with_other_organs_needs_spine_evidence(text: str) -> None:
    verdict = judged(service_request(text=text))
    assert not verdict.flagged
    assert verdict.reason == "names the technique but nothing says the study is of the spine"
    assert judged(service_request(text=text, body_site=CERVICAL)).flagged
    assert judged(service_request(text=text, reasonCode=[coded(ICD10, "M54.50")])).flagged


def test_a_named_technique_for_another_body_region_is_not_flagged() -> None:
    verdict = judged(service_request(text="Digital motion x-ray of the knee"))
    assert not verdict.flagged
    assert verdict.reason == "names the technique for a body region other than the spine"
    assert labels(verdict) == (
        ["the order text names 'Digital motion x-ray' (in the order name)"],
        ["'knee' in the order name"],
    )


@pytest.mark.parametrize("place", ["detail", "note", "instruction", "body_site"])
def test_techniques_are_read_in_every_place_of_the_order(place: str) -> None:
    text = "Digital motion x-ray of the cervical spine"
    fields: dict[str, Any] = {
        "detail": {"orderDetail": [{"text": text}]},
        "note": {"note": [{"text": text}]},
        "instruction": {"patientInstruction": text},
        "body_site": {"bodySite": [{"text": text}]},
    }[place]
    verdict = judged(service_request(text="Imaging referral", **fields))
    assert verdict.flagged
    assert verdict.evidence_for[0].place == place


def test_a_technique_in_the_reasons_is_not_an_order_for_it() -> None:
    # "prior DMX" among the reasons is history; the reasons only ever add spine evidence.
    assert not judged(service_request(text="Office visit", reasonCode=[{"text": "Prior DMX"}])).flagged


# --- combinations ------------------------------------------------------------------------------------------------


def test_a_combination_in_one_field() -> None:
    verdict = judged(service_request(text="MRI C-spine in flexion and extension"))
    assert verdict.flagged
    assert "the order text names 'MRI' with 'flexion and extension' (in the order name)" in explain_lines(verdict)


def test_a_combination_split_over_the_orders_name_and_detail() -> None:
    resource = service_request(
        cpt="72141", text="MRI cervical spine", orderDetail=[{"text": "Kinematic sequences, flexion/extension"}]
    )
    verdict = judged(resource)
    assert verdict.flagged
    assert any("(in the order name and order detail)" in line for line in explain_lines(verdict))


def test_r5_order_detail_parameters_are_read() -> None:
    resource = service_request(
        text="MRI lumbar spine",
        r5=True,
        orderDetail=[{"parameter": [{"code": {"text": "Positioning"}, "valueString": "flexion and extension"}]}],
    )
    assert judged(resource).flagged


def test_a_combination_is_not_assembled_from_the_orders_name_and_a_note() -> None:
    resource = service_request(text="MRI C-spine w/o contrast", note=[{"text": "Dynamic symptoms with neck flexion"}])
    assert not judged(resource).flagged


def test_a_combination_inside_one_note_counts() -> None:
    resource = service_request(text="Imaging", note=[{"text": "Please do fluoroscopy of the lumbar spine in flexion"}])
    assert judged(resource).flagged


def test_combination_words_count_inside_a_longer_look_alike_phrase() -> None:
    verdict = judged(service_request(text="Upright MRI lumbar spine with flexion/extension"))
    assert verdict.flagged
    assert "positional (upright) MRI, a different policy ('Upright MRI' in the order name)" in labels(verdict)[1]
    assert not judged(service_request(text="Upright MRI lumbar spine")).flagged


def test_a_named_technique_is_not_repeated_as_a_combination_of_its_words() -> None:
    lines = explain_lines(judged(service_request(text="Dynamic fluoroscopy cervical spine")))
    assert lines[0] == "the order text names 'Dynamic fluoroscopy' (in the order name)"
    assert not any(" with " in line for line in lines)


# --- look-alikes ---------------------------------------------------------------------------------------------------


def test_a_look_alike_code_excludes_the_order() -> None:
    resource = service_request(cpt="74230", text="Videofluoroscopy swallow", body_site=CERVICAL)
    verdict = judged(resource)
    assert not verdict.flagged
    assert verdict.reason == "the order is a swallow or speech study, not dynamic spinal visualization"
    assert "swallow or speech study (CPT 74230)" in labels(verdict)[1]


@pytest.mark.parametrize(
    "text",
    [
        "Myelogram lumbar",
        "Lumbar epidural under fluoroscopy",
        "Cardiac cine MRI",
        "DXA lumbar spine",
        "Gait analysis, spinal stenosis",
        "DCE MRI lumbar spine",
        "PT evaluation lumbar spine range of motion",
        "Dynamic MRI pelvic floor",
    ],
)
def test_look_alike_words_exclude_a_spine_order(text: str) -> None:
    verdict = judged(service_request(text=text, cpt="76496", body_site=LUMBAR))
    assert not verdict.flagged and verdict.reason.startswith("the order is a ")


def test_look_alike_words_in_a_note_do_not_exclude() -> None:
    resource = service_request(
        text="Videofluoroscopy cervical spine", note=[{"text": "Prior modified barium swallow was normal"}]
    )
    assert judged(resource).flagged


def test_a_look_alike_reads_its_own_places_the_swallow_study_reads_the_reasons() -> None:
    swallow = service_request(text="Videofluoroscopy", reasonCode=[{"text": "Dysphagia"}, coded(ICD10, "M47.812")])
    verdict = judged(swallow)
    assert not verdict.flagged and "('Dysphagia' in the reason for the order)" in labels(verdict)[1][0]
    # The guidance look-alike keeps the default places: "failed epidural injections" as a reason is history.
    history = service_request(text="Videofluoroscopy lumbar spine", reasonCode=[{"text": "Failed epidural injections"}])
    assert judged(history).flagged


def test_a_look_alike_outside_the_name_does_not_outweigh_a_spine_only_technique_in_the_name() -> None:
    dmx = service_request(text="Digital motion x-ray lumbar", orderDetail=[{"text": "s/p epidural injection"}])
    verdict = judged(dmx)
    assert verdict.flagged
    assert any("epidural" in label for label in labels(verdict)[1])
    # A shared technique does not get that benefit: the detail says what the videofluoroscopy is of.
    swallow = service_request(text="Videofluoroscopy", body_site=CERVICAL, orderDetail=[{"text": "swallow study"}])
    assert not judged(swallow).flagged
    # And a look-alike in the name itself always decides.
    assert not judged(service_request(text="DMX cervical spine with myelogram")).flagged


def test_a_note_look_alike_is_shown_but_changes_nothing() -> None:
    verdict = judged(service_request(cpt="76499", text="XR lumbar spine flexion/extension"))
    assert verdict.flagged
    assert labels(verdict)[1] == [
        "standard flexion/extension or bending radiographs ('flexion/extension' in the order name)"
    ]


def test_explains_code_discounts_the_billing_code_but_not_a_named_technique(tmp_path: Path) -> None:
    def explain_flexion(recognition: dict[str, Any]) -> None:
        look = next(x for x in recognition["look_alikes"] if x["name"].startswith("standard flexion"))
        look["effect"] = "explains_code"

    policy = changed_policy(tmp_path, explain_flexion)
    plain = judged(service_request(cpt="76499", text="XR lumbar spine flexion/extension"), policy)
    assert not plain.flagged
    assert plain.reason == "the billing code is explained by standard flexion/extension or bending radiographs"
    assert judged(service_request(cpt="76120", text="Cine lumbar spine flexion/extension"), policy).flagged


def test_a_look_alike_place_must_be_a_known_place(tmp_path: Path) -> None:
    def bad(recognition: dict[str, Any]) -> None:
        recognition["look_alikes"][0]["places"] = ["code", "supportingInfo"]

    with pytest.raises(
        PolicyError, match=r"recognition\.look_alikes\[0\]\.places\[1\]: unknown place 'supportingInfo'"
    ):
        changed_policy(tmp_path, bad)


def test_adding_a_look_alike_is_a_data_change(tmp_path: Path) -> None:
    resource = service_request(cpt="76496", text="Fluoroscopy lumbar spine, hardware check")
    assert judged(resource).flagged

    def add(recognition: dict[str, Any]) -> None:
        recognition["look_alikes"].append({"name": "hardware check", "effect": "excludes", "terms": ["hardware check"]})

    verdict = judged(resource, changed_policy(tmp_path, add))
    assert not verdict.flagged and verdict.reason == "the order is a hardware check, not dynamic spinal visualization"


# --- statuses ----------------------------------------------------------------------------------------------------


def test_do_not_perform_is_never_flagged() -> None:
    verdict = judged(service_request(text="DMX cervical", doNotPerform=True))
    assert not verdict.flagged and verdict.reason == "the order says do not perform"
    assert judged(service_request(text="DMX cervical", doNotPerform=False)).flagged
    assert judged(service_request(text="DMX cervical", doNotPerform="true")).flagged  # only the boolean counts


@pytest.mark.parametrize("status", ["revoked", "entered-in-error"])
def test_skipped_statuses_are_not_judged(status: str) -> None:
    verdict = judged(service_request(text="DMX cervical", status=status))
    assert not verdict.flagged and verdict.reason == f"order status is {status}: not judged"
    assert verdict.evidence_for == []


@pytest.mark.parametrize("status", ["draft", "active", "on-hold", None])
def test_other_statuses_are_judged(status: str | None) -> None:
    assert judged(service_request(text="DMX cervical", status=status)).flagged


# --- the region chosen for the alternative ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "region"),
    [
        ({"body_site": CERVICAL}, "cervical"),
        ({"body_site": ("297173004", "Lumbosacral spine")}, "lumbar"),
        ({"body_site": "C-spine"}, "cervical"),
        ({"text": "Videofluoroscopy LS"}, "lumbar"),
        ({"body_site": ("122495006", "Thoracic spine")}, "thoracic"),
        ({"text": "Videofluoroscopy cervical and lumbar spine"}, None),
        ({"body_site": ("421060004", "Vertebral column")}, None),
        ({"reasonCode": [coded(ICD10, "M54.2", "Cervicalgia")]}, "cervical"),
        ({"reasonCode": [{"text": "low back pain"}], "body_site": "spine"}, "lumbar"),
        ({"reasonCode": [{"text": "low back pain"}], "body_site": CERVICAL}, "cervical"),
        ({"reasonCode": [{"text": "neck and low back pain"}]}, None),
    ],
)
def test_the_region_comes_from_the_order_then_from_its_reasons(fields: dict[str, Any], region: str | None) -> None:
    fields = {"text": "Videofluoroscopy", **fields}
    verdict = judged(service_request(**fields))
    assert verdict.flagged and verdict.region == region


def test_the_cervical_dmx_abbreviation_names_its_region() -> None:
    assert judged(service_request(text="C-DMX")).region == "cervical"


def test_an_unflagged_order_has_no_region_and_no_billing_code() -> None:
    verdict = judged(service_request(cpt="76496", body_site="Left hip"))
    assert verdict.region is None and verdict.billing_code is None


# --- explanations ----------------------------------------------------------------------------------------------------


def test_explain_lines_name_the_code_with_its_spine_evidence() -> None:
    verdict = judged(service_request(cpt="76496", body_site=CERVICAL))
    assert explain_lines(verdict) == [
        "CPT 76496 Unlisted fluoroscopic procedure with body site Cervical spine (SNOMED 122494005)"
    ]


def test_explain_lines_quote_the_technique_as_written_and_list_spine_evidence() -> None:
    verdict = judged(service_request(text="VIDEOFLOUROSCOPY L-SPINE"))
    assert explain_lines(verdict) == [
        "the order text names 'VIDEOFLOUROSCOPY' (in the order name)",
        "spine evidence: 'L-SPINE' in the order name",
    ]


def test_the_same_words_in_two_cases_are_one_piece_of_evidence() -> None:
    resource = service_request(
        cpt="76499", code={"coding": [{"system": CPT, "code": "76499", "display": "SPINE"}], "text": "spine"}
    )
    assert explain_lines(judged(resource)) == [
        "CPT 76499 Unlisted diagnostic radiographic procedure with 'SPINE' in the order name"
    ]


def test_a_coded_body_site_speaks_for_its_display_words() -> None:
    verdict = judged(service_request(cpt="76120", body_site=LUMBAR))
    assert labels(verdict)[0] == [
        "CPT 76120 Cineradiography/videoradiography, except where specifically included",
        "body site Lumbar spine (SNOMED 122496007)",
    ]


def test_describe_prints_the_verdict_and_every_piece_of_evidence() -> None:
    text = describe(judged(service_request("sr9", cpt="76120", text="Cine knee")))
    assert text.splitlines() == [
        "ServiceRequest/sr9: not flagged by dynamic-spinal-visualization " + packaged().version,
        "  order:   Cine knee",
        "  reason:  names the technique for a body region other than the spine",
        "  for:     the order text names 'Cine' (in the order name)",
        "  against: 'knee' in the order name",
    ]
    flagged = describe(judged(service_request(text="DMX")))
    assert "FLAGGED" in flagged and flagged.endswith("region:  not named (no replacement offered)")


def test_verdict_to_dict_is_what_the_audit_log_stores() -> None:
    out = judged(service_request("sr2", text="DMX", body_site=LUMBAR)).to_dict()
    assert out["order"] == "ServiceRequest/sr2" and out["verdict"] == "flagged" and out["region"] == "lumbar"
    assert out["evidenceFor"][0] == {
        "kind": "technique",
        "label": "the order text names 'DMX' (in the order name)",
        "place": "code",
        "name": "digital motion x-ray",
    }
    assert set(judged(service_request(text="CBC")).to_dict()) == {
        "order",
        "policy",
        "policyVersion",
        "verdict",
        "reason",
        "evidenceFor",
        "evidenceAgainst",
    }
