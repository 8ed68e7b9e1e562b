"""Judge one order against one policy: the verdict, and the evidence for and against it, in words a reader checks."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from .orders import OrderView, Place
from .policy import Coding, Diagnosis, LookAlike, Policy, Recognition, Ref, _norm_code

# Where a place's words speak about the study itself rather than the patient.
_PROCEDURE_PLACES: frozenset[Place] = frozenset({"code", "detail", "body_site"})
# Places whose region names choose the alternative: what the order asks for, not why (reasons are excluded).
_REGION_PLACES: frozenset[Place] = frozenset({"code", "detail", "body_site", "note", "instruction"})
_PLACE_WORDS: dict[str, str] = {
    "code": "order name",
    "detail": "order detail",
    "body_site": "body site",
    "reason": "reason for the order",
    "note": "order note",
    "instruction": "patient instructions",
}
_SYSTEM_NAMES = {"cpt": "CPT", "snomed": "SNOMED", "icd10cm": "ICD-10-CM", "icd10": "ICD-10", "loinc": "LOINC"}


@dataclass(frozen=True)
class Evidence:
    """One fact about an order, as a sentence fragment a clinician or analyst can check against the order."""

    kind: str  # billing_code, technique, spine, other_region, look_alike
    label: str
    place: Place
    region: str = ""
    name: str = ""
    needs_spine: bool = False
    effect: str = ""
    coded: bool = False
    combo: bool = False  # a technique found as a combination of words rather than by its name

    def to_dict(self) -> dict[str, str]:
        out = {"kind": self.kind, "label": self.label, "place": self.place}
        if self.name:
            out["name"] = self.name
        return out


@dataclass
class Verdict:
    """The policy's judgement of one order."""

    order: OrderView
    policy: Policy
    flagged: bool
    reason: str
    evidence_for: list[Evidence] = field(default_factory=list)
    evidence_against: list[Evidence] = field(default_factory=list)
    region: str | None = None
    billing_code: Coding | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "order": self.order.reference,
            "policy": self.policy.id,
            "policyVersion": self.policy.version,
            "verdict": "flagged" if self.flagged else "not-flagged",
            "reason": self.reason,
            "evidenceFor": [e.to_dict() for e in self.evidence_for],
            "evidenceAgainst": [e.to_dict() for e in self.evidence_against],
            **({"region": self.region} if self.region else {}),
        }


def _system_name(alias: str) -> str:
    return _SYSTEM_NAMES.get(alias, alias.upper())


def _quote(text: str) -> str:
    return "'" + " ".join(text.split()) + "'"


@dataclass
class _Found:
    billing: list[Evidence] = field(default_factory=list)
    billing_codings: list[Coding] = field(default_factory=list)
    cpt_codings: list[Coding] = field(default_factory=list)
    techniques: list[Evidence] = field(default_factory=list)
    spine: list[Evidence] = field(default_factory=list)
    other: list[Evidence] = field(default_factory=list)
    look_alikes: list[Evidence] = field(default_factory=list)


def _system_key(system: str) -> str:
    """A code system URI as clients vary it: case, http/https, "www.", a trailing slash, "urn:oid:" or not."""
    key = system.strip().lower().rstrip("/")
    for prefix in ("https://", "http://", "urn:oid:"):
        key = key.removeprefix(prefix)
    return key.removeprefix("www.")


def _knows(rec: Recognition, alias: str, code: str) -> bool:
    """Whether the policy lists this code under this code system anywhere (billing, site, diagnosis, look-alike)."""
    if (alias, code) in rec.billing_codes or (alias, code) in rec.body_sites:
        return True
    if any(d.alias == alias and code in d.codes for d in rec.diagnoses):
        return True
    return any(alias in look.codes and code in look.codes[alias] for look in rec.look_alikes.values())


@functools.lru_cache(maxsize=4096)
def _alias(rec: Recognition, system: str, code: str) -> str | None:
    """The policy's name for a coding's system. Without a system, the code decides when exactly one system of the
    policy lists it (a half-filled order's bare "76496" is the CPT code, not a guess).

    Cached: EHRs send the same few systems and codes over and over (bounded; keyed by the policy's identity).
    """
    alias = rec.system_alias.get(system)
    if alias is not None:
        return alias
    if system:
        key = _system_key(system)
        return next((a for uri, a in rec.system_alias.items() if _system_key(uri) == key), None)
    candidates = [a for a in rec.canonical_system if _knows(rec, a, code)]
    return candidates[0] if len(candidates) == 1 else None


@functools.lru_cache(maxsize=4096)
def _look_alikes_of(rec: Recognition, alias: str, code: str) -> tuple[LookAlike, ...]:
    return tuple(look for look in rec.look_alikes.values() if alias in look.codes and code in look.codes[alias])


@functools.lru_cache(maxsize=4096)
def _diagnosis_of(rec: Recognition, alias: str, code: str) -> Diagnosis | None:
    """The most specific diagnosis entry covering the code (M54.2 within M40-M54), if any."""
    matches = [d for d in rec.diagnoses if d.alias == alias and code in d.codes]
    return max(matches, key=lambda d: d.specificity) if matches else None


def _read_codings(order: OrderView, policy: Policy, found: _Found) -> None:
    rec = policy.recognition
    for coding in order.codings:
        code = _norm_code(coding.code)
        if not code:
            continue
        alias = _alias(rec, coding.system, code if not coding.system else "")
        if alias is None:
            continue
        name = _system_name(alias)
        if coding.place == "code":
            system = rec.canonical_system[alias]
            if alias == "cpt":
                found.cpt_codings.append(Coding(system, coding.code, coding.display))
            display = rec.billing_codes.get((alias, code))
            if display is not None:
                found.billing.append(Evidence("billing_code", f"{name} {coding.code} {display}", "code"))
                found.billing_codings.append(Coding(system, coding.code, coding.display or display))
            for look in _look_alikes_of(rec, alias, code):
                found.look_alikes.append(
                    Evidence(
                        "look_alike",
                        f"{look.name} ({name} {coding.code})",
                        "code",
                        name=look.name,
                        effect=look.effect,
                    )
                )
        elif coding.place == "body_site" and "body_site" in rec.places["spine"]:
            site = rec.body_sites.get((alias, code))
            if site is not None:
                display, region = site
                found.spine.append(
                    Evidence(
                        "spine", f"body site {display} ({name} {coding.code})", "body_site", region=region, coded=True
                    )
                )
        elif coding.place == "reason" and "reason" in rec.places["spine"]:
            best = _diagnosis_of(rec, alias, code)
            if best is not None:
                display = coding.display or best.display
                found.spine.append(Evidence("spine", f"reason {display} ({name} {coding.code})", "reason", coded=True))


def _is_combo_part(ref: object) -> bool:
    return isinstance(ref, Ref) and ref.kind == "combo"


def _where(places: list[Place]) -> str:
    names = [_PLACE_WORDS[p] for p in dict.fromkeys(places)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _read_texts(order: OrderView, policy: Policy, found: _Found) -> None:
    rec = policy.recognition
    places = rec.places
    # A combination's words may be split over the order's own fields ("MRI C-spine" in the name, "kinematic
    # sequences in flexion/extension" in the detail): together they name the one procedure ordered. In a note or an
    # instruction each text stands alone.
    scopes: dict[tuple[Place, int] | str, dict[str, dict[int, tuple[str, Place]]]] = {}
    combo_refs: dict[str, Ref] = {}
    for number, (place, text) in enumerate(order.texts):
        where = _PLACE_WORDS[place]
        combos = scopes.setdefault("order" if place in _PROCEDURE_PLACES else (place, number), {})
        for hit in rec.index.find(text, nested=_is_combo_part):
            for ref in hit.refs:
                if not isinstance(ref, Ref):
                    continue
                if ref.kind == "technique" and place in places["techniques"]:
                    found.techniques.append(
                        Evidence(
                            "technique",
                            f"the order text names {_quote(hit.text)} (in the {where})",
                            place,
                            name=ref.name,
                            needs_spine=ref.needs_spine,
                        )
                    )
                elif ref.kind == "combo" and place in places["techniques"]:
                    combos.setdefault(ref.name, {}).setdefault(ref.group, (hit.text, place))
                    combo_refs[ref.name] = ref
                elif ref.kind == "spine" and place in places["spine"]:
                    found.spine.append(
                        Evidence("spine", f"{_quote(hit.text)} in the {where}", place, region=ref.region)
                    )
                elif ref.kind == "site" and place == "body_site" and place in places["spine"]:
                    found.spine.append(Evidence("spine", f"body site {_quote(hit.text)}", place, region=ref.region))
                elif ref.kind == "other" and place in places["other_regions"]:
                    found.other.append(Evidence("other_region", f"{_quote(hit.text)} in the {where}", place))
                elif ref.kind == "look_alike" and place in (rec.look_alikes[ref.name].places or places["look_alikes"]):
                    look = rec.look_alikes[ref.name]
                    found.look_alikes.append(
                        Evidence(
                            "look_alike",
                            f"{look.name} ({_quote(hit.text)} in the {where})",
                            place,
                            name=look.name,
                            effect=look.effect,
                        )
                    )
    for combos in scopes.values():
        for combo_name, groups in combos.items():
            technique_name, _, index = combo_name.rpartition("#")
            if len(groups) == rec.techniques[technique_name].combos[int(index)]:
                words = " with ".join(_quote(groups[g][0]) for g in sorted(groups))
                where_found = [groups[g][1] for g in sorted(groups)]
                found.techniques.append(
                    Evidence(
                        "technique",
                        f"the order text names {words} (in the {_where(where_found)})",
                        where_found[0],
                        name=technique_name,
                        needs_spine=combo_refs[combo_name].needs_spine,
                        combo=True,
                    )
                )


def _region(spine: list[Evidence]) -> str | None:
    """The one spinal region the order names (None when it names several); when its own fields name none, the one
    region its reasons name ("DMX" for cervicalgia: the cervical alternative)."""
    for places in (_REGION_PLACES, frozenset({"reason"})):
        regions = {e.region for e in spine if e.place in places and e.region and e.region != "spine"}
        if regions:
            return regions.pop() if len(regions) == 1 else None
    return None


def _dedupe(items: list[Evidence]) -> list[Evidence]:
    """One line per fact: "SPINE" in a coding display and "spine" in code.text are the same words."""
    seen: set[str] = set()
    out = []
    for item in items:
        key = item.label.casefold()
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def judge(order: OrderView, policy: Policy) -> Verdict:
    """Apply one policy's recognition rules to one order."""
    rec = policy.recognition
    if order.status in rec.skip_statuses:
        return Verdict(order, policy, False, f"order status is {order.status}: not judged")
    if order.do_not_perform:
        return Verdict(order, policy, False, "the order says do not perform")

    found = _Found()
    _read_codings(order, policy, found)
    _read_texts(order, policy, found)
    # A coded body site or diagnosis says it best; its display words in the same place add nothing.
    coded_places = {e.place for e in found.spine if e.coded}
    spine = _dedupe([e for e in found.spine if e.coded or e.place not in coded_places])
    other = _dedupe(found.other)
    look_alikes = _dedupe(found.look_alikes)
    # "dynamic fluoroscopy" is named once, not again as "fluoroscopy" with "dynamic".
    by_name = {e.name for e in found.techniques if not e.combo}
    techniques = _dedupe([e for e in found.techniques if not e.combo or e.name not in by_name])
    billing = _dedupe(found.billing)

    procedure_spine = [e for e in spine if e.place in _PROCEDURE_PLACES]
    # The order's own fields decide the region; a note or diagnosis about the spine does not turn a knee study
    # into a spine study.
    other_region_only = bool(other) and not procedure_spine
    has_spine = bool(procedure_spine) or (bool(spine) and not other)
    named = [e for e in techniques if not e.needs_spine]
    # The order's name decides what it is. A look-alike there excludes; one found only in the detail, body site or
    # reasons does not outweigh a spine-only technique (DMX, VMA) named in the order's name ("failed epidural
    # injections" in a DMX order's detail is history, not the procedure).
    named_in_code = any(e.place == "code" for e in named)
    excludes = [e for e in look_alikes if e.effect == "excludes" and (e.place == "code" or not named_in_code)]
    explains = [e for e in look_alikes if e.effect == "explains_code"]
    contextual = [e for e in techniques if e.needs_spine]
    billing_code = (found.billing_codings or found.cpt_codings or [None])[0]

    def verdict(flagged: bool, reason: str, evidence_for: list[Evidence], against: list[Evidence]) -> Verdict:
        return Verdict(
            order,
            policy,
            flagged,
            reason,
            evidence_for,
            against,
            _region(found.spine) if flagged else None,
            billing_code if flagged else None,
        )

    if excludes:
        return verdict(
            False,
            f"the order is a {excludes[0].name}, not dynamic spinal visualization",
            techniques + billing,
            excludes + other,
        )
    if named and not other_region_only:
        return verdict(True, f"names {named[0].name}", named + contextual + billing + spine, look_alikes)
    if contextual and has_spine:
        return verdict(
            True, f"names {contextual[0].name} with spine evidence", contextual + billing + spine, look_alikes
        )
    if billing and has_spine and not explains:
        return verdict(True, "a billing code of the policy with spine evidence", billing + spine, look_alikes)

    # Not flagged: say what came closest, so an analyst sees why.
    if named or contextual:
        if other_region_only:
            return verdict(
                False, "names the technique for a body region other than the spine", named + contextual, other
            )
        return verdict(False, "names the technique but nothing says the study is of the spine", contextual, [])
    if billing and explains:
        return verdict(False, f"the billing code is explained by {explains[0].name}", billing + spine, explains)
    if billing:
        reason = (
            "billing code for a body region other than the spine" if other else "billing code without spine evidence"
        )
        return verdict(False, reason, billing, other)
    return verdict(False, "no code, technique or words of the policy", [], look_alikes)


def explain_lines(verdict: Verdict) -> list[str]:
    """The evidence that decided a flagged order, as sentences for the card's "why this order matched"."""
    techniques = [e.label for e in verdict.evidence_for if e.kind == "technique"]
    billing = [e.label for e in verdict.evidence_for if e.kind == "billing_code"]
    spine = ", ".join(e.label for e in verdict.evidence_for if e.kind == "spine")
    lines = list(techniques)
    lines.extend(f"{code} with {spine}" if spine else code for code in billing)
    if spine and not billing:
        lines.append(f"spine evidence: {spine}")
    return lines


def describe(verdict: Verdict) -> str:
    """The verdict, its reason and every piece of evidence for and against, one per line (for analysts)."""
    ref = verdict.order.reference or "ServiceRequest (no id)"
    label = " ".join(verdict.order.label().split())
    lines = [
        f"{ref}: {'FLAGGED' if verdict.flagged else 'not flagged'} by {verdict.policy.id} {verdict.policy.version}",
        f"  order:   {label}",
        f"  reason:  {verdict.reason}",
    ]
    lines += [f"  for:     {e.label}" for e in verdict.evidence_for]
    lines += [f"  against: {e.label}" for e in verdict.evidence_against]
    if verdict.flagged:
        lines.append(f"  region:  {verdict.region or 'not named (no replacement offered)'}")
    return "\n".join(lines)
