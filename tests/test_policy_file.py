"""Strict policy files: every problem names the file, the YAML path and the line; the JSON Schema; check-policy."""

from __future__ import annotations

import json
import logging
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cds_service.engine import PolicyError, check_policies, load_policies
from cds_service.engine.policy import json_schema, load_policy_file

from .conftest import ROOT
from .process_support import cds_service_command

SYNTHETIC = ROOT / "tests" / "policies" / "engine-test" / "engine-test.yaml"
SHIPPED = ROOT / "policies" / "dynamic-spinal-visualization.yaml"
PROBLEM_LINE = re.compile(r"^ERROR (?P<file>\S+\.yaml): (?P<path>[^\s,]+), line (?P<line>\d+): (?P<message>.+)$")


def edited(tmp_path: Path, *edits: tuple[str, str], name: str = "policy.yaml") -> Path:
    """The synthetic policy with text edits (each `old` written exactly once), as an analyst would make them."""
    text = SYNTHETIC.read_text(encoding="utf-8")
    for old, new in edits:
        assert text.count(old) == 1, f"the synthetic policy must hold {old!r} exactly once"
        text = text.replace(old, new)
    folder = tmp_path / "policies"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def line_of(path: Path, snippet: str) -> int:
    """The 1-based line of the one line of `path` that holds `snippet`."""
    found = [n for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if snippet in line]
    assert len(found) == 1, f"{snippet!r} is on lines {found}"
    return found[0]


def problems(path: Path) -> list[str]:
    policy, found = load_policy_file(path)
    assert policy is None, "a file with problems must not load"
    return [str(p) for p in found]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cds_service_command(), *args], capture_output=True, text=True, timeout=120, check=False, cwd=ROOT
    )


# --- one problem, one exact line ----------------------------------------------------------------------------------


def test_the_synthetic_and_shipped_policies_load_without_problems() -> None:
    for path in (SYNTHETIC, SHIPPED):
        policy, found = load_policy_file(path)
        assert policy is not None and found == [], found


def test_a_misspelled_key_stops_the_load_and_names_the_key_it_is_close_to(tmp_path: Path) -> None:
    # The experiment of the issue: `combinations:` renamed `combination:` used to switch a family of orders off.
    path = edited(tmp_path, ("      combinations:\n", "      combination:\n"))
    line = line_of(path, "combination:")
    assert problems(path) == [
        f"{path}: recognition.techniques[1].combination, line {line}: "
        "unknown key 'combination'; did you mean 'combinations'?"
    ]
    with pytest.raises(PolicyError) as caught:
        load_policies(path.parent)
    assert caught.value.problems == problems(path)


def test_an_unknown_key_far_from_any_known_one_lists_the_known_keys(tmp_path: Path) -> None:
    path = edited(tmp_path, ("payer:\n  name: Test Payer\n", "payer:\n  name: Test Payer\n  telephone: 555\n"))
    assert problems(path) == [
        f"{path}: payer.telephone, line {line_of(path, 'telephone:')}: unknown key 'telephone'; known keys: name"
    ]


@pytest.mark.parametrize(
    ("old", "new", "where", "message"),
    [
        (
            "      needs_anatomy: true\n",
            "      needs_anatomy: sometimes\n",
            "recognition.techniques[1].needs_anatomy",
            "Input should be a valid boolean, unable to interpret input",
        ),
        (
            "  indicator: warning\n",
            "  indicator: warnin\n",
            "card.indicator",
            "Input should be 'info', 'warning' or 'critical' (did you mean 'warning'?)",
        ),
        (
            '    verdict: flagged\n    reason: "names {technique}"',
            '    verdict: yes\n    reason: "names {technique}"',
            "decision[6].verdict",
            "Input should be 'flagged' or 'not-flagged'",
        ),
    ],
    ids=["boolean", "literal", "verdict"],
)
def test_a_wrong_type_names_its_path_and_line(tmp_path: Path, old: str, new: str, where: str, message: str) -> None:
    path = edited(tmp_path, (old, new))
    assert problems(path) == [f"{path}: {where}, line {line_of(path, new.splitlines()[0].strip())}: {message}"]


def test_a_duplicate_term_names_both_places(tmp_path: Path) -> None:
    path = edited(tmp_path, ("        - zetagraphy\n", "        - zetagraphy\n        - Zeta-graphy\n"))
    first, second = line_of(path, "- zetagraphy"), line_of(path, "- Zeta-graphy")
    assert problems(path) == [
        f"{path}: recognition.techniques[0].terms[2], line {second}: duplicate term 'Zeta-graphy': "
        f"already listed at recognition.techniques[0].terms[1] (line {first})"
    ]


@pytest.mark.parametrize(
    ("technique", "old", "again"),
    [
        # Once plain, once with an attribute that changes its kind: the plain one already counts.
        (1, "        - cine\n", "{term: cine, needs_anatomy: false}"),
        # Once plain, once case-sensitive (alone or with any_case_with): the plain one matches every case.
        (0, "        - zetagraphy\n", "{term: ZETAGRAPHY, case: true}"),
        (0, "        - zetagraphy\n", "{term: zetagraphy, case: true}"),
        (0, "        - zetagraphy\n", "{term: ZETAGRAPHY, case: true, any_case_with: [anatomy]}"),
        # Once plain, once with its places: reported before this change too, and still.
        (0, "        - zetagraphy\n", "{term: zetagraphy, places: [code]}"),
    ],
)
def test_a_term_listed_plain_and_again_as_a_mapping_is_a_duplicate(
    tmp_path: Path, technique: int, old: str, again: str
) -> None:
    path = edited(tmp_path, (old, f"{old}        - {again}\n"))
    lines = path.read_text(encoding="utf-8").splitlines()
    first, second = lines.index(old.rstrip("\n")) + 1, line_of(path, again)
    [problem] = problems(path)
    index = 1  # both words are their technique's second term
    assert problem.startswith(
        f"{path}: recognition.techniques[{technique}].terms[{index + 1}], line {second}: duplicate term "
    )
    assert f"already listed at recognition.techniques[{technique}].terms[{index}] (line {first})" in problem


def test_case_sensitive_spellings_of_one_acronym_are_two_terms(tmp_path: Path) -> None:
    old = "        - {term: ZS, case: true}\n"
    path = edited(tmp_path, (old, old + "        - {term: Zs, case: true}\n"))
    policy, found = load_policy_file(path)
    assert found == [] and policy is not None


def test_a_word_that_is_both_a_technique_and_a_look_alike_is_a_contradiction(tmp_path: Path) -> None:
    old = "      terms: [injection, guided, {term: ESI, case: true}]"
    path = edited(tmp_path, (old, "      terms: [injection, guided, Zeta Scan, {term: ESI, case: true}]"))
    assert problems(path) == [
        f"{path}: recognition.look_alikes[1].terms[2], line {line_of(path, 'guided, Zeta Scan')}: "
        "contradiction: 'Zeta Scan' is a look-alike (guided injection) here and a technique (zeta scan) at "
        f"recognition.techniques[0].terms[0] (line {line_of(path, '        - zeta scan')})"
    ]


def test_a_code_that_is_both_a_billing_code_and_a_comparator_is_a_contradiction(tmp_path: Path) -> None:
    path = edited(tmp_path, ('        cpt: ["73060", "73560-73564"]', '        cpt: ["76499", "73560-73564"]'))
    line = line_of(path, 'cpt: ["76499"')
    assert problems(path) == [
        f"{path}: recognition.look_alikes[4].codes.cpt, line {line}: contradiction: "
        "cpt 76499 is a comparator (plain radiographs) here and a billing-code (billing code) at "
        "recognition.billing_codes.cpt.76499"
    ]


def test_a_key_written_twice_is_a_problem_not_a_silent_overwrite(tmp_path: Path) -> None:
    path = edited(tmp_path, ('  reference: "T-01"\n', '  reference: "T-01"\n  reference: "T-02"\n'))
    assert problems(path) == [
        f"{path}: policy.reference, line {line_of(path, 'T-02')}: "
        "key 'reference' is written twice in this mapping (YAML would keep only the last)"
    ]


def test_an_unknown_named_condition(tmp_path: Path) -> None:
    old = "      unless: [{condition: other-region-only}]\n    verdict: flagged"
    path = edited(tmp_path, (old, "      unless: [{condition: other-region}]\n    verdict: flagged"))
    assert problems(path) == [
        f"{path}: decision[6].when.unless[0].condition, line {line_of(path, '{condition: other-region}')}: "
        "no condition named 'other-region' under `conditions:`; did you mean 'other-region-only'?"
    ]


def test_an_unknown_rule_id_in_a_rule_reference(tmp_path: Path) -> None:
    path = edited(tmp_path, ("{rule: technique-named}", "{rule: technique-name}"))
    assert problems(path) == [
        f"{path}: decision[5].when.all[1].rule, line {line_of(path, '{rule: technique-name}')}: "
        "no rule with id 'technique-name' in `decision:`; did you mean 'technique-named'?"
    ]


def test_a_rule_that_refers_to_itself(tmp_path: Path) -> None:
    path = edited(tmp_path, ("{rule: technique-named}", "{rule: plan-naming-technique}"))
    assert problems(path) == [
        f"{path}: decision[5].when.all[1].rule, line {line_of(path, '{rule: plan-naming-technique}')}: "
        "rule 'plan-naming-technique' refers to itself (rule plan-naming-technique -> rule plan-naming-technique)"
    ]


def test_a_reason_placeholder_that_does_not_exist(tmp_path: Path) -> None:
    path = edited(tmp_path, ('reason: "names {technique}"', 'reason: "names {techniqe}"'))
    [problem] = problems(path)
    prefix = f"{path}: decision[6].reason, line {line_of(path, '{techniqe}')}: unknown placeholder(s) ['techniqe']"
    assert problem.startswith(prefix + "; allowed: ")
    assert "'technique'" in problem and "'status'" in problem


def test_a_card_placeholder_that_does_not_exist(tmp_path: Path) -> None:
    path = edited(tmp_path, ("  evidence: No study shows", "  evidence: No study by {payr} shows"))
    [problem] = problems(path)
    assert problem.startswith(f"{path}: card.evidence, line {line_of(path, '{payr}')}: unknown placeholder(s) ['payr']")


def test_a_summary_of_140_characters_is_refused_and_139_accepted(tmp_path: Path) -> None:
    old = '  summary: "{title} is investigational under policy {reference}; order plain radiographs instead"'
    # "Zeta Scan of the Limbs" is 22 characters once {title} is filled.
    for length, refused in ((139, False), (140, True)):
        path = edited(tmp_path, (old, f'  summary: "{{title}} {"x" * (length - 23)}"'), name=f"summary-{length}.yaml")
        policy, found = load_policy_file(path)
        if refused:
            assert [str(p) for p in found] == [
                f"{path}: card.summary, line {line_of(path, 'summary:')}: 140 characters; "
                "a card summary must be under 140"
            ]
        else:
            assert found == [] and policy is not None and len(policy.card.summary) == 139


def test_the_last_rule_must_decide_the_rest(tmp_path: Path) -> None:
    old = "  - id: no-evidence\n    verdict: not-flagged"
    path = edited(tmp_path, (old, "  - id: no-evidence\n    when: {evidence: anatomy}\n    verdict: not-flagged"))
    assert problems(path) == [
        f"{path}: decision[15], line {line_of(path, '- id: no-evidence')}: "
        "the last rule must have no `when:` (it decides every order no other rule decided)"
    ]


def test_a_rule_without_when_before_the_end_hides_the_rules_after_it(tmp_path: Path) -> None:
    old = "    when: {evidence: comparator}\n"
    path = edited(tmp_path, (old, ""))
    assert problems(path) == [
        f"{path}: decision[14], line {line_of(path, '- id: comparator-only')}: rule 'comparator-only' has no "
        "`when:`, so it always holds and the rules after it never apply"
    ]


def test_an_alternative_for_a_region_the_anatomy_does_not_have(tmp_path: Path) -> None:
    path = edited(tmp_path, ("    leg:\n      label: plain", "    foot:\n      label: plain"))
    assert problems(path) == [
        f"{path}: alternatives.regions.foot, line {line_of(path, '    foot:')}: "
        "region 'foot' is not one of recognition.anatomy.regions (arm, leg, limb)"
    ]


@pytest.mark.parametrize(
    ("alias", "hint"), [("lokal", "did you mean 'local'?"), ("hcpcs", "declared: local, cpt, snomed, icd10cm")]
)
def test_an_undeclared_code_system_alias(tmp_path: Path, alias: str, hint: str) -> None:
    path = edited(tmp_path, ("        local: [BS-1]", f"        {alias}: [BS-1]"))
    assert problems(path) == [
        f"{path}: recognition.look_alikes[0].codes.{alias}, line {line_of(path, f'{alias}: [BS-1]')}: "
        f"code system {alias!r} is not declared in recognition.code_systems; {hint}"
    ]


def test_needs_anatomy_belongs_to_technique_terms_only(tmp_path: Path) -> None:
    path = edited(tmp_path, ("          - shin\n", "          - {term: shin, needs_anatomy: true}\n"))
    assert problems(path) == [
        f"{path}: recognition.anatomy.regions.leg.terms[2].needs_anatomy, line {line_of(path, 'term: shin')}: "
        "only a technique's terms can need anatomy"
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("policy: [unclosed\n", "(the file), line 2: not valid YAML: "),
        ("- just\n- a list\n", "(the file), line 1: the file must hold a mapping (policy:, card:, ...)"),
        ("", "(the file): the file is empty"),
    ],
)
def test_not_a_policy_document(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(content)
    [problem] = problems(path)
    assert problem.startswith(f"{path}: {message}")


def test_an_empty_or_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no policy files"):
        load_policies(tmp_path)
    with pytest.raises(PolicyError, match="policy folder not found"):
        load_policies(tmp_path / "missing")


# --- every problem of a file in one run ---------------------------------------------------------------------------

# Independent mistakes in one file; each is reported as it is when made alone.
SEVERAL = [
    ("      combinations:\n", "      combination:\n"),
    ("        - zetagraphy\n", "        - zetagraphy\n        - Zeta-graphy\n"),
    ("      terms: [injection, guided, {term: ESI, case: true}]", "      terms: [injection, guided, cine]"),
    ('  reference: "T-01"\n', '  reference: "T-01"\n  reference: "T-02"\n'),
    (
        "unless: [{condition: other-region-only}]\n    verdict: flagged",
        "unless: [{condition: elsewhere}]\n    verdict: flagged",
    ),
    ("{rule: technique-named}", "{rule: technique-name}"),
    ("    leg:\n      label: plain", "    foot:\n      label: plain"),
    ("        local: [BS-1]", "        hcpcs: [BS-1]"),
]


def test_check_policies_returns_every_problem_of_the_file(tmp_path: Path) -> None:
    alone: set[str] = set()
    for n, edit in enumerate(SEVERAL):
        single = edited(tmp_path / str(n), edit)
        alone |= {p.replace(str(single), "FILE") for p in problems(single)}
    path = edited(tmp_path, *SEVERAL)
    policies, found = check_policies(path.parent)
    assert policies is None
    together = [str(p).replace(str(path), "FILE") for p in found]
    assert len(together) == len(SEVERAL) == len(set(together))
    # Same paths and messages as alone; only the line numbers move with the lines the other edits add.
    assert {re.sub(r"line \d+", "line N", p) for p in together} == {re.sub(r"line \d+", "line N", p) for p in alone}
    assert f"FILE: policy.reference, line {line_of(path, 'T-02')}: " in "\n".join(together)


@pytest.mark.slow
def test_check_policy_command_lists_every_problem_with_file_path_and_line(tmp_path: Path) -> None:
    path = edited(tmp_path, *SEVERAL)
    result = run_cli("check-policy", str(path.parent))
    assert result.returncode == 1
    lines = [line for line in result.stdout.splitlines() if line.startswith("ERROR")]
    assert len(lines) == len(SEVERAL), result.stdout
    for line in lines:
        match = PROBLEM_LINE.match(line)
        assert match is not None, line
        assert match["file"] == str(path)
    assert f"policy check failed: {len(SEVERAL)} problem(s)" in result.stderr
    paths = {PROBLEM_LINE.match(line)["path"] for line in lines}  # type: ignore[index]
    assert "recognition.techniques[1].combination" in paths and "alternatives.regions.foot" in paths


# --- the JSON Schema -------------------------------------------------------------------------------------------------


def schema_errors(schema: dict[str, Any], value: Any, path: str = "", root: dict[str, Any] | None = None) -> list[str]:
    """A small JSON Schema check (no validator is installed): $ref, anyOf, type, enum, properties, required,
    additionalProperties, propertyNames and items, which is all the policy schema uses to say what is allowed."""
    root = root or schema
    if "$ref" in schema:
        return schema_errors(root["$defs"][schema["$ref"].rsplit("/", 1)[1]], value, path, root)
    if "anyOf" in schema:
        tried = [schema_errors(option, value, path, root) for option in schema["anyOf"]]
        return [] if any(not errors for errors in tried) else [f"{path or '(root)'}: matches no option: {tried[0][0]}"]
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int, "null": type(None)}
    wanted = schema.get("type")
    if wanted is not None and (not isinstance(value, types[wanted]) or (wanted == "integer" and value is True)):
        return [f"{path or '(root)'}: expected {wanted}, got {value!r}"]
    errors: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [f"{path or '(root)'}: {key!r} is required" for key in schema.get("required", []) if key not in value]
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if "propertyNames" in schema:
                errors += schema_errors(schema["propertyNames"], key, f"{path}.{key}", root)
            if key in properties:
                errors += schema_errors(properties[key], item, f"{path}.{key}", root)
            elif extra is False:
                errors.append(f"{path or '(root)'}: unknown key {key!r}")
            elif isinstance(extra, dict):
                errors += schema_errors(extra, item, f"{path}.{key}", root)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += schema_errors(schema["items"], item, f"{path}[{i}]", root)
    return errors


def command_schema() -> dict[str, Any]:
    result = run_cli("policy-schema")
    assert result.returncode == 0, result.stderr
    schema: dict[str, Any] = json.loads(result.stdout)
    return schema


@pytest.mark.slow
def test_policy_schema_command_prints_a_schema_that_refuses_unknown_keys() -> None:
    schema = command_schema()
    assert schema == json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    assert {"policy", "card", "recognition", "conditions", "decision"} <= set(schema["properties"])
    objects = {name: d for name, d in schema["$defs"].items() if d.get("type") == "object"}
    assert {"TechniqueSpec", "LookAlikeSpec", "Rule", "Condition", "CardSpec"} <= set(objects)
    assert [name for name, d in objects.items() if d.get("additionalProperties") is not False] == []


def test_the_schema_refuses_a_misspelled_key() -> None:
    data = yaml.safe_load(SYNTHETIC.read_text(encoding="utf-8"))
    technique = data["recognition"]["techniques"][1]
    technique["combination"] = technique.pop("combinations")
    assert ".recognition.techniques[1]: unknown key 'combination'" in schema_errors(json_schema(), data)


def _as_mappings(value: Any) -> Any:
    """Plain-string terms written as {term: ...} and numbers as text: what the loader reads them as."""
    if isinstance(value, dict):
        return {key: _as_mappings(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_as_mappings(item) for item in value]
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def _terms_as_mappings(data: dict[str, Any]) -> dict[str, Any]:
    recognition = data["recognition"]
    term_lists = [t["terms"] for t in recognition["techniques"]]
    term_lists += [group for t in recognition["techniques"] for combo in t.get("combinations", []) for group in combo]
    term_lists += [r["terms"] for r in recognition["anatomy"]["regions"].values()]
    term_lists += [recognition["other_anatomy"]["terms"]] + [look["terms"] for look in recognition["look_alikes"]]
    for terms in term_lists:
        terms[:] = [{"term": t} if isinstance(t, str) else t for t in terms]
    return data


def test_the_schema_accepts_the_synthetic_policy_written_with_term_mappings() -> None:
    # The check itself works: with every term written as a mapping, the synthetic policy is valid.
    data = _terms_as_mappings(_as_mappings(yaml.safe_load(SYNTHETIC.read_text(encoding="utf-8"))))
    assert schema_errors(json_schema(), data) == []


@pytest.mark.parametrize("source", [SYNTHETIC, SHIPPED], ids=["synthetic", "shipped"])
def test_the_policy_files_validate_against_the_schema(source: Path) -> None:
    errors = schema_errors(json_schema(), yaml.safe_load(source.read_text(encoding="utf-8")))
    assert errors == [], f"{len(errors)} errors, first: {errors[:3]}"


@pytest.mark.slow
def test_the_packaged_schema_file_is_the_commands_output() -> None:
    packaged = ROOT / "policies" / "policy.schema.json"
    if not packaged.exists():
        pytest.skip("policies/policy.schema.json is not written yet")
    assert json.loads(packaged.read_text(encoding="utf-8")) == command_schema()


# --- labelled examples beside a policy --------------------------------------------------------------------------------


def _example(eid: str, label: str, text: str, **extra: str) -> dict[str, Any]:
    resource = {
        "resourceType": "ServiceRequest",
        "id": eid,
        "status": "draft",
        "intent": "order",
        "code": {"text": text},
    }
    return {"id": eid, "label": label, "why": f"{text} ({label})", "resource": resource, **extra}


@pytest.mark.slow
def test_check_policy_fails_on_a_misjudged_example_and_explains_it(tmp_path: Path) -> None:
    folder = tmp_path / "with-examples"
    folder.mkdir()
    (folder / "engine-test.yaml").write_text(SYNTHETIC.read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "examples").mkdir()
    examples = [
        _example("ok-flagged", "flagged", "Zeta scan arm"),
        _example("ok-not", "not-flagged", "Plain film knee"),
        _example("wrong-label", "flagged", "Office visit"),
        # Right verdict, wrong rule: the example names the rule it expects.
        _example("wrong-rule", "flagged", "Cine arm", rule="technique-named"),
    ]
    (folder / "examples" / "cases.json").write_text(json.dumps(examples), encoding="utf-8")
    result = run_cli("check-policy", str(folder))
    assert result.returncode == 1, result.stdout
    out = result.stdout
    assert "examples: 4 (3 to flag, 1 not); precision 1.000, recall 0.667" in out
    assert "MISJUDGED cases.json wrong-label: should be flagged: Office visit (flagged)" in out
    assert "ServiceRequest/wrong-label: not flagged by engine-test 1.2.3, rule no-evidence" in out
    assert "MISJUDGED cases.json wrong-rule: should be flagged by rule technique-named: Cine arm (flagged)" in out
    assert "ServiceRequest/wrong-rule: FLAGGED by engine-test 1.2.3, rule technique-on-limb" in out
    assert "ok-flagged" not in out and "ok-not" not in out
    assert "2 misjudged" in result.stderr


@pytest.mark.slow
def test_check_policy_passes_when_every_example_is_judged_right(tmp_path: Path) -> None:
    folder = tmp_path / "good"
    (folder / "examples").mkdir(parents=True)
    (folder / "engine-test.yaml").write_text(SYNTHETIC.read_text(encoding="utf-8"), encoding="utf-8")
    examples = [_example("a", "flagged", "Zeta scan arm"), _example("b", "not-flagged", "Zeta scan head")]
    (folder / "examples" / "cases.json").write_text(json.dumps(examples), encoding="utf-8")
    result = run_cli("check-policy", str(folder))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "examples: 2 (1 to flag, 1 not); precision 1.000, recall 1.000" in result.stdout


# --- engine bugs found while writing these tests (each xfail is strict: it fails loudly once fixed) -----------------


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        ('reason: "names {technique}"', 'reason: "names {technique:d}"', "decision[6].reason"),
        ('reason: "names {technique}"', 'reason: "names {technique!x}"', "decision[6].reason"),
        ('footer: "Policy {reference} (version', 'footer: "Policy {reference:d} (version', "card.footer"),
    ],
    ids=["reason-spec", "reason-conversion", "card-spec"],
)
def test_a_placeholder_with_a_format_spec_is_a_problem_not_a_crash(
    tmp_path: Path, old: str, new: str, where: str
) -> None:
    path = edited(tmp_path, (old, new))
    [problem] = problems(path)
    assert problem.startswith(f"{path}: {where}, line {line_of(path, new)}: ")


def test_a_misspelled_evidence_kind_is_one_problem(tmp_path: Path) -> None:
    path = edited(tmp_path, ("when: {evidence: comparator}", "when: {evidence: comparater}"))
    assert problems(path) == [
        f"{path}: decision[14].when.evidence, line {line_of(path, 'comparater')}: Input should be 'billing-code', "
        "'technique', 'ambiguous-technique', 'anatomy', 'other-anatomy', 'look-alike', 'billing-explanation', "
        "'comparator' or 'other-service' (did you mean 'comparator'?)"
    ]


def test_a_billing_code_inside_a_look_alike_range_is_a_contradiction(tmp_path: Path) -> None:
    billing = '      "76499": Unlisted diagnostic radiographic procedure\n'
    path = edited(tmp_path, (billing, billing + '      "78305": Bone imaging, synthetic\n'))
    [problem] = problems(path)
    assert "contradiction" in problem and "78305" in problem


# --- rules marked for review (possible misses) ------------------------------------------------------------------------


def test_rules_marked_for_review_load_with_the_mark() -> None:
    [policy] = load_policies(SYNTHETIC.parent).policies
    assert {r.id for r in policy.rules if r.review} == {"technique-without-limb", "billing-code-alone"}


def test_review_belongs_to_not_flagged_rules(tmp_path: Path) -> None:
    old = "    verdict: flagged\n    reason: a billing code of the policy with limb evidence\n"
    path = edited(tmp_path, (old, "    verdict: flagged\n    review: true  # here\n" + old.split("\n", 1)[1]))
    assert problems(path) == [
        f"{path}: decision[8].review, line {line_of(path, 'review: true  # here')}: "
        "review: true marks a not-flagged rule whose orders may be misses; this one flags"
    ]


def test_review_must_be_true_or_false(tmp_path: Path) -> None:
    old = "    review: true\n    reason: billing code without limb evidence\n"
    path = edited(tmp_path, (old, "    review: often\n    reason: billing code without limb evidence\n"))
    [problem] = problems(path)
    assert problem.startswith(f"{path}: decision[13].review, line {line_of(path, 'review: often')}: ")


def test_the_policy_folder_is_policies_and_the_old_cards_folder_is_still_read_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from cds_service.engine.policy.load import find_policy_dir

    package = tmp_path / "site" / "cds_service"
    package.mkdir(parents=True)
    (package / "_cards").mkdir()
    with caplog.at_level(logging.WARNING):
        assert find_policy_dir(package) == (package / "_cards").resolve()
    assert "now called policies/" in caplog.text
    (package / "_policies").mkdir()
    caplog.clear()
    assert find_policy_dir(package) == (package / "_policies").resolve()
    assert not caplog.text
    checkout = tmp_path / "checkout"
    (checkout / "cds_service").mkdir(parents=True)
    (checkout / "policies").mkdir()
    assert find_policy_dir(checkout / "cds_service") == (checkout / "policies").resolve()
