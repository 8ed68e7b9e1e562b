"""Benchmark `cds-service serve` against a bare-Flask baseline on loopback and print one table (see bench/README.md).

Run: `python bench/run.py` (about 3 minutes) or `python bench/run.py --quick` (about 30 seconds).
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bodies  # noqa: E402
import tokens  # noqa: E402

SERVICE_ID = bodies.SERVICE
HOOK_PATH = f"/cds-services/{SERVICE_ID}"
HOST = "127.0.0.1"  # the only address this script ever connects to or binds
SIZES = (5, 50, 500)
# Targets from issue 7, checked in the table.
TARGET_RATIO = 0.60
TARGET_P99_MS = 20.0
TARGET_500_MS = 50.0
TARGET_RSS_MB = 150.0
TARGET_STARTUP_S = 2.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 25.0  # gunicorn's graceful_timeout is 20 s


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------
# Servers


@dataclass(frozen=True)
class Variant:
    """How gunicorn runs: `default` is whatever `cds-service serve` chooses with no options.

    Written CLASS:WORKERS[:THREADS][:NAME=VALUE...], e.g. sync:4, gthread:2:4, gthread:2:4:keepalive=0.
    """

    worker_class: str | None = None
    workers: int | None = None
    threads: int | None = None
    settings: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Variant:
        if text == "default":
            return cls()
        parts = text.split(":")
        plain = [p for p in parts if "=" not in p]
        settings = tuple(tuple(p.split("=", 1)) for p in parts if "=" in p)
        if plain[0] not in ("sync", "gthread") or not 2 <= len(plain) <= 3:
            raise argparse.ArgumentTypeError(f"variant {text!r}: expected default, sync:W or gthread:W:T[:name=value]")
        workers = int(plain[1])
        # gunicorn silently turns sync with threads > 1 into gthread: sync always runs one thread.
        threads = 1 if plain[0] == "sync" else int(plain[2]) if len(plain) == 3 else None
        return cls(plain[0], workers, threads, settings)  # type: ignore[arg-type]

    @property
    def name(self) -> str:
        if self.worker_class is None:
            return "default"
        out = f"{self.worker_class} w{self.workers}" + (f" t{self.threads}" if self.worker_class == "gthread" else "")
        return out + "".join(f" {k}={v}" for k, v in self.settings)

    def serve_args(self) -> list[str]:
        out = []
        if self.workers:
            out += ["--workers", str(self.workers)]
        if self.threads:
            out += ["--threads", str(self.threads)]
        return out

    def gunicorn_sets(self) -> list[str]:
        """--set pairs for serve_variant.py / baseline_app.py: the worker class (when not gthread) and settings."""
        pairs = list(self.settings)
        if self.worker_class not in (None, "gthread"):
            pairs.insert(0, ("worker_class", self.worker_class))
        return [item for name, value in pairs for item in ("--set", f"{name}={value}")]


_RUNNING: list[Server] = []


class Server:
    """A server process in its own process group, so stopping it stops its gunicorn workers too."""

    def __init__(self, kind: str, variant: Variant, command: list[str], env: dict[str, str], workdir: Path) -> None:
        self.kind = kind  # "baseline" or the service's label
        self.is_service = kind != "baseline"
        self.variant = variant
        self.command = command
        self.env = env
        self.workdir = workdir
        self.port = int(command[command.index("--port") + 1])
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{kind}-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> float:
        """Start; seconds from the command to the first 200 on /health."""
        runtime_dir = Path(tempfile.mkdtemp(prefix="xdg-", dir=self.workdir))
        # gunicorn 27 puts a control socket in $XDG_RUNTIME_DIR (else ~/.gunicorn): one per server, not shared.
        env = self.env | {"XDG_RUNTIME_DIR": str(runtime_dir)}
        with self.log_path.open("ab") as out:
            started = time.perf_counter()
            self.proc = subprocess.Popen(
                self.command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir
            )
        _RUNNING.append(self)
        deadline = started + START_TIMEOUT_S
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode} on start:\n{self.log_tail()}")
            try:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=2)
                conn.request("GET", "/health")
                status = conn.getresponse().status
                conn.close()
                if status == 200:
                    return time.perf_counter() - started
            except OSError:
                pass
            time.sleep(0.005)
        raise RuntimeError(f"{self.kind} gave no 200 on /health within {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if self in _RUNNING:
            _RUNNING.remove(self)
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log(f"{self.kind} did not stop in {STOP_TIMEOUT_S:.0f} s: SIGKILL")
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        # Workers that outlived their master (they should not) are in the same group: make sure.
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def pids(self) -> tuple[int, list[int]]:
        """The master's pid and its workers' pids."""
        if self.proc is None:
            raise RuntimeError(f"{self.kind} is not running")
        master = self.proc.pid
        return master, children_of(master)

    def cpu_ticks(self) -> int:
        if self.proc is None:
            return 0
        master, workers = self.pids()
        return sum(process_ticks(pid) for pid in [master, *workers])


def stop_all() -> None:
    for server in list(_RUNNING):
        try:
            server.stop()
        except Exception as exc:  # keep stopping the others
            log(f"stopping {server.kind}: {exc}")


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            out.append(int(entry.name))
    return sorted(out)


def process_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, Pss) in kB: RSS counts the pages shared with the preloaded master, PSS splits them."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def cpu_busy() -> tuple[int, int]:
    """(busy, total) ticks of the whole machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return total - idle, total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class FhirStub:
    """A FHIR server on loopback that answers every read after `delay` seconds: the client's server, when slow."""

    def __init__(self, delay: float) -> None:
        coverage = bodies.order_sign_body(5)["prefetch"]["coverage"]
        answer = orjson.dumps(coverage)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                time.sleep(delay)
                self.send_response(200)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="fhir-stub", daemon=True)
        self.thread.start()
        self.delay = delay
        self.reads = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server.server_address[1]}/fhir"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------------------------------------------
# Load


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    log("wrk is missing: installing the Debian package (apt-get install wrk)")
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=300)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, env=env, timeout=300)
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError("wrk is still missing after apt-get install wrk")
    return found


@dataclass
class LoadResult:
    app: str
    variant: str
    round: int
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    exhausted: int
    other_load: float  # share of the machine's CPU used by processes that are not this benchmark
    cpu_share: float  # share of the machine's CPU used by the server under test
    server_cpu_s: float  # CPU seconds the server (master and workers) used during the run
    busiest_worker: float  # the busiest worker's share of the workers' CPU (1/workers is an even spread)

    @property
    def cpu_ms_per_request(self) -> float:
        return self.server_cpu_s / self.requests * 1e3 if self.requests else float("nan")

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def valid(self) -> bool:
        return self.errors == 0 and self.exhausted == 0


def run_wrk(
    wrk: str,
    server: Server,
    bodies_file: Path,
    token_prefix: Path | None,
    *,
    token_mode: str,
    duration: float,
    connections: int,
    threads: int,
    max_requests: int = 0,
    idle: list[Server] | None = None,
) -> dict[str, Any]:
    """One wrk run against `server`; the BENCH_JSON summary plus the CPU accounting of the run."""
    command = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(HERE / "post.lua"),
        server.url + HOOK_PATH,
        "--",
        str(bodies_file),
        str(token_prefix) if token_prefix else "-",
        token_mode,
        str(max_requests),
    ]
    env = os.environ | {"BENCH_WRK_THREADS": str(threads)}
    server_before = server.cpu_ticks()
    _, workers = server.pids()
    workers_before = {pid: process_ticks(pid) for pid in workers}
    ours_before = server_before + sum(s.cpu_ticks() for s in idle or [])
    busy_before, total_before = cpu_busy()
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    self_before = resource.getrusage(resource.RUSAGE_SELF)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    summary: dict[str, Any] | None = None
    stopped = 0
    deadline = time.monotonic() + duration + 60
    try:
        for line in proc.stdout or []:
            if line.startswith("BENCH_STOPPED"):
                stopped += 1
                if stopped == threads:
                    proc.send_signal(signal.SIGINT)  # every thread has sent its share: end wrk's sleep
            elif line.startswith("BENCH_JSON "):
                summary = json.loads(line[len("BENCH_JSON ") :])
            if time.monotonic() > deadline:
                proc.kill()
                break
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read() if proc.stderr else ""
    if summary is None:
        raise RuntimeError(f"wrk gave no summary (exit {proc.returncode}): {stderr[-2000:]}")
    usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    self_after = resource.getrusage(resource.RUSAGE_SELF)
    busy_after, total_after = cpu_busy()
    hz = os.sysconf("SC_CLK_TCK")
    server_ticks = server.cpu_ticks()
    ours = server_ticks + sum(s.cpu_ticks() for s in idle or []) - ours_before
    ours_s = ours / hz
    ours_s += (usage_after.ru_utime + usage_after.ru_stime) - (usage_before.ru_utime + usage_before.ru_stime)
    ours_s += (self_after.ru_utime + self_after.ru_stime) - (self_before.ru_utime + self_before.ru_stime)
    total_s = (total_after - total_before) / hz
    busy_s = (busy_after - busy_before) / hz
    summary["other_load"] = max(0.0, busy_s - ours_s) / total_s if total_s else 0.0
    summary["cpu_share"] = (server_ticks - server_before) / hz / total_s if total_s else 0.0
    summary["server_cpu_s"] = (server_ticks - server_before) / hz
    # How evenly the workers shared the work: keep-alive connections stay with the worker that accepted them.
    used = [process_ticks(pid) - before for pid, before in workers_before.items()]
    summary["busiest_worker"] = max(used) / sum(used) if sum(used) > 0 else 0.0
    return summary


def load_result(app: str, variant: Variant, rnd: int, summary: dict[str, Any]) -> LoadResult:
    errors = sum(int(summary[k]) for k in ("connect", "read", "write", "status", "timeout"))
    return LoadResult(
        app=app,
        variant=variant.name,
        round=rnd,
        requests=int(summary["requests"]),
        seconds=int(summary["duration_us"]) / 1e6,
        p50_ms=summary["p50"] / 1000,
        p90_ms=summary["p90"] / 1000,
        p99_ms=summary["p99"] / 1000,
        max_ms=summary["max"] / 1000,
        errors=errors,
        exhausted=int(summary["exhausted"]),
        other_load=float(summary["other_load"]),
        cpu_share=float(summary["cpu_share"]),
        server_cpu_s=float(summary["server_cpu_s"]),
        busiest_worker=float(summary["busiest_worker"]),
    )


# --------------------------------------------------------------------------------------------------------------
# The bench


@dataclass(frozen=True)
class ServiceSpec:
    """One build of the service to measure: where cds_service is imported from, and extra settings (experiments)."""

    label: str = "service"
    src: Path | None = None
    env: tuple[tuple[str, str], ...] = ()
    serve_args: tuple[str, ...] = ()  # extra `cds-service serve` options, e.g. ("--threads", "8")

    @classmethod
    def parse(cls, text: str) -> ServiceSpec:
        """LABEL=SRC[,CDS_NAME=VALUE...][,--serve-option=VALUE...]; an empty SRC imports cds_service as installed."""
        label, _, rest = text.partition("=")
        if not label or label == "baseline":
            raise argparse.ArgumentTypeError(f"--service {text!r}: expected LABEL=SRC[,CDS_NAME=VALUE...]")
        src, *items = rest.split(",")
        pairs = tuple(tuple(p.split("=", 1)) for p in items if not p.startswith("--"))
        options = tuple(part for p in items if p.startswith("--") for part in p.split("=", 1))
        return cls(label, Path(src) if src else None, pairs, options)  # type: ignore[arg-type]

    def describe(self) -> str:
        source = f"cds_service from {self.src}" if self.src else "cds_service as installed"
        extra = ", ".join([f"{k}={v}" for k, v in self.env] + [" ".join(self.serve_args)] * bool(self.serve_args))
        return f"{self.label}: {source}, default settings" + (f" except {extra}" if extra else "")


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    wrk: str
    signer: tokens.Signer
    issuers_file: Path
    body_files: dict[int, Path] = field(default_factory=dict)
    body_pools: dict[int, list[bytes]] = field(default_factory=dict)
    auth: str = "jwt"
    auth_note: str = ""
    started: float = field(default_factory=time.monotonic)
    est_rate: float = 3000.0
    fhir: FhirStub | None = None

    # -- budget ---------------------------------------------------------------------------------------------
    def check_budget(self, what: str) -> None:
        spent = time.monotonic() - self.started
        if spent > self.args.max_minutes * 60:
            raise RuntimeError(f"time budget of {self.args.max_minutes} min spent before {what}")

    # -- servers --------------------------------------------------------------------------------------------
    def service(self, variant: Variant, spec: ServiceSpec) -> Server:
        port = free_port()
        sets = variant.gunicorn_sets()
        if sets:
            command = [sys.executable, str(HERE / "serve_variant.py"), *sets, "--"]
        else:
            command = [sys.executable, "-m", "cds_service", "serve"]
        command += ["--host", HOST, "--port", str(port), *variant.serve_args(), *spec.serve_args]
        db = self.workdir / f"cds-{port}.sqlite3"
        env = self.base_env(spec.src) | {
            "CDS_DATABASE_URL": f"sqlite:///{db}",
            # Each server's own audit journal and spill folder (beside its database): one server never replays
            # another's records into its database.
            "CDS_AUDIT_SPILL_DIR": str(self.workdir / f"audit-{port}"),
            "CDS_PUBLIC_URL": f"http://{HOST}:{port}",
            "CDS_AUTH": self.auth,
        }
        if self.auth == "jwt":
            env["CDS_TRUSTED_ISSUERS"] = str(self.issuers_file)
        if self.fhir is not None:
            env["CDS_ALLOW_HTTP_FHIR"] = "true"  # the stub is plain http on loopback
        env.update(dict(spec.env))
        return Server(spec.label, variant, command, env, self.workdir)

    def baseline(self, variant: Variant) -> Server:
        port = free_port()
        command = [sys.executable, str(HERE / "baseline_app.py"), "--host", HOST, "--port", str(port)]
        command += variant.serve_args() + variant.gunicorn_sets()
        # The baseline imports cds_service only for its gunicorn options: from the first build measured.
        return Server("baseline", variant, command, self.base_env(self.args.services[0].src), self.workdir)

    def base_env(self, src: Path | None) -> dict[str, str]:
        # The service runs on its defaults: no CDS_* setting leaks in from the shell that runs the bench.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}
        if src:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
        return env

    # -- tokens ---------------------------------------------------------------------------------------------
    def audience(self, server: Server) -> str:
        return f"http://{HOST}:{server.port}{HOOK_PATH}"

    def token_files(self, server: Server, count: int, threads: int) -> Path | None:
        """Sign `count` fresh tokens for `server` and split them into one file per wrk thread."""
        if not server.is_service or self.auth != "jwt":
            return self.fixed_token_file()
        pool = tokens.sign_pool(self.signer, self.audience(server), count)
        prefix = self.workdir / f"tokens-{server.port}-{time.monotonic_ns()}"
        for i in range(threads):
            Path(f"{prefix}.{i}").write_text("\n".join(pool[i::threads]) + "\n")
        return prefix

    def fixed_token_file(self) -> Path:
        # The baseline ignores the header; it gets one of the same size so both read the same bytes.
        prefix = self.workdir / "tokens-fixed"
        if not Path(f"{prefix}.0").exists():
            token = tokens.sign_pool(self.signer, "http://127.0.0.1:1/unused", 1, processes=1)[0]
            for i in range(self.args.wrk_threads):
                Path(f"{prefix}.{i}").write_text(token + "\n")
        return prefix

    def one_token(self, server: Server) -> str | None:
        if not server.is_service or self.auth != "jwt":
            return None
        return tokens.sign_pool(self.signer, self.audience(server), 1, processes=1)[0]

    # -- calls ----------------------------------------------------------------------------------------------
    def post(self, conn: http.client.HTTPConnection, server: Server, body: bytes) -> tuple[int, bytes, float]:
        headers = {"Content-Type": "application/json"}
        token = self.one_token(server)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        started = time.perf_counter()
        conn.request("POST", HOOK_PATH, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, data, time.perf_counter() - started

    def sanity(self, server: Server) -> list[str]:
        """Every body size answers 200; the service flags exactly the DSV order (else the numbers mean nothing)."""
        problems = []
        conn = http.client.HTTPConnection(HOST, server.port, timeout=30)
        try:
            for size in SIZES:
                body = self.body_pools[size][0]
                status, data, _ = self.post(conn, server, body)
                if status != 200:
                    problems.append(f"{server.kind} {size} orders: HTTP {status} {data[:200]!r}")
                    continue
                if server.is_service:
                    cards = orjson.loads(data).get("cards", [])
                    refs = sorted(
                        r["reference"]
                        for c in cards
                        for r in c.get("extension", {}).get("davinci-crd.associated-resource", [])
                    )
                    expected = sorted(bodies.flagged_ids(orjson.loads(body)))
                    if refs != expected:
                        problems.append(f"service {size} orders: cards for {refs}, expected {expected}")
        finally:
            conn.close()
        return problems

    def probe_auth(self, server: Server) -> int:
        conn = http.client.HTTPConnection(HOST, server.port, timeout=30)
        try:
            status, _, _ = self.post(conn, server, self.body_pools[5][0])
        finally:
            conn.close()
        return status

    def scaling(self, server: Server) -> dict[int, float]:
        """Median seconds of `--scaling-calls` sequential calls for each body size, after 3 warm-up calls."""
        out = {}
        conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
        try:
            for size in SIZES:
                pool = self.body_pools[size]
                times = []
                for i in range(3 + self.args.scaling_calls):
                    status, data, seconds = self.post(conn, server, pool[i % len(pool)])
                    if status != 200:
                        raise RuntimeError(f"{server.kind} {size} orders: HTTP {status} {data[:200]!r}")
                    if i >= 3:
                        times.append(seconds)
                out[size] = statistics.median(times)
        finally:
            conn.close()
        return out

    def load(
        self, server: Server, *, duration: float, max_requests: int = 0, idle: list[Server] | None = None
    ) -> dict[str, Any]:
        threads = self.args.wrk_threads
        count = max_requests + 500 if max_requests else int(self.est_rate * 1.5 * duration) + 1000
        prefix = self.token_files(server, count, threads)
        mode = "rotate" if server.is_service and self.auth == "jwt" else "fixed"
        summary = run_wrk(
            self.wrk,
            server,
            self.body_files[5],
            prefix,
            token_mode=mode,
            duration=duration if not max_requests else max_requests / 100 + 30,
            connections=self.args.connections,
            threads=threads,
            max_requests=max_requests,
            idle=idle,
        )
        if prefix and mode == "rotate":
            for i in range(threads):
                Path(f"{prefix}.{i}").unlink(missing_ok=True)
        return summary

    def rss(self, server: Server) -> list[tuple[int, int]]:
        _, workers = server.pids()
        return [memory_kb(pid) for pid in workers]


# --------------------------------------------------------------------------------------------------------------
# Driver


def prepare(args: argparse.Namespace, workdir: Path) -> Bench:
    wrk = ensure_wrk()
    signer = tokens.make_signer(args.jwt_alg)
    bench = Bench(args, workdir, wrk, signer, tokens.write_trusted_issuers(signer, workdir / "trusted-issuers.json"))
    pool_sizes = {5: 32, 50: 8, 500: 3}
    if args.fhir_delay_ms:
        bench.fhir = FhirStub(args.fhir_delay_ms / 1000)
    # With --fhir-delay-ms, every `every`-th 5-order body leaves Coverage out of prefetch: the service reads it.
    every = round(1 / args.fhir_share) if args.fhir_delay_ms and args.fhir_share > 0 else 0
    for size in SIZES:
        pool = [
            orjson.dumps(
                bodies.order_sign_body(
                    size,
                    variant=v,
                    fhir_server=bench.fhir.url if bench.fhir and size == 5 and every and v % every == 0 else None,
                )
            )
            for v in range(pool_sizes[size])
        ]
        bench.body_pools[size] = pool
        path = workdir / f"bodies-{size}.txt"
        path.write_bytes(b"\n".join(pool) + b"\n")
        bench.body_files[size] = path
    return bench


def choose_auth(bench: Bench) -> None:
    """CDS_AUTH=jwt with real tokens; if the verifier is still the placeholder (every call 401), fall back to off."""
    server = bench.service(Variant(), bench.args.services[0])
    try:
        server.start()
        status = bench.probe_auth(server)
    finally:
        server.stop()
    if status == 200:
        bench.auth_note = f"CDS_AUTH=jwt, a fresh {bench.args.jwt_alg} token (unique jti) per request"
        return
    if status != 401:
        raise RuntimeError(f"the service answered {status} to a signed request: see {server.log_path}")
    reasons = [line.split(": ", 1)[-1] for line in server.log_tail(200).splitlines() if "401 for" in line]
    bench.auth = "off"
    bench.auth_note = (
        "CDS_AUTH=off: the JWT verifier answered 401 to a correctly signed token "
        f"({reasons[-1] if reasons else 'no reason logged'}); JWT verification is NOT in these numbers"
    )
    log(bench.auth_note)


def run_variant(bench: Bench, variant: Variant, results: dict[str, Any]) -> None:
    args = bench.args
    servers = {"baseline": bench.baseline(variant)}
    servers.update({spec.label: bench.service(variant, spec) for spec in args.services})
    specs = {spec.label: spec for spec in args.services}
    entry: dict[str, Any] = {"variant": variant.name, "startup_s": {}, "memory": {}, "scaling": {}, "load": []}
    results["variants"].append(entry)
    try:
        for name, server in servers.items():
            bench.check_budget(f"starting {name} {variant.name}")
            entry["startup_s"][name] = [server.start()]
            problems = bench.sanity(server)
            for problem in problems:
                log(f"SANITY: {problem}")
            results["sanity"].extend(problems)
            log(f"{name} {variant.name}: up in {entry['startup_s'][name][0]:.2f} s")

        # Memory: RSS per worker after N and 2N calls (these calls also warm the workers up).
        for name, server in servers.items():
            bench.check_budget(f"memory {name}")
            readings = {}
            for step in (1, 2):
                bench.load(server, duration=0, max_requests=args.mem_calls, idle=[])
                readings[step * args.mem_calls] = bench.rss(server)
            entry["memory"][name] = readings
            entry.setdefault("workers", {})[name] = len(server.pids()[1])  # all booted by now
            log(f"{name} {variant.name}: RSS kB per worker {readings}")

        # Alternating load rounds: baseline, service, then service, baseline, ...
        for rnd in range(args.rounds):
            # Rotate who goes first, so a drift in the machine's load does not always favour the same app.
            names = list(servers)
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            for name in order:
                bench.check_budget(f"round {rnd + 1} {name}")
                server = servers[name]
                other = [s for n, s in servers.items() if n != name]
                summary = bench.load(server, duration=args.duration, idle=other)
                result = load_result(name, variant, rnd + 1, summary)
                if name != "baseline" and result.valid:
                    bench.est_rate = max(bench.est_rate, result.rps)
                entry["load"].append(
                    result.__dict__ | {"rps": result.rps, "valid": result.valid, "cpu_ms": result.cpu_ms_per_request}
                )
                log(
                    f"round {rnd + 1} {name:8s} {variant.name}: {result.rps:7.0f} req/s p50 {result.p50_ms:.1f} "
                    f"p99 {result.p99_ms:.1f} ms errors {result.errors} other load {result.other_load:.0%}"
                )

        for name, server in servers.items():
            bench.check_budget(f"scaling {name}")
            entry["scaling"][name] = bench.scaling(server)
            entry["memory"][name]["end"] = bench.rss(server)
    finally:
        for server in servers.values():
            server.stop()

    # More start-up measurements: each a fresh start, only up to /health.
    for name in servers:
        for _ in range(args.startup_runs - 1):
            bench.check_budget(f"start-up {name}")
            server = bench.baseline(variant) if name == "baseline" else bench.service(variant, specs[name])
            try:
                entry["startup_s"][name].append(server.start())
            finally:
                server.stop()


# --------------------------------------------------------------------------------------------------------------
# Report


def machine() -> dict[str, str]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    versions = {}
    for package in ("gunicorn", "flask", "fhir.resources", "pydantic", "orjson", "PyJWT"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:
            versions[package] = "?"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "loadavg": Path("/proc/loadavg").read_text().split(" ")[0],
    }


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _ok(passed: bool) -> str:
    return "ok" if passed else "MISSED"


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    out = [
        f"Machine: {m['nproc']} x {m['cpu']}, Linux {m['kernel']}, Python {m['python']}; {m['packages']}",
        f"Date: {m['date']}; load average at start {m['loadavg']}",
        f"Auth: {results['auth_note']}",
        f"Service: {results['service']}",
        f"FHIR reads: {results['fhir']}",
        f"Load: wrk, {results['connections']} connections, {results['wrk_threads']} thread(s), "
        f"{results['duration']:.0f} s per run, {results['rounds']} alternating rounds; 5-order order-sign body "
        f"(~{results['body_bytes'][5] / 1024:.0f} KB, 1 DSV order flagged)",
        "",
        "| gunicorn | app | req/s (median) | min-max | p50 ms | p90 ms | p99 ms | ratio to baseline | "
        "server CPU ms/req | busiest worker | other load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    for entry in results["variants"]:
        base_rps = _median([r["rps"] for r in entry["load"] if r["app"] == "baseline" and r["valid"]])
        for app in dict.fromkeys(r["app"] for r in entry["load"]):
            runs = [r for r in entry["load"] if r["app"] == app]
            good = [r for r in runs if r["valid"]]
            if not good:
                out.append(f"| {entry['variant']} | {app} | no valid run | | | | | | | | |")
                continue
            rps = _median([r["rps"] for r in good])
            p99 = _median([r["p99_ms"] for r in good])
            ratio = rps / base_rps if base_rps else float("nan")
            balance = ", ".join(f"{r['busiest_worker']:.0%}" for r in good)
            bad = len(runs) - len(good)
            out.append(
                f"| {entry['variant']} | {app}{f' ({bad} invalid runs)' if bad else ''} | {rps:,.0f} | "
                f"{min(r['rps'] for r in good):,.0f}-{max(r['rps'] for r in good):,.0f} | "
                f"{_median([r['p50_ms'] for r in good]):.1f} | {_median([r['p90_ms'] for r in good]):.1f} | "
                f"{p99:.1f} | {ratio:.2f} | {_median([r['cpu_ms'] for r in good]):.2f} | "
                f"{balance} | {max(r['other_load'] for r in good):.0%} |"
            )
            if app != "baseline":
                name = f"{entry['variant']} {app}"
                checks.append(f"{name}: throughput ratio {ratio:.2f} (>= {TARGET_RATIO}) {_ok(ratio >= TARGET_RATIO)}")
                checks.append(f"{name}: p99 {p99:.1f} ms (<= {TARGET_P99_MS:.0f}) {_ok(p99 <= TARGET_P99_MS)}")

    out += [
        "",
        "Order scaling (median of sequential calls, one connection):",
        "",
        "| gunicorn | app | 5 orders ms | 50 orders ms | 500 orders ms | per order 5 / 50 / 500 (µs) | "
        "marginal per order 5->500 (µs) |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in results["variants"]:
        for app, times in entry["scaling"].items():
            t = {int(k): v for k, v in times.items()}
            per = " / ".join(f"{t[n] / n * 1e6:,.0f}" for n in SIZES)
            marginal = (t[500] - t[5]) / 495 * 1e6
            out.append(
                f"| {entry['variant']} | {app} | {t[5] * 1e3:.2f} | {t[50] * 1e3:.2f} | {t[500] * 1e3:.2f} | "
                f"{per} | {marginal:,.0f} |"
            )
            if app != "baseline":
                checks.append(
                    f"{entry['variant']} {app}: 500 orders {t[500] * 1e3:.1f} ms (< {TARGET_500_MS:.0f}) "
                    f"{_ok(t[500] * 1e3 < TARGET_500_MS)}"
                )

    out += [
        "",
        "Memory per worker (VmRSS MB; PSS MB in brackets, shared pages split with the preloaded master):",
        "",
        "| gunicorn | app | workers | after N calls | after 2N calls | growth N->2N | at the end |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in results["variants"]:
        for app, readings in entry["memory"].items():
            steps = sorted(int(k) for k in readings if k != "end")

            def fmt(values: list[list[int]]) -> str:
                return ", ".join(f"{rss / 1024:.0f} [{pss / 1024:.0f}]" for rss, pss in values)

            first, second = readings[steps[0]], readings[steps[1]]
            growth = max(b[0] - a[0] for a, b in zip(first, second, strict=False)) / 1024 if first else 0
            out.append(
                f"| {entry['variant']} | {app} | {len(first)} | N={steps[0]:,}: {fmt(first)} | {fmt(second)} | "
                f"{growth:+.1f} | {fmt(readings.get('end', []))} |"
            )
            if app != "baseline" and first:
                worst = max(r[0] for r in second) / 1024
                checks.append(
                    f"{entry['variant']} {app}: RSS {worst:.0f} MB after {steps[1]:,} calls (<= {TARGET_RSS_MB:.0f}) "
                    f"{_ok(worst <= TARGET_RSS_MB)}; growth {growth:+.1f} MB"
                )

    out += ["", "Start-up (command to first 200 on /health, s, each start):", ""]
    out += ["| gunicorn | app | runs | median |", "|---|---|---|---|"]
    for entry in results["variants"]:
        for app, runs in entry["startup_s"].items():
            med = _median(runs)
            out.append(f"| {entry['variant']} | {app} | {', '.join(f'{r:.2f}' for r in runs)} | {med:.2f} |")
            if app != "baseline":
                ok = _ok(med < TARGET_STARTUP_S)
                checks.append(f"{entry['variant']} {app}: start-up {med:.2f} s (< {TARGET_STARTUP_S:.0f}) {ok}")

    out += ["", "Targets (issue 7):", ""] + [f"- {c}" for c in checks]
    if results["sanity"]:
        out += ["", "SANITY PROBLEMS (numbers above are suspect):"] + [f"- {p}" for p in results["sanity"]]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs for a smoke check: 2 rounds of 3 s")
    parser.add_argument("--rounds", type=int, default=None, help="alternating load rounds (default 3; quick 2)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per load run (default 10; quick 3)")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (1 keeps wrk's own CPU small)")
    parser.add_argument("--mem-calls", type=int, default=None, help="RSS read after N and 2N calls (default 10000)")
    parser.add_argument("--scaling-calls", type=int, default=20)
    parser.add_argument("--startup-runs", type=int, default=None, help="starts timed per app (default 3; quick 1)")
    parser.add_argument(
        "--variants",
        default=None,
        help="comma list of gunicorn setups: default, sync:WORKERS, gthread:WORKERS:THREADS (default: default)",
    )
    parser.add_argument(
        "--compare-workers",
        action="store_true",
        help="compare worker classes and counts: default,sync:2,sync:4,gthread:2:1,gthread:4:4 (cores=2)",
    )
    parser.add_argument("--jwt-alg", choices=tokens.ALGORITHMS, default="ES384")
    parser.add_argument(
        "--fhir-delay-ms",
        type=float,
        default=0,
        help="make a share of the 5-order calls read Coverage from a local FHIR server that answers this slowly "
        "(sets CDS_ALLOW_HTTP_FHIR=true): shows whether a read blocks a worker's other calls",
    )
    parser.add_argument("--fhir-share", type=float, default=0.25, help="share of calls that read (default 0.25)")
    parser.add_argument(
        "--service",
        action="append",
        type=ServiceSpec.parse,
        default=[],
        metavar="LABEL=SRC[,CDS_NAME=VALUE...][,--serve-option=VALUE...]",
        help="a build to measure (repeat to compare builds in one run): cds_service imported from SRC, extra "
        "settings and serve options for experiments; default: the installed cds_service as `service`",
    )
    parser.add_argument("--max-minutes", type=float, default=40.0, help="abort when the bench runs longer")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args(argv)
    args.services = args.service or [ServiceSpec()]
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.mem_calls = args.mem_calls or (2000 if args.quick else 10000)
    args.startup_runs = args.startup_runs or (1 if args.quick else 3)
    if args.compare_workers and not args.variants:
        cores = os.cpu_count() or 1
        args.variants = f"default,sync:{cores},sync:{2 * cores},gthread:{cores}:1,gthread:{2 * cores}:4"
    args.variant_list = [Variant.parse(v.strip()) for v in (args.variants or "default").split(",") if v.strip()]
    return args


@contextmanager
def stopping_servers() -> Iterator[None]:
    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        stop_all()
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, Any] = {
        "machine": machine(),
        "variants": [],
        "sanity": [],
        "connections": args.connections,
        "wrk_threads": args.wrk_threads,
        "duration": args.duration,
        "rounds": args.rounds,
    }
    with tempfile.TemporaryDirectory(prefix="cds-bench-") as tmp, stopping_servers():
        workdir = Path(tmp)
        bench = prepare(args, workdir)
        results["body_bytes"] = {size: len(pool[0]) for size, pool in bench.body_pools.items()}
        choose_auth(bench)
        results["auth_note"] = bench.auth_note
        results["service"] = "; ".join(spec.describe() for spec in args.services)
        results["fhir"] = (
            f"{args.fhir_share:.0%} of the 5-order calls read Coverage from a loopback FHIR server answering after "
            f"{args.fhir_delay_ms:.0f} ms (CDS_ALLOW_HTTP_FHIR=true)"
            if bench.fhir
            else "none (Coverage prefetched)"
        )
        try:
            for variant in args.variant_list:
                run_variant(bench, variant, results)
        finally:
            if bench.fhir is not None:
                bench.fhir.close()
    save_results(render(results), results, "", args.json)
    return 1 if results["sanity"] else 0


def save_results(text: str, results: dict[str, Any], prefix: str, json_path: Path | None) -> None:
    """Print the table and keep it with the raw numbers: bench/results/<prefix><UTC time>.md and .json (and the
    numbers at `json_path` when asked)."""
    print(text)
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (out_dir / f"{prefix}{stamp}.md").write_text(text + "\n")
    raw = json.dumps(results, indent=1, default=str)
    (out_dir / f"{prefix}{stamp}.json").write_text(raw)
    if json_path:
        json_path.write_text(raw)


if __name__ == "__main__":
    sys.exit(main())
