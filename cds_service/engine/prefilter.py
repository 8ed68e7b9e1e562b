"""The cheap first pass over an order: can any flagging rule of the policy hold at all? Most orders answer no."""

from __future__ import annotations

import functools
import re

from .guesses import read_cut, read_word, typo_choices
from .orders import OrderWords, order_words
from .policy.model import Recognition

__all__ = ["FHIR_KEYS", "OrderWords", "might_flag", "order_words"]

# A code value in the JSON of the read elements ("code":"M54.50"): tested against the policy's code ranges.
_CODE_VALUE = re.compile(r'"code":"([^"\\]{1,64})"')

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
        "location",
        "locationreference",
        "valuecoding",
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


@functools.lru_cache(maxsize=8192)
def _in_code_sets(rec: Recognition, value: str) -> bool:
    """Whether a code value falls in one of the ranges or prefixes the table tests (cached: catalogs repeat)."""
    return any(value in codes for codes in rec.candidate_code_sets)


def might_flag(rec: Recognition, words: OrderWords) -> bool:
    """False only when the order holds none of the words, codes or patterns of the evidence the decision table
    tests: no evidence, so the rule that decides it by its request facts is the one the full judgement names."""
    if not rec.prefilter:
        return True
    text, tokens = words.text, words.tokens
    if not rec.candidate_tokens.isdisjoint(tokens):
        return True
    lowered = None
    for pattern, needs, whole_word in rec.candidate_patterns:
        # Searched only when the order holds what every match holds (most orders hold none of it).
        if needs is not None:
            if whole_word:
                if needs not in tokens:
                    continue
            else:
                lowered = text.lower() if lowered is None else lowered
                if needs not in lowered:
                    continue
        if pattern.search(text):
            return True
    if rec.candidate_code_sets and any(_in_code_sets(rec, v) for v in _CODE_VALUE.findall(text)):
        return True
    # A misspelled or abbreviated policy word counts only beside spine words (a technique that needs them, or one
    # that names the spine itself, is then in reach): the reading runs for spine orders, not for every word of every
    # order. Words are read exactly as the evidence step reads them, so the two passes cannot disagree on a typo.
    if not rec.anatomy_tokens.isdisjoint(tokens):
        for token in tokens - FHIR_KEYS:
            # (a cut word counts only at the end of a field: the first pass, reading words without places, lets
            # any word through that would be read so there, and the evidence step decides)
            reads = (read_word(rec, token), read_cut(rec, token), *typo_choices(rec, token))
            # An abbreviation may stand for several words ("xr" -> "x ray"): its first is the candidate word.
            if any(read is not None and read.split(" ", 1)[0] in rec.candidate_tokens for read in reads):
                return True
    return False
