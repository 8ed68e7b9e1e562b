"""The benchmark measures what it claims: its generated bodies flag exactly the orders meant as DSV."""

from __future__ import annotations

import sys

import pytest
from flask.testing import FlaskClient

from .conftest import ROOT, SIGN

sys.path.insert(0, str(ROOT / "bench"))
import bodies


@pytest.mark.parametrize(("orders", "variant"), [(5, v) for v in range(6)] + [(50, 0), (500, 1)])
def test_bench_bodies_flag_exactly_the_dsv_orders(client: FlaskClient, orders: int, variant: int) -> None:
    body = bodies.order_sign_body(orders, variant=variant)
    assert len(body["context"]["draftOrders"]["entry"]) == orders
    data = client.post(f"/cds-services/{SIGN}", json=body).get_json()
    flagged = [c["extension"]["davinci-crd.associated-resource"][0]["reference"] for c in data["cards"]]
    assert flagged == bodies.flagged_ids(body) and len(flagged) == 1
    assert len(data["systemActions"]) == 1  # the Coverage is prefetched
