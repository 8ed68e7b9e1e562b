"""Cheap structural checks of the FHIR datatypes the service copies from a client into resources it proposes."""

from __future__ import annotations

import re
from typing import Any

# FHIR R4/R5 primitive rules (https://hl7.org/fhir/R4/datatypes.html): a uri has no whitespace, a code no leading or
# trailing whitespace and no runs of it, a string is non-empty.
_URI = re.compile(r"\S+")
_CODE = re.compile(r"[^\s]+(\s[^\s]+)*")
_CODING_KEYS = frozenset({"id", "extension", "system", "version", "code", "display", "userSelected"})
_CONCEPT_KEYS = frozenset({"id", "extension", "coding", "text"})
_REFERENCE_KEYS = frozenset({"id", "extension", "reference", "type", "identifier", "display"})


def _string(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _extensions(value: Any) -> bool:
    return value is None or (
        isinstance(value, list) and all(isinstance(e, dict) and _string(e.get("url")) for e in value)
    )


def is_coding(value: Any) -> bool:
    if not isinstance(value, dict) or not value or not set(value) <= _CODING_KEYS:
        return False
    if "system" in value and not (isinstance(value["system"], str) and _URI.fullmatch(value["system"])):
        return False
    if "code" in value and not (isinstance(value["code"], str) and _CODE.fullmatch(value["code"])):
        return False
    if any(k in value and not _string(value[k]) for k in ("version", "display", "id")):
        return False
    if "userSelected" in value and not isinstance(value["userSelected"], bool):
        return False
    return _extensions(value.get("extension"))


def is_codeable_concept(value: Any) -> bool:
    if not isinstance(value, dict) or not value or not set(value) <= _CONCEPT_KEYS:
        return False
    coding = value.get("coding")
    if coding is not None and not (isinstance(coding, list) and coding and all(is_coding(c) for c in coding)):
        return False
    if "text" in value and not _string(value["text"]):
        return False
    return _extensions(value.get("extension"))


def is_reference(value: Any) -> bool:
    if not isinstance(value, dict) or not set(value) <= _REFERENCE_KEYS or not _string(value.get("reference")):
        return False
    if any(k in value and not _string(value[k]) for k in ("type", "display", "id")):
        return False
    return "identifier" not in value or isinstance(value["identifier"], dict)


def is_codeable_reference(value: Any) -> bool:
    """R5 CodeableReference: a concept, a reference, or both."""
    if not isinstance(value, dict) or not value or not set(value) <= {"id", "extension", "concept", "reference"}:
        return False
    if "concept" in value and not is_codeable_concept(value["concept"]):
        return False
    if "reference" in value and not is_reference(value["reference"]):
        return False
    return ("concept" in value or "reference" in value) and _extensions(value.get("extension"))
