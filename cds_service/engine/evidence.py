"""What one order says in a policy's terms: its codes and words, each as evidence with its place and assertion."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from . import context as ctx
from .guesses import corrected as corrected_text
from .guesses import is_combo_part
from .orders import WORD, Answer, OrderView
from .policy.model import CodedMeaning, Composition, ConceptRef, ContextTrigger, Meaning, Policy, Recognition, norm_code
from .policy.schema import ASSERTED, GUESS_KINDS, PRO_KINDS, Assertion, EvidenceKind, Place
from .terms import TermHit, fold, term_key

PLACE_WORDS: dict[str, str] = {
    "code": "order name",
    "detail": "order detail",
    "body_site": "body site",
    "reason": "reason for the order",
    "note": "order note",
    "instruction": "patient instructions",
    "category": "order category",
    "performer": "performer",
    "location": "order location",
    "supporting_info": "supporting information",
}
_SYSTEM_NAMES = {"cpt": "CPT", "snomed": "SNOMED", "icd10cm": "ICD-10-CM", "icd10": "ICD-10", "loinc": "LOINC"}


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
    # Kinds of evidence this needs beside it to count (an acronym written in another case than listed).
    requires: frozenset[str] = frozenset()
    # Named by a composition of concept classes (rather than a listed term or combination).
    composed: bool = False

    @property
    def pro(self) -> bool:
        return self.kind in PRO_KINDS

    @property
    def asserted(self) -> bool:
        """The order asserts it (plainly, or asked for explicitly)."""
        return self.assertion in ASSERTED


@dataclass
class OrderEvidence:
    """Everything a policy found in one order."""

    items: list[Evidence] = field(default_factory=list)
    # Every mention before duplicates are merged: the words of a coded diagnosis's display still name its region.
    mentions: list[Evidence] = field(default_factory=list)
    billing_codes: list[tuple[str, str, str]] = field(default_factory=list)  # (system, code, display)
    cpt_codes: list[tuple[str, str, str]] = field(default_factory=list)


_ASSERTION_WORDS = {
    "negated": "negated",
    "historical": "only as history",
    "hypothetical": "only as a possibility",
    "other-experiencer": "only as someone else's request",
}


def evidence_line(item: Evidence) -> str:
    """One piece of evidence; a mention the order does not assert says how, with the words that say so:
    "'DMX' only as history: 's/p DMX 03/2024 at chiropractic office' (order note)"."""
    if item.asserted:
        return item.label
    how = _ASSERTION_WORDS.get(item.assertion, item.assertion)
    words = f": {quote(item.context)}" if item.context else ""
    return f"{quote(item.text)} {how}{words} ({PLACE_WORDS[item.place]})"


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


def _is_billing_code(rec: Recognition, system: str, code: str) -> bool:
    key = norm_code(code)
    alias = _alias(rec, system, key if not system else "")
    return alias is not None and any(m.kind == "billing-code" for m in _meanings(rec, alias, key))


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


@dataclass(frozen=True)
class _Mention:
    """A term found in one text, with the assertion the text gives it."""

    hit: TermHit
    meaning: Meaning
    place: Place
    assertion: Assertion
    context: str
    written: str  # what the order wrote, when a typo was read as the term


def _answer_polarity(rec: Recognition, answer: Answer) -> str:
    """yes / no / unanswered / text, from the policy's answer words ("No - static films only" is a no)."""
    value = answer.value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not value.strip():
        return "unanswered"
    words = WORD.findall(fold(value).lower())
    for size in (3, 2, 1):
        head = "".join(words[:size])
        if len(words) >= size and head and (not answer.loose or len(words) == size):
            if head in rec.no_answers:
                return "no"
            if head in rec.yes_answers:
                return "yes"
    # A refusal or a deferral answers no without the word ("Patient declined", "Not at this time", "Deferred to
    # spine surgeon"): a negation trigger among the answer's first two words. Farther in, a negation is about
    # something else the answer says ("lumbar; not improving with PT").
    second = list(_ANSWER_WORD.finditer(value))[1:2]
    reach = second[0].end() if second else len(value)
    for hit in rec.context.find(value):
        if hit.start < reach and any(
            isinstance(r, ContextTrigger)
            and r.assertion == "negated"
            and not (answer.loose and r.direction == "forward")
            for r in hit.refs
        ):
            return "no"
    return "text"


_ANSWER_WORD = re.compile(r"[^\W_]+")


class _TextReader:
    """Reads one text of an order: its terms, and (only when a term needs it) its assertion context."""

    def __init__(self, rec: Recognition, place: Place, text: str, answer: Answer | None) -> None:
        self.rec = rec
        self.place = place
        self.text = text
        self.answer = answer
        self._scopes: list[ctx.Scope] | None = None

    def assertion(self, hit: TermHit, kind: str) -> tuple[Assertion, str]:
        if kind not in self.rec.context_kinds:
            return "affirmed", ""
        if self.answer is not None and hit.start < self.answer.question_end:
            polarity = _answer_polarity(self.rec, self.answer)
            question = " ".join(self.text[: self.answer.question_end].split())
            if polarity == "no":
                shown = self.answer.value if isinstance(self.answer.value, str) else "false"
                return "negated", f"{question}? answered {quote(shown)}"
            if polarity == "unanswered":
                return "hypothetical", f"asked, not answered: {question}?"
        if self._scopes is None:
            self._scopes = ctx.scopes(self.text, self.rec.context)
        if self.answer is not None and hit.start >= self.answer.question_end:
            end = self.answer.question_end
            # A trigger of the answer's own words that reaches the mention is the nearest and decides ("pt msg:
            # 'can I get the DMX the dr mentioned?' Per Dr. - order DMX lumbar": the answer orders it).
            own = ctx.assertion_at([sc for sc in self._scopes if sc.trigger_start >= end], hit.start, hit.end)
            if own is not None:
                return own.assertion, ctx.snippet(self.text, own, hit.start, hit.end)  # type: ignore[return-value]
            # The answer to "Has the patient had DMX?" speaks of what the question asks about: a trigger in the
            # question qualifies the answer's mentions too ("Yes - 2023 at Spine Kinetics" is history), when it
            # qualifies what the question asks about (a mention in its reach) or reaches the question's end ("Prior
            # study: DMX"). A date that only dates the label ("Referral letter 11/20/2026: requesting DMX") does not.
            asked = [
                sc
                for sc in self._scopes
                if sc.trigger_end <= end
                and sc.assertion not in ("affirmed", "requested")
                and (sc.end >= end or self._qualifies_mention(sc, end))
            ]
            if asked:
                question = " ".join(self.text[:end].split())
                return asked[-1].assertion, f"answer to: {question}"  # type: ignore[return-value]
        scope = ctx.assertion_at(self._scopes, hit.start, hit.end)
        if scope is None:
            return "affirmed", ""
        return scope.assertion, ctx.snippet(self.text, scope, hit.start, hit.end)  # type: ignore[return-value]

    def _qualifies_mention(self, scope: ctx.Scope, end: int) -> bool:
        """Whether a trigger's scope in an order question covers a mention the context qualifies, in the question."""
        return any(
            h.start < end
            and scope.start <= h.start
            and h.end <= scope.end
            and any(isinstance(r, Meaning) and r.kind in self.rec.context_kinds for r in h.refs)
            for h in self.rec.index.find(self.text[:end], nested=is_combo_part)
        )

    def mentions(self, hits: list[TermHit], written: dict[tuple[int, int], str]) -> list[_Mention]:
        out = []
        for hit in hits:
            for ref in hit.refs:
                if not isinstance(ref, Meaning) or self.place not in ref.places:
                    continue
                assertion, why = self.assertion(hit, ref.kind)
                typo = next((w for (a, b), w in written.items() if a < hit.end and hit.start < b), "")
                out.append(_Mention(hit, ref, self.place, assertion, why, typo))
        return out


def _combine(parts: list[_Mention]) -> tuple[Assertion, str]:
    """A combination is asserted only when every part is; else the first qualified part says why."""
    for part in parts:
        if part.assertion not in ASSERTED:
            return part.assertion, part.context
    requested = next((p for p in parts if p.assertion == "requested"), None)
    return ("requested", requested.context) if requested else ("affirmed", "")


def _scan(order: OrderView, rec: Recognition) -> list[tuple[int, Place, str, list[TermHit]]]:
    """Every text of the order with the policy's terms found in it (one pass of the combined term automaton)."""
    out = []
    for number, (place, text) in enumerate(order.texts):
        coding = order.displays.get(number)
        if coding is not None and _is_billing_code(rec, coding.system, coding.code):
            # The descriptor of one of the policy's own codes ("Unlisted fluoroscopic procedure") says what the
            # code says; its words are not the order's ("fluoroscopic" beside "bending" is no motion study).
            continue
        out.append((number, place, text, rec.index.find(text, nested=is_combo_part)))
    return out


def _read_texts(
    order: OrderView,
    policy: Policy,
    found: OrderEvidence,
    scanned: list[tuple[int, Place, str, list[TermHit]]],
    *,
    typos: bool,
) -> None:
    rec = policy.recognition
    # A combination's words may be split over the order's own fields ("MRI C-spine" in the name, "kinematic
    # sequences in flexion/extension" in the detail): together they name the one procedure ordered. Elsewhere
    # (a note, an instruction) each text stands alone.
    scopes: dict[object, dict[str, dict[int, _Mention]]] = {}
    combo_meanings: dict[str, Meaning] = {}
    for number, place, text, hits in scanned:
        reader = _TextReader(rec, place, text, order.answers.get(number))
        mentions = reader.mentions(hits, {}) if hits else []
        corrected = None
        if typos:
            corrected = corrected_text(rec, text)
            if corrected is not None:
                fixed_text, written = corrected
                fixed = _TextReader(rec, place, fixed_text, None)
                fixed_hits = [
                    h
                    for h in rec.index.find(fixed_text, nested=is_combo_part)
                    if any(a < h.end and h.start < b for a, b in written)
                ]
                # A guessed reading is evidence only for what the order names, never against it.
                mentions += [m for m in fixed.mentions(fixed_hits, written) if m.meaning.kind in GUESS_KINDS]
        composed = _compose(rec, reader, place, text, hits, None) if rec.compositions and hits else []
        if not composed and rec.compositions and corrected is not None:
            fixed_text, written = corrected
            fixed_all = rec.index.find(fixed_text, nested=is_combo_part)
            composed = _compose(rec, _TextReader(rec, place, fixed_text, None), place, fixed_text, fixed_all, written)
        found.items.extend(composed)
        for mention in mentions:
            ref = mention.meaning
            if ref.combo is not None:
                combo_id, part, _size = ref.combo
                # A note that asks for something outright ("perform on the upright unit with flexion and extension
                # sequences") adds to the order itself: its words join the order's own fields.
                in_order = place in rec.order_fields or mention.assertion == "requested"
                combos = scopes.setdefault("order" if in_order else number, {})
                combos.setdefault(combo_id, {}).setdefault(part, mention)
                combo_meanings[combo_id] = ref
                continue
            found.items.append(_evidence(ref, mention))
    for combos in scopes.values():
        for combo_id, parts in combos.items():
            meaning = combo_meanings[combo_id]
            if meaning.combo is None or len(parts) != meaning.combo[2]:
                continue
            ordered = [parts[g] for g in sorted(parts)]
            words = " with ".join(quote(p.written or p.hit.text) for p in ordered)
            assertion, why = _combine(ordered)
            found.items.append(
                Evidence(
                    meaning.kind,
                    meaning.group,
                    f"the order text names {words} (in the {_where([p.place for p in ordered])})",
                    ordered[0].place,
                    text=" ".join(p.hit.text for p in ordered),
                    combo=True,
                    assertion=assertion,
                    context=why,
                    requires=frozenset().union(*(_requires(p) for p in ordered)),
                )
            )


def _compose(
    rec: Recognition,
    reader: _TextReader,
    place: Place,
    text: str,
    hits: list[TermHit],
    guessed: dict[tuple[int, int], str] | None,
) -> list[Evidence]:
    """Techniques named by their parts within one sentence of this text: a concept of every slot of a composition
    and none of its `unless` ("'fluoroscopic' with 'video' and 'lumbar spine' in the order name"). In a corrected
    text (`guessed`: the replaced spans and what was written) a guessed word may fill a slot, never an `unless`."""
    out: list[Evidence] = []
    for start, end in ctx.phrases(text):
        inside = [h for h in hits if start <= h.start and h.end <= max(end, start + 1)]
        concepts: dict[str, list[TermHit]] = {}
        for hit in inside:
            for ref in hit.refs:
                if isinstance(ref, ConceptRef):
                    concepts.setdefault(ref.name, []).append(hit)
        if not concepts:
            continue
        named: set[str] = set()  # one composition per technique and sentence: the first the policy lists
        for comp in rec.compositions:
            if place not in comp.meaning.places or comp.meaning.group in named:
                continue
            if any(_said(h, guessed) for name in comp.unless for h in concepts.get(name, ())):
                continue
            parts = [next((h for name in sorted(slot) for h in concepts.get(name, ())), None) for slot in comp.slots]
            found = [p for p in parts if p is not None]
            if len(found) == len(parts) and len({(p.start, p.end) for p in found}) == len(found):
                named.add(comp.meaning.group)
                out.append(_composed(comp, reader, place, found, inside, guessed))
    return out


def _said(hit: TermHit, guessed: dict[tuple[int, int], str] | None) -> bool:
    """Whether the order wrote this hit itself (not a guessed reading): only such words may argue against it."""
    return guessed is None or not any(a < hit.end and hit.start < b for a, b in guessed)


def _composed(
    comp: Composition,
    reader: _TextReader,
    place: Place,
    parts: list[TermHit],
    sentence: list[TermHit],
    guessed: dict[tuple[int, int], str] | None,
) -> Evidence:
    meaning = comp.meaning
    assertion: Assertion = "affirmed"
    why = ""
    for part in parts:
        said, context = reader.assertion(part, meaning.kind)
        if said not in ASSERTED:
            assertion, why = said, context
            break
        if said == "requested" and assertion == "affirmed":
            assertion, why = said, context
    shown = []
    for part in parts:
        written = next((w for (a, b), w in (guessed or {}).items() if a < part.end and part.start < b), "")
        shown.append(quote(written or part.text))
    # The anatomy said in the same sentence completes the picture ("... and 'lumbar spine'").
    anatomy = next(
        (h for h in sentence for r in h.refs if isinstance(r, Meaning) and r.kind == "anatomy" and place in r.places),
        None,
    )
    if anatomy is not None:
        shown.append(quote(anatomy.text))
    words = " with ".join(shown[:-1]) + " and " + shown[-1]
    return Evidence(
        meaning.kind,
        meaning.group,
        f"{comp.name}: {words} in the {PLACE_WORDS[place]}",
        place,
        text=" ".join(p.text for p in parts),
        combo=True,
        assertion=assertion,
        context=why,
        composed=True,
    )


def _requires(mention: _Mention) -> frozenset[str]:
    meaning = mention.meaning
    if meaning.any_case_with and term_key(mention.hit.text, case=True) != meaning.exact_key:
        return meaning.any_case_with
    return frozenset()


def _evidence(ref: Meaning, mention: _Mention) -> Evidence:
    if mention.written:
        # Quote what the order says; name the word it was read as without quotes.
        label = _label(ref, mention.written, mention.place).replace(
            " (in the ", f" (read as {mention.hit.text}, in the "
        )
    else:
        label = _label(ref, mention.hit.text, mention.place)
    return Evidence(
        ref.kind,
        ref.group,
        label,
        mention.place,
        text=mention.hit.text,
        region=ref.region,
        assertion=mention.assertion,
        context=mention.context,
        requires=_requires(mention),
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
    """All evidence a policy finds in one order.

    One pass of the combined term automaton over the order's texts decides whether the order is a candidate at all;
    an order that names none of the policy's codes or words (most orders: labs, medications, ordinary imaging)
    stops there. Assertion context runs only for texts holding a mention it qualifies, and typos are looked for only
    in orders that already say something for the service (a technique, a billing code or the anatomy).
    """
    rec = policy.recognition
    found = OrderEvidence()
    _read_codings(order, policy, found)
    scanned = _scan(order, rec)
    if not found.items and not any(hits for _, _, _, hits in scanned):
        return found
    pro = any(item.kind in PRO_KINDS for item in found.items) or any(
        isinstance(ref, Meaning) and ref.kind in PRO_KINDS for _, _, _, hits in scanned for h in hits for ref in h.refs
    )
    _read_texts(order, policy, found, scanned, typos=pro and bool(rec.typo_words or rec.abbreviations))
    items = found.items
    # An acronym written in another case than listed counts only beside the evidence it needs ("dmx neck").
    present = {e.kind for e in items if e.asserted and not e.requires}
    items = [e for e in items if not e.requires or e.requires & present]
    found.mentions = list(items)
    # A coded body site or diagnosis says it best; its display words in the same place add nothing.
    coded_anatomy = {e.place for e in items if e.kind == "anatomy" and e.coded}
    items = [e for e in items if e.kind != "anatomy" or e.coded or e.place not in coded_anatomy]
    # "dynamic fluoroscopy" is named once, not again as "fluoroscopy" with "dynamic".
    named = {
        (e.group, e.assertion, e.place) for e in items if e.kind in ("technique", "ambiguous-technique") and not e.combo
    }
    items = [e for e in items if not e.combo or (e.group, e.assertion, e.place) not in named]
    # A listed combination says it in the policy's own words: a composition of the same technique adds nothing.
    listed = {(e.group, e.assertion, e.place) for e in items if e.combo and not e.composed}
    items = [e for e in items if not e.composed or (e.group, e.assertion, e.place) not in listed]
    found.items = _dedupe(items)
    return found
