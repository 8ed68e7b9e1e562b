"""What one order says in a policy's terms: its codes and words, each as evidence with its place and assertion."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from .orders import OrderView
from .policy.model import CodedMeaning, Meaning, Policy, Recognition, norm_code
from .policy.schema import Assertion, EvidenceKind, Place

PLACE_WORDS: dict[str, str] = {
    "code": "order name",
    "detail": "order detail",
    "body_site": "body site",
    "reason": "reason for the order",
    "note": "order note",
    "instruction": "patient instructions",
    "category": "order category",
    "performer": "performer type",
}
_SYSTEM_NAMES = {"cpt": "CPT", "snomed": "SNOMED", "icd10cm": "ICD-10-CM", "icd10": "ICD-10", "loinc": "LOINC"}
PRO_KINDS: frozenset[str] = frozenset({"billing-code", "technique", "ambiguous-technique", "anatomy"})


@dataclass(frozen=True)
class Evidence:
    """One fact about an order, as a sentence fragment a clinician or analyst can check against the order."""

    kind: EvidenceKind
    group: str
    label: str
    place: Place
    text: str = ""
    region: str = ""
    coded: bool = False
    combo: bool = False
    assertion: Assertion = "affirmed"
    # Why the assertion is not "affirmed": the trigger and the words around it, as written.
    context: str = ""

    @property
    def pro(self) -> bool:
        return self.kind in PRO_KINDS


@dataclass
class OrderEvidence:
    """Everything a policy found in one order."""

    items: list[Evidence] = field(default_factory=list)
    # Every mention before duplicates are merged: the words of a coded diagnosis's display still name its region.
    mentions: list[Evidence] = field(default_factory=list)
    billing_codes: list[tuple[str, str, str]] = field(default_factory=list)  # (system, code, display)
    cpt_codes: list[tuple[str, str, str]] = field(default_factory=list)


def system_name(alias: str) -> str:
    return _SYSTEM_NAMES.get(alias, alias.upper())


def quote(text: str) -> str:
    return "'" + " ".join(text.split()) + "'"


def _system_key(system: str) -> str:
    """A code system URI as clients vary it: case, http/https, "www.", a trailing slash, "urn:oid:" or not."""
    key = system.strip().lower().rstrip("/")
    for prefix in ("https://", "http://", "urn:oid:"):
        key = key.removeprefix(prefix)
    return key.removeprefix("www.")


@functools.lru_cache(maxsize=4096)
def _meanings(rec: Recognition, alias: str, code: str) -> tuple[CodedMeaning, ...]:
    """Everything the policy says about one code (cached: EHRs send the same few codes over and over)."""
    found = list(rec.exact_codes.get((alias, code), ()))
    found += [entry.meaning for entry in rec.code_sets if entry.alias == alias and code in entry.codes]
    return tuple(found)


@functools.lru_cache(maxsize=4096)
def _alias(rec: Recognition, system: str, code: str) -> str | None:
    """The policy's name for a coding's system. Without a system, the code decides when exactly one system of the
    policy lists it (a half-filled order's bare "76496" is the CPT code, not a guess)."""
    alias = rec.system_alias.get(system)
    if alias is not None:
        return alias
    if system:
        key = _system_key(system)
        return next((a for uri, a in rec.system_alias.items() if _system_key(uri) == key), None)
    candidates = [a for a in rec.canonical_system if _meanings(rec, a, code)]
    return candidates[0] if len(candidates) == 1 else None


def _read_codings(order: OrderView, policy: Policy, found: OrderEvidence) -> None:
    rec = policy.recognition
    for coding in order.codings:
        code = norm_code(coding.code)
        if not code:
            continue
        alias = _alias(rec, coding.system, code if not coding.system else "")
        if alias is None:
            continue
        name = system_name(alias)
        if coding.place == "code" and alias == "cpt":
            found.cpt_codes.append((rec.canonical_system[alias], coding.code, coding.display))
        # The most specific diagnosis entry names a code covered by several (M54.2 within M40-M54).
        meanings = sorted(_meanings(rec, alias, code), key=lambda m: -m.specificity)
        anatomy_done = False
        for meaning in meanings:
            if coding.place not in meaning.places:
                continue
            shown = f"{name} {coding.code}"
            if meaning.kind == "billing-code":
                found.billing_codes.append(
                    (rec.canonical_system[alias], coding.code, coding.display or meaning.display)
                )
                label = f"{shown} {meaning.display}"
            elif meaning.kind == "anatomy":
                if anatomy_done:
                    continue
                anatomy_done = True
                display = coding.display or meaning.display
                what = {"body_site": "body site", "reason": "reason"}.get(coding.place, PLACE_WORDS[coding.place])
                label = f"{what} {display} ({shown})"
            else:
                label = f"{meaning.group} ({shown})"
            found.items.append(
                Evidence(
                    meaning.kind,
                    meaning.group,
                    label,
                    coding.place,
                    text=coding.code,
                    region=meaning.region,
                    coded=True,
                )
            )


def _is_combo_part(ref: object) -> bool:
    return isinstance(ref, Meaning) and ref.combo is not None


def _where(places: list[Place]) -> str:
    names = [PLACE_WORDS[p] for p in dict.fromkeys(places)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _label(meaning: Meaning, written: str, place: Place) -> str:
    where = PLACE_WORDS[place]
    if meaning.kind in ("technique", "ambiguous-technique"):
        return f"the order text names {quote(written)} (in the {where})"
    if meaning.kind == "anatomy":
        return f"body site {quote(written)}" if place == "body_site" else f"{quote(written)} in the {where}"
    if meaning.kind in ("look-alike", "billing-explanation", "comparator", "other-service"):
        return f"{meaning.group} ({quote(written)} in the {where})"
    return f"{quote(written)} in the {where}"


def _read_texts(order: OrderView, policy: Policy, found: OrderEvidence) -> None:
    rec = policy.recognition
    # A combination's words may be split over the order's own fields ("MRI C-spine" in the name, "kinematic
    # sequences in flexion/extension" in the detail): together they name the one procedure ordered. Elsewhere
    # (a note, an instruction) each text stands alone.
    scopes: dict[object, dict[str, dict[int, tuple[str, Place]]]] = {}
    combo_meanings: dict[str, Meaning] = {}
    for number, (place, text) in enumerate(order.texts):
        combos = scopes.setdefault("order" if place in rec.order_fields else number, {})
        for hit in rec.index.find(text, nested=_is_combo_part):
            for ref in hit.refs:
                if not isinstance(ref, Meaning) or place not in ref.places:
                    continue
                if ref.combo is not None:
                    combo_id, part, _size = ref.combo
                    combos.setdefault(combo_id, {}).setdefault(part, (hit.text, place))
                    combo_meanings[combo_id] = ref
                    continue
                found.items.append(
                    Evidence(ref.kind, ref.group, _label(ref, hit.text, place), place, text=hit.text, region=ref.region)
                )
    for combos in scopes.values():
        for combo_id, parts in combos.items():
            meaning = combo_meanings[combo_id]
            if meaning.combo is None or len(parts) != meaning.combo[2]:
                continue
            words = " with ".join(quote(parts[g][0]) for g in sorted(parts))
            places = [parts[g][1] for g in sorted(parts)]
            found.items.append(
                Evidence(
                    meaning.kind,
                    meaning.group,
                    f"the order text names {words} (in the {_where(places)})",
                    places[0],
                    text=" ".join(parts[g][0] for g in sorted(parts)),
                    combo=True,
                )
            )


def _dedupe(items: list[Evidence]) -> list[Evidence]:
    """One line per fact: "SPINE" in a coding display and "spine" in code.text are the same words."""
    seen: set[tuple[str, str, str]] = set()
    out = []
    for item in items:
        key = (item.kind, item.label.casefold(), item.assertion)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def collect(order: OrderView, policy: Policy) -> OrderEvidence:
    """All evidence a policy finds in one order."""
    found = OrderEvidence()
    _read_codings(order, policy, found)
    _read_texts(order, policy, found)
    items = found.items
    found.mentions = list(items)
    # A coded body site or diagnosis says it best; its display words in the same place add nothing.
    coded_anatomy = {e.place for e in items if e.kind == "anatomy" and e.coded}
    items = [e for e in items if e.kind != "anatomy" or e.coded or e.place not in coded_anatomy]
    # "dynamic fluoroscopy" is named once, not again as "fluoroscopy" with "dynamic".
    named = {(e.group, e.assertion) for e in items if e.kind in ("technique", "ambiguous-technique") and not e.combo}
    items = [e for e in items if not e.combo or (e.group, e.assertion) not in named]
    found.items = _dedupe(items)
    return found
