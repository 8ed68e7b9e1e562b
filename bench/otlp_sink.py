"""A do-nothing OTLP/HTTP collector on 127.0.0.1 for benchmarks: takes every export, answers 200, counts requests.

Run: `python bench/otlp_sink.py --port 4318` and give the service OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318
(bench/README.md, tracing cost). It does not decode the spans, so its own CPU stays small beside the service's.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOST = "127.0.0.1"  # the only address it binds
_counts = {"requests": 0, "bytes": 0}
_lock = threading.Lock()


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def do_POST(self) -> None:
        size = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(size)
        with _lock:
            _counts["requests"] += 1
            _counts["bytes"] += size
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer((HOST, args.port), Sink)
    server.daemon_threads = True

    def stop(_signum: int, _frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"OTLP sink on http://{HOST}:{args.port}", file=sys.stderr, flush=True)
    server.serve_forever()
    print(f"OTLP sink: {_counts['requests']} export requests, {_counts['bytes']} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
