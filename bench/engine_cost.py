"""What the engine costs per order, in process: non-candidate orders (the cheap first pass) and candidate orders
(read and judged in full, verdict memo cleared), as CPU microseconds per order (best round).

Run: `python bench/engine_cost.py [--rounds N]`. Non-candidate orders are labs and procedures that name none of the
policy's words or codes; ordinary imaging names some (a knee, plain views) but no technique; candidate orders are
the packaged examples. Each
order's id is varied per round so the memo does not answer (the memo is keyed by content, not id, so candidate
orders are also run with the memo cleared between rounds).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

from cds_service.engine import decision, load_policies
from cds_service.engine.decision import judge_resource

CPT = "http://www.ama-assn.org/go/cpt"
CBC = {"system": "http://loinc.org", "code": "58410-2", "display": "CBC panel - Blood by Automated count"}
KNEE = {"system": CPT, "code": "73562", "display": "Radiologic examination, knee; 3 views"}

ROOT = Path(__file__).resolve().parent.parent

# Orders naming none of the policy's words or codes: the first pass alone decides them.
NON_CANDIDATE: list[dict[str, Any]] = [
    {
        "resourceType": "ServiceRequest",
        "id": "lab",
        "status": "draft",
        "intent": "order",
        "code": {"coding": [CBC], "text": "CBC with differential"},
    },
    {
        "resourceType": "ServiceRequest",
        "id": "a1c",
        "status": "draft",
        "intent": "order",
        "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}], "text": "Hemoglobin A1c"},
        "reasonCode": [{"text": "type 2 diabetes, follow-up"}],
    },
    {
        "resourceType": "ServiceRequest",
        "id": "colonoscopy",
        "status": "draft",
        "intent": "order",
        "code": {"concept": {"text": "Colonoscopy"}},
        "reason": [{"concept": {"text": "family history of polyps"}}],
        "orderDetail": [{"parameter": [{"code": {"text": "Anticoagulated?"}, "valueBoolean": False}]}],
    },
    {
        "resourceType": "ServiceRequest",
        "id": "echo",
        "status": "draft",
        "intent": "order",
        "code": {"text": "Transthoracic echo complete"},
        "note": [{"text": "murmur, evaluate valves"}],
    },
]
# Ordinary imaging that names some of the policy's words (another body region, plain views) but no technique.
ORDINARY_IMAGING: list[dict[str, Any]] = [
    {
        "resourceType": "ServiceRequest",
        "id": "xr-knee",
        "status": "draft",
        "intent": "order",
        "code": {"coding": [KNEE], "text": "XR knee 3 views"},
        "reasonCode": [{"text": "knee pain after fall"}],
    },
    {
        "resourceType": "ServiceRequest",
        "id": "ct-head",
        "status": "draft",
        "intent": "order",
        "code": {"concept": {"text": "CT head without contrast"}},
        "reason": [{"concept": {"text": "headache"}}],
    },
]


def _candidates() -> list[dict[str, Any]]:
    cases = [c for f in sorted((ROOT / "policies" / "examples").glob("*.json")) for c in json.loads(f.read_text())]
    return [c["resource"] for c in cases]


def _per_order(orders: list[dict[str, Any]], rounds: int, *, clear_memo: bool) -> float:
    [policy] = [p for p in load_policies().policies if p.id == "dynamic-spinal-visualization"]
    samples = []
    for r in range(rounds):
        batch = []
        for order in orders:
            copy_ = copy.deepcopy(order)
            copy_["id"] = f"{order.get('id')}-{r}"
            batch.append(copy_)
        if clear_memo:
            decision._memo.clear()  # a cold memo is what a new orderable meets
        start = time.process_time()
        for order in batch:
            judge_resource(order, policy)
        samples.append((time.process_time() - start) / len(batch) * 1e6)
    # CPU time of the fastest round: the machine is shared, and other work only ever adds time.
    return min(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    non = NON_CANDIDATE * 50
    cand = _candidates()
    imaging = ORDINARY_IMAGING * 100
    cheap = _per_order(non, args.rounds, clear_memo=False)
    other = _per_order(imaging, args.rounds, clear_memo=True)
    full = _per_order(cand, args.rounds, clear_memo=True)
    print(f"non-candidate orders:      {cheap:8.1f} µs/order ({len(non)} per round)")
    print(f"ordinary imaging orders:   {other:8.1f} µs/order ({len(imaging)} per round, memo cold)")
    print(f"candidate orders:          {full:8.1f} µs/order ({len(cand)} per round, memo cold)")


if __name__ == "__main__":
    main()
