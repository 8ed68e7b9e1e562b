"""Regenerate the golden responses in fixtures/hooks/ after a deliberate change (review `git diff` before committing).

Only files whose content changed beyond per-call values (uuids, assertion ids, dates) are rewritten, so a rerun does
not churn the others. Run: python -m tests.regenerate_goldens
"""

from __future__ import annotations

import contextlib
import io
import json

from cds_service.cli import main

from .test_fixtures import CASES, FIXTURES, expected, normalise


def regenerate() -> list[str]:
    changed = []
    for case in CASES:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            main(["evaluate", str(FIXTURES / f"{case}.request.json")])
        fresh = json.loads(out.getvalue())
        if normalise(fresh, set()) != expected(case):
            (FIXTURES / f"{case}.response.json").write_text(out.getvalue(), encoding="utf-8")
            changed.append(case)
    return changed


if __name__ == "__main__":
    for case in regenerate():
        print(f"rewrote {case}.response.json")  # noqa: T201
