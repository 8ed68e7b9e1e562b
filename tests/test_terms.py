"""Phrase matching: word boundaries, case, separators, plurals, longest match, nested meanings, and no regex work
per text."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import pytest

from cds_service.engine import terms
from cds_service.engine.terms import TermError, TermHit, TermIndex, term_key


def index(*entries: tuple[str, Hashable] | tuple[str, Hashable, bool], patterns: tuple[str, ...] = ()) -> TermIndex:
    built = TermIndex()
    for entry in entries:
        term, ref, *case = entry
        built.add(term, ref, case=bool(case and case[0]))
    for pattern in patterns:
        built.add_pattern(pattern, f"pattern:{pattern}")
    built.compile()
    return built


def found(built: TermIndex, text: str, **kwargs: Any) -> list[tuple[str, tuple[Hashable, ...]]]:
    return [(hit.text, hit.refs) for hit in built.find(text, **kwargs)]


def written(built: TermIndex, text: str) -> list[str]:
    return [hit.text for hit in built.find(text)]


# --- word boundaries -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("term", "text", "hit"),
    [
        ("neck", "Neck pain", True),
        ("neck", "necklace", False),
        ("neck", "turtleneck", False),
        ("cine", "cine views", True),
        ("cine", "medicine", False),
        ("cine", "cinema", False),
        ("spine", "L-spine", True),
        ("spine", "spinel", False),
        ("spine", "(spine)", True),
        ("spine", "spine2", False),
        ("x-ray", "x-ray.", True),
    ],
)
def test_phrases_match_whole_words_only(term: str, text: str, hit: bool) -> None:
    assert bool(written(index((term, "r")), text)) is hit


# --- case ------------------------------------------------------------------------------------------------------------


def test_plain_terms_ignore_case() -> None:
    built = index(("digital motion x-ray", "dmx"))
    for text in ("Digital Motion X-Ray", "DIGITAL MOTION XRAY", "digital motion x ray"):
        assert written(built, text), text


@pytest.mark.parametrize(("text", "hit"), [("LS spine", True), ("ls spine", False), ("Ls", False), ("ALS", False)])
def test_case_sensitive_acronyms_match_only_as_written(text: str, hit: bool) -> None:
    assert bool(written(index(("LS", "lumbar", True)), text)) is hit


def test_a_case_sensitive_and_a_plain_spelling_can_share_letters() -> None:
    built = index(("kMRI", "kinematic", True), ("KMRI", "kinematic", True), ("VMA", "vma", True))
    assert written(built, "kMRI C-spine") == ["kMRI"]
    assert written(built, "KMRI C-SPINE") == ["KMRI"]
    assert written(built, "kmri") == []
    assert written(built, "vma urine") == []


# --- separators --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["x-ray", "x ray", "xray", "X/Ray", "x_ray", "x.ray", "x\u2013ray", "x\u00a0ray", "x -  ray", "X-RAY"],
)
def test_separators_between_words_are_optional_and_any_kind(text: str) -> None:
    assert written(index(("x-ray", "r")), f"motion {text} lumbar") == [text]


@pytest.mark.parametrize("text", ["videofluoroscopy", "video fluoroscopy", "Video-Fluoroscopy", "VIDEO/FLUOROSCOPY"])
def test_a_split_term_also_matches_written_together(text: str) -> None:
    assert written(index(("video fluoroscopy", "r")), text) == [text]


def test_a_term_written_together_does_not_match_split() -> None:
    # Why the policy writes the split form: "videofluoroscopy" cannot know where a writer might break it.
    assert written(index(("videofluoroscopy", "r")), "video fluoroscopy") == []


def test_separators_do_not_join_letters_across_other_characters() -> None:
    assert written(index(("flex ext", "r")), "flex*ext") == []


# --- plurals ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "hit"), [("radiographs", True), ("radiographes", True), ("radiographic", False)])
def test_a_trailing_plural_is_tolerated(text: str, hit: bool) -> None:
    assert bool(written(index(("radiograph", "r")), text)) is hit


def test_plural_of_an_acronym() -> None:
    assert written(index(("DMX", "dmx", True)), "two DMXs") == ["DMX"]


# --- overlap and longest match ---------------------------------------------------------------------------------------


def test_the_longest_phrase_wins_where_one_holds_another() -> None:
    built = index(("neck", "spine"), ("soft tissue neck", "other"), ("femoral neck", "other"))
    assert found(built, "XR soft tissue neck") == [("soft tissue neck", ("other",))]
    assert found(built, "femoral neck fracture") == [("femoral neck", ("other",))]
    assert found(built, "neck pain") == [("neck", ("spine",))]


def test_overlapping_phrases_that_do_not_contain_each_other_are_all_found() -> None:
    built = index(("flexion and extension", "fe"), ("extension views", "views"))
    assert written(built, "flexion and extension views") == ["flexion and extension", "extension views"]


def test_every_occurrence_is_found_in_order() -> None:
    built = index(("spine", "s"), ("lumbar", "l"))
    hits = built.find("spine: lumbar; spine")
    assert [(h.start, h.text) for h in hits] == [(0, "spine"), (7, "lumbar"), (15, "spine")]


def test_one_spelling_may_mean_several_things() -> None:
    built = index(("flexion", "combo part"), ("flexion", "look-alike"))
    assert found(built, "flexion") == [("flexion", ("combo part", "look-alike"))]


def test_nested_meanings_survive_inside_a_longer_phrase_when_asked() -> None:
    built = index(
        ("MRI", "combo:mri"), ("upright MRI", "look-alike"), ("motion", "combo:motion"), ("motion study", "other-combo")
    )

    def keep(ref: Hashable) -> bool:
        return str(ref).startswith("combo:")

    assert found(built, "Upright MRI") == [("Upright MRI", ("look-alike",))]
    # "MRI" ends the longer phrase, "motion" starts one: both are found again when their meaning is wanted.
    assert found(built, "Upright MRI", nested=keep) == [("Upright MRI", ("look-alike",)), ("MRI", ("combo:mri",))]
    assert ("motion", ("combo:motion",)) in found(built, "motion study", nested=keep)
    assert found(built, "motion study") == [("motion study", ("other-combo",))]


# --- patterns --------------------------------------------------------------------------------------------------------


def test_patterns_find_what_a_phrase_cannot() -> None:
    built = index(patterns=(r"\bL[1-5]\s*-\s*(?:L?[1-5]|S1)\b",))
    assert written(built, "Disc L4-5 and L5-S1") == ["L4-5", "L5-S1"]
    assert written(built, "L45") == []


@pytest.mark.parametrize(("pattern", "problem"), [("(unclosed", "pattern"), ("x*", "empty string")])
def test_broken_patterns_are_refused(pattern: str, problem: str) -> None:
    with pytest.raises(TermError, match=problem):
        TermIndex().add_pattern(pattern, "r")


@pytest.mark.parametrize("term", ["", "  ", "x*ray", "fluoro?", "c\u00e9ph\u00a7al"])
def test_terms_are_letters_digits_and_separators(term: str) -> None:
    with pytest.raises(TermError):
        TermIndex().add(term, "r")


# --- keys, refs and speed ---------------------------------------------------------------------------------------------


def test_term_key_ignores_separators_and_case_unless_asked() -> None:
    assert term_key("X-Ray", case=False) == term_key("xray", case=False) == "xray"
    assert term_key("C-DMX", case=True) == "CDMX"


def test_refs_lists_every_meaning_once_per_spelling() -> None:
    built = index(("neck", "spine"), ("neck", "spine"), ("NECK", "other"), patterns=(r"\bC\d\b",))
    assert sorted(map(str, built.refs())) == ["other", "pattern:\\bC\\d\\b", "spine"]


def test_find_before_compile_finds_nothing_and_an_empty_index_is_harmless() -> None:
    built = TermIndex()
    built.add("spine", "s")
    assert built.find("spine") == []
    empty = TermIndex()
    empty.compile()
    assert empty.find("anything at all") == []


class _NoRegexBuilding:
    """Stands in for the re module while texts are searched: any attempt to build a regex fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"re.{name} called while finding phrases: regexes must be built at load time")


def test_finding_builds_no_regex(monkeypatch: pytest.MonkeyPatch) -> None:
    built = index(("digital motion x-ray", "dmx"), ("LS", "ls", True), ("motion", "m"), patterns=(r"\bL[1-5]\b",))
    monkeypatch.setattr(terms, "re", _NoRegexBuilding())
    hits = built.find("Digital motion X-rays, LS L4 " * 3, nested=lambda ref: ref == "m")
    assert {h.text for h in hits} >= {"Digital motion X-ray", "LS", "L4", "motion"}
    assert all(isinstance(h, TermHit) for h in hits)


def test_accented_terms_match_with_and_without_accents() -> None:
    """Spanish orders are typed with and without accents; offsets and quotes still point at what was written."""
    index = TermIndex()
    index.add("videofluoroscop\u00eda din\u00e1mica", "technique")
    index.compile()
    for text in ("Videofluoroscop\u00eda din\u00e1mica de columna", "VIDEOFLUOROSCOPIA DINAMICA DE COLUMNA"):
        [hit] = index.find(text)
        assert hit.refs == ("technique",) and hit.start == 0
        assert hit.text == text[: hit.end]
    decomposed = "Videofluoroscopi\u0301a dina\u0301mica"  # combining accents (NFD) as some systems send
    [hit] = index.find(decomposed)
    assert hit.text == "Videofluoroscop\u00eda din\u00e1mica"
