"""Card markdown: client text escaped so it shows as text, and the words a clinician reads counted."""

from __future__ import annotations

import re

# Characters that start markdown or HTML constructs (GitHub-flavoured markdown, raw HTML allowed by the sandbox).
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#|!~])")
# GFM autolink literals (www.x.org, http(s)://..., a@b.org, mailto:/xmpp: addresses) become links from plain text,
# and a backslash does not stop them (remark-gfm finds them in the text after escapes are read). A WORD JOINER
# (U+2060: invisible, no width, no line break) between "www"/the scheme and what follows, and before "@", does.
_WORD_JOINER = "\u2060"
_AUTOLINK = re.compile(r"(?i)(?<=www)(?=\.)|(?=://)|(?=@)")
# A markdown link's target: "[label](https://...)" reads as its label only.
_LINK_TARGET = re.compile(r"\]\([^)\s]*\)")
# A word: a run of non-space characters holding at least one letter or digit (found in one C pass).
_WORD = re.compile(r"[^\s\w]*\w\S*")

# A card's detail must read without scrolling in an EHR's card pane (the sandbox shows about 120 words): CRD
# cards.html "Card.detail SHOULD provide graduated information, with critical information being provided in the
# first paragraph".
MAX_DETAIL_WORDS = 120


def md(text: str) -> str:
    """Client text shown as text: no markdown of the client's (links, images, HTML) renders in the EHR's card."""
    escaped = _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(text.split()))
    return _AUTOLINK.sub(_WORD_JOINER, escaped)


def word_count(markdown: str) -> int:
    """The words a reader sees once the markdown is rendered: link targets and markup are not words."""
    return len(_WORD.findall(_LINK_TARGET.sub("]", markdown)))


def shorten(text: str, words: int) -> str:
    """At most `words` words of plain text, with an ellipsis when cut."""
    parts = text.split()
    return " ".join(parts) if len(parts) <= words else " ".join(parts[:words]) + "…"
