"""Verdicts in words: the card's "why this order matched" and the analyst's full explanation."""

from __future__ import annotations

from .decision import Verdict
from .evidence import evidence_line


def explain_lines(verdict: Verdict) -> list[str]:
    """The evidence that decided a flagged order, as sentences for the card's "why this order matched"."""
    deciding = [e for e in verdict.deciding if e.pro and e.asserted] or [e for e in verdict.evidence_for if e.asserted]
    techniques = [e.label for e in deciding if e.kind in ("technique", "ambiguous-technique")]
    billing = [e.label for e in deciding if e.kind == "billing-code"]
    anatomy = ", ".join(e.label for e in deciding if e.kind == "anatomy")
    lines = list(techniques)
    lines.extend(f"{code} with {anatomy}" if anatomy else code for code in billing)
    if anatomy and not billing:
        lines.append(f"{verdict.policy.recognition.anatomy} evidence: {anatomy}")
    return lines


def describe(verdict: Verdict) -> str:
    """The verdict, the rule that decided it, its reason and every piece of evidence (for analysts)."""
    ref = verdict.order.reference or "ServiceRequest (no id)"
    label = " ".join(verdict.order.label().split())
    policy = verdict.policy
    outcome = "FLAGGED" if verdict.flagged else "not flagged"
    lines = [
        f"{ref}: {outcome} by {policy.id} {policy.version}, rule {verdict.rule}",
        f"  order:   {label}",
        f"  rule:    {verdict.rule}",
        f"  reason:  {verdict.reason}",
    ]
    lines += [f"  decided: {evidence_line(e)}" for e in verdict.deciding]
    lines += [f"  for:     {evidence_line(e)}" for e in verdict.evidence_for if e not in verdict.deciding]
    lines += [f"  against: {evidence_line(e)}" for e in verdict.evidence_against if e not in verdict.deciding]
    if verdict.flagged:
        lines.append(f"  region:  {verdict.region or 'not named (no replacement offered)'}")
    return "\n".join(lines)
