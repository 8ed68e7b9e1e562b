"""The cheap first pass over an order: can any flagging rule of the policy hold at all? Most orders answer no."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from .evidence import WORD, read_word
from .orders import READ_FIELDS
from .policy.model import Recognition
from .terms import fold

# Element names of FHIR JSON are words of the dump too: never a candidate word, and never read as a typo.
FHIR_KEYS = frozenset(
    [
        "resourcetype",
        "servicerequest",
        "id",
        "meta",
        "status",
        "intent",
        "category",
        "priority",
        "donotperform",
        "code",
        "concept",
        "coding",
        "system",
        "version",
        "display",
        "userselected",
        "text",
        "orderdetail",
        "parameter",
        "parameterfocus",
        "valuestring",
        "valueboolean",
        "valuecodeableconcept",
        "valuequantity",
        "valueratio",
        "valuerange",
        "valueperiod",
        "quantityquantity",
        "subject",
        "focus",
        "encounter",
        "occurrencedatetime",
        "occurrenceperiod",
        "occurrencetiming",
        "asneededboolean",
        "authoredon",
        "requester",
        "performertype",
        "performer",
        "locationcode",
        "reasoncode",
        "reasonreference",
        "reason",
        "reference",
        "insurance",
        "supportinginfo",
        "specimen",
        "bodysite",
        "bodystructure",
        "note",
        "authorstring",
        "authorreference",
        "time",
        "patientinstruction",
        "instructionmarkdown",
        "instructionreference",
        "relevanthistory",
        "extension",
        "modifierextension",
        "url",
        "identifier",
        "type",
        "value",
        "basedon",
        "replaces",
        "requisition",
        "instantiatescanonical",
        "instantiatesuri",
    ]
)
# JSON escapes for control characters would glue a letter to the next word ("\nDMX" -> "nDMX"): they become spaces.
_ESCAPE = re.compile(r"\\[bfnrt]")


@dataclass(frozen=True)
class OrderWords:
    """What the first pass reads of an order: the JSON of the elements the engine reads (also the key of the verdict
    cache: equal content, equal verdict), its text folded, and its words."""

    content: bytes
    text: str
    tokens: frozenset[str]


def order_words(resource: dict[str, Any]) -> OrderWords:
    """Every word of the order's elements the engine reads, keys included (no key is a word the policy needs): lower
    case, no accents. One orjson dump and one token pass, both in C."""
    content = orjson.dumps([resource.get(name) for name in READ_FIELDS])
    text = content.decode()
    if "\\" in text:
        text = _ESCAPE.sub(" ", text)
    text = fold(text)
    return OrderWords(content, text, frozenset(WORD.findall(text.lower())))


def might_flag(rec: Recognition, words: OrderWords) -> bool:
    """False only when the order holds none of the words, codes or patterns every flagging rule needs."""
    if not rec.prefilter:
        return True
    text, tokens = words.text, words.tokens
    if not rec.candidate_tokens.isdisjoint(tokens):
        return True
    if any(pattern.search(text) for pattern in rec.candidate_patterns):
        return True
    # A misspelled or abbreviated policy word counts only beside spine words (a technique that needs them, or one
    # that names the spine itself, is then in reach): the reading runs for spine orders, not for every word of every
    # order. Words are read exactly as the evidence step reads them, so the two passes cannot disagree on a typo.
    if not rec.anatomy_tokens.isdisjoint(tokens):
        for token in tokens - FHIR_KEYS:
            read = read_word(rec, token)
            # An abbreviation may stand for several words ("xr" -> "x ray"): its first is the candidate word.
            if read is not None and read.split(" ", 1)[0] in rec.candidate_tokens:
                return True
    return False
