"""Load the policy files in cards/: validate them, name the file and the problem, compile what matching needs."""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .orders import PLACES, Place
from .terms import TermError, TermIndex

HOOKS = ("order-select", "order-sign")
# CDS Hooks 2.0: card summary "<140 characters"; the Inferno CRD kit fails 140 and more.
SUMMARY_LIMIT = 139
LookAlikeEffect = Literal["excludes", "explains_code", "note"]
_EVIDENCE_KINDS = ("techniques", "spine", "other_regions", "look_alikes")


class PolicyError(ValueError):
    """A policy file is broken; the message names the file, the place in it and the problem."""


def packaged_policy_dir() -> Path:
    """The policy folder shipped with the package, or the repository's cards/ when running from a checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "_cards"
    return installed if installed.is_dir() else here.parent / "cards"


@dataclass(frozen=True)
class Coding:
    system: str
    code: str
    display: str

    def to_fhir(self) -> dict[str, str]:
        return {"system": self.system, "code": self.code, "display": self.display}


class CodeSet:
    """Codes written as exact codes, ranges ("77001-77003", "M40-M54") or ICD-10 prefixes ("S13.4")."""

    def __init__(self, specs: Iterable[str], *, prefixes: bool) -> None:
        self.exact: set[str] = set()
        self.ranges: list[tuple[str, str]] = []
        self.prefixes: list[str] = []
        for spec in specs:
            spec = _norm_code(spec)
            # "A-B" with both ends the same length is a range; LOINC codes ("24945-8") carry a check digit instead.
            bounds = re.fullmatch(r"([A-Z0-9]+)-([A-Z0-9]+)", spec)
            if bounds and len(bounds[1]) == len(bounds[2]):
                if bounds[1] > bounds[2]:
                    raise ValueError(f"range {spec!r} runs backwards")
                self.ranges.append((bounds[1], bounds[2]))
            elif prefixes:
                self.prefixes.append(spec)
            else:
                self.exact.add(spec)

    def __contains__(self, code: str) -> bool:
        code = _norm_code(code)
        if not code:
            return False
        if code in self.exact:
            return True
        for low, high in self.ranges:
            if code[0].isdigit() == low[0].isdigit():
                # ICD-10 ranges cover whole three-character categories; CPT ranges compare equal-length numbers.
                key = code[: len(low)] if not low[0].isdigit() else code
                if len(key) == len(low) and low <= key <= high:
                    return True
        return any(code.startswith(p) for p in self.prefixes)


def _norm_code(code: str) -> str:
    # ICD-10-CM is written with or without its dot; codes are compared without it.
    return str(code).strip().upper().replace(".", "")


@dataclass(frozen=True)
class Ref:
    """What a phrase means in a policy: kind (technique, combo, spine, site, other, look_alike) and details."""

    kind: str
    name: str
    region: str = ""
    needs_spine: bool = False
    group: int = 0


@dataclass
class Technique:
    name: str
    needs_spine: bool
    # Number of term groups in each combination; all must appear in one field.
    combos: list[int] = field(default_factory=list)


@dataclass
class LookAlike:
    name: str
    effect: LookAlikeEffect
    codes: dict[str, CodeSet]
    # Where this look-alike's words are read; None means recognition.places.look_alikes.
    places: frozenset[Place] | None = None


@dataclass
class Diagnosis:
    alias: str
    codes: CodeSet
    display: str
    specificity: int


@dataclass(eq=False)  # hashed by identity: matching caches lookups per policy
class Recognition:
    places: dict[str, frozenset[Place]]
    skip_statuses: frozenset[str]
    system_alias: dict[str, str]
    # The first URI listed for each alias: what the service writes when it names a code (CRD billingCode).
    canonical_system: dict[str, str]
    billing_codes: dict[tuple[str, str], str]
    techniques: dict[str, Technique]
    body_sites: dict[tuple[str, str], tuple[str, str]]
    diagnoses: list[Diagnosis]
    look_alikes: dict[str, LookAlike]
    index: TermIndex


@dataclass(frozen=True)
class Alternative:
    region: str
    label: str
    code: Coding
    body_site: Coding
    suggestion_label: str


@dataclass(frozen=True)
class PrefetchKey:
    """A prefetch template the policy wants; `required` makes a call without it a 412 (CDS Hooks 2.0)."""

    query: str
    required: bool = False


@dataclass(frozen=True)
class ServiceDef:
    hook: str
    id: str
    title: str


@dataclass
class CardText:
    indicator: str
    topic: Coding
    summary: str
    position: str
    evidence: str
    instead: str
    links: list[dict[str, str]]
    remove_label: str
    remove_description: str
    replace_description: str
    override_reasons: list[Coding]


@dataclass
class Policy:
    id: str
    title: str
    version: str
    status: str
    reference: str
    url: str
    payer: str
    services: list[ServiceDef]
    description: str
    card: CardText
    alternatives: dict[str, Alternative]
    recognition: Recognition
    prefetch: dict[str, PrefetchKey]
    source: Path


@dataclass(frozen=True)
class Service:
    """A CDS service as discovery lists it: one hook, and the policies it applies."""

    id: str
    hook: str
    title: str
    description: str
    policies: tuple[Policy, ...]

    @property
    def prefetch(self) -> dict[str, PrefetchKey]:
        merged: dict[str, PrefetchKey] = {}
        for policy in self.policies:
            for name, key in policy.prefetch.items():
                known = merged.get(name)
                merged[name] = PrefetchKey(key.query, key.required or (known.required if known else False))
        return merged


@dataclass
class PolicySet:
    policies: list[Policy]
    services: dict[str, Service]


class _Doc:
    """A YAML document with a path, so every validation error says exactly where it is."""

    def __init__(self, source: Path, data: Any, path: str = "") -> None:
        self.source = source
        self.data = data
        self.path = path

    def fail(self, problem: str) -> PolicyError:
        where = f" at {self.path}" if self.path else ""
        return PolicyError(f"{self.source}{where}: {problem}")

    def child(self, key: str | int) -> _Doc:
        path = f"{self.path}[{key}]" if isinstance(key, int) else (f"{self.path}.{key}" if self.path else key)
        if isinstance(key, int):
            return _Doc(self.source, self.data[key], path)
        return _Doc(self.source, self.data.get(key) if isinstance(self.data, dict) else None, path)

    def mapping(self, key: str, *, required: bool = True) -> _Doc:
        node = self.child(key)
        if node.data is None and not required:
            return _Doc(self.source, {}, node.path)
        if not isinstance(node.data, dict):
            raise node.fail("must be a mapping" if node.data is not None else "is required")
        return node

    def seq(self, key: str, *, required: bool = True) -> list[_Doc]:
        node = self.child(key)
        if node.data is None and not required:
            return []
        if not isinstance(node.data, list):
            raise node.fail("must be a list" if node.data is not None else "is required")
        return [node.child(i) for i in range(len(node.data))]

    def text(self, key: str, *, required: bool = True, default: str = "") -> str:
        node = self.child(key)
        if node.data is None:
            if required:
                raise node.fail("is required")
            return default
        if isinstance(node.data, int | float) and not isinstance(node.data, bool):
            return str(node.data)
        if not isinstance(node.data, str) or not node.data.strip():
            raise node.fail("must be non-empty text")
        return node.data.strip()

    def names(self) -> list[str]:
        return [str(k) for k in self.data]


def _url(doc: _Doc, key: str) -> str:
    value = doc.text(key)
    if not re.fullmatch(r"https?://[^\s]+", value):
        raise doc.child(key).fail(f"{value!r} is not an absolute http(s) URL")
    return value


def _coding(doc: _Doc) -> Coding:
    if not isinstance(doc.data, dict):
        raise doc.fail("must be a coding {system, code, display}")
    system = doc.text("system")
    if not re.fullmatch(r"(https?://|urn:)\S+", system):
        raise doc.child("system").fail(f"{system!r} is not a code system URI")
    return Coding(system, doc.text("code"), doc.text("display"))


def _template(doc: _Doc, key: str, allowed: Mapping[str, str]) -> str:
    """Fill {placeholders} from policy facts at load time, refusing unknown names."""
    raw = doc.text(key)
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(raw) if name is not None}
    except ValueError as exc:
        raise doc.child(key).fail(f"bad placeholder: {exc}") from exc
    unknown = names - set(allowed)
    if unknown:
        raise doc.child(key).fail(f"unknown placeholder(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return raw.format_map(allowed)


def _add_terms(index: TermIndex, doc: _Doc, ref: Ref) -> None:
    """A list of terms: plain strings, {term, case} or {pattern}."""
    if not isinstance(doc.data, list):
        raise doc.fail("must be a list of terms")
    for i in range(len(doc.data)):
        item = doc.child(i)
        try:
            if isinstance(item.data, str):
                index.add(item.data, ref)
            elif isinstance(item.data, dict) and "pattern" in item.data:
                index.add_pattern(item.text("pattern"), ref)
            elif isinstance(item.data, dict) and "term" in item.data:
                case = item.data.get("case", False)
                if not isinstance(case, bool):
                    raise item.child("case").fail("must be true or false")
                index.add(item.text("term"), ref, case=case)
            else:
                raise item.fail("a term is text, {term: ..., case: true} or {pattern: ...}")
        except TermError as exc:
            raise item.fail(str(exc)) from exc


def _load_recognition(doc: _Doc) -> Recognition:
    index = TermIndex()
    places_doc = doc.mapping("places")
    places: dict[str, frozenset[Place]] = {}
    for kind in _EVIDENCE_KINDS:
        chosen = places_doc.seq(kind)
        for item in chosen:
            if item.data not in PLACES:
                raise item.fail(f"unknown place {item.data!r}; places are {list(PLACES)}")
        places[kind] = frozenset(item.data for item in chosen)

    aliases: dict[str, str] = {}
    canonical: dict[str, str] = {}
    systems_doc = doc.mapping("code_systems")
    for alias in systems_doc.names():
        for item in systems_doc.seq(alias):
            if not isinstance(item.data, str):
                raise item.fail("must be a code system URI")
            aliases[item.data] = alias
            canonical.setdefault(alias, item.data)

    def check_alias(node: _Doc, alias: str) -> None:
        if alias not in systems_doc.data:
            raise node.fail(f"code system {alias!r} is not declared in recognition.code_systems")

    billing: dict[tuple[str, str], str] = {}
    billing_doc = doc.mapping("billing_codes")
    for alias in billing_doc.names():
        check_alias(billing_doc.child(alias), alias)
        codes = billing_doc.mapping(alias)
        for code in codes.names():
            billing[(alias, _norm_code(code))] = codes.text(code)

    techniques: dict[str, Technique] = {}
    for tdoc in doc.seq("techniques"):
        name = tdoc.text("name")
        if name in techniques:
            raise tdoc.child("name").fail(f"technique {name!r} is listed twice")
        needs_spine = tdoc.child("needs_spine").data
        if not isinstance(needs_spine, bool):
            raise tdoc.child("needs_spine").fail("must be true or false")
        technique = Technique(name, needs_spine)
        _add_terms(index, tdoc.child("terms"), Ref("technique", name, needs_spine=needs_spine))
        for c, combo in enumerate(tdoc.seq("combinations", required=False)):
            if not isinstance(combo.data, list) or len(combo.data) < 2:
                raise combo.fail("a combination lists at least two groups of terms")
            for g in range(len(combo.data)):
                _add_terms(index, combo.child(g), Ref("combo", f"{name}#{c}", group=g, needs_spine=needs_spine))
            technique.combos.append(len(combo.data))
        techniques[name] = technique

    spine = doc.mapping("spine")
    body_sites: dict[tuple[str, str], tuple[str, str]] = {}
    sites_doc = spine.mapping("body_sites")
    for alias in sites_doc.names():
        check_alias(sites_doc.child(alias), alias)
        codes = sites_doc.mapping(alias)
        for code in codes.names():
            entry = codes.mapping(code)
            body_sites[(alias, _norm_code(code))] = (entry.text("display"), entry.text("region"))
    words = spine.mapping("words")
    for region in words.names():
        _add_terms(index, words.child(region), Ref("spine", "spine word", region=region))
    site_words = spine.mapping("body_site_words", required=False)
    for region in site_words.names():
        _add_terms(index, site_words.child(region), Ref("site", "body-site word", region=region))
    diagnoses: list[Diagnosis] = []
    dx_doc = spine.mapping("diagnoses")
    for alias in dx_doc.names():
        check_alias(dx_doc.child(alias), alias)
        for item in dx_doc.seq(alias):
            spec = item.text("codes")
            try:
                codes_set = CodeSet([s.strip() for s in spec.split(",")], prefixes=alias == "icd10cm")
            except ValueError as exc:
                raise item.child("codes").fail(str(exc)) from exc
            # The most specific entry names a code covered by several (M54.2 within M40-M54).
            specificity = 0 if codes_set.ranges else len(_norm_code(spec))
            diagnoses.append(Diagnosis(alias, codes_set, item.text("display"), specificity))

    _add_terms(index, doc.mapping("other_regions").child("words"), Ref("other", "other body region"))

    look_alikes: dict[str, LookAlike] = {}
    for ldoc in doc.seq("look_alikes"):
        name = ldoc.text("name")
        effect = ldoc.text("effect")
        if effect not in ("excludes", "explains_code", "note"):
            raise ldoc.child("effect").fail("must be excludes, explains_code or note")
        codes_doc = ldoc.mapping("codes", required=False)
        code_sets: dict[str, CodeSet] = {}
        for alias in codes_doc.names():
            check_alias(codes_doc.child(alias), alias)
            specs = [str(item.data) for item in codes_doc.seq(alias)]
            try:
                code_sets[alias] = CodeSet(specs, prefixes=False)
            except ValueError as exc:
                raise codes_doc.child(alias).fail(str(exc)) from exc
        if ldoc.child("terms").data is not None:
            _add_terms(index, ldoc.child("terms"), Ref("look_alike", name))
        if not code_sets and ldoc.child("terms").data is None:
            raise ldoc.fail("a look-alike needs codes or terms")
        look_places: frozenset[Place] | None = None
        if ldoc.child("places").data is not None:
            chosen = ldoc.seq("places")
            for item in chosen:
                if item.data not in PLACES:
                    raise item.fail(f"unknown place {item.data!r}; places are {list(PLACES)}")
            look_places = frozenset(item.data for item in chosen)
        look_alikes[name] = LookAlike(name, effect, code_sets, look_places)  # type: ignore[arg-type]

    statuses = doc.seq("skip_statuses", required=False)
    index.compile()
    return Recognition(
        places=places,
        skip_statuses=frozenset(str(s.data) for s in statuses),
        system_alias=aliases,
        canonical_system=canonical,
        billing_codes=billing,
        techniques=techniques,
        body_sites=body_sites,
        diagnoses=diagnoses,
        look_alikes=look_alikes,
        index=index,
    )


def load_policy(source: Path) -> Policy:
    """Read and validate one policy file."""
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{source}: cannot read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise PolicyError(f"{source}: the file must hold a mapping (policy:, card:, recognition: ...)")
    doc = _Doc(source, raw)
    meta = doc.mapping("policy")
    payer = doc.mapping("payer").text("name")
    facts = {
        "payer": payer,
        "title": meta.text("title"),
        "reference": meta.text("reference"),
        "version": meta.text("version"),
    }

    services_doc = doc.mapping("services")
    services = []
    for hook in services_doc.names():
        if hook == "description":
            continue
        if hook not in HOOKS:
            raise services_doc.child(hook).fail(f"unknown hook {hook!r}; this service answers {list(HOOKS)}")
        sdoc = services_doc.mapping(hook)
        sid = sdoc.text("id")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", sid):
            raise sdoc.child("id").fail("a service id is letters, digits, '.', '_' or '-' (at most 64)")
        services.append(ServiceDef(hook, sid, sdoc.text("title")))
    if not services:
        raise services_doc.fail("name at least one hook (order-select, order-sign)")

    cdoc = doc.mapping("card")
    indicator = cdoc.text("indicator")
    if indicator not in ("info", "warning", "critical"):
        raise cdoc.child("indicator").fail("must be info, warning or critical")
    summary = _template(cdoc, "summary", facts)
    if len(summary) > SUMMARY_LIMIT:
        raise cdoc.child("summary").fail(f"{len(summary)} characters; a card summary must be under 140")
    links = []
    for ldoc in cdoc.seq("links"):
        links.append({"label": ldoc.text("label"), "url": _url(ldoc, "url"), "type": "absolute"})
    if not links:
        raise cdoc.child("links").fail("at least one link to the policy or its evidence is required")
    sdoc = cdoc.mapping("suggestions")
    remove = sdoc.mapping("remove")
    replace = sdoc.mapping("replace")
    odoc = cdoc.mapping("override_reasons")
    o_system = _url(odoc, "system")
    reasons = [Coding(o_system, r.text("code"), r.text("display")) for r in odoc.seq("reasons")]
    if len({r.code for r in reasons}) != len(reasons):
        raise odoc.child("reasons").fail("override reason codes must be unique")

    alternatives: dict[str, Alternative] = {}
    adoc = doc.mapping("alternatives", required=False)
    for region in adoc.names():
        item = adoc.mapping(region)
        label = item.text("label")
        alternatives[region] = Alternative(
            region=region,
            label=label,
            code=_coding(item.mapping("code")),
            body_site=_coding(item.mapping("body_site")),
            suggestion_label=_template(replace, "label", {**facts, "alternative": label}),
        )

    prefetch: dict[str, PrefetchKey] = {}
    pdoc = doc.mapping("prefetch", required=False)
    for name in pdoc.names():
        item = pdoc.mapping(name)
        required = item.child("required").data or False
        if not isinstance(required, bool):
            raise item.child("required").fail("must be true or false")
        prefetch[name] = PrefetchKey(item.text("query"), required)

    recognition = _load_recognition(doc.mapping("recognition"))
    regions = {ref.region for ref in _all_refs(recognition) if ref.region} | {
        region for _, region in recognition.body_sites.values()
    }
    for region in alternatives:
        if region not in regions:
            raise adoc.child(region).fail(f"region {region!r} is not a spine region of recognition.spine")

    card = CardText(
        indicator=indicator,
        topic=_coding(cdoc.mapping("topic")),
        summary=summary,
        position=_template(cdoc, "position", facts),
        evidence=_template(cdoc, "evidence", facts),
        instead=_template(cdoc, "instead", facts),
        links=links,
        remove_label=_template(remove, "label", facts),
        remove_description=_template(remove, "description", facts),
        replace_description=_template(replace, "description", facts),
        override_reasons=reasons,
    )
    return Policy(
        id=meta.text("id"),
        title=facts["title"],
        version=facts["version"],
        status=meta.text("status"),
        reference=facts["reference"],
        url=_url(meta, "url"),
        payer=payer,
        services=services,
        description=" ".join(services_doc.text("description").split()),
        card=card,
        alternatives=alternatives,
        recognition=recognition,
        prefetch=prefetch,
        source=source,
    )


def _all_refs(recognition: Recognition) -> set[Ref]:
    return {ref for ref in recognition.index.refs() if isinstance(ref, Ref)}


def load_policies(directory: Path | str | None = None) -> PolicySet:
    """Every *.yaml / *.yml policy in the folder; a broken one stops the load with its name and problem."""
    folder = Path(directory) if directory else packaged_policy_dir()
    if not folder.is_dir():
        raise PolicyError(f"{folder}: policy folder not found")
    files = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
    if not files:
        raise PolicyError(f"{folder}: no policy files (*.yaml) in the folder")
    policies = [load_policy(path) for path in files]
    seen: dict[str, Path] = {}
    for policy in policies:
        if policy.id in seen:
            raise PolicyError(f"{policy.source}: policy id {policy.id!r} is already used by {seen[policy.id]}")
        seen[policy.id] = policy.source
    services: dict[str, Service] = {}
    for policy in policies:
        for sdef in policy.services:
            existing = services.get(sdef.id)
            if existing and existing.hook != sdef.hook:
                raise PolicyError(
                    f"{policy.source}: service id {sdef.id!r} is used for {existing.hook} elsewhere; "
                    "each service answers one hook"
                )
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
    return PolicySet(policies, services)
