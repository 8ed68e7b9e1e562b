"""The CPU a hook call costs with tracing off and on, in-process (bench/README.md, tracing cost).

Run: `python bench/tracing_cost.py` (about a minute). One app answers the same 5-order order-sign call through
Flask's test client in alternating rounds: tracing off (as shipped), then on with the real set-up (`tracing.setup`:
batched OTLP/HTTP export) to a do-nothing collector on 127.0.0.1 (bench/otlp_sink.py, a subprocess). CPU time is
this process's, all threads (the exporter's included), per call.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bodies  # noqa: E402
import orjson  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    from cds_service import create_app
    from cds_service.ops import tracing

    port = free_port()
    sink = subprocess.Popen([sys.executable, str(HERE / "otlp_sink.py"), "--port", str(port)])
    try:
        time.sleep(0.5)
        with tempfile.TemporaryDirectory(prefix="cds-tracing-cost-") as tmp:
            app = create_app({"AUTH": "off", "AUDIT": False, "DATABASE_URL": f"sqlite:///{tmp}/x.sqlite3"})
            client = app.test_client()
            pool = [orjson.dumps(bodies.order_sign_body(5, variant=v)) for v in range(50)]
            path = f"/cds-services/{bodies.SERVICE}"
            headers = {"Content-Type": "application/json"}
            for n in range(300):  # warm-up: imports, caches, the engine's memo
                if client.post(path, data=pool[n % 50], headers=headers).status_code != 200:
                    raise RuntimeError("the warm-up call was not answered")
            environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"}
            results: dict[str, list[float]] = {"off": [], "on": []}
            for _ in range(args.rounds):
                for mode in ("off", "on"):
                    if mode == "on" and not tracing.setup(environ):
                        raise RuntimeError("tracing did not turn on")
                    started = time.process_time()
                    for n in range(args.calls):
                        client.post(path, data=pool[n % 50], headers=headers)
                    if mode == "on":
                        tracing.flush()  # the spans' export belongs to the calls that made them
                    results[mode].append((time.process_time() - started) / args.calls * 1e6)
                    tracing.stop()
    finally:
        sink.terminate()
        sink.wait(timeout=10)
    off, on = statistics.median(results["off"]), statistics.median(results["on"])
    print(f"calls per round {args.calls}, rounds {args.rounds}, 5-order order-sign body, audit off")
    print(f"tracing off: {off:.0f} us CPU per call (rounds: {', '.join(f'{v:.0f}' for v in results['off'])})")
    print(f"tracing on:  {on:.0f} us CPU per call (rounds: {', '.join(f'{v:.0f}' for v in results['on'])})")
    print(f"cost of tracing: {on - off:.0f} us per call ({(on - off) / off:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
