"""Assertion context (ConText): whether a mention in free text is asserted, negated, historical, hypothetical or
someone else's, from trigger terms with a direction and a window, cut short by terminators and sentence ends.

The algorithm is ConText (Harkema H, Dowling JN, Thornblade T, Chapman WW. "ConText: an algorithm for determining
negation, experiencer, and temporal status from clinical reports". J Biomed Inform 2009;42(5):839-51), the
successor of NegEx (Chapman et al. 2001): a trigger affects the mentions within its scope, which runs forward or
backward from it for a number of words and stops at a terminator ("but", "however") or the end of the sentence.
The triggers and terminators are the policy's (`recognition.context`, `recognition.terminators`), so an analyst
extends them like any other word list. Where several triggers reach a mention, the nearest one decides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .policy.model import ContextTrigger
from .terms import TermIndex

# Sentence ends: ".", "!", "?" or ";" followed by a space or the end, and line breaks. A dot inside a number or an
# abbreviation without a following space ("2.5", "C5.6") does not end a sentence.
_SENTENCE_END = re.compile(r"[.!?;]+(?=\s|$)|\n+|\s[-\u2013\u2014]\s")
# A sentence end that only cuts a clause: a ";" or a dash between spaces.
_CLAUSE_END = re.compile(r"\s*(?:;+|[-\u2013\u2014])\s*")
# Words a window counts: numbers (dates, claim numbers, levels) do not use up a trigger's reach.
_WORD = re.compile(r"[^\W\d_][^\W_]*", re.UNICODE)


@dataclass(frozen=True)
class Scope:
    """Where one trigger's assertion applies in a text: [start, end), and the trigger's own span."""

    start: int
    end: int
    assertion: str
    name: str
    trigger_start: int
    trigger_end: int


def sentences(text: str) -> list[tuple[int, int]]:
    """[start, end) of each sentence of a text."""
    return _sentences(text)


def phrases(text: str) -> list[tuple[int, int]]:
    """[start, end) of each sentence, with a clause set off by a dash joined to the one before: "Dynamic X-ray neck -
    continuous video sequence" names one study (a catalog's or a note's dash adds to what it describes)."""
    out: list[tuple[int, int]] = []
    for start, end in _sentences(text):
        if out and _DASH.fullmatch(text, out[-1][1], start):
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


_DASH = re.compile(r"\s+[-\u2013\u2014]\s+")


def _sentences(text: str) -> list[tuple[int, int]]:
    spans = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        spans.append((start, match.start()))
        start = match.end()
    spans.append((start, len(text)))
    return spans


def scopes(text: str, index: TermIndex) -> list[Scope]:
    """Every trigger's scope in a text (the text as the term index reads it: NFC, offsets preserved)."""
    hits = index.find(text)
    if not hits:
        return []
    triggers = [(h, r) for h in hits for r in h.refs if isinstance(r, ContextTrigger)]
    if not triggers:
        return []
    stops = sorted(h.start for h in hits if "terminate" in h.refs)
    sentences = _sentences(text)
    out = []
    for hit, trigger in triggers:
        s_start, s_end = next(((a, b) for a, b in sentences if a <= hit.start < max(b, a + 1)), (0, len(text)))
        if trigger.direction in ("forward", "both"):
            end = s_end
            for stop in stops:
                if hit.end <= stop < end:
                    end = stop
                    break
            words = list(_WORD.finditer(text, hit.end, end))
            if len(words) > trigger.window:
                end = words[trigger.window - 1].end()
            out.append(Scope(hit.end, end, trigger.assertion, trigger.name, hit.start, hit.end))
        if trigger.direction in ("backward", "both"):
            start = s_start
            if s_start > 0 and not text[s_start : hit.start].strip():
                # A clause with no words of its own before the trigger ("DMX cervical; explained not indicated",
                # "VMA - declined") speaks of the one before it: the same clause, cut by a ";" or a dash.
                start = next(
                    (a for a, b in sentences if b < s_start and _CLAUSE_END.fullmatch(text, b, s_start)), start
                )
            for stop in reversed(stops):
                if start <= stop < hit.start:
                    start = stop
                    break
            words = list(_WORD.finditer(text, start, hit.start))
            if len(words) > trigger.window:
                start = words[-trigger.window].start()
            out.append(Scope(start, hit.start, trigger.assertion, trigger.name, hit.start, hit.end))
    return out


def assertion_at(found: list[Scope], start: int, end: int) -> Scope | None:
    """The scope that decides a mention at [start, end): the nearest trigger whose scope covers it."""
    best: tuple[int, Scope] | None = None
    for scope in found:
        if (scope.start <= start and end <= scope.end) or (scope.start < end and start < scope.end):
            if scope.trigger_start <= start < scope.trigger_end:
                continue  # a mention that is itself part of the trigger phrase
            distance = start - scope.trigger_end if scope.trigger_end <= start else scope.trigger_start - end
            if best is None or distance < best[0]:
                best = (max(distance, 0), scope)
    return best[1] if best else None


def snippet(text: str, scope: Scope, start: int, end: int, limit: int = 90) -> str:
    """The words from the trigger to the mention (or back), as written, for an explanation."""
    left = min(scope.trigger_start, start)
    right = max(scope.trigger_end, end)
    words = " ".join(text[left:right].split())
    return words if len(words) <= limit else words[: limit - 1] + "…"
