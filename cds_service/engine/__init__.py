"""The clinical engine: policies, orders, evidence, the decision table, cards and CRD actions; no web, no I/O."""

from .crd import CoverageResult
from .decision import Verdict, judge
from .discovery import discovery_entries
from .errors import InvalidRequest
from .explain import describe, explain_lines
from .hook import Assessment, assess, respond
from .orders import OrderView, read_order
from .outcome import CardOutcome, Outcome, VerdictRecord
from .policy import Policy, PolicyError, PolicySet, Service, check_policies, load_policies
from .request import HookRequest, parse_hook_request, parse_json

__all__ = [
    "Assessment",
    "CardOutcome",
    "CoverageResult",
    "HookRequest",
    "InvalidRequest",
    "OrderView",
    "Outcome",
    "Policy",
    "PolicyError",
    "PolicySet",
    "Service",
    "Verdict",
    "VerdictRecord",
    "assess",
    "check_policies",
    "describe",
    "discovery_entries",
    "explain_lines",
    "judge",
    "load_policies",
    "parse_hook_request",
    "parse_json",
    "read_order",
    "respond",
]
