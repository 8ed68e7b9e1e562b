"""Phrase matching for policy words: compiled once at load into trie-shaped regular expressions."""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

# Characters that separate words inside a phrase. "x-ray", "x ray", "x/ray" and "xray" are the same phrase.
_SEPARATOR_CHARS = r"\s\-_/.,:;()'+&\u2010\u2011\u2012\u2013\u2014\u00a0\u202f"
_SEP = f"[{_SEPARATOR_CHARS}]*"
# A trailing plural is tolerated ("views", "x-rays", "DMXs"): analysts write the singular.
_TAIL = r"(?:e?s)?(?![A-Za-z0-9])"
_HEAD = r"(?<![A-Za-z0-9])"
_CACHE_SIZE = 8192
_CACHE_TEXT_LIMIT = 512
_SPLIT = re.compile(f"[{_SEPARATOR_CHARS}]+")
_ALNUM = re.compile(r"[^a-z0-9]+")
_ALNUM_CASE = re.compile(r"[^A-Za-z0-9]+")


class TermError(ValueError):
    """A term or pattern in a policy file cannot be compiled."""


@functools.lru_cache(maxsize=4096)
def _base(char: str) -> str:
    decomposed = unicodedata.normalize("NFD", char)
    return decomposed[0] if decomposed else char


def fold(text: str) -> str:
    """The text with accents removed letter by letter ("radiografía" -> "radiografia"), the same length as the
    NFC text, so offsets found in the folded text point at the same letters in the original.

    Orders are written in Spanish with and without accents; policy terms are matched on the folded form.
    """
    if text.isascii():
        return text
    return "".join(_base(c) if ord(c) > 127 else c for c in unicodedata.normalize("NFC", text))


def term_key(text: str, *, case: bool) -> str:
    """The lookup key of a phrase: its letters and digits (accents removed), lower-cased unless case-sensitive."""
    text = fold(text)
    if case:
        return _ALNUM_CASE.sub("", text)
    return _ALNUM.sub("", text.lower())


def _words(term: str) -> list[str]:
    words = [w for w in _SPLIT.split(fold(term).strip()) if w]
    if not words:
        raise TermError(f"empty term {term!r}")
    for word in words:
        if not re.fullmatch(r"[A-Za-z0-9]+", word):
            raise TermError(f"term {term!r}: use letters, digits and separators only (or a pattern:)")
    return words


@dataclass
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    end: bool = False


def _trie_regex(phrases: Iterable[list[str]]) -> str:
    """A regex matching any phrase, as a trie so each text position is tried once, not once per phrase.

    Phrases are sequences of words; between words any separators (or none) are allowed. Greedy optional groups
    make the longest phrase at a position win, which is what a reader means ("digital motion x-ray", not "motion").
    """
    root = _Node()
    for words in phrases:
        node = root
        atoms = list("\x00".join(words))  # \x00 stands for "separator here"
        for atom in atoms:
            node = node.children.setdefault(atom, _Node())
        node.end = True

    def emit(node: _Node) -> str:
        branches = []
        for atom, child in sorted(node.children.items()):
            piece = _SEP if atom == "\x00" else re.escape(atom)
            branches.append(piece + emit(child))
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if node.end else body

    return emit(root)


@dataclass(frozen=True)
class TermHit:
    """One phrase found in a text: where, what was written, and what it means in the policy."""

    start: int
    end: int
    text: str
    refs: tuple[Hashable, ...]


class TermIndex:
    """Every phrase of a policy in one place: add phrases with what they mean, compile once, find all in a text."""

    def __init__(self) -> None:
        self._plain: dict[str, list[Hashable]] = {}
        self._exact: dict[str, list[Hashable]] = {}
        self._patterns: list[tuple[re.Pattern[str], Hashable]] = []
        self._regexes: list[tuple[re.Pattern[str], bool]] = []
        # Every spelling goes into the trie: "videofluoroscopy" and "video fluoroscopy" share a key but not words.
        self._spellings: set[tuple[bool, tuple[str, ...]]] = set()
        self._cached = functools.lru_cache(maxsize=_CACHE_SIZE)(self._find)

    def add(self, term: str, ref: Hashable, *, case: bool = False) -> None:
        words = _words(term)
        key = term_key(" ".join(words), case=case)
        table = self._exact if case else self._plain
        refs = table.setdefault(key, [])
        if ref not in refs:
            refs.append(ref)
        self._spellings.add((case, tuple(w if case else w.lower() for w in words)))

    def add_pattern(self, pattern: str, ref: Hashable) -> None:
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise TermError(f"pattern {pattern!r}: {exc}") from exc
        if compiled.match(""):
            raise TermError(f"pattern {pattern!r} matches the empty string")
        self._patterns.append((compiled, ref))

    def compile(self) -> None:
        regexes = []
        for case in (False, True):
            phrases = [list(words) for c, words in sorted(self._spellings) if c is case]
            if not phrases:
                continue
            # The lookahead finds a match starting at every position, so phrases that overlap are all found.
            body = _trie_regex(phrases)
            flags = 0 if case else re.IGNORECASE
            regexes.append((re.compile(f"{_HEAD}(?=({body}){_TAIL})", flags), case))
        self._regexes = regexes
        # Order texts repeat: an EHR's catalog has a few thousand names, and the same displays arrive call after
        # call. Remember recent answers (bounded, thread-safe); a hostile stream of unique texts only churns it.
        self._cached = functools.lru_cache(maxsize=_CACHE_SIZE)(self._find)

    def refs(self) -> list[Hashable]:
        """Everything the phrases and patterns mean (to check a policy's cross-references)."""
        out = [ref for table in (self._plain, self._exact) for refs in table.values() for ref in refs]
        return out + [ref for _, ref in self._patterns]

    @staticmethod
    def _prefixes(
        start: int, written: str, table: dict[str, list[Hashable]], case: bool, original: str
    ) -> list[TermHit]:
        out = []
        for sep in _SPLIT.finditer(written):
            head = written[: sep.start()]
            refs = table.get(term_key(head, case=case))
            if head and refs:
                out.append(TermHit(start, start + len(head), original[start : start + len(head)], tuple(refs)))
        return out

    def find(self, text: str, *, nested: Callable[[Hashable], bool] | None = None) -> list[TermHit]:
        """All phrases in `text`, longest first where they overlap; a phrase inside a longer one is dropped.

        `nested` names the meanings that survive inside a longer phrase: the parts of a combination ("MRI" inside
        "upright MRI", "motion" inside "motion study") are still there when a longer phrase means something else.
        """
        if len(text) > _CACHE_TEXT_LIMIT:
            return list(self._find(text, nested))
        return list(self._cached(text, nested))

    def _find(self, text: str, nested: Callable[[Hashable], bool] | None) -> tuple[TermHit, ...]:
        hits: list[TermHit] = []
        original = text if text.isascii() else unicodedata.normalize("NFC", text)
        text = fold(original)
        for regex, case in self._regexes:
            table = self._exact if case else self._plain
            for match in regex.finditer(text):
                written = match.group(1)
                refs = table.get(term_key(written, case=case))
                start, end = match.start(1), match.end(1)
                if refs:
                    hits.append(TermHit(start, end, original[start:end], tuple(refs)))
                if nested is not None:
                    # The regex reads the longest phrase at a position; shorter ones starting there ("motion" in
                    # "motion study") are only wanted for their nested meanings.
                    hits.extend(self._prefixes(start, written, table, case, original))
        for pattern, ref in self._patterns:
            for match in pattern.finditer(text):
                hits.append(TermHit(match.start(), match.end(), original[match.start() : match.end()], (ref,)))
        if len(hits) < 2:
            return tuple(hits)
        # Keep the longest reading: "soft tissue neck" is not the spine word "neck", "cine phase contrast" is not
        # the technique word "cine".
        hits.sort(key=lambda h: (h.start, -(h.end - h.start)))
        kept: list[TermHit] = []
        for hit in hits:
            size = hit.end - hit.start
            if any(k.start <= hit.start and hit.end <= k.end and k.end - k.start > size for k in kept):
                survivors = tuple(ref for ref in hit.refs if nested is not None and nested(ref))
                if not survivors:
                    continue
                hit = TermHit(hit.start, hit.end, hit.text, survivors)
            kept.append(hit)
        return tuple(kept)
