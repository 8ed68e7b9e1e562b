"""Settings: defaults, then CDS_* environment variables, then the mapping given to create_app (which wins), checked
once into a frozen, typed Settings."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

PREFIX = "CDS_"

# The Flask import name fixes the instance folder (the default SQLite file and audit spill folder live there; an
# installed wheel's is <prefix>/var/cds_service.app-instance). It keeps the name the app module had before it moved
# into cds_service/web/, so an upgrade finds the same database.
FLASK_IMPORT_NAME = "cds_service.app"


def instance_folder() -> str:
    """The instance folder Flask derives for FLASK_IMPORT_NAME (from the package's location only), computed without
    looking that former module up: the app and the commands that open the store without an app use the same one."""
    from flask.sansio.scaffold import find_package

    prefix, package_path = find_package("cds_service")
    if prefix is None:
        return os.path.join(package_path, "instance")
    return os.path.join(prefix, "var", f"{FLASK_IMPORT_NAME}-instance")


# Every setting the service reads, with its default. docs/operators.md (Settings) documents each one.
DEFAULTS: dict[str, Any] = {
    "POLICY_DIR": None,  # None: the packaged policies/
    "PUBLIC_URL": "http://127.0.0.1:8080",
    "AUTH": "jwt",
    "TRUSTED_ISSUERS": None,
    "CORS_ORIGINS": "",
    "DATABASE_URL": None,  # None: SQLite file in the instance folder
    "FHIR_TIMEOUT": 3.0,
    "FHIR_MAX_READS": 16,  # per worker process
    "FHIR_BREAKER_FAILURES": 3,
    "FHIR_BREAKER_COOLDOWN": 30.0,
    "FHIR_BREAKER_WINDOW": 60.0,
    "ALLOW_HTTP_FHIR": False,
    # Seconds the Coverage read at encounter-start is kept (per process, in memory, per FHIR server and patient) for
    # the encounter's later hooks whose prefetch lacks it; 0 turns the cache off.
    "COVERAGE_CACHE_TTL": 300.0,
    "AUDIT_SPILL_DIR": None,  # None: audit-spill/ in the instance folder
    "MAX_BODY_BYTES": 5 * 1024 * 1024,
    "AUDIT": True,
    # sync: an answered call's audit record is in this process's journal (fsynced, in the spill folder) before the
    # answer is sent, so a SIGKILL or power cut loses none; async: it waits in memory for the database writer
    # (faster; a SIGKILL loses the records not yet written). docs/audit-durability.md has the measured costs.
    "AUDIT_DURABILITY": "sync",
    "CARD_ID_KEY": None,  # None: a key made once in the database (marks card uuids as this service's)
    "LOG_LEVEL": "INFO",
    "LOG_FORMAT": "text",  # text | json (one JSON object per line)
    "ACCESS_LOG": None,  # None: on with LOG_FORMAT=json, off with text
    "METRICS": True,  # GET /metrics (Prometheus)
    "METRICS_TOKEN": None,  # when set, /metrics wants `Authorization: Bearer <token>`
    "AUDIT_EXPORT_TOKEN": None,  # bearer token for `cds-service audit export --to URL` (never logged)
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """A setting has a value the service cannot use."""


def from_environment(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """CDS_* variables with the prefix removed (strings, converted by `normalise`)."""
    env = os.environ if environ is None else environ
    return {key[len(PREFIX) :]: value for key, value in env.items() if key.startswith(PREFIX)}


def as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"CDS_{name}: expected true or false, got {value!r}")


def normalise(settings: dict[str, Any]) -> dict[str, Any]:
    """Check and convert the settings the service reads (Settings.load keeps only the names it knows)."""
    out = dict(settings)
    auth = str(out["AUTH"]).strip().lower()
    if auth not in ("jwt", "off"):
        raise ConfigError(f"CDS_AUTH: expected 'jwt' or 'off', got {out['AUTH']!r}")
    out["AUTH"] = auth
    out["PUBLIC_URL"] = str(out["PUBLIC_URL"]).rstrip("/")
    if not out["PUBLIC_URL"].startswith(("http://", "https://")):
        raise ConfigError(f"CDS_PUBLIC_URL: expected an http(s) URL, got {out['PUBLIC_URL']!r}")
    try:
        out["FHIR_TIMEOUT"] = float(out["FHIR_TIMEOUT"])
        out["MAX_BODY_BYTES"] = int(out["MAX_BODY_BYTES"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"CDS_FHIR_TIMEOUT / CDS_MAX_BODY_BYTES: {exc}") from exc
    if not 0 < out["FHIR_TIMEOUT"] <= 30:
        raise ConfigError("CDS_FHIR_TIMEOUT: expected seconds between 0 and 30")
    out["FHIR_MAX_READS"] = _number("FHIR_MAX_READS", out["FHIR_MAX_READS"], int, 1, 1000)
    out["FHIR_BREAKER_FAILURES"] = _number("FHIR_BREAKER_FAILURES", out["FHIR_BREAKER_FAILURES"], int, 0, 1000)
    out["FHIR_BREAKER_COOLDOWN"] = _number("FHIR_BREAKER_COOLDOWN", out["FHIR_BREAKER_COOLDOWN"], float, 0.1, 3600)
    out["FHIR_BREAKER_WINDOW"] = _number("FHIR_BREAKER_WINDOW", out["FHIR_BREAKER_WINDOW"], float, 0.1, 86400)
    spill = out["AUDIT_SPILL_DIR"]
    out["AUDIT_SPILL_DIR"] = (str(spill).strip() or None) if spill is not None else None
    out["COVERAGE_CACHE_TTL"] = _number("COVERAGE_CACHE_TTL", out["COVERAGE_CACHE_TTL"], float, 0, 86400)
    out["ALLOW_HTTP_FHIR"] = as_bool("ALLOW_HTTP_FHIR", out["ALLOW_HTTP_FHIR"])
    out["AUDIT"] = as_bool("AUDIT", out["AUDIT"])
    durability = str(out["AUDIT_DURABILITY"]).strip().lower()
    if durability not in ("sync", "async"):
        raise ConfigError(f"CDS_AUDIT_DURABILITY: expected 'sync' or 'async', got {out['AUDIT_DURABILITY']!r}")
    out["AUDIT_DURABILITY"] = durability
    out["CORS_ORIGINS"] = _cors_origins(out["CORS_ORIGINS"])
    out["LOG_FORMAT"] = str(out["LOG_FORMAT"]).strip().lower()
    if out["LOG_FORMAT"] not in ("text", "json"):
        raise ConfigError(f"CDS_LOG_FORMAT: expected 'text' or 'json', got {settings['LOG_FORMAT']!r}")
    access = out["ACCESS_LOG"]
    out["ACCESS_LOG"] = out["LOG_FORMAT"] == "json" if access is None else as_bool("ACCESS_LOG", access)
    out["METRICS"] = as_bool("METRICS", out["METRICS"])
    for name in ("METRICS_TOKEN", "AUDIT_EXPORT_TOKEN"):
        token = out[name]
        out[name] = (str(token).strip() or None) if token is not None else None
    issuers = out["TRUSTED_ISSUERS"]
    # A path to the issuers JSON file (read by auth.build_authenticator); empty means none.
    out["TRUSTED_ISSUERS"] = (str(issuers).strip() or None) if issuers is not None else None
    return out


def _number(name: str, value: Any, kind: type[int] | type[float], low: float, high: float) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"CDS_{name}: expected a number, got {value!r}") from None
    if not low <= number <= high:
        raise ConfigError(f"CDS_{name}: expected a number from {low:g} to {high:g}, got {value!r}")
    return number


def _cors_origins(value: Any) -> list[str]:
    """CDS_CORS_ORIGINS: a comma list of origins (scheme://host[:port], as browsers send them) or "*"."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    origins: list[str] = []
    for item in items:
        origin = str(item).strip().rstrip("/").lower()  # browsers serialise scheme and host in lower case
        if not origin:
            continue
        if origin != "*":
            scheme, sep, rest = origin.partition("://")
            if scheme not in ("http", "https") or not sep or not rest or any(c in rest for c in "/?#@ "):
                raise ConfigError(f"CDS_CORS_ORIGINS: expected origins like https://ehr.example.org, got {item!r}")
        origins.append(origin)
    return origins


@dataclass(frozen=True)
class Settings:
    """Every setting the service reads, checked and converted once. Field `x_y` is the variable `CDS_X_Y`; the
    defaults are DEFAULTS above and docs/operators.md describes each one."""

    policy_dir: str | None
    public_url: str
    auth: Literal["jwt", "off"]
    trusted_issuers: str | None  # path of the issuers JSON file
    cors_origins: tuple[str, ...]
    database_url: str | None
    fhir_timeout: float
    fhir_max_reads: int
    fhir_breaker_failures: int
    fhir_breaker_cooldown: float
    fhir_breaker_window: float
    allow_http_fhir: bool
    coverage_cache_ttl: float  # seconds; 0 turns the encounter-start Coverage cache off
    audit_spill_dir: str | None
    max_body_bytes: int
    audit: bool
    audit_durability: Literal["sync", "async"]  # sync: journalled (fsync) before the answer leaves
    card_id_key: str | None
    log_level: str
    log_format: Literal["text", "json"]
    access_log: bool
    metrics: bool
    metrics_token: str | None
    audit_export_token: str | None  # `cds-service audit export --to URL` (never logged)

    @classmethod
    def load(cls, config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Defaults, then the CDS_* environment, then `config` (names without the prefix); ConfigError when a value
        cannot be used."""
        merged = dict(DEFAULTS)
        merged.update(from_environment(environ))
        if config:
            merged.update({k.removeprefix(PREFIX): v for k, v in config.items()})
        checked = normalise(merged)
        return cls(**{f.name: _frozen(checked[f.name.upper()]) for f in fields(cls)})

    def as_config(self) -> dict[str, Any]:
        """The settings under their CDS_* names without the prefix (what Flask's app.config shows)."""
        return {
            name.upper(): list(value) if isinstance(value, tuple) else value for name, value in asdict(self).items()
        }


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def load(config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    return Settings.load(config, environ)
