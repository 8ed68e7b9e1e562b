"""Shared language files (ConText lexicon, answer words, abbreviations, typo settings) and their merge into a policy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from . import schema as s
from .yamlread import Loc, Problem

LANGUAGES_DIR = "languages"
# The parts of `recognition:` a language file supplies; a policy that writes one of them replaces the languages'.
SECTIONS: tuple[str, ...] = ("context", "terminators", "questions", "abbreviations", "typos")
DEFAULT_LANGUAGES: tuple[str, ...] = ("en",)


class LanguageMeta(s.Strict):
    code: Annotated[str, Field(pattern=r"^[a-z]{2}$", description="ISO 639-1 code; the file is named <code>.yaml")]
    name: s.Text


class LanguageQuestions(s.Strict):
    """Answers to order questions in this language; a policy's languages' answers are read together."""

    yes: s.Terms = Field(default_factory=list)
    no: s.Terms = Field(default_factory=list)


class LanguageFile(s.Strict):
    """One language file in languages/: the words every policy that names the language reads orders with."""

    schema_: Annotated[str | None, Field(alias="$schema")] = None
    language: LanguageMeta
    context: list[s.ContextSpec] = Field(default_factory=list)
    terminators: s.Terms = Field(default_factory=list)
    questions: LanguageQuestions | None = None
    abbreviations: dict[
        Annotated[str, Field(pattern=r"^[a-z0-9]+$")], Annotated[str, Field(pattern=r"^[a-z0-9 ]+$")]
    ] = Field(default_factory=dict)
    typos: s.TyposSpec | None = None


def language_json_schema() -> dict[str, Any]:
    """The JSON Schema of a language file, for editors and reviewers."""
    schema = LanguageFile.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "cds-service language file"
    return schema


def language_path(code: str, policy_folder: Path, packaged: Path) -> Path | None:
    """A policy folder's own languages/<code>.yaml, else the one shipped with the service."""
    for folder in (policy_folder / LANGUAGES_DIR, packaged / LANGUAGES_DIR):
        path = folder / f"{code}.yaml"
        if path.is_file():
            return path
    return None


def language_files(folder: Path) -> list[Path]:
    """The language files a policy folder holds itself (copied with the policies on a live reload)."""
    return sorted((folder / LANGUAGES_DIR).glob("*.yaml"))


@dataclass(frozen=True)
class Language:
    source: Path
    spec: LanguageFile
    lines: dict[Loc, int]

    def problem(self, path: Loc, message: str) -> Problem:
        return Problem(self.source, path, self.lines.get(path), message)


def merged_recognition(recognition: s.Recognition, languages: list[Language]) -> tuple[s.Recognition, list[Problem]]:
    """The policy's recognition with every language section it does not write itself taken from its languages, in
    the order it names them: triggers of one name are one trigger (their terms together), terminators, answers and
    abbreviations are read together, and typo settings come from the first language that has them."""
    written = recognition.model_fields_set
    problems: list[Problem] = []
    update: dict[str, Any] = {}
    if "context" not in written:
        triggers: dict[str, tuple[s.ContextSpec, Language, int]] = {}
        terms: dict[str, list[s.TermSpec]] = {}
        for language in languages:
            for i, trigger in enumerate(language.spec.context):
                first = triggers.get(trigger.name)
                if first is None:
                    triggers[trigger.name] = (trigger, language, i)
                    terms[trigger.name] = list(trigger.terms)
                    continue
                known, where, index = first
                if (known.assertion, known.direction, known.window) != (
                    trigger.assertion,
                    trigger.direction,
                    trigger.window,
                ):
                    problems.append(
                        language.problem(
                            ("context", i),
                            f"trigger {trigger.name!r} is {trigger.assertion}, {trigger.direction}, window "
                            f"{trigger.window} here and {known.assertion}, {known.direction}, window {known.window} "
                            f"in {where.source} (context[{index}]): one name, one behaviour in every language",
                        )
                    )
                    continue
                terms[trigger.name] += trigger.terms
        update["context"] = [
            trigger.model_copy(update={"terms": terms[name]}) for name, (trigger, _, _) in triggers.items()
        ]
    if "terminators" not in written:
        update["terminators"] = [term for language in languages for term in language.spec.terminators]
    if "questions" not in written:
        yes = [t for language in languages if language.spec.questions for t in language.spec.questions.yes]
        no = [t for language in languages if language.spec.questions for t in language.spec.questions.no]
        update["questions"] = s.QuestionsSpec(yes=yes, no=no) if yes and no else None
    if "abbreviations" not in written:
        abbreviations: dict[str, str] = {}
        said_by: dict[str, Language] = {}
        for language in languages:
            for short, long in language.spec.abbreviations.items():
                if short in abbreviations and abbreviations[short] != long:
                    problems.append(
                        language.problem(
                            ("abbreviations", short),
                            f"{short!r} reads {long!r} here and {abbreviations[short]!r} in {said_by[short].source}: "
                            "write the policy's own `abbreviations:` to choose",
                        )
                    )
                    continue
                abbreviations.setdefault(short, long)
                said_by.setdefault(short, language)
        update["abbreviations"] = abbreviations
    if "typos" not in written:
        update["typos"] = next((language.spec.typos for language in languages if language.spec.typos), None)
    return recognition.model_copy(update=update), problems
