"""Logging: readable text by default, or one JSON object per line (CDS_LOG_FORMAT=json) with the call's ids on it."""

from __future__ import annotations

import contextvars
import io
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

from gunicorn import glogging
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CALL_FIELDS = ("service", "hookInstance", "status")
# Lines held back for a call until its status is known; past this, they go out with status null.
_MAX_PENDING = 200
ENVIRON_KEY = "cds.call"


class JsonFormatter(_JsonFormatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, process, and the call's fields."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s %(process)d",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            # The filter's own bookkeeping on a record is not a field.
            reserved_attrs=[*RESERVED_ATTRS, "_cds_done", "_cds_handler"],
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = datetime.fromtimestamp(record.created, UTC)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- the call a line is about -------------------------------------------------------------------------------------


@dataclass
class CallContext:
    """The call being answered on this thread: what its log lines carry."""

    service: str | None
    hook_instance: str | None = None
    status: int | None = None
    pending: list[logging.LogRecord] = field(default_factory=list)

    def fields(self) -> dict[str, Any]:
        return {"service": self.service, "hookInstance": self.hook_instance, "status": self.status}


_call: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar("cds_call", default=None)


def begin_call(service: str | None) -> tuple[CallContext, contextvars.Token[CallContext | None]]:
    context = CallContext(service)
    return context, _call.set(context)


def current_call() -> CallContext | None:
    return _call.get()


def bind_call(*, hook_instance: str | None = None, status: int | None = None) -> None:
    """What the call learned: its hookInstance once the body is read, its status once it is answered."""
    context = _call.get()
    if context is None:
        return
    if hook_instance:
        context.hook_instance = hook_instance
    if status is not None:
        context.status = status


def end_call(token: contextvars.Token[CallContext | None], status: int | None) -> None:
    """The call is answered: its held-back lines go out with the final status; the thread forgets the call."""
    context = _call.get()
    _call.reset(token)
    if context is None:
        return
    if status is not None:
        context.status = status
    _release(context)


def _release(context: CallContext) -> None:
    pending, context.pending = context.pending, []
    for record in pending:
        for name, value in context.fields().items():
            setattr(record, name, value)
        handler: logging.Handler = record.__dict__.pop("_cds_handler")
        handler.handle(record)


class CallFilter(logging.Filter):
    """Adds service, hookInstance and status to a line logged while a call is answered on this thread.

    A call's status is known only once it is answered, so its lines are held back until then (a few ms; the
    record keeps its own time) and then written with the final status: every line about a call carries all three.
    """

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if "_cds_done" in record.__dict__:
            return True
        context = _call.get()
        if context is None:
            return True
        record._cds_done = True
        if context.status is None and len(context.pending) < _MAX_PENDING:
            record._cds_handler = self.handler
            context.pending.append(record)
            return False
        for name, value in context.fields().items():
            setattr(record, name, value)
        return True


# -- stray output: print(), tracebacks, warnings written straight to the streams ---------------------------------


class JsonLines(io.TextIOBase):
    """A stdout/stderr stand-in for JSON mode: a line that is not already a JSON object becomes one.

    Log handlers write JSON objects and pass through unchanged; what gunicorn prints, a thread's uncaught
    traceback or a library's print() becomes {"level": ..., "logger": "stdout"|"stderr", "message": line}.
    """

    def __init__(self, raw: TextIO, name: str, level: str) -> None:
        super().__init__()
        self.raw = raw
        self.name = name
        self.level = level
        self._buffer = ""
        self._lock = threading.Lock()
        self._formatter = JsonFormatter()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            self._buffer += text
            while "\n" in self._buffer:
                line, self._buffer = self._buffer.split("\n", 1)
                self._emit(line)
        return len(text)

    def _emit(self, line: str) -> None:
        stripped = line.strip()
        if not stripped:
            return
        if stripped.startswith("{") and stripped.endswith("}"):
            self.raw.write(line + "\n")
            return
        record = logging.LogRecord(self.name, logging.getLevelName(self.level), "", 0, line, None, None)
        self.raw.write(self._formatter.format(record) + "\n")

    def flush(self) -> None:
        with self._lock:
            if self._buffer:
                line, self._buffer = self._buffer, ""
                self._emit(line)
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def isatty(self) -> bool:
        return False


# -- set-up ---------------------------------------------------------------------------------------------------------


def configure(log_format: str, level: str) -> None:
    """The process's logging, once, before anything logs (`cds-service serve`)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(level.upper())
    if log_format != "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
        root.addHandler(handler)
        return
    if not isinstance(sys.stderr, JsonLines):
        sys.stdout = JsonLines(sys.stdout, "stdout", "INFO")
        sys.stderr = JsonLines(sys.stderr, "stderr", "ERROR")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(CallFilter(handler))
    root.addHandler(handler)
    # Warnings and uncaught exceptions in threads would otherwise print multi-line text: log them as records.
    logging.captureWarnings(True)

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread else "?"
        # exc_value is typed optional but set for every uncaught exception.
        exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
        logging.getLogger("cds_service").error("uncaught exception in thread %s", name, exc_info=exc_info)  # type: ignore[arg-type]

    threading.excepthook = thread_excepthook


class GunicornJsonLogger(glogging.Logger):  # type: ignore[misc]
    """gunicorn's error and access logs as JSON objects; an access line about a call names its service,
    hookInstance and status. Never a header or a query string: a token or patient data could be in them."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        formatter = JsonFormatter()
        for logger in (self.error_log, self.access_log):
            for handler in logger.handlers:
                handler.setFormatter(formatter)

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        if not self.access_log_enabled:
            return
        status = resp.status
        code = int(str(status).split(None, 1)[0]) if status else None
        call: CallContext | None = environ.get(ENVIRON_KEY)
        method, path = environ.get("REQUEST_METHOD", "-"), environ.get("PATH_INFO", "-")
        extra: dict[str, Any] = {
            "method": method,
            "path": path[:200],
            "status": code,
            "durationMs": round(request_time.total_seconds() * 1000, 3),
            "bytes": getattr(resp, "sent", None),
            "remote": environ.get("REMOTE_ADDR"),
            "userAgent": (environ.get("HTTP_USER_AGENT") or "")[:200] or None,
        }
        if call is not None:
            extra["service"] = call.service
            extra["hookInstance"] = call.hook_instance
        try:
            self.access_log.info("%s %s %s", method, path[:200], code, extra=extra)
        except Exception:
            self.error("access log failed", exc_info=True)


def now_iso() -> str:
    return datetime.fromtimestamp(time.time(), UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
