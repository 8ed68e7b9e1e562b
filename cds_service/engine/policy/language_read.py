"""Read one shared language file (ConText triggers, terminators, answers), validated as strictly as a policy."""

from __future__ import annotations

from pathlib import Path

from ..terms import TermError, TermIndex, term_key
from .compile_recognition import Compiler, add_plain
from .diagnostics import structure_problems
from .language import Language, LanguageFile
from .model import ContextTrigger
from .yamlread import Problem, read_yaml


def read_language(path: Path) -> tuple[Language | None, bytes, list[Problem]]:
    """One language file, validated as strictly as a policy: format, terms, answers, each problem with its line."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, b"", [Problem(path, (), None, f"cannot read: {exc}")]
    located = read_yaml(path, text)
    problems = list(located.problems)
    if located.data is None or not isinstance(located.data, dict):
        if not problems:
            problems.append(Problem(path, (), 1, "a language file holds a mapping (language:, context:, ...)"))
        return None, raw, problems
    problems += structure_problems(path, located, LanguageFile, located.data, ())
    if problems:
        return None, raw, problems
    spec = LanguageFile.model_validate(located.data)
    if spec.language.code != path.stem:
        problems.append(
            Problem(
                path,
                ("language", "code"),
                located.line_of(("language", "code")),
                f"the file {path.name} must hold language {path.stem!r}, not {spec.language.code!r}",
            )
        )
    c = Compiler(path, located)
    index = TermIndex()
    for i, trigger in enumerate(spec.context):
        ref = ContextTrigger(trigger.name, trigger.assertion, trigger.direction, trigger.window)
        for t, term in enumerate(trigger.terms):
            add_plain(c, index, term, ref, ("context", i, "terms", t))
    for t, term in enumerate(spec.terminators):
        add_plain(c, index, term, "terminate", ("terminators", t))
    answers: dict[str, set[str]] = {"yes": set(), "no": set()}
    for answer in ("yes", "no"):
        for t, term in enumerate(getattr(spec.questions, answer) if spec.questions else []):
            if term.term is None:
                c.problem(("questions", answer, t), "an answer is a word or phrase, not a pattern")
            else:
                answers[answer].add(term_key(term.term, case=False))
    for both in sorted(answers["yes"] & answers["no"]):
        c.problem(("questions",), f"{both!r} is listed as both a yes and a no answer")
    try:
        index.compile()
    except TermError as exc:
        c.problem((), str(exc))
    problems += c.problems
    return (Language(path, spec, located.lines) if not problems else None), raw, problems
