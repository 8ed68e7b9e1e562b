"""Prometheus metrics: what the service counts, and the no-op-when-off hooks the rest of the code calls."""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
import threading
from collections import Counter as Tally
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from ..audit import CallRecord
    from ..engine.policy import Policy

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FHIR_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0)
# The caller names its FHIR server, so the server label could grow without end: past this many, "other".
MAX_FHIR_SERVERS = 50

# JWT refusal reasons (auth.AuthError.reason, free text for the log) as a small fixed set of label values.
# First matching prefix wins; test_metrics checks that every reason auth/tokens.py raises has a label here.
_REFUSALS: tuple[tuple[str, str], ...] = (
    ("no Authorization header", "no-token"),
    ("empty bearer token", "no-token"),
    ("Authorization scheme", "not-bearer"),
    ("bearer token longer than", "malformed"),
    ("malformed token", "malformed"),
    ("token rejected", "malformed"),
    ("header ", "malformed"),
    ("exp, iat and nbf must be numbers", "malformed"),
    ("jti must be", "malformed"),
    ("tenant must be", "malformed"),
    ("algorithm ", "algorithm"),
    ("the key for this kid cannot verify", "algorithm"),
    ("missing claim iss", "untrusted-issuer"),
    ("claim iss is not a string", "untrusted-issuer"),
    ("issuer is not trusted", "untrusted-issuer"),
    ("missing claim", "missing-claim"),
    ("jku ", "jku"),
    ("unknown kid", "unknown-key"),
    ("bad signature", "bad-signature"),
    ("aud does not name", "audience"),
    ("token expired", "expired"),
    ("iat is in the future", "not-yet-valid"),
    ("token not valid yet", "not-yet-valid"),
    ("iat is more than an hour ago", "too-old"),
    ("tenant is not allowed", "tenant"),
    ("jti already used", "replay"),
)
REFUSAL_LABELS = frozenset(label for _, label in _REFUSALS) | {"other"}


def refusal_label(reason: str) -> str:
    """The label for an AuthError reason: never the reason itself (it quotes token contents)."""
    for prefix, label in _REFUSALS:
        if reason.startswith(prefix):
            return label
    return "other"


class Metrics:
    """Every metric of one app. In multiprocess mode the values live in files shared by all workers."""

    def __init__(self) -> None:
        # Imported here, not at module level: prometheus_client decides at import whether it runs in multiprocess
        # mode, and `serve` sets PROMETHEUS_MULTIPROC_DIR only once it knows it is serving.
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        # The *_created samples exist only without multiprocess mode: leave them out so both read the same.
        disable_created_metrics()  # type: ignore[no-untyped-call]

        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        # In-process mode: a registry of this app's own (tests build many apps in one process). Multiprocess mode:
        # /metrics reads the files of every worker, so the metrics need no registry.
        self.registry: CollectorRegistry | None = None if self.multiprocess else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls = Counter(
            "cds_calls",
            "Hook calls answered, by service, hook and HTTP status.",
            ["service", "hook", "status"],
            registry=r,
        )
        self.call_duration = Histogram(
            "cds_call_duration_seconds",
            "Time the service spent on a hook call (every status).",
            ["service", "hook"],
            buckets=CALL_BUCKETS,
            registry=r,
        )
        self.orders = Counter(
            "cds_orders",
            "Orders judged, by policy, verdict (flagged | not-flagged) and the rule that decided.",
            ["policy", "verdict", "rule"],
            registry=r,
        )
        self.cards = Counter("cds_cards", "Cards returned.", registry=r)
        self.system_actions = Counter(
            "cds_system_actions", "systemActions returned (CRD coverage information), by type.", ["type"], registry=r
        )
        self.feedback = Counter(
            "cds_feedback",
            "Feedback items stored, by outcome and override reason code (none; other when the policy lists no such "
            "code).",
            ["outcome", "reason"],
            registry=r,
        )
        self.jwt_refusals = Counter(
            "cds_jwt_refusals", "Calls refused for their JWT, by reason (a fixed set).", ["reason"], registry=r
        )
        self.fhir_reads = Counter(
            "cds_fhir_reads",
            "Reads from clients' FHIR servers, by outcome (ok | error | skipped).",
            ["outcome"],
            registry=r,
        )
        self.fhir_read_duration = Histogram(
            "cds_fhir_read_duration_seconds",
            "Time a FHIR read took, by outcome.",
            ["outcome"],
            buckets=FHIR_BUCKETS,
            registry=r,
        )
        self.fhir_breaker = Gauge(
            "cds_fhir_breaker_state",
            "Circuit breaker per FHIR server: 1 for the state a live worker holds (closed | open | half-open).",
            ["server", "state"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.audit_records = Counter(
            "cds_audit_records",
            "Audit records by what became of them (written | failed | spilled).",
            ["state"],
            registry=r,
        )
        self.audit_queue = Gauge(
            "cds_audit_queue_depth",
            "Audit records waiting to be written, all live workers.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.policy_info = Gauge(
            "cds_policy_info",
            "The policies answering calls (value 1), with their version and content hash.",
            ["policy", "version", "sha256"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.policy_loaded = Gauge(
            "cds_policy_loaded_timestamp_seconds",
            "When the running policies were loaded (Unix time).",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.policy_load_duration = Gauge(
            "cds_policy_load_duration_seconds",
            "How long loading and checking the running policies took.",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.reloads = Counter(
            "cds_policy_reloads", "Policy reloads (SIGHUP), by result (ok | failed).", ["result"], registry=r
        )
        self.last_reload_ok = Gauge(
            "cds_policy_last_reload_ok",
            "1 when the last policy reload succeeded (or none was asked for), 0 when it failed.",
            multiprocess_mode="livemostrecent",
            registry=r,
        )
        for label in ("ok", "failed"):
            self.reloads.labels(label)
        for state in ("written", "failed", "spilled"):
            self.audit_records.labels(state)
        self._shown: set[tuple[str, str, str]] = set()
        # Label values here come from the service's own ids, rules and statuses: a bounded set.
        self._children: dict[tuple[Any, ...], Any] = {}
        self._servers: set[str] = set()
        self._lock = threading.Lock()

    # -- calls ------------------------------------------------------------------------------------------------------
    def _child(self, metric: Any, *labels: str) -> Any:
        """metric.labels(...) remembered: the lookup costs as much as the increment (1 us each, measured)."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_call(self, call: CallRecord) -> None:
        hook = call.hook or ""
        self._child(self.calls, call.service_id, hook, str(call.status)).inc()
        self._child(self.call_duration, call.service_id, hook).observe(call.duration_ms / 1000.0)
        # One increment per distinct (policy, verdict, rule) of the call, not one per order.
        judged = Tally((o.policy, "flagged" if o.flagged else "not-flagged", o.rule) for o in call.orders)
        for labels, count in judged.items():
            self._child(self.orders, *labels).inc(count)
        if call.cards:
            self.cards.inc(len(call.cards))
        for action in call.system_actions:
            self.system_actions.labels(action.type).inc()

    # -- policies ---------------------------------------------------------------------------------------------------
    def show_policies(self, policies: Iterable[Policy], loaded_at: float, took: float) -> None:
        """Mark these policies as the running ones; the ones they replace drop to 0 (and out of /metrics)."""
        current = {(p.id, p.version, p.sha256) for p in policies}
        with self._lock:
            for labels in self._shown - current:
                self.policy_info.labels(*labels).set(0)
            for labels in current:
                self.policy_info.labels(*labels).set(1)
            self._shown = current
        self.policy_loaded.set(loaded_at)
        self.policy_load_duration.set(took)

    def after_fork(self) -> None:
        """In a new worker: its own copies of the gauges start at zero; show the policies it runs. Breakers are per
        process, so the worker starts with none."""
        with self._lock:
            self._servers = set()
            for labels in self._shown:
                self.policy_info.labels(*labels).set(1)

    def breaker(self, server: str, state: str) -> None:
        with self._lock:
            if server not in self._servers:
                if len(self._servers) >= MAX_FHIR_SERVERS:
                    server = "other"
                self._servers.add(server)
        for known in ("closed", "open", "half-open"):
            self.fhir_breaker.labels(server, known).set(1 if known == state else 0)

    # -- exposition -------------------------------------------------------------------------------------------------
    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

        # Multiprocess mode: read every worker's files at each scrape (the client library's documented way).
        source = self.registry if self.registry is not None else multiprocess.MultiProcessCollector(registry=None)  # type: ignore[no-untyped-call]
        view = CollectorRegistry()
        view.register(_LiveOnly(source))
        return generate_latest(view), CONTENT_TYPE_LATEST


class _LiveOnly:
    """Leaves out the state gauges' samples at 0: a policy no live process runs any more, a breaker state no live
    process holds (multiprocess mode keeps their files; in-process, reload and state changes leave them at 0)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def collect(self) -> Iterable[Any]:
        for family in self.inner.collect():
            if family.name in ("cds_policy_info", "cds_fhir_breaker_state"):
                family.samples = [s for s in family.samples if s.value != 0]
            yield family


# -- the process's active metrics, and hooks for code that has no app at hand ---------------------------------------

_current: Metrics | None = None


def install(metrics: Metrics | None) -> None:
    """Make `metrics` the process's active metrics (None: metrics off; every hook below does nothing)."""
    global _current
    _current = metrics


def current() -> Metrics | None:
    return _current


def _guarded(action: str, fn: Any, *args: Any) -> None:
    # A metric must never break the call it counts.
    try:
        fn(*args)
    except Exception:
        log.exception("metrics: %s failed", action)


def observe_call(call: CallRecord) -> None:
    m = _current
    if m is not None:
        _guarded("observe_call", m.observe_call, call)


def jwt_refused(reason: str) -> None:
    m = _current
    if m is not None:
        _guarded("jwt_refused", lambda: m.jwt_refusals.labels(refusal_label(reason)).inc())


def feedback_stored(outcome: str, reason_code: str | None, known_codes: frozenset[str]) -> None:
    m = _current
    if m is not None:
        reason = "none" if not reason_code else reason_code if reason_code in known_codes else "other"
        _guarded("feedback", lambda: m.feedback.labels(outcome, reason).inc())


def fhir_read(outcome: str, seconds: float) -> None:
    m = _current
    if m is not None:

        def count() -> None:
            m.fhir_reads.labels(outcome).inc()
            m.fhir_read_duration.labels(outcome).observe(seconds)

        _guarded("fhir_read", count)


def breaker_state(server: str, state: str) -> None:
    """A FHIR server's circuit breaker changed state (closed | open | half-open) in this process."""
    m = _current
    if m is not None:
        _guarded("breaker_state", m.breaker, server, state)


def audit_queued() -> None:
    m = _current
    if m is not None:
        _guarded("audit_queued", m.audit_queue.inc)


def audit_written(count: int, *, from_spill: bool = False) -> None:
    """Records written to the database; `from_spill`: read back from the spill file (they left the queue already)."""
    m = _current
    if m is not None and count:

        def done() -> None:
            m._child(m.audit_records, "written").inc(count)
            if not from_spill:
                m.audit_queue.dec(count)

        _guarded("audit_written", done)


def audit_failed(count: int) -> None:
    """Records that could not be written and are lost (refused by the database, queue full, not written by exit)."""
    m = _current
    if m is not None and count:

        def done() -> None:
            m.audit_records.labels("failed").inc(count)
            m.audit_queue.dec(count)

        _guarded("audit_failed", done)


def audit_spilled(count: int) -> None:
    """Queued records set aside in the spill file while the database is unreachable (they leave the queue; when they
    are written later, count them with audit_written(n, from_spill=True))."""
    m = _current
    if m is not None and count:

        def done() -> None:
            m.audit_records.labels("spilled").inc(count)
            m.audit_queue.dec(count)

        _guarded("audit_spilled", done)


def reload_result(ok: bool) -> None:
    m = _current
    if m is not None:

        def done() -> None:
            m.reloads.labels("ok" if ok else "failed").inc()
            m.last_reload_ok.set(1 if ok else 0)

        _guarded("reload_result", done)


# -- multiprocess mode (cds-service serve) --------------------------------------------------------------------------


def prepare_multiprocess_dir(parent: str) -> str:
    """Point prometheus_client at an empty folder of this server's own, before anything imports it.

    An operator's PROMETHEUS_MULTIPROC_DIR is used (its old files removed: counts from another run would be added
    to this one's); else a folder inside `parent`, the server's private temporary folder.
    """
    import sys

    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before its multiprocess folder was set")
    folder = os.environ.get(MULTIPROC_ENV) or os.path.join(parent, "metrics")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    for stale in glob.glob(os.path.join(folder, "*.db")):
        os.remove(stale)
    os.environ[MULTIPROC_ENV] = folder
    return folder


def private_dir() -> str:
    """A temporary folder only this user can read, for one `serve` run (metrics files, policy snapshots)."""
    return tempfile.mkdtemp(prefix="cds-service-")


def remove_private_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def mark_process_dead(pid: int) -> None:
    """gunicorn child_exit (in the master): drop the dead worker's live gauges (queue depth, breakers, policy)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        try:
            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
        except OSError as exc:
            log.warning("metrics: cleaning up after worker %d failed: %s", pid, exc)
