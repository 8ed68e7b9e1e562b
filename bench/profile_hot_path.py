"""Profile one service call in-process (a WSGI call, no HTTP): where the time goes, by stage and by function.

Run: `python bench/profile_hot_path.py` (5- and 500-order bodies, CDS_AUTH=jwt with real ES384 tokens).
Prints a stage table (inclusive times measured by wrapping the functions on the path) and the top of a
pyinstrument profile; the full profiles go to bench/results/profile-<orders>.txt and .html.
"""

from __future__ import annotations

import argparse
import gc
import io
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bodies  # noqa: E402
import tokens  # noqa: E402

PUBLIC_URL = "http://127.0.0.1:8080"
HOOK_PATH = f"/cds-services/{bodies.SERVICE}"


@dataclass
class Stage:
    label: str
    depth: int
    seconds: float = 0.0
    calls: int = 0


@dataclass
class Timers:
    stages: dict[str, Stage] = field(default_factory=dict)
    restore: list[Callable[[], None]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def wrap(self, owner: Any, attr: str, label: str, depth: int) -> None:
        """Time every call of owner.attr (a module function, class attribute or instance method)."""
        original = getattr(owner, attr, None)
        if original is None:
            self.missing.append(label)
            return
        stage = self.stages.setdefault(label, Stage(label, depth))
        is_static = isinstance(owner, type) and isinstance(owner.__dict__.get(attr), classmethod)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                stage.seconds += time.perf_counter() - started
                stage.calls += 1

        setattr(owner, attr, staticmethod(timed) if is_static else timed)
        in_dict = isinstance(owner, type) and attr in owner.__dict__

        def undo() -> None:
            if is_static:
                setattr(owner, attr, classmethod(original.__func__))
            elif in_dict or not isinstance(owner, type):
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)

        self.restore.append(undo)

    def reset(self) -> None:
        for stage in self.stages.values():
            stage.seconds, stage.calls = 0.0, 0

    def undo(self) -> None:
        for undo in reversed(self.restore):
            undo()
        self.restore.clear()


class Harness:
    """The app as `serve` builds it (store migrated), and a WSGI call with a fresh token each time."""

    def __init__(self, auth: str, alg: str, workdir: Path) -> None:
        from cds_service import create_app

        self.signer = tokens.make_signer(alg)
        issuers = tokens.write_trusted_issuers(self.signer, workdir / "issuers.json")
        settings = {"AUTH": auth, "PUBLIC_URL": PUBLIC_URL, "DATABASE_URL": f"sqlite:///{workdir / 'cds.sqlite3'}"}
        if auth == "jwt":
            settings["TRUSTED_ISSUERS"] = str(issuers)
        self.auth = auth
        self.app = create_app(settings)
        from cds_service.runtime import services_of

        services_of(self.app).store.prepare_serve()
        self.pool: list[str] = []

    def tokens(self, count: int) -> None:
        if self.auth == "jwt":
            self.pool = tokens.sign_pool(self.signer, PUBLIC_URL + HOOK_PATH, count)

    def call(self, body: bytes) -> bytes:
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": HOOK_PATH,
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8080",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "wsgi.version": (1, 0),
            "CONTENT_LENGTH": str(len(body)),
            "CONTENT_TYPE": "application/json",
        }
        if self.pool:
            environ["HTTP_AUTHORIZATION"] = "Bearer " + self.pool.pop()
        status: list[str] = []
        # The app never calls the write() that start_response would return.
        out = b"".join(self.app(environ, lambda s, h, e=None: status.append(s)))  # type: ignore[arg-type]
        if not status[0].startswith("200"):
            raise RuntimeError(f"{status[0]}: {out[:300]!r}")
        return out

    def flush_audit(self) -> None:
        from cds_service.runtime import services_of

        audit = services_of(self.app).runtime.audit
        if hasattr(audit, "flush"):
            audit.flush()


def install_timers(h: Harness) -> Timers:
    """Wrap the functions a call goes through; inclusive times, indented by nesting."""
    import jwt

    from cds_service import calls
    from cds_service.engine import cards, decision, hook, outcome
    from cds_service.runtime import services_of
    from cds_service.web import hook_route as api

    rt = services_of(h.app).runtime
    t = Timers()
    t.wrap(api.HookRoute, "__call__", "whole WSGI call (hook route)", 0)
    t.wrap(api, "hook_call", "hook call (no HTTP framing)", 1)
    t.wrap(api, "authenticate", "JWT: authenticate", 2)
    t.wrap(jwt, "decode", "PyJWT decode (incl. the signature check)", 3)
    if rt.authenticator is not None:
        t.wrap(rt.authenticator.jti_store, "remember", "jti store remember (database write)", 3)
    t.wrap(api, "read_json", "read body + JSON parse (+ depth check)", 2)
    t.wrap(api, "parse_hook_request", "parse_hook_request", 2)
    t.wrap(api, "answer", "answer (engine + coverage adapter)", 2)
    t.wrap(calls, "assess", "engine: assess (judge every order)", 3)
    t.wrap(hook, "read_order", "read the order once (order model)", 4)
    t.wrap(hook, "judge", "engine: judge one order", 4)
    t.wrap(decision, "might_flag", "first pass (prefilter)", 5)
    t.wrap(decision, "collect", "evidence (terms, context, typos)", 5)
    t.wrap(calls, "respond", "engine: respond (cards, CRD actions)", 3)
    t.wrap(cards.CardMaker, "alternative_card", "card building", 4)
    t.wrap(cards, "alternative_order", "replacement order", 5)
    t.wrap(rt.coverage, "resolve", "coverage lookup (prefetch)", 3)
    t.wrap(hook, "_coverage_actions", "CRD coverage systemAction", 4)
    t.wrap(outcome.Outcome, "verdict_records", "audit: verdict records", 2)
    t.wrap(rt.audit, "record", "audit: record (queue for the writer)", 2)
    t.wrap(logging.Logger, "_log", "logging (records emitted)", 2)
    return t


@contextmanager
def quiet_logs() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(level)


def measure(h: Harness, body: bytes, calls: int) -> dict[str, float]:
    """Per call: wall ms (median and mean) and process CPU ms (every thread: the audit writer included)."""
    h.tokens(calls)
    times = []
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    for _ in range(calls):
        started = time.perf_counter()
        h.call(body)
        times.append(time.perf_counter() - started)
    h.flush_audit()
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    return {
        "median_ms": statistics.median(times) * 1e3,
        "mean_ms": wall / calls * 1e3,
        "cpu_ms": cpu / calls * 1e3,
        "p99_ms": sorted(times)[int(len(times) * 0.99) - 1] * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, nargs="+", default=[5, 500])
    parser.add_argument("--calls", type=int, default=None, help="calls per measurement (default 2000 / orders)")
    parser.add_argument("--auth", choices=("jwt", "off"), default="jwt")
    parser.add_argument("--jwt-alg", choices=tokens.ALGORITHMS, default="ES384")
    parser.add_argument("--no-pyinstrument", action="store_true")
    parser.add_argument(
        "--no-gc-freeze", action="store_true", help="skip the gc.freeze() that `serve` does before forking workers"
    )
    args = parser.parse_args(argv)

    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cds-profile-") as tmp, quiet_logs():
        h = Harness(args.auth, args.jwt_alg, Path(tmp))
        if not args.no_gc_freeze:
            gc.collect()
            gc.freeze()  # as cds_service.ops.server.serve does before forking the workers
        print(f"auth {args.auth}{' ' + args.jwt_alg if args.auth == 'jwt' else ''}; python {sys.version.split()[0]}")
        for size in args.orders:
            body = orjson.dumps(bodies.order_sign_body(size))
            calls = args.calls or max(20, 3000 // size)
            h.tokens(50)
            for _ in range(min(50, calls)):
                h.call(body)  # warm-up: first calls build caches and connections
            plain = measure(h, body, calls)
            print(
                f"\n{size} orders ({len(body) / 1024:.0f} KB), {calls} calls: median {plain['median_ms']:.2f} ms, "
                f"p99 {plain['p99_ms']:.2f} ms, process CPU {plain['cpu_ms']:.2f} ms per call (all threads)"
            )
            timers = install_timers(h)
            try:
                timed = measure(h, body, calls)
            finally:
                timers.undo()
            whole = timers.stages["whole WSGI call (hook route)"].seconds / calls
            heading = "stage (inclusive, ms per call; nested stages are part of their parent)"
            print(f"{heading:76s} {'ms':>7s} {'%':>5s}")
            for stage in timers.stages.values():
                if not stage.calls:
                    continue
                ms = stage.seconds / calls * 1e3
                times = f" x{stage.calls / calls:g}" if stage.calls != calls else ""
                label = "  " * stage.depth + stage.label + times
                print(f"{label:76s} {ms:7.3f} {ms / (whole * 1e3):5.0%}")
            print(f"(timer overhead: median {timed['median_ms'] - plain['median_ms']:+.2f} ms per call)")
            if timers.missing:
                print(f"not found (renamed?): {', '.join(timers.missing)}")
            if not args.no_pyinstrument:
                from pyinstrument import Profiler

                h.tokens(calls)
                profiler = Profiler(interval=0.0002)
                profiler.start()
                for _ in range(calls):
                    h.call(body)
                profiler.stop()
                text = profiler.output_text(unicode=False, color=False, show_all=False)
                (out_dir / f"profile-{size}.txt").write_text(text)
                (out_dir / f"profile-{size}.html").write_text(profiler.output_html())
                print(f"pyinstrument: bench/results/profile-{size}.txt and .html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
