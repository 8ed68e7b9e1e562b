"""Load policy files: read, validate and compile each one, and assemble a folder of them into a policy set."""

from __future__ import annotations

import difflib
import hashlib
import logging
from pathlib import Path

from ..markdown import MAX_DETAIL_WORDS, word_count
from . import schema as s
from .compile_decision import compile_rules, prefilter
from .compile_recognition import Compiler, compile_recognition
from .diagnostics import repaired, structure_problems
from .language import DEFAULT_LANGUAGES, LANGUAGES_DIR, Language, language_files, language_path, merged_recognition
from .language_read import read_language
from .model import (
    COVERED_BY_STATUS,
    Alternative,
    CardText,
    Coding,
    Link,
    Policy,
    PolicyError,
    PolicySet,
    PrefetchKey,
    Service,
    ServiceDef,
)
from .yamlread import Loc, Located, Problem, read_yaml

log = logging.getLogger(__name__)

# CDS Hooks 2.0: card summary "<140 characters"; the Inferno CRD kit fails 140 and more.
SUMMARY_LIMIT = 139
FACTS = ("payer", "title", "reference", "version")
EXAMPLES_DIR = "examples"


def packaged_policy_dir() -> Path:
    """The policy folder shipped with the package, or the repository's policies/ when running from a checkout."""
    return find_policy_dir(Path(__file__).resolve().parents[2])


# Before this release the folder was called cards/ (_cards inside the wheel): still read, with a warning, for one
# release, so a deployment that copied its edited policies into the old folder keeps its policies.
_FOLDERS = ("_policies", "../policies")
_LEGACY_FOLDERS = ("_cards", "../cards")


def find_policy_dir(package: Path) -> Path:
    """The first of the package's policy folders that exists (installed, then checkout), else the legacy cards/."""
    for name in _FOLDERS:
        if (package / name).is_dir():
            return (package / name).resolve()
    for name in _LEGACY_FOLDERS:
        if (package / name).is_dir():
            legacy = (package / name).resolve()
            log.warning(
                "reading policies from %s: the folder is now called policies/ (cards/ is read until the next release)",
                legacy,
            )
            return legacy
    return (package / _FOLDERS[-1]).resolve()


def _compile(c: Compiler, spec: s.PolicyFile, digest: str) -> Policy:
    """The whole policy compiled, section by section (the order fixes the order of problems)."""
    meta = spec.policy
    facts = {"payer": spec.payer.name, "title": meta.title, "reference": meta.reference, "version": meta.version}
    services = _services(c, spec)
    card = spec.card
    summary = c.fill(card.summary, facts, ("card", "summary"))
    if len(summary) > SUMMARY_LIMIT:
        c.problem(("card", "summary"), f"{len(summary)} characters; a card summary must be under 140")
    reasons = tuple(Coding(card.override_reasons.system, r.code, r.display) for r in card.override_reasons.reasons)
    if len({r.code for r in reasons}) != len(reasons):
        c.problem(("card", "override_reasons", "reasons"), "override reason codes must be unique")
    recognition = compile_recognition(c, spec.recognition, ("recognition",))
    alternatives = _alternatives(c, spec, facts, recognition.regions)
    text = _card_text(c, card, facts, summary, reasons)
    _check_card_words(c, text, alternatives)
    rules = compile_rules(c, spec)
    prefilter(spec.recognition, rules, recognition)
    return Policy(
        id=meta.id,
        title=meta.title,
        version=meta.version,
        status=meta.status,
        covered=COVERED_BY_STATUS[meta.status],
        reference=meta.reference,
        url=meta.url,
        payer=spec.payer.name,
        services=services,
        description=" ".join(spec.services.description.split()),
        card=text,
        coverage_reason=c.fill(spec.coverage.reason, facts, ("coverage", "reason")),
        coverage_action=c.fill(spec.coverage.action, facts, ("coverage", "action")),
        alternatives=alternatives,
        region_from=tuple(frozenset(group) for group in spec.alternatives.region_from),
        replacement_note=c.fill(spec.alternatives.note, facts, ("alternatives", "note"), keep=("order",)),
        recognition=recognition,
        rules=rules,
        prefetch={name: PrefetchKey(p.query, p.required) for name, p in spec.prefetch.items()},
        source=c.source,
        sha256=digest,
    )


def _services(c: Compiler, spec: s.PolicyFile) -> list[ServiceDef]:
    services = []
    for hook, sdef in (
        ("order-select", spec.services.order_select),
        ("order-sign", spec.services.order_sign),
        ("order-dispatch", spec.services.order_dispatch),
        ("appointment-book", spec.services.appointment_book),
        ("encounter-start", spec.services.encounter_start),
    ):
        if sdef is not None:
            services.append(ServiceDef(hook, sdef.id, sdef.title))
    if not services:
        c.problem(("services",), "name at least one hook (order-select, order-sign, ...)")
    return services


def _coding(spec: s.CodingSpec) -> Coding:
    return Coding(spec.system, spec.code, spec.display)


def _alternatives(
    c: Compiler, spec: s.PolicyFile, facts: dict[str, str], regions: tuple[str, ...]
) -> dict[str, Alternative]:
    card = spec.card
    alternatives: dict[str, Alternative] = {}
    for region, alt in spec.alternatives.regions.items():
        if region not in spec.recognition.anatomy.regions:
            c.problem(
                ("alternatives", "regions", region),
                f"region {region!r} is not one of recognition.anatomy.regions ({', '.join(regions)})",
            )
        named = {**facts, "alternative": alt.label}
        alternatives[region] = Alternative(
            region=region,
            label=alt.label,
            code=_coding(alt.code),
            body_site=_coding(alt.body_site),
            suggestion_label=c.fill(card.alternative.label, named, ("card", "alternative", "label")),
            instead=c.fill(card.alternative.instead, named, ("card", "alternative", "instead")),
        )
    if not alternatives:
        # The {alternative} placeholders are still checked when no region has an alternative.
        c.fill(card.alternative.label, {**facts, "alternative": ""}, ("card", "alternative", "label"))
        c.fill(card.alternative.instead, {**facts, "alternative": ""}, ("card", "alternative", "instead"))
    return alternatives


def _card_text(
    c: Compiler, card: s.CardSpec, facts: dict[str, str], summary: str, reasons: tuple[Coding, ...]
) -> CardText:
    instructions = card.instructions
    return CardText(
        indicator=card.indicator,
        summary=summary,
        matched=c.fill(card.matched, facts, ("card", "matched")),
        position=c.fill(card.position, facts, ("card", "position")),
        evidence=c.fill(card.evidence, facts, ("card", "evidence")),
        footer=c.fill(card.footer, facts, ("card", "footer")),
        links=tuple(Link(link.label, link.url, link.detail) for link in card.links),
        override_reasons=reasons,
        guideline_topic=_coding(card.guideline.topic),
        guideline_instead=c.fill(card.guideline.instead, facts, ("card", "guideline", "instead")),
        alternative_topic=_coding(card.alternative.topic),
        alternative_remove=c.fill(card.alternative.remove, facts, ("card", "alternative", "remove")),
        alternative_description=c.fill(card.alternative.description, facts, ("card", "alternative", "description")),
        instructions_topic=_coding(instructions.topic) if instructions else None,
        instructions_summary=c.fill(instructions.summary, facts, ("card", "instructions", "summary"))
        if instructions
        else None,
        instructions_detail=c.fill(instructions.detail, facts, ("card", "instructions", "detail"))
        if instructions
        else None,
    )


def _check_card_words(c: Compiler, text: CardText, alternatives: dict[str, Alternative]) -> None:
    # The detail holds the order's name (at most 12 words) and why it matched besides these words: they may take at
    # most two thirds of the card's MAX_DETAIL_WORDS, so the whole reads without scrolling.
    instead = max([text.guideline_instead, *(a.instead for a in alternatives.values())], key=word_count)
    links = " ".join(link.detail for link in text.links if link.detail)
    own = word_count(" ".join([text.matched, "What to do:", instead, text.position, text.evidence, text.footer, links]))
    if own > MAX_DETAIL_WORDS * 2 // 3:
        c.problem(
            ("card",),
            f"the card's own words (matched, instead, position, evidence, footer, link labels) come to {own}; at most "
            f"{MAX_DETAIL_WORDS * 2 // 3} leave room for the order's name and why it matched in "
            f"{MAX_DETAIL_WORDS} words",
        )
    if text.instructions_detail and word_count(text.instructions_detail) > MAX_DETAIL_WORDS - 12:
        c.problem(("card", "instructions", "detail"), f"at most {MAX_DETAIL_WORDS - 12} words")
    if text.instructions_summary and len(text.instructions_summary) > SUMMARY_LIMIT:
        c.problem(("card", "instructions", "summary"), "a card summary must be under 140 characters")
    topics = [text.guideline_topic.code, text.alternative_topic.code]
    if text.instructions_topic:
        topics.append(text.instructions_topic.code)
    if len(set(topics)) != len(topics):
        # Each card type is switched on and off by its topic code (CRD davinci-crd.configuration-options, dev-5).
        c.problem(("card",), f"each card type needs its own topic code, got {topics}")


def load_policy_file(source: Path) -> tuple[Policy | None, list[Problem]]:
    """Read, validate and compile one policy file; every problem found is returned, none raised."""
    try:
        raw = source.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(source, (), None, f"cannot read: {exc}")]
    located = read_yaml(source, text)
    problems = list(located.problems)
    if located.data is None and not problems:
        problems.append(Problem(source, (), None, "the file is empty"))
    if located.data is None:
        return None, problems
    if not isinstance(located.data, dict):
        return None, [*problems, Problem(source, (), 1, "the file must hold a mapping (policy:, card:, ...)")]
    structure = structure_problems(source, located, s.PolicyFile, located.data, ())
    problems += structure
    spec = repaired(located.data) if structure else s.PolicyFile.model_validate(located.data)
    if spec is None:
        return None, problems
    spec, used, language_problems = _with_languages(source, located, spec)
    problems += language_problems
    digest = hashlib.sha256(raw)
    for part in used:  # a change to a language file the policy reads is a change to the policy
        digest.update(part)
    compiler = Compiler(source, located)
    policy = _compile(compiler, spec, digest.hexdigest())
    # A part left out for a format problem can cause follow-on problems (a rule naming a dropped condition): each
    # place is reported once, with the format problem first.
    # ... and a problem on a part that contains a reported one (its parent mapping) is a consequence too.
    reported = {p.path for p in structure}
    problems += [
        p for p in compiler.problems if not any(p.path[: len(r)] == r or r[: len(p.path)] == p.path for r in reported)
    ]
    return (policy if not problems else None), problems


def _with_languages(
    source: Path, located: Located, spec: s.PolicyFile
) -> tuple[s.PolicyFile, list[bytes], list[Problem]]:
    """The policy with its languages' sections filled in, the bytes of the language files read, and their problems."""
    rec = spec.recognition
    codes = rec.languages if "languages" in rec.model_fields_set else list(DEFAULT_LANGUAGES)
    packaged = packaged_policy_dir()
    languages: list[Language] = []
    used: list[bytes] = []
    problems: list[Problem] = []
    for i, code in enumerate(codes):
        path = language_path(code, source.parent, packaged)
        where: Loc = ("recognition", "languages", i)
        if code in codes[:i]:
            problems.append(Problem(source, where, located.line_of(where), f"language {code!r} is named twice"))
            continue
        if path is None:
            known = sorted({p.stem for folder in (source.parent, packaged) for p in language_files(folder)})
            close = difflib.get_close_matches(code, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known) or 'none'}"
            problems.append(
                Problem(
                    source,
                    where,
                    located.line_of(where),
                    f"no language file {code}.yaml in {LANGUAGES_DIR}/ here or shipped{hint}",
                )
            )
            continue
        language, raw, found = read_language(path)
        used.append(raw)
        problems += found
        if language is not None:
            languages.append(language)
    merged, found = merged_recognition(rec, languages)
    return spec.model_copy(update={"recognition": merged}), used, problems + found


def policy_files(folder: Path) -> list[Path]:
    return sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])


def check_policies(directory: Path | str | None = None) -> tuple[PolicySet | None, list[Problem]]:
    """Every policy in the folder; (None, problems) when any file has a problem."""
    folder = Path(directory) if directory else packaged_policy_dir()
    if not folder.is_dir():
        return None, [Problem(folder, (), None, "policy folder not found")]
    files = policy_files(folder)
    if not files:
        return None, [Problem(folder, (), None, "no policy files (*.yaml) in the folder")]
    policies: list[Policy] = []
    problems: list[Problem] = []
    for path in files:
        policy, found = load_policy_file(path)
        problems += found
        if policy is not None:
            policies.append(policy)
    seen: dict[str, Path] = {}
    for policy in policies:
        if policy.id in seen:
            problems.append(
                Problem(
                    policy.source,
                    ("policy", "id"),
                    None,
                    f"policy id {policy.id!r} is already used by {seen[policy.id]}",
                )
            )
        seen[policy.id] = policy.source
    services: dict[str, Service] = {}
    for policy in policies:
        for sdef in policy.services:
            existing = services.get(sdef.id)
            if existing and existing.hook != sdef.hook:
                problems.append(
                    Problem(
                        policy.source,
                        ("services",),
                        None,
                        f"service id {sdef.id!r} is used for {existing.hook} elsewhere; each service answers one hook",
                    )
                )
                continue
            if existing:
                services[sdef.id] = Service(
                    sdef.id,
                    sdef.hook,
                    existing.title,
                    f"{existing.description} {policy.description}",
                    (*existing.policies, policy),
                )
            else:
                services[sdef.id] = Service(sdef.id, sdef.hook, sdef.title, policy.description, (policy,))
    examples = folder / EXAMPLES_DIR
    for policy in policies:
        policy.examples = examples if examples.is_dir() else None
    if problems:
        return None, problems
    return PolicySet(policies, services, folder), []


def load_policies(directory: Path | str | None = None) -> PolicySet:
    """Every policy in the folder; PolicyError lists every problem of every file."""
    policies, problems = check_policies(directory)
    if policies is None:
        raise PolicyError(problems)
    return policies
