"""Structural validation of policy and language files: each format problem with its path, line and a hint."""

from __future__ import annotations

import copy
import difflib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

from . import schema as s
from .yamlread import Loc, Located, Problem


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types inside Optional / Union / Annotated."""
    origin = get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for arg in get_args(annotation) for t in _unwrap(arg)]
    return [annotation]


def _known_keys(model: type[BaseModel], loc: Loc) -> list[str]:
    """The keys a model accepts at `loc` (for "did you mean"); [] when the place holds free-form keys."""
    current: list[Any] = [model]
    for part in loc:
        following: list[Any] = []
        for kind in current:
            for typ in _unwrap(kind):
                origin = get_origin(typ)
                if isinstance(typ, type) and issubclass(typ, BaseModel) and isinstance(part, str):
                    for name, info in typ.model_fields.items():
                        if part in (name, info.alias):
                            following.append(info.annotation)
                elif origin is list and isinstance(part, int):
                    following.append(get_args(typ)[0])
                elif origin is dict:
                    following.append(get_args(typ)[1])
        current = following
    keys: list[str] = []
    for kind in current:
        for typ in _unwrap(kind):
            if isinstance(typ, type) and issubclass(typ, BaseModel):
                keys += [info.alias or name for name, info in typ.model_fields.items()]
    return keys


def _message(error: Mapping[str, Any], loc: Loc, model: type[BaseModel] = s.PolicyFile) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        known = _known_keys(model, loc[:-1])
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}" if known else ""
        return f"unknown key {key!r}{hint}"
    if kind == "missing":
        return f"{str(loc[-1])!r} is required"
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind == "literal_error":
        value = error.get("input")
        expected = str(error.get("ctx", {}).get("expected", ""))
        options = [o.strip().strip("'") for o in expected.replace(" or ", ", ").split(",")]
        close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.6)
        if close:
            message += f" (did you mean {close[0]!r}?)"
    return message


def structure_problems(source: Path, located: Located, model: type[BaseModel], data: Any, base: Loc) -> list[Problem]:
    try:
        model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc: Loc = tuple(p for p in error["loc"] if p != "[key]")
            full = (*base, *loc)
            message = _message(error, full, model)
            if "[key]" in error["loc"]:
                message = f"key {str(loc[-1])!r}: {message}" if loc else message
            problems.append(Problem(source, full, located.line_of(full), message))
        return problems
    return []


def _without(data: Any, errors: list[Any]) -> bool:
    """Drop the mapping keys under the errors' locations (in place); False when nothing could be dropped."""
    dropped = False
    for error in errors:
        loc = [p for p in error["loc"] if p != "[key]"]
        if error["type"] == "missing":
            loc = loc[:-1]  # the key is absent: drop the mapping that lacks it
        # The deepest mapping key on the path: list items are never removed, so later paths keep their indexes.
        while loc and not isinstance(loc[-1], str):
            loc = loc[:-1]
        if not loc:
            continue
        parent: Any = data
        try:
            for part in loc[:-1]:
                parent = parent[part]
        except (KeyError, IndexError, TypeError):
            continue
        if isinstance(parent, dict) and loc[-1] in parent:
            del parent[loc[-1]]
            dropped = True
    return dropped


def repaired(data: Any) -> s.PolicyFile | None:
    """The file with every part that breaks the format left out, so the other checks still run on the rest (an
    analyst sees every problem of the file in one run, not one per run)."""
    work = copy.deepcopy(data)
    for _ in range(50):
        try:
            return s.PolicyFile.model_validate(work)
        except ValidationError as exc:
            if not _without(work, exc.errors()):
                return None
    return None
