"""Safe guessing: the policy word an abbreviation, a misspelling or a word cut at a field's end stands for.

A guess only ever reads a word as a word of the order's own subject (technique or anatomy terms: the loader allows
no other typo kinds), so it can help recognise what the order names but never argue against it (issue 18).
"""

from __future__ import annotations

import functools

from rapidfuzz.distance import OSA
from rapidfuzz.process import extract

from .orders import WORD
from .policy.model import ConceptRef, Meaning, Recognition
from .policy.schema import GUESS_KINDS
from .terms import fold


def is_combo_part(ref: object) -> bool:
    return (isinstance(ref, Meaning) and ref.combo is not None) or isinstance(ref, ConceptRef)


@functools.lru_cache(maxsize=16384)
def read_word(rec: Recognition, word: str) -> str | None:
    """The policy word a written word stands for: its abbreviation, or the word it misspells; None if neither.

    A guess only ever reads a word as a word of the order's own subject (technique or anatomy terms; the loader
    allows no other typo kinds), so it can help recognise what the order names but never argue against it.
    Cached per word: order texts repeat the same words call after call, and the edit-distance search is the costly
    part of reading an order with a typo (bounded; keyed by the policy's identity)."""
    read_as = rec.abbreviations.get(word)
    if read_as is not None:
        return read_as
    if len(word) < rec.typo_min_length or not word.isalpha() or not rec.typo_words:
        return None
    base = word[:-2] if word.endswith("es") else word[:-1] if word.endswith("s") else word
    if word in rec.known_words or base in rec.known_words:
        return None
    choices = typo_choices(rec, word)
    return choices[0] if choices else None


@functools.lru_cache(maxsize=16384)
def typo_choices(rec: Recognition, word: str) -> tuple[str, ...]:
    """Every policy word within the edit bound of a written word, nearest first ("analisys": the Spanish
    "analisis", then "analysis"); the evidence step takes the first that makes a term with its neighbours."""
    if word in rec.abbreviations or len(word) < rec.typo_min_length or not word.isalpha() or not rec.typo_words:
        return ()
    base = word[:-2] if word.endswith("es") else word[:-1] if word.endswith("s") else word
    if word in rec.known_words or base in rec.known_words:
        return ()
    edits = rec.typo_max_edits_long if len(word) >= rec.typo_long_length else rec.typo_max_edits
    found = extract(word, rec.typo_words, scorer=OSA.distance, score_cutoff=edits, limit=_TYPO_CHOICES)
    return tuple(str(choice) for choice, _, _ in found)


_TYPO_CHOICES = 4


@functools.lru_cache(maxsize=16384)
def read_cut(rec: Recognition, word: str) -> str | None:
    """The policy word a word cut short by a catalog's field length begins ("ANALYS"): only ever asked of the last
    word of a field, where a fixed-length field cuts; elsewhere a prefix is a word of its own ("local")."""
    if len(word) < rec.typo_min_length or not word.isalpha() or word in rec.known_words:
        return None
    begun = [w for w in rec.typo_words if w.startswith(word) and len(w) > len(word)]
    return min(begun, key=len) if begun else None


@functools.lru_cache(maxsize=8192)
def corrected(rec: Recognition, text: str) -> tuple[str, dict[tuple[int, int], str]] | None:
    """The text with each abbreviation and long unknown word replaced by the policy word it stands for (edit
    distance bounded; a word cut at the very end of the field by the word it begins), and the spans of the
    replacements in the new text with what was written; None when nothing was replaced."""
    if not rec.typo_words and not rec.abbreviations:
        return None
    folded = fold(text).lower()
    pieces: list[str] = []
    spans: dict[tuple[int, int], str] = {}
    last = 0
    size = 0
    end = len(folded.rstrip())
    for token in WORD.finditer(folded):
        word = token.group(0)
        read_as = read_word(rec, word)
        if read_as is None and token.end() == end:
            read_as = read_cut(rec, word)
        if read_as is None:
            continue
        choices = typo_choices(rec, word)
        if len(choices) > 1:
            # Several words within the bound: the one that makes a term of the order's subject with its
            # neighbours ("vertebral motion analisys" is "analysis", not the Spanish "analisis").
            head = "".join(pieces) + text[last : token.start()]
            read_as = next(
                (c for c in choices if _makes_term(rec, head + c + text[token.end() :], len(head), len(c))), read_as
            )
        pieces.append(text[last : token.start()])
        size += token.start() - last
        spans[(size, size + len(read_as))] = text[token.start() : token.end()]
        pieces.append(read_as)
        size += len(read_as)
        last = token.end()
    if not spans:
        return None
    pieces.append(text[last:])
    return "".join(pieces), spans


def _makes_term(rec: Recognition, text: str, start: int, size: int) -> bool:
    """Whether the word at [start, start + size) is part of a term of the order's subject in this text."""
    return any(
        h.start <= start
        and start + size <= h.end
        and any(isinstance(r, Meaning) and r.kind in GUESS_KINDS for r in h.refs)
        for h in rec.index.find(text, nested=is_combo_part)
    )
