"""The monthly report for the CDS committee: calls, orders flagged, cards, what clinicians did with them, and why."""

from .build import DEFINITIONS, EVIDENCE_KINDS, FALSE_ALARM_CODES, REMOVED, SWITCHED, build_report, percentile
from .misses import MissCounter, possible_miss_examples
from .model import Report
from .render import render_csv, render_json, render_text

__all__ = [
    "DEFINITIONS",
    "EVIDENCE_KINDS",
    "FALSE_ALARM_CODES",
    "REMOVED",
    "SWITCHED",
    "MissCounter",
    "Report",
    "build_report",
    "percentile",
    "possible_miss_examples",
    "render_csv",
    "render_json",
    "render_text",
]
