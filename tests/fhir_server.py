"""A small real FHIR server stand-in on 127.0.0.1 for tests: Coverage searches, bearer tokens, delays, failures,
drip-fed answers, connections that hang, endless pages, TLS."""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class FhirBehaviour:
    """What the stand-in does; tests change it between calls."""

    coverages: list[dict[str, Any]] = field(default_factory=list)
    token: str | None = None  # when set, requests must carry exactly this bearer token (else 401)
    delay: float = 0.0  # seconds before answering
    status: int = 200  # answer this status instead of a Bundle
    page_size: int = 50
    requests: list[dict[str, Any]] = field(default_factory=list)
    drip: float = 0.0  # send the body one byte every `drip` seconds (headers at once)
    drip_all: bool = False  # with drip: the status line and headers too
    hang: bool = False  # read the request, then never answer (until the stand-in stops)
    endless: bool = False  # every searchset page links a next one
    padding: int = 0  # bytes of whitespace added to the body (a long drip-fed answer)
    released: threading.Event = field(default_factory=threading.Event)  # set when the stand-in stops
    # Other resources it serves (ServiceRequests): read by Type/id or searched by _id; `failing` answers a type's
    # requests with a status instead (a 500 for ServiceRequest while Coverage answers).
    resources: list[dict[str, Any]] = field(default_factory=list)
    failing: dict[str, int] = field(default_factory=dict)
    # Resources written by batch Bundles (POST to the base URL), by "Type/id", and the batches received.
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)
    batches: list[dict[str, Any]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def do_GET(self) -> None:
        behaviour = self.server.behaviour
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        behaviour.requests.append(
            {
                "path": url.path,
                "query": query,
                "authorization": self.headers.get("Authorization"),
                "traceparent": self.headers.get("traceparent"),
            }
        )
        if behaviour.hang:
            behaviour.released.wait(60)
            return None
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
        kind = url.path.rstrip("/").split("/fhir/", 1)[-1].split("/")[0]
        if kind in behaviour.failing:
            return self._send(
                behaviour.failing[kind],
                {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception"}]},
            )
        if not url.path.endswith("/Coverage"):
            return self._other(url.path, query)
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
        if offset + behaviour.page_size < len(matches) or behaviour.endless:
            base = f"{self.server.scheme}://127.0.0.1:{self.server.server_address[1]}{url.path}"
            bundle["link"].append(
                {
                    "relation": "next",
                    "url": f"{base}?patient={patient}&status=active&_offset={offset + behaviour.page_size}",
                }
            )
        return self._send(200, bundle)

    def _other(self, path: str, query: dict[str, list[str]]) -> None:
        """Type/id reads and Type?_id=a,b searches over `resources`; anything else is a 404."""
        parts = path.rstrip("/").split("/fhir/", 1)[-1].split("/")
        known = [r for r in self.server.behaviour.resources if r.get("resourceType") == parts[0]]
        if len(parts) == 2:
            found = [r for r in known if r.get("id") == parts[1]]
            if found:
                return self._send(200, found[0])
        elif len(parts) == 1 and "_id" in query:
            ids = {i for value in query["_id"] for i in value.split(",")}
            entries = [{"resource": r} for r in known if r.get("id") in ids]
            return self._send(200, {"resourceType": "Bundle", "type": "searchset", "entry": entries})
        return self._send(
            404, {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]}
        )

    def do_POST(self) -> None:
        """A batch Bundle of PUTs by id, as a FHIR server takes it; each resource validated (FHIR R4B models, whose
        AuditEvent is R4's) before it is stored."""
        behaviour = self.server.behaviour
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        behaviour.batches.append(
            {
                "path": urlsplit(self.path).path,
                "authorization": self.headers.get("Authorization"),
                "contentType": self.headers.get("Content-Type"),
                "entries": len(body.get("entry") or []),
            }
        )
        if behaviour.token is not None and self.headers.get("Authorization") != f"Bearer {behaviour.token}":
            return self._send(
                401, {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "login"}]}
            )
        if behaviour.status != 200:
            return self._send(
                behaviour.status,
                {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception"}]},
            )
        if body.get("resourceType") != "Bundle" or body.get("type") != "batch":
            return self._send(
                400,
                {
                    "resourceType": "OperationOutcome",
                    "issue": [{"severity": "error", "code": "invalid", "diagnostics": "expected a batch Bundle"}],
                },
            )
        entries: list[dict[str, Any]] = []
        for entry in body.get("entry") or []:
            resource, request = entry.get("resource") or {}, entry.get("request") or {}
            key = f"{resource.get('resourceType')}/{resource.get('id')}"
            if request.get("method") != "PUT" or request.get("url") != key:
                entries.append({"response": {"status": "400 Bad Request"}})
                continue
            try:
                _validate(resource)
            except ValueError as exc:
                entries.append(
                    {
                        "response": {
                            "status": "400 Bad Request",
                            "outcome": {
                                "resourceType": "OperationOutcome",
                                "issue": [{"severity": "error", "code": "invalid", "diagnostics": str(exc)[:500]}],
                            },
                        }
                    }
                )
                continue
            created = key not in behaviour.stored
            behaviour.stored[key] = resource
            entries.append({"response": {"status": "201 Created" if created else "200 OK", "location": key}})
        return self._send(200, {"resourceType": "Bundle", "type": "batch-response", "entry": entries})

    def _send(self, status: int, body: dict[str, Any]) -> None:
        behaviour = self.server.behaviour
        data = json.dumps(body).encode() + b" " * behaviour.padding
        if behaviour.drip and behaviour.drip_all:
            head = (
                f"HTTP/1.1 {status} X\r\nContent-Type: application/fhir+json\r\nContent-Length: {len(data)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            return self._drip(head + data)
        self.send_response(status)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if behaviour.drip:
            self.wfile.flush()
            return self._drip(data)
        self.wfile.write(data)
        return None

    def _drip(self, data: bytes) -> None:
        """One byte at a time, until done, the client goes away or the stand-in stops."""
        behaviour = self.server.behaviour
        with suppress(OSError):
            for i in range(len(data)):
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()
                if behaviour.released.wait(behaviour.drip):
                    return


def _validate(resource: dict[str, Any]) -> None:
    """ValueError (pydantic's ValidationError) when the resource is not a valid FHIR resource of its type."""
    from fhir.resources.R4B import get_fhir_model_class

    get_fhir_model_class(str(resource.get("resourceType"))).model_validate(resource)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    behaviour: FhirBehaviour
    scheme = "http"


@contextmanager
def fhir_server(
    behaviour: FhirBehaviour | None = None, *, tls: FhirCertificate | None = None
) -> Iterator[tuple[str, FhirBehaviour]]:
    """Run the stand-in; yields its base URL ("http://127.0.0.1:<port>/fhir", https with `tls`) and its behaviour."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.behaviour = behaviour or FhirBehaviour()
    if tls is not None:
        server.socket = tls.server_context().wrap_socket(server.socket, server_side=True)
        server.scheme = "https"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"{server.scheme}://127.0.0.1:{server.server_address[1]}/fhir", server.behaviour
    finally:
        server.behaviour.released.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never sends a byte (a TLS handshake that never completes)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            with suppress(TimeoutError, OSError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in accepted:
            conn.close()
        listener.close()


@dataclass(frozen=True)
class FhirCertificate:
    """A self-signed certificate for 127.0.0.1, and the file a client trusts it with."""

    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def make_certificate(folder: Path) -> FhirCertificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cds-test-fhir")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "fhir-cert.pem", folder / "fhir-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return FhirCertificate(cert_file, key_file)


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
