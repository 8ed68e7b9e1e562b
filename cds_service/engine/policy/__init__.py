"""Policies as data: the file format, its loader and the compiled form the engine judges with."""

from .language import language_files, language_json_schema
from .load import check_policies, load_policies, load_policy_file, packaged_policy_dir, policy_files
from .model import Coding, Policy, PolicyError, PolicySet, PrefetchKey, Rule, Service
from .schema import json_schema
from .yamlread import Problem

__all__ = [
    "Coding",
    "Policy",
    "PolicyError",
    "PolicySet",
    "PrefetchKey",
    "Problem",
    "Rule",
    "Service",
    "check_policies",
    "json_schema",
    "language_files",
    "language_json_schema",
    "load_policies",
    "load_policy_file",
    "packaged_policy_dir",
    "policy_files",
]
