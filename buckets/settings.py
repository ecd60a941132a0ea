"""Settings: one pydantic-settings class, read from ``BUCKETS_*`` environment variables.

The CLI's ``--database-url`` / ``--definitions`` options override the environment by passing
values to :func:`get_settings`; Alembic's ``env.py`` reads the same class, so the app and its
migrations always talk to the same database.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import platformdirs
from apscheduler.triggers.cron import CronTrigger
from pydantic import AwareDatetime, Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from buckets.criteria.durations import MAX_DURATION
from buckets.errors import ConfigError

DEFAULT_RECONCILE_CRON = "*/5 * * * *"
DEFAULT_FULL_SWEEP_CRON = "30 3 * * *"
# The accepted instants leave MAX_DURATION (and a day for offsets) of room on both sides of
# Python's datetime range, so `now - within` and `now + max_dwell` never overflow.
_HEADROOM = MAX_DURATION + timedelta(days=1)
_EARLIEST = datetime.min.replace(tzinfo=UTC) + _HEADROOM
_LATEST = datetime.max.replace(tzinfo=UTC) - _HEADROOM


def default_data_dir() -> Path:
    """Where the embedded PostgreSQL keeps its data when nothing else is configured."""
    return platformdirs.user_data_path("buckets")


class Settings(BaseSettings):
    """Every knob of the engine. Environment variables carry the ``BUCKETS_`` prefix."""

    model_config = SettingsConfigDict(env_prefix="BUCKETS_", extra="ignore")

    database_url: str | None = Field(
        default=None,
        description="PostgreSQL URL. Unset: an embedded PostgreSQL under data_dir is used.",
    )
    definitions: str | None = Field(
        default=None,
        description="Bucket definitions: a module path, or a .py/.yaml/.json file or directory.",
    )
    reconcile_cron: str = Field(
        default=DEFAULT_RECONCILE_CRON,
        description="Crontab expression (5 fields, UTC) on which the reconcile tick runs.",
    )
    full_sweep_cron: str = Field(
        default=DEFAULT_FULL_SWEEP_CRON,
        description="Crontab (5 fields, UTC) of the full sweep: every member and candidate"
        " examined and the due queue rebuilt (the safety net; what it heals is logged).",
    )
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Directory for local state; the embedded PostgreSQL lives in data_dir/pgdata.",
    )

    config_cache_seconds: float = Field(
        default=1.0,
        ge=0,
        description="How long a process may cache bucket_configs.enabled overrides (seconds).",
    )
    max_payload_bytes: int = Field(
        default=65_536,
        gt=0,
        description="Largest accepted event: JSON size of properties plus contact_properties.",
    )
    max_clock_skew: timedelta = Field(
        default=timedelta(minutes=5),
        ge=timedelta(0),
        description="How far past `now` an event's occurred_at may be, and how far past the"
        " real clock a `now` given to the CLI or the HTTP API may be (seconds or ISO 8601).",
    )
    min_instant: AwareDatetime = Field(
        default=datetime(1970, 1, 1, tzinfo=UTC),
        description="Earliest accepted `now` / `occurred_at` (after offset normalisation).",
    )
    max_instant: AwareDatetime = Field(
        default=datetime(9900, 1, 1, tzinfo=UTC),
        description="Latest accepted `now` / `occurred_at`; the years up to 9999 are room for"
        " durations (at most 36,500 days) added to it.",
    )
    max_json_depth: int = Field(
        default=64,
        ge=1,
        le=200,
        description="Deepest nesting of an event's properties / contact_properties (the object"
        " itself is level 1).",
    )
    max_request_bytes: int = Field(
        default=10 * 1024 * 1024,
        gt=0,
        description="Largest HTTP request body the admin API reads.",
    )
    max_outage: timedelta = Field(
        default=timedelta(minutes=5),
        ge=timedelta(0),
        description=(
            "How long a long-running process (worker, dispatcher, backfill) keeps retrying an"
            " unavailable database before it exits non-zero (seconds or ISO 8601; 0: forever)."
        ),
    )
    ingest_chunk_size: int = Field(
        default=500,
        gt=0,
        description="Events per transaction in batch ingest.",
    )
    due_connections: int = Field(
        default=2,
        ge=1,
        le=32,
        description="Connections a tick decides a large due backlog on, side by side (from"
        " 10,000 entries due; each claims its own entries and contacts).",
    )
    admin_token: str | None = Field(
        default=None,
        description="Bearer token of the admin HTTP API; unset: every request is refused.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO",
        description="Level of the long-running commands' log lines (run, dispatch, serve).",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="text: one readable line per record; json: one JSON object per line.",
    )
    worker_http: str | None = Field(
        default=None,
        description="host:port on which `buckets run` serves /healthz, /readyz and /metrics"
        " (unset: no HTTP listener; port 0 picks a free one).",
    )

    @field_validator("database_url", "definitions", "admin_token", "worker_http")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            return None
        return value

    @field_validator("max_outage", mode="before")
    @classmethod
    def _seconds(cls, value: Any) -> Any:
        """A bare number is seconds (pydantic only takes ISO 8601 or [HH:MM:]SS strings)."""
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value
        return value

    @field_validator("reconcile_cron", "full_sweep_cron")
    @classmethod
    def _valid_crontab(cls, value: str) -> str:
        try:
            CronTrigger.from_crontab(value, timezone="UTC")
        except ValueError as exc:
            raise ValueError(f"not a valid crontab expression {value!r}: {exc}") from exc
        return value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _case(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            return (
                value.strip().upper() if info.field_name == "log_level" else value.strip().lower()
            )
        return value

    @field_validator("worker_http")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            parse_host_port(value)
        return value

    @field_validator("min_instant")
    @classmethod
    def _room_before(cls, value: datetime) -> datetime:
        if value < _EARLIEST:
            raise ValueError(f"must be at least {_EARLIEST.isoformat()} (room for durations)")
        return value

    @field_validator("max_instant")
    @classmethod
    def _room_after(cls, value: datetime, info: ValidationInfo) -> datetime:
        skew = info.data.get("max_clock_skew", timedelta(0))
        if value > _LATEST - skew:
            raise ValueError(
                f"must be at most {(_LATEST - skew).isoformat()} (room for durations and"
                " BUCKETS_MAX_CLOCK_SKEW)"
            )
        lowest = info.data.get("min_instant")
        if lowest is not None and value <= lowest:
            raise ValueError("must be later than BUCKETS_MIN_INSTANT")
        return value

    @property
    def embedded_pgdata(self) -> Path:
        return self.data_dir / "pgdata"


def parse_host_port(value: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9000`` for IPv6) into its parts; ``ValueError`` naming the
    problem otherwise."""
    host, sep, port = value.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected host:port (e.g. 127.0.0.1:9100), got {value!r}")
    return host, int(port)


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment, with explicit non-None ``overrides`` winning.

    Raises :class:`ConfigError` naming the offending variable instead of pydantic's report.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"BUCKETS_{field.upper()}: {message}") from exc


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings from the environment (cached; tests build their own)."""
    return load_settings()
