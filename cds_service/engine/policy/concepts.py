"""Compile a policy's concept classes and compositions: concept words into the term index, compositions checked."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..terms import TermIndex
from . import schema as s
from .model import Composition, ConceptRef, Meaning
from .yamlread import Loc

if TYPE_CHECKING:
    from .compile_recognition import Compiler


def compile_concepts(
    c: Compiler,
    spec: s.Recognition,
    index: TermIndex,
    techniques: dict[str, Meaning],
    kind_places: dict[str, frozenset[s.Place]],
    base: Loc,
) -> tuple[Composition, ...]:
    """Add every concept word to the policy's term index (a ConceptRef, never evidence by itself) and turn each
    composition into the technique evidence it gives. Unknown concepts or techniques and unused concepts are
    problems, like any broken cross-reference of the policy file."""
    used: set[str] = set()
    out: list[Composition] = []
    for i, comp in enumerate(spec.compositions):
        path = (*base, "compositions", i)
        named = techniques.get(comp.technique)
        if named is None:
            known = sorted(techniques)
            c.problem((*path, "technique"), f"no technique {comp.technique!r} in techniques: (one of {known})")
            continue
        slots = []
        for k, entry in enumerate(comp.all):
            names = [entry] if isinstance(entry, str) else entry
            for name in names:
                if name not in spec.concepts:
                    c.problem((*path, "all", k), f"no concept {name!r} in concepts: (one of {sorted(spec.concepts)})")
            slots.append(frozenset(names))
        for k, name in enumerate(comp.unless):
            if name not in spec.concepts:
                c.problem((*path, "unless", k), f"no concept {name!r} in concepts: (one of {sorted(spec.concepts)})")
            if any(name in slot for slot in slots):
                c.problem((*path, "unless", k), f"concept {name!r} is both a part of the composition and in unless")
        used.update(n for slot in slots for n in slot)
        used.update(comp.unless)
        kind: s.EvidenceKind = named.kind
        if comp.needs_anatomy is not None:
            kind = "ambiguous-technique" if comp.needs_anatomy else "technique"
        meaning = Meaning(kind, named.group, kind_places.get(kind, named.places))
        out.append(Composition(comp.name, meaning, tuple(slots), frozenset(comp.unless)))
    for name, concept in spec.concepts.items():
        path = (*base, "concepts", name)
        if name not in used:
            c.problem(path, f"concept {name!r} is used by no composition")
        for t, term in enumerate(concept.terms):
            try:
                if term.pattern is not None:
                    index.add_pattern(term.pattern, ConceptRef(name))
                elif term.term is not None:
                    index.add(term.term, ConceptRef(name), case=term.case)
                    # Known words, never a typo's target: everyday words ("reporting") lie within two edits of
                    # concept words ("recording"), and a part is not a name. Listed abbreviations still fill parts.
                    c.add_words("concept", term.term)
            except ValueError as exc:
                c.problem((*path, "terms", t), str(exc))
    return tuple(out)
