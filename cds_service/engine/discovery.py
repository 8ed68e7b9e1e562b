"""The CDS Hooks discovery entries of a policy set: one per service, with its prefetch and the CRD extension."""

from __future__ import annotations

from typing import Any

from . import crd, referenced
from .policy import PolicySet


def discovery_entries(policies: PolicySet) -> list[dict[str, Any]]:
    """`GET /cds-services` lists these (CDS Hooks 2.0 Discovery): derived from the policies, nothing else."""
    return [
        {
            "hook": service.hook,
            "id": service.id,
            "title": service.title,
            "description": service.description,
            # The policy's prefetch, and the orders or appointments a CRD 2.2 hook names by reference (referenced.py).
            "prefetch": {name: key.query for name, key in service.prefetch.items()}
            | referenced.HOOK_PREFETCH.get(service.hook, {}),
            "extension": crd.service_extension(service),
        }
        for service in policies.services.values()
    ]
