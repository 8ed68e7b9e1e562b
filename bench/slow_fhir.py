"""Mixed load with a slow FHIR server (issue 12): prefetched calls at a fixed rate while N callers wait on FHIR reads.

Run: `python bench/slow_fhir.py` (about 2 minutes per build) or `--quick`. See bench/README.md.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bodies  # noqa: E402
import run  # noqa: E402
import tokens  # noqa: E402

HOST = run.HOST
HOOK_PATH = run.HOOK_PATH
# Targets from issue 12.
TARGET_P99_MS = 100.0
FHIR_TIMEOUT_S = 3.0  # the service's default CDS_FHIR_TIMEOUT
TARGET_SLOW_S = FHIR_TIMEOUT_S + 0.5


def log(message: str) -> None:
    print(f"[slow-fhir {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Call:
    """One call's outcome: latency from its scheduled start (open loop) or its send (closed loop)."""

    seconds: float
    status: int
    cards: int
    actions: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and self.cards == 1


@dataclass
class Scenario:
    label: str
    slow_callers: int
    prefetched: list[Call] = field(default_factory=list)
    slow: list[Call] = field(default_factory=list)
    other_load: float = 0.0

    def summary(self) -> dict[str, Any]:
        fast = sorted(c.seconds for c in self.prefetched)
        slow = sorted(c.seconds for c in self.slow)
        return {
            "service": self.label,
            "slow_callers": self.slow_callers,
            "prefetched_calls": len(fast),
            "prefetched_errors": sum(not c.ok for c in self.prefetched),
            "p50_ms": percentile(fast, 50) * 1e3,
            "p99_ms": percentile(fast, 99) * 1e3,
            "max_ms": (fast[-1] if fast else float("nan")) * 1e3,
            "over_1s": sum(s > 1.0 for s in fast),
            "slow_calls": len(slow),
            "slow_errors": sum(not c.ok for c in self.slow),
            "slow_with_action": sum(c.actions > 0 for c in self.slow),
            "slow_min_s": slow[0] if slow else float("nan"),
            "slow_median_s": statistics.median(slow) if slow else float("nan"),
            "slow_max_s": slow[-1] if slow else float("nan"),
            "other_load": self.other_load,
        }


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of sorted values."""
    if not values:
        return float("nan")
    rank = max(1, round(pct / 100 * len(values) + 0.5 - 1e-9))
    return values[min(rank, len(values)) - 1]


class Tokens:
    """Pre-signed tokens for one server, each handed out once (the service refuses a replayed jti)."""

    def __init__(self, signer: tokens.Signer | None, audience: str, count: int) -> None:
        self._pool = deque(tokens.sign_pool(signer, audience, count) if signer else [])
        self._lock = threading.Lock()
        self.enabled = signer is not None

    def take(self) -> str | None:
        if not self.enabled:
            return None
        with self._lock:
            return self._pool.popleft() if self._pool else None


def post(port: int, body: bytes, token: str | None, timeout: float = 30.0) -> tuple[int, bytes]:
    """One call on a new connection, as separate clinicians' calls arrive (the kernel picks the worker)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", HOOK_PATH, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def timed_call(port: int, body: bytes, pool: Tokens, since: float) -> Call:
    token = pool.take()
    if pool.enabled and token is None:
        return Call(0.0, 0, 0, 0, "the bench ran out of signed tokens")
    try:
        status, data = post(port, body, token)
    except Exception as exc:  # a refused or cut connection is a result to report, not a crash
        return Call(time.perf_counter() - since, 0, 0, 0, f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - since
    if status != 200:
        return Call(seconds, status, 0, 0, data[:200].decode(errors="replace"))
    answer = orjson.loads(data)
    return Call(seconds, status, len(answer.get("cards", [])), len(answer.get("systemActions", [])))


def run_scenario(
    server: run.Server,
    pool: Tokens,
    fast_bodies: list[bytes],
    slow_bodies: list[bytes],
    args: argparse.Namespace,
    slow_callers: int,
) -> Scenario:
    scenario = Scenario(server.kind, slow_callers)
    stop = threading.Event()
    lock = threading.Lock()

    def slow_loop(index: int) -> None:
        n = 0
        while not stop.is_set():
            started = time.perf_counter()
            call = timed_call(server.port, slow_bodies[(index + n) % len(slow_bodies)], pool, started)
            n += 1
            with lock:
                scenario.slow.append(call)
            # A caller (a clinician signing orders) calls again at most once per FHIR delay: when the service
            # answers at once (an open breaker), it must not turn into a tight loop.
            stop.wait(max(0.0, args.fhir_delay - (time.perf_counter() - started)))

    callers = [threading.Thread(target=slow_loop, args=(i,), daemon=True) for i in range(slow_callers)]
    for thread in callers:
        thread.start()
    if slow_callers:
        time.sleep(min(1.0, args.fhir_delay / 2))  # the slow calls are in flight before the measured calls start
    ours_before = server.cpu_ticks()
    busy_before, total_before = run.cpu_busy()
    self_before = time.process_time()
    count = int(args.rate * args.duration)
    futures = []
    with ThreadPoolExecutor(max_workers=64) as senders:
        start = time.perf_counter() + 0.05
        for i in range(count):
            due = start + i / args.rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            # Latency counts from the scheduled time: a sender that fell behind does not hide the server's delay.
            futures.append(senders.submit(timed_call, server.port, fast_bodies[i % len(fast_bodies)], pool, due))
        scenario.prefetched = [f.result() for f in futures]
    hz = os.sysconf("SC_CLK_TCK")
    busy_after, total_after = run.cpu_busy()
    ours = (server.cpu_ticks() - ours_before) / hz + (time.process_time() - self_before)
    total = (total_after - total_before) / hz
    scenario.other_load = max(0.0, (busy_after - busy_before) / hz - ours) / total if total else 0.0
    stop.set()
    for thread in callers:
        thread.join(timeout=60)
    return scenario


def start_service(spec: run.ServiceSpec, workdir: Path, issuers: Path | None) -> run.Server:
    port = run.free_port()
    command = [sys.executable, "-m", "cds_service", "serve", "--host", HOST, "--port", str(port), *spec.serve_args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}
    if spec.src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(spec.src), env.get("PYTHONPATH")]))
    env |= {
        "CDS_DATABASE_URL": f"sqlite:///{workdir / f'cds-{port}.sqlite3'}",
        "CDS_PUBLIC_URL": f"http://{HOST}:{port}",
        "CDS_ALLOW_HTTP_FHIR": "true",  # the stand-in FHIR server is plain http on loopback
    }
    if issuers is not None:
        env |= {"CDS_AUTH": "jwt", "CDS_TRUSTED_ISSUERS": str(issuers)}
    else:
        env["CDS_AUTH"] = "off"
    env.update(dict(spec.env))
    server = run.Server(spec.label, run.Variant(), command, env, workdir)
    server.start()
    return server


def render(results: dict[str, Any]) -> str:
    out = [
        f"Machine: {results['machine']['nproc']} x {results['machine']['cpu']}; {results['machine']['date']}",
        f"Services: {results['services']}",
        f"Load: {results['rate']:.0f} prefetched calls/s (open loop, new connection each) for "
        f"{results['duration']:.0f} s per row, plus N closed-loop callers whose Coverage is read from a FHIR "
        f"server answering after {results['fhir_delay']:.1f} s; {results['auth']}",
        "",
        "| service | slow callers | prefetched calls | errors | p50 ms | p99 ms | max ms | over 1 s | slow calls "
        "(with systemAction) | slow errors | slow min / median / max s | other load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    for row in results["rows"]:
        out.append(
            f"| {row['service']} | {row['slow_callers']} | {row['prefetched_calls']} | {row['prefetched_errors']} | "
            f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['max_ms']:.0f} | {row['over_1s']} | "
            f"{row['slow_calls']} ({row['slow_with_action']}) | {row['slow_errors']} | "
            f"{row['slow_min_s']:.2f} / {row['slow_median_s']:.2f} / {row['slow_max_s']:.2f} | "
            f"{row['other_load']:.0%} |"
        )
        if row["slow_callers"]:
            ok = row["p99_ms"] <= TARGET_P99_MS and row["prefetched_errors"] == 0
            slow_ok = row["slow_errors"] == 0 and not row["slow_max_s"] > TARGET_SLOW_S
            checks.append(
                f"{row['service']}, {row['slow_callers']} slow callers: prefetched p99 {row['p99_ms']:.0f} ms "
                f"(<= {TARGET_P99_MS:.0f}, no errors) {'ok' if ok else 'MISSED'}; slow calls max "
                f"{row['slow_max_s']:.2f} s (<= {TARGET_SLOW_S:.1f}, each with its card) "
                f"{'ok' if slow_ok else 'MISSED'}"
            )
    return "\n".join([*out, "", "Targets (issue 12):", "", *[f"- {c}" for c in checks]])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slow-callers", default="0,2,4,8", help="comma list of concurrent slow callers per row")
    parser.add_argument("--rate", type=float, default=40.0, help="prefetched calls per second (open loop)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per row (default 20; quick 8)")
    parser.add_argument("--fhir-delay", type=float, default=2.0, help="seconds the FHIR server takes to answer")
    parser.add_argument("--quick", action="store_true", help="8 s per row")
    parser.add_argument("--jwt-alg", choices=(*tokens.ALGORITHMS, "off"), default="ES384")
    parser.add_argument(
        "--service",
        action="append",
        type=run.ServiceSpec.parse,
        default=[],
        metavar="LABEL=SRC[,CDS_NAME=VALUE...][,--serve-option=VALUE...]",
        help="a build (and settings) to measure; repeat to compare in one run (rows alternate between them)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args(argv)
    args.services = args.service or [run.ServiceSpec()]
    args.duration = args.duration or (8.0 if args.quick else 20.0)
    args.counts = [int(n) for n in args.slow_callers.split(",") if n.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, Any] = {
        "machine": run.machine(),
        "rate": args.rate,
        "duration": args.duration,
        "fhir_delay": args.fhir_delay,
        "services": "; ".join(spec.describe() for spec in args.services),
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="cds-slow-fhir-") as tmp, run.stopping_servers():
        workdir = Path(tmp)
        stub = run.FhirStub(args.fhir_delay)
        signer = tokens.make_signer(args.jwt_alg) if args.jwt_alg != "off" else None
        issuers = tokens.write_trusted_issuers(signer, workdir / "issuers.json") if signer else None
        results["auth"] = f"CDS_AUTH=jwt, a fresh {args.jwt_alg} token per call" if signer else "CDS_AUTH=off"
        fast = [orjson.dumps(bodies.order_sign_body(5, variant=v)) for v in range(32)]
        slow = [orjson.dumps(bodies.order_sign_body(5, variant=v, fhir_server=stub.url)) for v in range(32)]
        servers: dict[str, run.Server] = {}
        pools: dict[str, Tokens] = {}
        try:
            for spec in args.services:
                server = start_service(spec, workdir, issuers)
                servers[spec.label] = server
                slow_estimate = sum(n * (args.duration + 2) / max(args.fhir_delay, 0.05) for n in args.counts)
                count = int(args.rate * args.duration * len(args.counts) * 1.1 + slow_estimate * 1.5 + 200)
                pools[spec.label] = Tokens(signer, f"http://{HOST}:{server.port}{HOOK_PATH}", count)
                # Warm-up, and a check that both kinds of call work as the table assumes.
                for i in range(50):
                    call = timed_call(server.port, fast[i % len(fast)], pools[spec.label], time.perf_counter())
                    if not call.ok or call.actions != 1:
                        raise RuntimeError(f"{spec.label}: a prefetched call failed: {call}")
                call = timed_call(server.port, slow[0], pools[spec.label], time.perf_counter())
                if not call.ok:
                    raise RuntimeError(f"{spec.label}: a call reading the FHIR server failed: {call}")
                log(f"{spec.label} up on port {server.port}")
            for index, n in enumerate(args.counts):
                labels = list(servers)
                order = labels[index % len(labels) :] + labels[: index % len(labels)]
                for label in order:
                    scenario = run_scenario(servers[label], pools[label], fast, slow, args, n)
                    row = scenario.summary()
                    results["rows"].append(row)
                    log(
                        f"{label} slow={n}: prefetched p50 {row['p50_ms']:.1f} p99 {row['p99_ms']:.1f} max "
                        f"{row['max_ms']:.0f} ms errors {row['prefetched_errors']}; slow {row['slow_calls']} calls "
                        f"max {row['slow_max_s']:.2f} s; other load {row['other_load']:.0%}"
                    )
        finally:
            for server in servers.values():
                server.stop()
            stub.close()
    results["rows"].sort(key=lambda r: (r["service"], r["slow_callers"]))
    run.save_results(render(results), results, "slow-fhir-", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
