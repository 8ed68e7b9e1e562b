"""The fields the engine reads from a client's order, put in FHIR's shapes: slips read as meant, the rest refused.

Real clients are sloppy (the CDS Hooks sandbox sends an object where an array belongs), and an order whose code or
body site the engine could not read would pass unjudged with a 200 and no card: the worst answer a payer can give.
So every field the engine reads is either read as the well-formed order it stands for, or refused with a 400 that
names its path. Read as meant:
- an object (or a string) where an array belongs: a one-item array;
- a string where a CodeableConcept belongs: its text; a string where an Annotation belongs: its text;
- a number where a string or code belongs: its decimal form;
- a one-item array where one value belongs: that value;
- "true"/"false" where doNotPerform's boolean belongs: the boolean;
- null: absent.
Refused (InvalidRequest naming the path): anything else, such as a Coding sent as a bare string (code or display?),
a boolean where text belongs, or several values where FHIR allows one.
The client's resource itself is never changed: the engine reads a fixed copy, the CRD echo sends the original.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import InvalidRequest
from .orders import FIELDS

_MAX_ITEMS = 200
Fix = Callable[[Any, str], Any]


def _refuse(path: str, expected: str) -> InvalidRequest:
    return InvalidRequest(f"'{path}' must be {expected}.", expression=path)


def _one(value: list[Any], path: str, fix: Fix, expected: str) -> Any:
    """A one-item array where one value belongs is that value, an empty one none; more items are ambiguous."""
    if not value:
        return None
    if len(value) == 1:
        return fix(value[0], f"{path}[0]")
    raise _refuse(path, expected)


def _string(value: Any, path: str) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list):
        return _one(value, path, _string, "a string")  # type: ignore[no-any-return]
    raise _refuse(path, "a string")


def _boolean(value: Any, path: str) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if isinstance(value, list):
        return _one(value, path, _boolean, "true or false")  # type: ignore[no-any-return]
    raise _refuse(path, "true or false")


def _fields(value: dict[str, Any], path: str, fixes: dict[str, Fix]) -> dict[str, Any]:
    """The object with each listed field fixed; a null (or empty one-value array) is absent."""
    out = dict(value)
    for key, fix in fixes.items():
        if key in out:
            fixed = None if out[key] is None else fix(out[key], f"{path}.{key}")
            if fixed is None:
                del out[key]
            else:
                out[key] = fixed
    return out


def _array(fix: Fix) -> Fix:
    def fixed(value: Any, path: str) -> list[Any]:
        if isinstance(value, list):
            return [fix(item, f"{path}[{i}]") for i, item in enumerate(value[:_MAX_ITEMS]) if item is not None]
        if isinstance(value, dict | str):
            return [fix(value, path)]
        raise _refuse(path, "an array")

    return fixed


def _coding(value: Any, path: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return _fields(value, path, {"system": _string, "code": _string, "display": _string})
    raise _refuse(path, "a Coding (an object with system, code and display)")


def _concept(value: Any, path: str) -> Any:
    """A CodeableConcept, or an R5 CodeableReference sent where one is read (the reader takes either)."""
    if isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool)):
        return {"text": _string(value, path)}
    if isinstance(value, list):
        return _one(value, path, _concept, "one CodeableConcept")
    if not isinstance(value, dict):
        raise _refuse(path, "a CodeableConcept (an object with coding and text)")
    fixed = _fields(value, path, {"text": _string, "coding": _array(_coding)})
    if "concept" in fixed:  # R5 CodeableReference
        fixed = _fields(fixed, path, {"concept": _concept})
    return fixed


def _annotation(value: Any, path: str) -> dict[str, Any]:
    if isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool)):
        return {"text": _string(value, path)}
    if isinstance(value, dict):
        return _fields(value, path, {"text": _string})
    raise _refuse(path, "an Annotation (an object with text)")


def _parameter(value: Any, path: str) -> Any:
    if isinstance(value, dict):
        return _fields(value, path, {"code": _concept, "valueCodeableConcept": _concept, "valueString": _string})
    raise _refuse(path, "an orderDetail parameter (an object with code and value[x])")


def _detail(value: Any, path: str) -> Any:
    """R4 orderDetail: a CodeableConcept; R5: {parameterFocus, parameter: [{code, value[x]}]}."""
    if isinstance(value, dict) and "parameter" in value:
        return _fields(value, path, {"parameter": _array(_parameter)})
    return _concept(value, path)


def _instruction(value: Any, path: str) -> Any:
    """R4: a string; R5: an array of {instructionMarkdown | instructionReference}; the reader takes any of these."""
    if isinstance(value, str | dict | list):
        return value
    return _string(value, path)


def _element(value: Any, path: str) -> Any:
    """What orders.FIELDS calls an element: a CodeableConcept, an R5 CodeableReference, or a Reference (whose
    display is read; its reference stays as sent)."""
    if isinstance(value, dict) and "coding" not in value and "concept" not in value and "display" in value:
        return _fields(value, path, {"display": _string})
    return _concept(value, path)


_SHAPES: dict[str, Fix] = {
    "element": _element,
    "detail": _detail,
    "annotation": _annotation,
    "instruction": _instruction,
}
# The fields the engine reads (orders.FIELDS, one table for every step), each fixed by its shape, and the facts.
_ORDER_FIELDS: dict[str, Fix] = {
    "id": _string,
    "status": _string,
    "intent": _string,
    "doNotPerform": _boolean,
    **{
        f.name: _array(_SHAPES[f.shape]) if f.repeats and f.shape != "instruction" else _SHAPES[f.shape] for f in FIELDS
    },
}


def well_formed(resource: dict[str, Any], path: str) -> dict[str, Any]:
    """A copy of the order with every field the engine reads in its FHIR shape; InvalidRequest names what is not."""
    return _fields(resource, path, _ORDER_FIELDS)
