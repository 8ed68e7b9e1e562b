"""Shared language files: the ConText lexicon, answers, abbreviations and typo settings every policy reads with unless
it writes its own; validated as strictly as a policy, with a schema of their own."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cds_service import create_app
from cds_service.engine import Policy, judge, read_order
from cds_service.engine.policy import language_json_schema, load_policy_file
from cds_service.runtime import services_of

from .builders import hook_request, service_request
from .conftest import ROOT
from .process_support import cds_service_command
from .test_policy_file import schema_errors

SYNTHETIC = ROOT / "tests" / "policies" / "engine-test" / "engine-test.yaml"
SECOND = ROOT / "tests" / "policies" / "second" / "carotid-intima-media-thickness.yaml"
SHIPPED_LANGUAGES = ROOT / "policies" / "languages"

# Two synthetic languages: words no shipped file has, so the tests never depend on the shipped wording.
ZZ = """\
language: {code: zz, name: Zedish}
context:
  - name: negation
    assertion: negated
    direction: forward
    window: 4
    terms: [sans, nope]
  - name: history
    assertion: historical
    direction: forward
    window: 4
    terms: [yore]
terminators: [halt]
questions:
  "yes": [yarp]
  "no": [narp]
abbreviations: {zgrphy: zetagraphy}
"""
YY = """\
language: {code: yy, name: Ypsilonian}
context:
  - name: negation
    assertion: negated
    direction: forward
    window: 4
    terms: [ohne]
"""


def policy_folder(tmp_path: Path, *edits: tuple[str, str], languages: dict[str, str] | None = None) -> Path:
    """A copy of the synthetic policy naming languages of its own folder, with text edits."""
    text = SYNTHETIC.read_text(encoding="utf-8")
    for old, new in (("  languages: []\n", "  languages: [zz]\n"), *edits):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    folder = tmp_path / "policies"
    (folder / "languages").mkdir(parents=True)
    path = folder / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    for code, body in (languages if languages is not None else {"zz": ZZ}).items():
        (folder / "languages" / f"{code}.yaml").write_text(body, encoding="utf-8")
    return path


def loaded(path: Path) -> Policy:
    policy, problems = load_policy_file(path)
    assert problems == [] and policy is not None
    return policy


def problems_of(path: Path) -> list[str]:
    policy, problems = load_policy_file(path)
    assert policy is None
    return [str(p) for p in problems]


def line_of(path: Path, snippet: str) -> int:
    [line] = [n for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if snippet in text]
    return line


def verdict(policy: Policy, text: str, **fields: Any) -> tuple[bool, str]:
    judged = judge(read_order(service_request("o1", text=text, **fields)), policy)
    return judged.flagged, judged.rule


# --- the second policy reads with the shipped English without copying it -------------------------------------------


def test_the_second_policy_reads_declined_as_declined_without_a_word_of_its_own() -> None:
    data = yaml.safe_load(SECOND.read_text(encoding="utf-8"))
    assert not {"languages", "context", "terminators", "questions"} & set(data["recognition"])
    policy = loaded(SECOND)
    assert verdict(policy, "CIMT") == (True, "cimt-named-in-order")
    flagged, rule = verdict(policy, "patient declined CIMT")
    assert not flagged and rule == "cimt-no-evidence"
    judged = judge(read_order(service_request("o1", text="patient declined CIMT")), policy)
    assert [(e.kind, e.assertion) for e in judged.evidence_against] == [("technique", "negated")]


def test_the_shipped_policy_names_its_languages_and_writes_none_of_their_sections() -> None:
    data = yaml.safe_load((ROOT / "policies" / "dynamic-spinal-visualization.yaml").read_text(encoding="utf-8"))
    recognition = data["recognition"]
    assert recognition["languages"] == ["en", "es"]
    assert not {"context", "terminators", "questions", "abbreviations", "typos"} & set(recognition)
    # Spanish words come from es.yaml only: a Spanish negation negates.
    policy = loaded(ROOT / "policies" / "dynamic-spinal-visualization.yaml")
    judged = judge(read_order(service_request("o1", text="Rayos X columna lumbar, sin DMX")), policy)
    assert not judged.flagged and any(e.assertion == "negated" for e in judged.evidence_against)


# --- a language's words, and a policy's own sections ------------------------------------------------------------------


def test_a_word_added_to_a_language_changes_every_policy_that_names_it(tmp_path: Path) -> None:
    with_word = loaded(policy_folder(tmp_path / "a"))
    without = loaded(policy_folder(tmp_path / "b", languages={"zz": ZZ.replace("[sans, nope]", "[nope]")}))
    assert verdict(with_word, "sans zeta scan of the arm") == (False, "no-evidence")
    assert verdict(without, "sans zeta scan of the arm") == (True, "technique-named")
    # Terminators, history triggers and abbreviations of the language read too.
    assert verdict(with_word, "nope halt zeta scan of the arm")[0]
    assert not verdict(with_word, "yore zeta scan of the arm")[0]
    assert verdict(with_word, "zgrphy of the arm") == (True, "technique-named")


def test_a_policy_section_replaces_the_languages_one_and_keeps_the_others(tmp_path: Path) -> None:
    own = (
        "  languages: [zz]\n",
        "  languages: [zz]\n  context:\n"
        "    - {name: refusal, assertion: negated, direction: forward, terms: [refused]}\n",
    )
    policy = loaded(policy_folder(tmp_path, own))
    assert verdict(policy, "sans zeta scan of the arm")[0]  # the language's negation is replaced ...
    assert not verdict(policy, "refused zeta scan of the arm")[0]  # ... by the policy's
    assert policy.recognition.abbreviations == {"zgrphy": "zetagraphy"}  # the other sections still come from zz
    assert "narp" in policy.recognition.no_answers


def test_two_languages_read_together_and_a_trigger_of_one_name_is_one_trigger(tmp_path: Path) -> None:
    path = policy_folder(tmp_path, ("  languages: [zz]\n", "  languages: [zz, yy]\n"), languages={"zz": ZZ, "yy": YY})
    policy = loaded(path)
    assert not verdict(policy, "sans zeta scan of the arm")[0]
    assert not verdict(policy, "ohne zeta scan of the arm")[0]
    assert verdict(policy, "zeta scan of the arm")[0]


def test_a_policy_without_languages_reads_english_by_default() -> None:
    assert "languages" not in yaml.safe_load(SECOND.read_text(encoding="utf-8"))["recognition"]
    english = yaml.safe_load((SHIPPED_LANGUAGES / "en.yaml").read_text(encoding="utf-8"))
    assert loaded(SECOND).recognition.abbreviations == english["abbreviations"]


def test_a_language_change_changes_the_policy_digest(tmp_path: Path) -> None:
    first = loaded(policy_folder(tmp_path / "a"))
    second = loaded(policy_folder(tmp_path / "b", languages={"zz": ZZ.replace("[yore]", "[yore, olden]")}))
    assert first.sha256 != second.sha256


# --- strict validation, with the language file's lines ----------------------------------------------------------------


def test_a_misspelled_key_in_a_language_file_names_the_file_line_and_the_key_it_is_close_to(tmp_path: Path) -> None:
    path = policy_folder(tmp_path, languages={"zz": ZZ.replace("terminators:", "terminator:")})
    language = path.parent / "languages" / "zz.yaml"
    assert problems_of(path) == [
        f"{language}: terminator, line {line_of(language, 'terminator:')}: unknown key 'terminator'; "
        "did you mean 'terminators'?"
    ]


def test_a_bad_value_in_a_language_file_names_its_path_and_line(tmp_path: Path) -> None:
    path = policy_folder(
        tmp_path, languages={"zz": ZZ.replace("window: 4\n    terms: [yore]", "window: 40\n    terms: [yore]")}
    )
    language = path.parent / "languages" / "zz.yaml"
    [problem] = problems_of(path)
    assert problem.startswith(f"{language}: context[1].window, line {line_of(language, 'window: 40')}: ")


def test_an_answer_that_is_both_yes_and_no_in_a_language_file(tmp_path: Path) -> None:
    path = policy_folder(tmp_path, languages={"zz": ZZ.replace('"no": [narp]', '"no": [narp, yarp]')})
    language = path.parent / "languages" / "zz.yaml"
    assert problems_of(path) == [
        f"{language}: questions, line {line_of(language, 'questions:')}: 'yarp' is listed as both a yes and a no answer"
    ]


def test_a_term_the_index_cannot_read_names_its_language_line(tmp_path: Path) -> None:
    path = policy_folder(tmp_path, languages={"zz": ZZ.replace("[yore]", "[yore, 'a{b']")})
    language = path.parent / "languages" / "zz.yaml"
    [problem] = problems_of(path)
    assert problem.startswith(f"{language}: context[1].terms[1], line {line_of(language, 'a{b')}: ")


def test_an_unknown_language_is_a_problem_of_the_policy_with_a_hint(tmp_path: Path) -> None:
    path = policy_folder(tmp_path, ("  languages: [zz]\n", "  languages: [zx]\n"))
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: recognition.languages[0], line {line_of(path, 'languages: [zx]')}: ")
    assert "no language file zx.yaml" in problem and "known: en, es, zz" in problem


def test_a_language_named_twice(tmp_path: Path) -> None:
    path = policy_folder(tmp_path, ("  languages: [zz]\n", "  languages: [zz, zz]\n"))
    [problem] = problems_of(path)
    assert problem == f"{path}: recognition.languages[1], line {line_of(path, 'languages: [zz, zz]')}: " + (
        "language 'zz' is named twice"
    )


def test_one_trigger_name_with_two_behaviours_across_languages(tmp_path: Path) -> None:
    yy = YY.replace("window: 4", "window: 5")
    path = policy_folder(tmp_path, ("  languages: [zz]\n", "  languages: [zz, yy]\n"), languages={"zz": ZZ, "yy": yy})
    language = path.parent / "languages" / "yy.yaml"
    [problem] = problems_of(path)
    assert problem.startswith(f"{language}: context[0], line {line_of(language, '- name: negation')}: ")
    assert "trigger 'negation'" in problem and "window 5" in problem and "window 4" in problem


def test_one_abbreviation_read_two_ways_across_languages(tmp_path: Path) -> None:
    yy = YY + "abbreviations: {zgrphy: zebra}\n"
    path = policy_folder(tmp_path, ("  languages: [zz]\n", "  languages: [zz, yy]\n"), languages={"zz": ZZ, "yy": yy})
    language = path.parent / "languages" / "yy.yaml"
    [problem] = problems_of(path)
    assert problem.startswith(f"{language}: abbreviations.zgrphy, line {line_of(language, 'zgrphy: zebra')}: ")


def test_a_language_file_must_hold_the_language_it_is_named_for(tmp_path: Path) -> None:
    path = policy_folder(tmp_path, languages={"zz": ZZ.replace("code: zz", "code: zy")})
    language = path.parent / "languages" / "zz.yaml"
    assert problems_of(path) == [
        f"{language}: language.code, line 1: the file zz.yaml must hold language 'zz', not 'zy'"
    ]


def test_check_policy_lists_a_language_files_problem_and_fails(tmp_path: Path) -> None:
    path = policy_folder(tmp_path, languages={"zz": ZZ.replace("terminators:", "terminator:")})
    result = subprocess.run(
        [*cds_service_command(), "check-policy", str(path.parent)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode != 0
    assert f"zz.yaml: terminator, line {line_of(path.parent / 'languages' / 'zz.yaml', 'terminator:')}" in (
        result.stdout + result.stderr
    )


# --- the schema -----------------------------------------------------------------------------------------------------


def test_the_language_schema_command_and_file_and_the_shipped_languages_agree() -> None:
    result = subprocess.run(
        [*cds_service_command(), "policy-schema", "--language"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert schema == language_json_schema()
    assert json.loads((SHIPPED_LANGUAGES / "language.schema.json").read_text(encoding="utf-8")) == schema
    assert schema["additionalProperties"] is False
    for code in ("en", "es"):
        data = yaml.safe_load((SHIPPED_LANGUAGES / f"{code}.yaml").read_text(encoding="utf-8"))
        assert schema_errors(schema, data) == [], code
    data = yaml.safe_load(ZZ)
    data["terminator"] = data.pop("terminators")
    assert any("unknown key 'terminator'" in e for e in schema_errors(schema, data))


@pytest.mark.parametrize("code", ["en", "es"])
def test_the_shipped_languages_load_without_problems(code: str, tmp_path: Path) -> None:
    path = policy_folder(tmp_path, ("  languages: [zz]\n", f"  languages: [{code}]\n"), languages={})
    loaded(path)


# --- a live reload takes the policy folder's own languages with it ----------------------------------------------------


def test_a_reload_through_a_snapshot_reads_the_folders_edited_language(tmp_path: Path) -> None:
    path = policy_folder(tmp_path)
    app = create_app({"AUTH": "off", "DATABASE_URL": f"sqlite:///{tmp_path / 'c.sqlite3'}", "POLICY_DIR": path.parent})
    reloader = services_of(app).reloader
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    reloader.serve_from(str(state))  # as `serve` does: every reload checks a snapshot copy of the folder
    client = app.test_client()

    def flagged(text: str) -> bool:
        body = hook_request("order-sign", [service_request("o1", text=text)])
        response = client.post("/cds-services/test-order-sign", json=body)
        assert response.status_code == 200
        return bool(response.get_json()["cards"])

    assert flagged("olden zeta scan of the arm")
    language = path.parent / "languages" / "zz.yaml"
    language.write_text(ZZ.replace("[yore]", "[yore, olden]"), encoding="utf-8")
    assert reloader.reload() is True
    assert not flagged("olden zeta scan of the arm")
    services_of(app).store.close()
