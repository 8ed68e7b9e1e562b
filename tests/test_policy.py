"""The policy loader: the packaged policy loads; a broken file is refused with its name and the problem."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from cds_service.policy import PolicyError, load_policies, load_policy, packaged_policy_dir

from .conftest import ROOT

POLICY_FILE = ROOT / "cards" / "dynamic-spinal-visualization.yaml"


def packaged() -> dict[str, Any]:
    return yaml.safe_load(POLICY_FILE.read_text())


def write(folder: Path, name: str, data: dict[str, Any]) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_packaged_policy_loads() -> None:
    policies = load_policies()
    assert packaged_policy_dir().is_dir()
    [policy] = policies.policies
    assert policy.id == "dynamic-spinal-visualization" and policy.version
    assert set(policies.services) == {"dsv-order-select", "dsv-order-sign"}
    assert set(policy.alternatives) == {"cervical", "lumbar"}
    assert policy.alternatives["cervical"].code.code == "24945-8"
    assert policy.alternatives["lumbar"].code.code == "24971-4"
    assert set(policy.recognition.billing_codes) == {("cpt", c) for c in ("76120", "76125", "76496", "76499")}
    assert len(policy.card.summary) < 140
    assert {r.code for r in policy.card.override_reasons} >= {"research-study", "payer-exception", "not-dsv"}


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


_DELETE = object()

BROKEN = [
    ("policy.id", _DELETE, "policy.id: is required"),
    ("card.summary", "x" * 140, "card.summary: 140 characters"),
    ("card.indicator", "loud", "card.indicator"),
    ("card.position", "Hello {nobody}", "unknown placeholder"),
    ("card.links", [{"label": "Policy", "url": "ftp://example.org"}], "not an absolute http(s) URL"),
    ("card.links", [], "at least one link"),
    ("recognition.places.techniques", ["code", "elsewhere"], "unknown place"),
    ("recognition.techniques.0.needs_spine", "sometimes", "needs_spine"),
    ("recognition.techniques.0.terms", [{"pattern": "(unclosed"}], "pattern"),
    ("recognition.techniques.0.terms", ["x-ray!"], "letters, digits and separators"),
    ("recognition.billing_codes", {"hcpcs": {"A0001": "x"}}, "not declared"),
    (
        "alternatives.elbow",
        {
            "label": "x",
            "code": {"system": "http://loinc.org", "code": "1", "display": "d"},
            "body_site": {"system": "http://snomed.info/sct", "code": "2", "display": "e"},
        },
        "not a spine region",
    ),
    ("services.order-dispatch", {"id": "x", "title": "y"}, "unknown hook"),
    ("services.order-sign.id", "has spaces", "service id"),
    ("card.override_reasons.reasons", [{"code": "a", "display": "A"}, {"code": "a", "display": "B"}], "unique"),
    ("recognition.look_alikes.0.effect", "maybe", "effect"),
]


@pytest.mark.parametrize(("path", "value", "message"), BROKEN, ids=[case[0] for case in BROKEN])
def test_broken_policy_names_file_place_and_problem(tmp_path: Path, path: str, value: Any, message: str) -> None:
    data = copy.deepcopy(packaged())
    _set(path, value)(data)
    source = write(tmp_path, "policy.yaml", data)
    with pytest.raises(PolicyError) as caught:
        load_policy(source)
    text = str(caught.value)
    assert str(source) in text
    assert message in text


@pytest.mark.parametrize("content", ["policy: [unclosed\n", "- just\n- a list\n", ""])
def test_not_a_policy_document(tmp_path: Path, content: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(content)
    with pytest.raises(PolicyError, match=r"p\.yaml"):
        load_policy(path)


def test_empty_or_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no policy files"):
        load_policies(tmp_path)
    with pytest.raises(PolicyError, match="not found"):
        load_policies(tmp_path / "missing")


def test_more_policy_files_mean_more_policies(tmp_path: Path) -> None:
    first = packaged()
    second = copy.deepcopy(first)
    second["policy"]["id"] = "second-policy"
    second["services"]["order-select"]["id"] = "second-select"
    del second["services"]["order-sign"]
    write(tmp_path, "a.yaml", first)
    write(tmp_path, "b.yaml", second)
    policies = load_policies(tmp_path)
    assert [p.id for p in policies.policies] == ["dynamic-spinal-visualization", "second-policy"]
    assert set(policies.services) == {"dsv-order-select", "dsv-order-sign", "second-select"}


def test_policies_sharing_a_service_id_are_both_applied_by_it(tmp_path: Path) -> None:
    second = copy.deepcopy(packaged())
    second["policy"]["id"] = "second-policy"
    write(tmp_path, "a.yaml", packaged())
    write(tmp_path, "b.yaml", second)
    service = load_policies(tmp_path).services["dsv-order-sign"]
    assert [p.id for p in service.policies] == ["dynamic-spinal-visualization", "second-policy"]


def test_duplicate_policy_id_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", packaged())
    write(tmp_path, "b.yaml", packaged())
    with pytest.raises(PolicyError, match="already used"):
        load_policies(tmp_path)


def test_one_service_id_on_two_hooks_is_refused(tmp_path: Path) -> None:
    second = copy.deepcopy(packaged())
    second["policy"]["id"] = "second-policy"
    second["services"]["order-select"]["id"] = "dsv-order-sign"
    write(tmp_path, "a.yaml", packaged())
    write(tmp_path, "b.yaml", second)
    with pytest.raises(PolicyError, match="each service answers one hook"):
        load_policies(tmp_path)


def test_adding_a_synonym_is_a_one_line_data_change(tmp_path: Path) -> None:
    from cds_service.matching import judge
    from cds_service.orders import read_order

    order = read_order({"resourceType": "ServiceRequest", "id": "x", "code": {"text": "Spinoscope motion study"}})
    [policy] = load_policies().policies
    assert not judge(order, policy).flagged
    data = packaged()
    standalone = next(t for t in data["recognition"]["techniques"] if t["needs_spine"] is False)
    standalone["terms"].append("spinoscope motion study")
    [changed] = load_policies(write(tmp_path / "p", "p.yaml", data).parent).policies
    assert judge(order, changed).flagged
