"""Read YAML keeping where every value was written, so a problem names its line; duplicate keys are problems."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Loc = tuple[str | int, ...]


@dataclass
class Problem:
    """One thing wrong with a policy file: the file, the YAML path, the line, and what is wrong."""

    source: Path
    path: Loc
    line: int | None
    message: str

    def __str__(self) -> str:
        where = format_path(self.path) or "(the file)"
        line = f", line {self.line}" if self.line else ""
        return f"{self.source}: {where}{line}: {self.message}"


def format_path(path: Loc) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


@dataclass
class Located:
    """The plain data of a YAML document and the line of every path in it."""

    data: Any
    lines: dict[Loc, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def line_of(self, path: Loc) -> int | None:
        """The line of the deepest part of `path` that exists (a missing key points at its parent)."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return None


def read_yaml(source: Path, text: str) -> Located:
    """Parse `text` into plain data; every mapping key and sequence item records its line (1-based)."""
    located = Located(None)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        located.problems.append(Problem(source, (), line, f"not valid YAML: {problem}"))
        return located
    if root is None:
        return located
    constructor = yaml.SafeLoader("")  # turns scalar nodes into Python values with YAML's own rules

    def build(node: yaml.Node, path: Loc) -> Any:
        located.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    # YAML merge keys (<<: *anchor): expand the merged mapping's keys, later keys win.
                    merged = build(value_node, path)
                    for item in merged if isinstance(merged, list) else [merged]:
                        if isinstance(item, dict):
                            for k, v in item.items():
                                out.setdefault(k, v)
                    continue
                raw_key = constructor.construct_object(key_node, deep=True)
                # Policy keys are names and codes: an unquoted 76120 or true is still the text written.
                key = raw_key if isinstance(raw_key, str) else str(key_node.value)
                child = (*path, key)
                if key in out:
                    located.problems.append(
                        Problem(
                            source,
                            child,
                            key_node.start_mark.line + 1,
                            f"key {key!r} is written twice in this mapping (YAML would keep only the last)",
                        )
                    )
                located.lines[child] = key_node.start_mark.line + 1
                out[key] = build(value_node, child)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [build(item, (*path, i)) for i, item in enumerate(node.value)]
        return constructor.construct_object(node, deep=True)

    try:
        located.data = build(root, ())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        located.problems.append(Problem(source, (), mark.line + 1 if mark else None, f"not valid YAML: {exc}"))
    return located
