"""Card markdown: client text escaped so it shows as text, and the words a clinician reads counted."""

from __future__ import annotations

import re

# Characters that start markdown or HTML constructs (GitHub-flavoured markdown, raw HTML allowed by the sandbox).
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#|!~])")
# A markdown link's target: "[label](https://...)" reads as its label only.
_LINK_TARGET = re.compile(r"\]\([^)\s]*\)")
_WORD = re.compile(r"\w")

# A card's detail must read without scrolling in an EHR's card pane (the sandbox shows about 120 words): CRD
# cards.html "Card.detail SHOULD provide graduated information, with critical information being provided in the
# first paragraph".
MAX_DETAIL_WORDS = 120


def md(text: str) -> str:
    """Client text shown as text: no markdown of the client's (links, images, HTML) renders in the EHR's card."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(text.split()))


def word_count(markdown: str) -> int:
    """The words a reader sees once the markdown is rendered: link targets and markup are not words."""
    return sum(1 for token in _LINK_TARGET.sub("]", markdown).split() if _WORD.search(token))


def shorten(text: str, words: int) -> str:
    """At most `words` words of plain text, with an ellipsis when cut."""
    parts = text.split()
    return " ".join(parts) if len(parts) <= words else " ".join(parts[:words]) + "…"
