"""Hostile input: size and nesting limits, broken encodings, type confusion, and a property test; never a 5xx."""

from __future__ import annotations

import copy
import http.client
import io
import json
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from werkzeug.serving import make_server

from cds_service import create_app
from cds_service.engine.request import MAX_JSON_DEPTH

from .builders import CPT, hook_request, medication_request, service_request

MB = 1024 * 1024
LIMIT = 5 * MB
SELECT = "/cds-services/dsv-order-select"
SIGN = "/cds-services/dsv-order-sign"
FEEDBACK = "/cds-services/dsv-order-select/feedback"
OVERRIDE = {"card": "c-1", "outcome": "overridden", "outcomeTimestamp": "2026-11-02T10:15:00Z"}


@pytest.fixture
def hostile_app(tmp_path: Path) -> Iterator[Flask]:
    # The full stack as deployed (audit log on), without client authentication: the body is what is under test.
    app = create_app({"AUTH": "off", "DATABASE_URL": f"sqlite:///{tmp_path / 'hostile.sqlite3'}"})
    app.config["TESTING"] = True  # an exception escaping a view fails the test instead of becoming a 500
    yield app


@pytest.fixture
def client(hostile_app: Flask) -> FlaskClient:
    return hostile_app.test_client()


def dsv(rid: str = "sr1", **fields: Any) -> dict[str, Any]:
    return service_request(rid, text="Dynamic spinal visualization", cpt="76496", **fields)


def post(client: FlaskClient, data: bytes, path: str = SIGN, **kwargs: Any) -> Any:
    return client.post(path, data=data, content_type=kwargs.pop("content_type", "application/json"), **kwargs)


def assert_sound(response: Any, path: str = SIGN) -> None:
    """What every answer must be: no 5xx, JSON with the security headers, an OperationOutcome on every 4xx."""
    assert response.status_code < 500, response.data[:300]
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    if path.startswith("/cds-services/"):
        assert response.headers["Cache-Control"] == "no-store"
    body = json.loads(response.data)
    if response.status_code >= 400:
        assert body["resourceType"] == "OperationOutcome"
        assert body["issue"] and all(i["severity"] and i["code"] and i["diagnostics"] for i in body["issue"])
    elif path.endswith("/feedback"):
        assert isinstance(body, dict)
    else:
        assert isinstance(body["cards"], list) and isinstance(body["systemActions"], list)


def assert_status(response: Any, status: int, path: str = SIGN) -> dict[str, Any]:
    assert_sound(response, path)
    assert response.status_code == status, response.data[:300]
    body: dict[str, Any] = json.loads(response.data)
    return body


# --- size -------------------------------------------------------------------------------------------------------------


class ReadCounter(io.RawIOBase):
    """A request body stream that counts what the server read from it."""

    def __init__(self, size: int, byte: bytes = b"[") -> None:
        self.left = size
        self.read_bytes = 0
        self.byte = byte

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = self.byte * n
        self.left -= n
        self.read_bytes += n
        return n


def test_body_over_5_mb_is_refused_before_it_is_read(client: FlaskClient) -> None:
    stream = ReadCounter(LIMIT + 1)
    response = client.post(
        SIGN,
        headers={"Content-Type": "application/json"},
        environ_overrides={"wsgi.input": stream, "CONTENT_LENGTH": str(LIMIT + 1)},
    )
    body = assert_status(response, 413)
    assert "too large" in body["issue"][0]["diagnostics"]
    assert stream.read_bytes == 0  # refused on Content-Length alone: nothing read, nothing parsed


def test_body_of_exactly_5_mb_is_read(client: FlaskClient) -> None:
    body = orjson.dumps(hook_request("order-sign", [dsv()], padding=""))
    body = body.replace(b'"padding":""', b'"padding":"' + b"x" * (LIMIT - len(body)) + b'"')
    assert len(body) == LIMIT
    assert_status(post(client, body), 200)


def test_chunked_body_over_5_mb_is_refused_while_reading(client: FlaskClient) -> None:
    """No Content-Length (Transfer-Encoding: chunked): the limit holds as the body streams in, before parsing."""
    stream = ReadCounter(6 * MB, b" ")
    response = client.post(
        SIGN,
        headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        # wsgi.input_terminated: what gunicorn and werkzeug's server set for a chunked request they de-chunk.
        environ_overrides={"wsgi.input": stream, "wsgi.input_terminated": True},
    )
    assert_status(response, 413)
    assert stream.read_bytes <= LIMIT + 64 * 1024  # stopped at the limit (plus one read buffer), not at 6 MB


def test_chunked_body_of_exactly_5_mb_is_read(client: FlaskClient) -> None:
    body = orjson.dumps(hook_request("order-sign", [dsv()]))
    stream = io.BytesIO(body + b" " * (LIMIT - len(body)))
    response = client.post(
        SIGN,
        headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input": stream, "wsgi.input_terminated": True},
    )
    assert_status(response, 200)


def test_chunked_body_over_5_mb_through_a_real_server(hostile_app: Flask) -> None:
    server = make_server("127.0.0.1", 0, hostile_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.putrequest("POST", SIGN)
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Transfer-Encoding", "chunked")
        connection.endheaders()
        chunk = b"[" * 65536
        sent = 0
        try:
            while sent <= LIMIT:
                connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            connection.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may stop reading at the limit; its answer is what matters
        response = connection.getresponse()
        data = response.read()
        connection.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert response.status == 413, data[:300]
    assert response.getheader("Content-Type") == "application/json"
    assert json.loads(data)["resourceType"] == "OperationOutcome"


# --- nesting ----------------------------------------------------------------------------------------------------------


def nested(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH + 1, 1023, 1024, 1025, 100_000])
def test_nesting_deeper_than_the_limit_is_a_400(client: FlaskClient, levels: int) -> None:
    body = orjson.dumps(hook_request("order-sign", [dsv()], extension="@")).replace(b'"@"', nested(levels - 1))
    outcome = assert_status(post(client, body), 400)
    assert f"nests deeper than {MAX_JSON_DEPTH} levels" in outcome["issue"][0]["diagnostics"]


def test_nesting_up_to_the_limit_is_read(client: FlaskClient) -> None:
    # The body object is level 1, so MAX_JSON_DEPTH - 1 arrays inside it reach the limit exactly.
    body = orjson.dumps(hook_request("order-sign", [dsv()], extension="@")).replace(b'"@"', nested(MAX_JSON_DEPTH - 1))
    assert_status(post(client, body), 200)


@pytest.mark.parametrize("place", ["category", "reasonCode", "orderDetail", "note", "code", "extension", "bodySite"])
def test_deep_values_where_the_service_reads_or_echoes_are_harmless(client: FlaskClient, place: str) -> None:
    """Nesting up to the limit inside a flagged order: the card, the CRD echo and the audit record must all cope."""
    # body 1, context 2, draftOrders 3, entry 4, the entry 5, the resource 6, the array 7: objects from level 8 on.
    levels = MAX_JSON_DEPTH - 8
    inner = b'{"x":' * levels + b"{}" + b"}" * levels
    body = orjson.dumps(hook_request("order-sign", [dsv(**{place: "@"})])).replace(b'"@"', b"[" + inner + b"]")
    assert_status(post(client, body), 200)


def test_feedback_nesting_is_limited_too(client: FlaskClient) -> None:
    assert_status(post(client, b'{"feedback":' + nested(MAX_JSON_DEPTH) + b"}", FEEDBACK), 400, FEEDBACK)


# --- encodings and syntax ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"   \r\n",
        b"{not json",
        b"{'hook': 'order-sign'}",
        b'{"hook": "order-sign",}',
        b'{"hook": "order-sign"} trailing',
        b"NaN",
        b'{"a": Infinity}',
        b'{"a": 1e400}',
        b'{"hook": "\xff\xfe"}',  # invalid UTF-8
        b'{"hook": "\xc0\xaf"}',  # overlong encoding
        b'{"hook": "\xed\xa0\x80"}',  # a surrogate encoded in UTF-8
        b'{"hook": "\\ud800"}',  # a lone surrogate escape
        b'{"hook": "\\udc00x"}',
        b"\xfe\xff\x00{\x00}",  # UTF-16 with its BOM
        b"\x00" * 64,
        b'{"hook": "order-sign"\x00}',
        '{"hook": "caf\xe9"}'.encode("latin-1"),
        b"hook=order-sign&context=x",
    ],
)
def test_bodies_that_are_not_json_are_a_400(client: FlaskClient, data: bytes) -> None:
    assert_status(post(client, data), 400)


def test_a_utf8_byte_order_mark_is_ignored(client: FlaskClient) -> None:
    assert_status(post(client, b"\xef\xbb\xbf" + orjson.dumps(hook_request("order-sign", [dsv()]))), 200)


def test_duplicate_keys_keep_the_last_value(client: FlaskClient) -> None:
    """Documented behaviour (RFC 8259 leaves it open): the last one wins, as in JavaScript's JSON.parse."""
    body = orjson.dumps(hook_request("order-select", [dsv()]))
    twice = body.replace(b'"hook":"order-select"', b'"hook":"order-sign","hook":"order-select"')
    assert twice != body
    assert_status(post(client, twice, SELECT), 200)
    reversed_ = body.replace(b'"hook":"order-select"', b'"hook":"order-select","hook":"order-sign"')
    outcome = assert_status(post(client, reversed_, SELECT), 400)
    assert "answers the 'order-select' hook" in outcome["issue"][0]["diagnostics"]


JSON_TYPES = [
    "application/json",
    "application/fhir+json",
    "application/json; charset=utf-8",
    "Application/JSON;charset=UTF-8",
    "application/fhir+json; fhir=4.0",
    "application/cds-hooks+json",
]
NOT_JSON = [
    "text/plain",
    "text/plain; charset=utf-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data",
    "text/json",
    "application/xml",
    "application/jsonp",
]


@pytest.mark.parametrize("content_type", JSON_TYPES)
@pytest.mark.parametrize("path", [SIGN, FEEDBACK])
def test_json_content_types_are_read(client: FlaskClient, content_type: str, path: str) -> None:
    body = hook_request("order-sign", [dsv()]) if path == SIGN else {"feedback": [OVERRIDE]}
    assert_status(post(client, orjson.dumps(body), path, content_type=content_type), 200, path)


@pytest.mark.parametrize("content_type", NOT_JSON)
@pytest.mark.parametrize("path", [SIGN, FEEDBACK])
def test_other_content_types_are_a_415(client: FlaskClient, content_type: str, path: str) -> None:
    body = hook_request("order-sign", [dsv()]) if path == SIGN else {"feedback": [OVERRIDE]}
    outcome = assert_status(post(client, orjson.dumps(body), path, content_type=content_type), 415, path)
    assert outcome["issue"][0]["code"] == "not-supported" and outcome["issue"][0]["expression"] == ["Content-Type"]


@pytest.mark.parametrize("path", [SIGN, FEEDBACK])
def test_a_missing_content_type_is_read_as_json(hostile_app: Flask, path: str) -> None:
    body = hook_request("order-sign", [dsv()]) if path == SIGN else {"feedback": [OVERRIDE]}
    environ = {"wsgi.input": io.BytesIO(orjson.dumps(body)), "CONTENT_LENGTH": str(len(orjson.dumps(body)))}
    response = hostile_app.test_client().post(path, environ_overrides=environ)
    assert "Content-Type" not in response.request.headers
    assert_status(response, 200, path)


# --- size of what is inside -------------------------------------------------------------------------------------------


def _big(field: str, value: Any, hook: str = "order-sign") -> bytes:
    body = hook_request(hook, [dsv()])
    target = body["context"] if field in ("patientId", "userId", "encounterId", "selections") else body
    target[field] = value
    return orjson.dumps(body)


@pytest.mark.parametrize(
    ("data", "statuses"),
    [
        (_big("hookInstance", "a" * (4 * MB)), {400}),
        (_big("hook", "order-sign" * 400_000), {400}),
        (_big("patientId", "p" * (4 * MB)), {200}),
        (_big("userId", "Practitioner/" + "u" * (4 * MB)), {200}),
        (_big("extension", {f"k{i}": i for i in range(250_000)}), {200}),
        (_big("prefetch", {"coverage": [None] * 1_000_000}), {200}),
        (orjson.dumps(hook_request("order-sign", [dsv(note=[{"text": "spine " * 700_000}])])), {200}),
        (orjson.dumps(hook_request("order-sign", [{"resourceType": "Basic"}] * 120_000)), {200}),
        (orjson.dumps(hook_request("order-sign", [dsv(f"sr{i}") for i in range(1000)])), {200}),
        (orjson.dumps(hook_request("order-sign", [dsv(bodySite=[{"text": "x"}] * 200_000)])), {200}),
        (
            orjson.dumps(hook_request("order-sign", [dsv(code={"coding": [{"system": CPT, "code": "1"}] * 80_000})])),
            {200},
        ),
        (orjson.dumps({"hook": "order-sign", "x": [0] * 2_000_000}), {400}),
    ],
    ids=[
        "hookInstance-4MB",
        "hook-4MB",
        "patientId-4MB",
        "userId-4MB",
        "extension-250k-keys",
        "prefetch-1M-nulls",
        "note-4MB",
        "entries-120k",
        "orders-1000",
        "bodySite-200k",
        "codings-80k",
        "array-2M-numbers",
    ],
)
def test_absurd_sizes_inside_the_limit_are_answered(client: FlaskClient, data: bytes, statuses: set[int]) -> None:
    assert len(data) <= LIMIT
    response = post(client, data)
    assert_sound(response)
    assert response.status_code in statuses


@pytest.mark.timeout(15)
def test_many_selections_do_not_make_a_call_slow(client: FlaskClient) -> None:
    """150 000 selections against 200 orders: matching indexes the selections (O(n + m), not O(n * m)).

    The unindexed scan needed ~25 s for this size; the 15 s limit sits far from both, so it is not a timing
    assertion in disguise.
    """
    orders = [dsv(f"sr{i}") for i in range(200)]
    selections = [f"ServiceRequest/sr{i % 200}" for i in range(150_000)]
    data = orjson.dumps(hook_request("order-select", orders, selections=selections))
    assert len(data) <= LIMIT
    response = post(client, data, SELECT)
    assert_status(response, 200, SELECT)
    assert len(response.json["cards"]) == 200


@pytest.mark.timeout(15)
def test_many_selections_of_unknown_orders_are_a_quick_400(client: FlaskClient) -> None:
    orders = [dsv(f"sr{i}") for i in range(200)]
    selections = ["ServiceRequest/sr7"] + [str(i) for i in range(450_000)]
    data = orjson.dumps(hook_request("order-select", orders, selections=selections))
    assert len(data) <= LIMIT
    response = post(client, data, SELECT)
    assert_status(response, 400, SELECT)
    message = response.json["issue"][0]["diagnostics"]
    assert "'0', '1', '2', '3', '4' and 449995 more" in message and len(message) < 300


# --- type confusion ---------------------------------------------------------------------------------------------------


def _with(path: str, value: Any, hook: str = "order-sign") -> dict[str, Any]:
    body = hook_request(hook, [dsv(), medication_request()])
    *parents, last = path.split(".")
    node: Any = body
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return body


CONFUSED: list[tuple[str, Any, int]] = [
    ("hook", 123, 400),
    ("hook", ["order-sign"], 400),
    ("hook", None, 400),
    ("hookInstance", 12345678, 400),
    ("hookInstance", str(uuid.uuid4()).upper(), 200),
    ("hookInstance", {"id": str(uuid.uuid4())}, 400),
    ("context", [], 400),
    ("context", "patient", 400),
    ("context.draftOrders", [], 400),
    ("context.draftOrders", "Bundle", 400),
    ("context.draftOrders.resourceType", ["Bundle"], 400),
    ("context.draftOrders.entry", {"resource": dsv()}, 200),  # an object where an array belongs
    ("context.draftOrders.entry", "many", 200),
    ("context.draftOrders.entry", [1, "x", None, [], {"resource": 5}], 200),
    ("context.draftOrders.entry.0.resource.id", 17, 200),
    ("context.draftOrders.entry.0.resource.id", "", 200),
    ("context.draftOrders.entry.0.resource.resourceType", 5, 200),
    ("context.draftOrders.entry.0.resource.code", "76496", 200),
    ("context.draftOrders.entry.0.resource.code", {"coding": {"system": CPT, "code": "76496"}}, 200),
    ("context.draftOrders.entry.0.resource.code", {"coding": [{"system": CPT, "code": 76496}]}, 200),
    ("context.draftOrders.entry.0.resource.code", {"coding": [{"system": 5, "code": ["76496"]}]}, 200),
    ("context.draftOrders.entry.0.resource.code", {"text": 1.5e308}, 200),
    ("context.draftOrders.entry.0.resource.bodySite", {"text": "lumbar"}, 200),
    ("context.draftOrders.entry.0.resource.status", ["draft"], 200),
    ("context.draftOrders.entry.0.resource.subject", "Patient/1", 200),
    ("context.draftOrders.entry.0.resource.note", {"text": "x"}, 200),
    ("context.draftOrders.entry.0.resource.extension", {"url": "x"}, 200),
    ("context.draftOrders.entry.0.resource.doNotPerform", "true", 200),
    ("context.patientId", 42, 200),
    ("context.patientId", {"reference": "Patient/1"}, 200),
    ("context.userId", ["Practitioner/1"], 200),
    ("context.encounterId", False, 200),
    ("prefetch", [], 200),
    ("prefetch", {"coverage": "Coverage/1", "patient": 5}, 200),
    ("fhirServer", 443, 200),
    ("fhirServer", "javascript:alert(1)", 200),
    ("fhirAuthorization", "Bearer abc", 200),
    ("fhirAuthorization", {"access_token": 5, "token_type": None}, 200),
    ("extension", [], 200),
    ("extension", {"davinci-crd.configuration": {"max-cards": "10", "coverage-info": "yes"}}, 200),
    ("extension", {"davinci-crd.configuration": {"max-cards": -1e300}}, 200),
    ("extension", {"davinci-crd.configuration": {"max-cards": 10**18}}, 200),
]


@pytest.mark.parametrize(("path", "value", "status"), CONFUSED, ids=[f"{p}={v!r}"[:60] for p, v, _ in CONFUSED])
def test_type_confusion_is_a_400_or_tolerated(client: FlaskClient, path: str, value: Any, status: int) -> None:
    assert_status(post(client, orjson.dumps(_with(path, value))), status)


@pytest.mark.parametrize(
    ("value", "status"),
    [
        (5, 400),
        ({"0": "ServiceRequest/sr1"}, 400),
        ("ServiceRequest/sr1", 200),  # one selection sent bare
        ([1, None, {"ref": "x"}, "ServiceRequest/sr1"], 400),  # a selection that names nothing readable
        (["ServiceRequest/sr1", "ServiceRequest/nope"], 400),  # a selection not in draftOrders
        (["ServiceRequest/sr1"] * 5000, 200),
        ([], 200),
    ],
)
def test_odd_selections(client: FlaskClient, value: Any, status: int) -> None:
    body = _with("context.selections", value, "order-select")
    assert_status(post(client, orjson.dumps(body), SELECT), status, SELECT)


@pytest.mark.parametrize("body", [[], "order-sign", 1, None, True, [{"hook": "order-sign"}]])
def test_a_body_that_is_not_an_object_is_a_400(client: FlaskClient, body: Any) -> None:
    assert_status(post(client, orjson.dumps(body)), 400)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("PUT", SIGN, 405),
        ("DELETE", SIGN, 405),
        ("GET", SIGN, 405),
        ("POST", "/cds-services/" + "x" * 5000, 404),
        ("POST", "/cds-services/%00%0a", 404),
        ("POST", "/cds-services/..%2f..%2fetc%2fpasswd", 404),
        ("POST", "/cds-services/dsv-order-sign/feedback/extra", 404),
    ],
)
def test_wrong_methods_and_paths(client: FlaskClient, method: str, path: str, status: int) -> None:
    response = client.open(path, method=method, data=b"{}", content_type="application/json")
    assert_status(response, status, path)


# --- property test ----------------------------------------------------------------------------------------------------

# Enough examples for CI to find what the tests above did not think of, inside about a minute on 2 shared cores;
# CDS_HYPOTHESIS_EXAMPLES raises it for a longer hunt.
settings.register_profile(
    "cds-hostile",
    max_examples=int(os.environ.get("CDS_HYPOTHESIS_EXAMPLES", "3000")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
HOSTILE = settings.get_profile("cds-hostile")

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(["", " ", "76496", "ServiceRequest/sr1", "order-sign", "draft", "Bundle", "\u202e", "\x00"])
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON document, as the keys and indexes that lead to it."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


def _mutate(draw: Any, doc: Any, path: tuple[Any, ...]) -> None:
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    value = parent[key]
    op = draw(st.sampled_from(["replace", "delete", "wrap", "unwrap", "stringify", "number", "empty", "grow", "add"]))
    if op == "replace":
        parent[key] = draw(_values)
    elif op == "delete":
        del parent[key]
    elif op == "wrap":
        parent[key] = [value] if draw(st.booleans()) else {"value": value}
    elif op == "unwrap" and isinstance(value, list | dict) and value:
        parent[key] = next(iter(value.values())) if isinstance(value, dict) else value[0]
    elif op == "stringify":
        parent[key] = json.dumps(value) if draw(st.booleans()) else str(value)
    elif op == "number":
        parent[key] = draw(st.sampled_from([0, -1, 1.5, 2**63 - 1, -(2**63), 1e308, -0.0, 10**19]))
    elif op == "empty":
        parent[key] = draw(st.sampled_from([[], {}, "", None]))
    elif op == "grow":
        # Bounded so repeated growth stays inside the body limit and the example stays fast.
        size = len(json.dumps(value))
        if draw(st.booleans()):
            parent[key] = [value] * max(2, min(draw(st.integers(2, 300)), 20_000 // size))
        else:
            parent[key] = str(value)[:200] * 1000
    elif op == "add" and isinstance(value, dict):
        value[draw(st.text(max_size=12))] = draw(_values)


@st.composite
def mutated(draw: Any, base: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 4))):
        paths = list(_paths(doc))
        if not paths:
            break
        _mutate(draw, doc, draw(st.sampled_from(paths)))
    return doc


def _valid_hook(hook: str) -> dict[str, Any]:
    orders = [
        dsv("sr1", bodySite=[{"text": "lumbar spine"}], reasonCode=[{"text": "low back pain"}]),
        service_request("sr2", text="MRI lumbar spine", cpt="72148"),
        medication_request("med1"),
    ]
    body = hook_request(hook, orders, selections=["ServiceRequest/sr1"] if hook == "order-select" else None)
    body["prefetch"] = {
        "patient": {"resourceType": "Patient", "id": "pat-1"},
        "coverage": {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [{"resource": {"resourceType": "Coverage", "id": "cov-1", "status": "active"}}],
        },
    }
    body["extension"] = {"davinci-crd.configuration": {"coverage-info": True, "max-cards": 5}}
    return body


VALID_SELECT = _valid_hook("order-select")
VALID_SIGN = _valid_hook("order-sign")
VALID_FEEDBACK = {
    "feedback": [
        {
            "card": "5d4c3b2a-1f0e-4d9c-8b7a-6f5e4d3c2b1a",
            "outcome": "accepted",
            "acceptedSuggestions": [{"id": "0f1e2d3c-4b5a-4697-8877-665544332211"}],
            "outcomeTimestamp": "2026-05-04T10:15:00Z",
        },
        {
            "card": "5d4c3b2a-1f0e-4d9c-8b7a-6f5e4d3c2b1a",
            "outcome": "overridden",
            "overrideReason": {
                "reason": {"system": "http://example.org/reasons", "code": "research-study", "display": "Research"},
                "userComment": "enrolled in a trial",
            },
            "outcomeTimestamp": "2026-05-04T10:16:00+02:00",
        },
    ]
}


def _encode(doc: Any) -> bytes:
    # json, not orjson: it writes integers past 64 bits, as a client could.
    return json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")


def test_the_property_test_starts_from_valid_requests(client: FlaskClient) -> None:
    """Mutations must start from answers the service accepts, or the property test proves little."""
    select = assert_status(post(client, _encode(VALID_SELECT), SELECT), 200, SELECT)
    assert len(select["cards"]) == 1
    sign = assert_status(post(client, _encode(VALID_SIGN), SIGN), 200, SIGN)
    assert len(sign["cards"]) == 1
    assert_status(post(client, _encode(VALID_FEEDBACK), FEEDBACK), 200, FEEDBACK)


@HOSTILE
@given(st.data())
def test_mutated_requests_never_cause_a_5xx(client: FlaskClient, data: st.DataObject) -> None:
    path, base = data.draw(
        st.sampled_from([(SELECT, VALID_SELECT), (SIGN, VALID_SIGN), (FEEDBACK, VALID_FEEDBACK)]), label="target"
    )
    doc = data.draw(mutated(base), label="body")
    response = post(client, _encode(doc), path)
    event(f"{path.rsplit('/', 1)[-1]}: {response.status_code}")  # --hypothesis-show-statistics shows the spread
    assert_sound(response, path)


# Damaged bytes mostly stop at the JSON parser: a third of the examples is plenty.
@settings(HOSTILE, max_examples=max(1, HOSTILE.max_examples // 3))
@given(st.data())
def test_damaged_bytes_never_cause_a_5xx(client: FlaskClient, data: st.DataObject) -> None:
    path, base = data.draw(
        st.sampled_from([(SELECT, VALID_SELECT), (SIGN, VALID_SIGN), (FEEDBACK, VALID_FEEDBACK)]), label="target"
    )
    raw = bytearray(_encode(base))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw)))
        op = data.draw(st.sampled_from(["cut", "insert", "flip", "delete"]))
        if op == "cut":
            del raw[at:]
        elif op == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "flip" and at < len(raw):
            raw[at] = data.draw(st.integers(0, 255))
        elif op == "delete":
            del raw[at : at + data.draw(st.integers(1, 16))]
    response = post(client, bytes(raw), path)
    event(f"{path.rsplit('/', 1)[-1]}: {response.status_code}")
    assert_sound(response, path)
