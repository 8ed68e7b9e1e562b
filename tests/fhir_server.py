"""A small real FHIR server stand-in on 127.0.0.1 for tests: Coverage searches, bearer tokens, delays, failures."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class FhirBehaviour:
    """What the stand-in does; tests change it between calls."""

    coverages: list[dict[str, Any]] = field(default_factory=list)
    token: str | None = None  # when set, requests must carry exactly this bearer token (else 401)
    delay: float = 0.0  # seconds before answering
    status: int = 200  # answer this status instead of a Bundle
    page_size: int = 50
    requests: list[dict[str, Any]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def do_GET(self) -> None:
        behaviour = self.server.behaviour
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        behaviour.requests.append(
            {"path": url.path, "query": query, "authorization": self.headers.get("Authorization")}
        )
        if behaviour.delay:
            time.sleep(behaviour.delay)
        if behaviour.token is not None and self.headers.get("Authorization") != f"Bearer {behaviour.token}":
            return self._send(
                401, {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "login"}]}
            )
        if behaviour.status != 200:
            return self._send(
                behaviour.status,
                {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception"}]},
            )
        if not url.path.endswith("/Coverage"):
            return self._send(
                404, {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]}
            )
        patient = (query.get("patient") or [""])[0]
        matches = [
            c
            for c in behaviour.coverages
            if c.get("beneficiary", {}).get("reference") in (f"Patient/{patient}", patient)
        ]
        offset = int((query.get("_offset") or ["0"])[0])
        page = matches[offset : offset + behaviour.page_size]
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(matches),
            "entry": [{"resource": c} for c in page],
            "link": [],
        }
        if offset + behaviour.page_size < len(matches):
            base = f"http://127.0.0.1:{self.server.server_address[1]}{url.path}"
            bundle["link"].append(
                {
                    "relation": "next",
                    "url": f"{base}?patient={patient}&status=active&_offset={offset + behaviour.page_size}",
                }
            )
        return self._send(200, bundle)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    behaviour: FhirBehaviour


@contextmanager
def fhir_server(behaviour: FhirBehaviour | None = None) -> Iterator[tuple[str, FhirBehaviour]]:
    """Run the stand-in; yields its base URL ("http://127.0.0.1:<port>/fhir") and its behaviour."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.behaviour = behaviour or FhirBehaviour()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/fhir", server.behaviour
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def coverage(cid: str, patient: str = "pat-1", *, status: str = "active", order: int | None = None) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Coverage",
        "id": cid,
        "status": status,
        "beneficiary": {"reference": f"Patient/{patient}"},
        "payor": [{"display": "Example Health Plan"}],
    }
    if order is not None:
        resource["order"] = order
    return resource
