"""Live policy reload: SIGHUP makes the serve master check the policy files; workers then switch inside themselves.

Why inside the workers: gunicorn's own HUP restarts them, and with `reuse_port` each worker owns a listening socket
whose queued connections are dropped when it closes. So the master (which gets the SIGHUP) only checks: it copies
the files into a snapshot folder, validates the copy, and on success writes a new generation to a state file; each
worker's watcher thread sees it, loads that same snapshot (exactly the bytes checked) and swaps its runtime in one
assignment. Calls in flight finish on the runtime they started with; the next call gets the new one. The master
swaps too, so a worker it forks later (after a crash) starts on the new policies.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from ..engine.policy import PolicySet, check_policies, language_files, load_policies, packaged_policy_dir, policy_files
from ..engine.policy.language import LANGUAGES_DIR
from . import metrics
from .logs import now_iso

if TYPE_CHECKING:
    from ..runtime import Runtime, Services

log = logging.getLogger(__name__)

STATE_FILE = "reload-state.json"
POLL_SECONDS = 0.5
_KEEP_SNAPSHOTS = 3


def describe(policies: PolicySet) -> list[dict[str, str]]:
    return [{"id": p.id, "version": p.version, "sha256": p.sha256} for p in policies.policies]


def _names(policies: PolicySet) -> str:
    return ", ".join(f"{p.id} {p.version} (sha256 {p.sha256[:12]})" for p in policies.policies)


class PolicyReloader:
    """Owns the switch from one set of policy files to the next, in the master and in each worker."""

    def __init__(self, parts: Services, folder: str | None) -> None:
        self.parts = parts
        self.folder = Path(folder) if folder else packaged_policy_dir()
        self.state_dir: Path | None = None  # set by `serve`: where snapshots and the state file live
        self.generation = 0
        self.last: dict[str, Any] = {"ok": True, "at": now_iso(), "error": None}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._state_mtime = 0
        self._watcher_pid = 0

    @property
    def runtime(self) -> Runtime:
        return self.parts.runtime

    # -- what /health shows -----------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return {"policies": describe(self.runtime.policies), "lastReload": dict(self.last)}

    def loaded(self, took: float) -> None:
        """The policies now answering: logged (id, version, hash) and shown in the metrics."""
        policies = self.runtime.policies
        for policy in policies.policies:
            # The file the operator edited, not the snapshot copy it was loaded from.
            source = self.folder / policy.source.name
            log.info("policy %s version %s (sha256 %s) from %s", policy.id, policy.version, policy.sha256, source)
        m = metrics.current()
        if m is not None:
            m.show_policies(policies.policies, time.time(), took)

    # -- the switch -------------------------------------------------------------------------------------------------
    def swap(self, policies: PolicySet) -> None:
        """Policies, services and discovery change together: one new Runtime, put in place in one assignment."""
        self.parts.runtime = self.runtime.with_policies(policies)

    def reload(self) -> bool:
        """Check the policy files; when they are valid, switch to them. The master's SIGHUP, or in-process."""
        with self._lock:
            started = time.monotonic()
            source = self.folder
            problems: list[object]
            try:
                if self.state_dir is not None:
                    source = self._snapshot()
                policies, found = check_policies(source)
                problems = list(found)
            except Exception as exc:  # an unreadable folder, a bug in the checker: never take the server down
                log.exception("policy reload: checking %s failed", self.folder)
                policies, problems = None, [f"{self.folder}: {type(exc).__name__}: {exc}"]
            if policies is None:
                error = "\n".join(str(p) for p in problems).replace(str(source), str(self.folder))
                self.last = {"ok": False, "at": now_iso(), "error": error}
                log.error(
                    "policy reload failed; still answering with %s. Problems:\n%s", _names(self.runtime.policies), error
                )
                metrics.reload_result(False)
                if source != self.folder:
                    shutil.rmtree(source, ignore_errors=True)
                self._write_state(None)
                return False
            before = _names(self.runtime.policies)
            self.swap(policies)
            self.generation += 1
            self.last = {"ok": True, "at": now_iso(), "error": None}
            log.info("policy reload: %s replaced by %s", before, _names(policies))
            metrics.reload_result(True)
            self.loaded(time.monotonic() - started)
            self._write_state(source if source != self.folder else None)
            return True

    def _snapshot(self) -> Path:
        """A copy of the policy files as they are now: what is checked is exactly what the workers will load."""
        if self.state_dir is None:
            raise RuntimeError("no state folder: not serving")
        target = self.state_dir / f"policies-{self.generation + 1}-{time.monotonic_ns()}"
        target.mkdir(mode=0o700)
        for path in policy_files(self.folder):
            shutil.copyfile(path, target / path.name)
        own = language_files(self.folder)
        if own:  # the folder's own languages are part of its policies; the shipped ones are not copied
            (target / LANGUAGES_DIR).mkdir(mode=0o700)
            for path in own:
                shutil.copyfile(path, target / LANGUAGES_DIR / path.name)
        snapshots = sorted(self.state_dir.glob("policies-*"), key=lambda p: p.stat().st_mtime_ns)
        for old in snapshots[:-_KEEP_SNAPSHOTS]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    # -- master to workers ------------------------------------------------------------------------------------------
    def serve_from(self, state_dir: str) -> None:
        """`serve`: reloads go through snapshots and a state file in this private folder."""
        self.state_dir = Path(state_dir)
        self._write_state(None)

    def _write_state(self, snapshot: Path | None) -> None:
        if self.state_dir is None:
            return
        state = {"generation": self.generation, "snapshot": str(snapshot) if snapshot else None, "last": self.last}
        if snapshot is None:
            previous = self._read_state()
            if previous and previous.get("generation") == self.generation:
                state["snapshot"] = previous.get("snapshot")
        path = self.state_dir / STATE_FILE
        temporary = path.with_suffix(".tmp")
        try:
            temporary.write_bytes(orjson.dumps(state))
            os.replace(temporary, path)  # workers never read a half-written state
        except OSError as exc:
            log.error("policy reload: cannot tell the workers (%s): %s", path, exc)

    def _read_state(self) -> dict[str, Any] | None:
        if self.state_dir is None:
            return None
        try:
            state = orjson.loads((self.state_dir / STATE_FILE).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        return state if isinstance(state, dict) else None

    def start_watching(self) -> None:
        """In a worker (gunicorn post_worker_init): follow the master's reloads from now on."""
        if self.state_dir is None or self._watcher_pid == os.getpid():
            return
        self._watcher_pid = os.getpid()
        self._wake = threading.Event()
        # A SIGHUP sent to the whole process group must not kill the worker (the default action): it only makes
        # the watcher look now.
        signal.signal(signal.SIGHUP, lambda _sig, _frame: self._wake.set())
        threading.Thread(target=self._watch, name="cds-policy-watch", daemon=True).start()

    def _watch(self) -> None:
        while True:
            self._wake.wait(POLL_SECONDS)
            self._wake.clear()
            try:
                self.follow()
            except Exception:  # the watcher must outlive any one bad state
                log.exception("policy reload: following the master failed")

    def follow(self) -> None:
        """Take up the master's latest state: its last result, and its policies when the generation is newer."""
        if self.state_dir is None:
            return
        try:
            mtime = (self.state_dir / STATE_FILE).stat().st_mtime_ns
        except OSError:
            return
        if mtime == self._state_mtime:
            return
        state = self._read_state()
        if state is None:
            return
        generation, snapshot = int(state.get("generation") or 0), state.get("snapshot")
        if generation > self.generation and snapshot:
            started = time.monotonic()
            try:
                policies = load_policies(snapshot)
            except Exception as exc:
                # The snapshot was checked by the master; only a vanished folder (a newer reload removed it) gets
                # here. Keep what runs; the next state names the newer snapshot.
                log.error("policy reload: cannot load the checked snapshot %s: %s", snapshot, exc)
                return
            before = _names(self.runtime.policies)
            self.swap(policies)
            self.generation = generation
            log.info("policy reload in worker %d: %s replaced by %s", os.getpid(), before, _names(policies))
            self.loaded(time.monotonic() - started)
        self.last = dict(state.get("last") or self.last)
        self._state_mtime = mtime
