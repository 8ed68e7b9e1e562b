"""HTTP rules shared by the Flask routes and the lean hook route: body reading, security headers, CORS headers."""

from __future__ import annotations

from typing import Any

from ..engine import InvalidRequest, parse_json
from ..errors import BadRequest, ServiceError

Headers = list[tuple[str, str]]

# Paths whose answers hold patient-specific guidance: never cached (service calls and feedback).
NO_STORE_PREFIX = "/cds-services/"

# Headers a security review expects on a JSON API: no sniffing, and JSON is never a document to render, so nothing
# may load from it or frame it if a browser opens it anyway.
SECURITY_HEADERS: Headers = [
    ("X-Content-Type-Options", "nosniff"),
    ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"),
    ("Referrer-Policy", "no-referrer"),
]


def security_headers(path: str, status: int) -> Headers:
    """The security headers of an answer; patient guidance and errors are never cached."""
    if path.startswith(NO_STORE_PREFIX) or status >= 400:
        return [*SECURITY_HEADERS, ("Cache-Control", "no-store")]
    return SECURITY_HEADERS


class Cors:
    """CORS for browser clients (the CDS Hooks sandbox): listed origins only, errors included, no credentials.

    CDS Hooks authenticates with a bearer JWT, not cookies, so Allow-Credentials is never sent; that is what makes
    a configured "*" safe. Preflights are answered before authentication: browsers send them without the JWT.
    """

    def __init__(self, origins: tuple[str, ...]) -> None:
        self.allowed = frozenset(o.lower() for o in origins)
        self.any_origin = "*" in self.allowed

    def allowed_origin(self, origin: str | None) -> str | None:
        if not origin:
            return None
        if self.any_origin:
            return "*"
        # Echo the origin exactly as the browser sent it; compare as browsers serialise it (lower case).
        return origin if origin.lower() in self.allowed else None

    def headers(self, origin: str | None) -> Headers:
        """The CORS headers of an answer (not a preflight) to a request from `origin`."""
        out: Headers = []
        if self.allowed and not self.any_origin:
            # The answer differs by Origin: a shared cache must not hand one origin's answer to another.
            out.append(("Vary", "Origin"))
        allowed = self.allowed_origin(origin)
        if allowed:
            out.append(("Access-Control-Allow-Origin", allowed))
        return out


def require_json_content_type(content_type: str | None) -> None:
    """415 for a body declared as anything but JSON; a missing Content-Type is read as JSON.

    CDS Hooks 2.0 calls and feedback are "application/json"; FHIR's "application/fhir+json" and any other "+json"
    type (RFC 6839 structured syntax suffix) are JSON too, with or without parameters such as charset. A text/plain
    or form body is what a browser may send cross-origin without a CORS preflight: refusing it keeps such a page
    from calling the service unasked. (Flask's own get_json refuses non-JSON types the same way.)
    """
    if not content_type:
        return
    mimetype = content_type.split(";", 1)[0].strip().lower()
    if mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json")):
        return
    raise ServiceError(
        415,
        f"The request body must be JSON (Content-Type application/json), not {mimetype[:100]!r}.",
        expression="Content-Type",
    )


def too_large(limit: int) -> str:
    return f"The request body is too large (limit {limit / 1_048_576:.3g} MB)."


def read_body(environ: dict[str, Any], limit: int) -> bytes:
    """The request body, at most `limit` bytes: 413 for a longer one (before reading when Content-Length says so)."""
    stream = environ["wsgi.input"]
    raw_length = environ.get("CONTENT_LENGTH")
    if raw_length:
        try:
            length = int(raw_length)
        except ValueError:
            raise BadRequest("The Content-Length header is not a number.", expression="Content-Length") from None
        if length < 0:
            raise BadRequest("The Content-Length header is negative.", expression="Content-Length")
        if length > limit:
            raise ServiceError(413, too_large(limit))
        return _read(stream, length)
    if not environ.get("wsgi.input_terminated"):
        return b""  # no length and a stream the server does not end: no body (what werkzeug reads too)
    # A streamed (chunked) body: one byte past the limit tells a body of exactly the limit from a longer one.
    data = _read(stream, limit + 1)
    if len(data) > limit:
        raise ServiceError(413, too_large(limit))
    return data


def _read(stream: Any, size: int) -> bytes:
    chunks: list[bytes] = []
    left = size
    while left > 0:
        chunk = stream.read(min(left, 1 << 20))
        if not chunk:
            break  # the client sent less than it announced
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_json(environ: dict[str, Any], limit: int) -> Any:
    """The request body as JSON: 415 when declared as another type, 413 over the size limit (before parsing), 400
    when it is not JSON or too deep."""
    require_json_content_type(environ.get("CONTENT_TYPE"))
    try:
        return parse_json(read_body(environ, limit))
    except InvalidRequest as exc:
        raise BadRequest(exc.message, expression=exc.expression) from None
