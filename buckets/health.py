"""Health and readiness: what ``/healthz``, ``/readyz`` and ``buckets status`` report.

* **Alive** (``/healthz``): the process answers. Nothing else is checked, so a supervisor does
  not restart a process because its database is away (the loops ride outages out).
* **Ready** (``/readyz``): the database answers, its schema is at the head revision of this
  code, and the definitions are loaded; for a worker also that its last reconcile tick (or its
  start, before the first tick) is not older than two cadences of ``BUCKETS_RECONCILE_CRON``
  (the gap between the two fire times that follow it) and that no loop of it has died.

Worker heartbeats live in ``worker_heartbeats`` (one row per ``buckets run`` process): the
worker writes its row every :data:`HEARTBEAT_SECONDS` and after each tick; ``buckets status``
reads every row. A worker whose last beat is older than :data:`GONE_AFTER` is reported as
gone (killed without a graceful stop, or its host lost).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from buckets.models import bucket_transitions, worker_heartbeats

HEARTBEAT_SECONDS = 10.0
GONE_AFTER = timedelta(seconds=6 * HEARTBEAT_SECONDS)
PRUNE_AFTER = timedelta(days=7)
UPGRADE_HINT = "run `buckets db upgrade`"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass(frozen=True)
class Readiness:
    checks: list[Check]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": "ready" if self.ok else "not ready",
            "checks": [check.to_dict() for check in self.checks],
            **self.extra,
        }


def _first_line(exc: BaseException) -> str:
    from buckets.db import first_line

    return first_line(getattr(exc, "orig", None) or exc)


def schema_problem(revision: str | None, head: str) -> str | None:
    """None when ``revision`` is ``head``; else one line saying what to do."""
    if revision == head:
        return None
    if revision is None:
        return f"the database has no buckets schema (head is {head}): {UPGRADE_HINT}"
    return f"the schema is at revision {revision}, this code needs {head}: {UPGRADE_HINT}"


def database_checks(engine: Engine) -> list[Check]:
    """``database`` (reachable) and ``schema`` (at head), one short connection."""
    from buckets.migrations import current_revision, head_revision

    head = head_revision()
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            revision = current_revision(conn)
    except DBAPIError as exc:
        return [
            Check("database", False, f"unreachable: {_first_line(exc)}"),
            Check("schema", False, "unknown (the database is unreachable)"),
        ]
    problem = schema_problem(revision, head)
    return [
        Check("database", True, "reachable"),
        Check("schema", problem is None, problem or f"at head ({head})"),
    ]


def definitions_check(buckets: int, journeys: int) -> Check:
    return Check("definitions", True, f"{buckets} buckets, {journeys} journeys loaded")


def cadence(cron: str, after: datetime) -> timedelta:
    """The gap between the two fire times of ``cron`` (UTC) that follow ``after``."""
    from apscheduler.triggers.cron import CronTrigger

    trigger = CronTrigger.from_crontab(cron, timezone="UTC")
    first = trigger.get_next_fire_time(None, after)
    second = trigger.get_next_fire_time(first, first + timedelta(microseconds=1))
    if first is None or second is None:  # pragma: no cover - crontabs always fire again
        return timedelta(days=366)
    gap: timedelta = second - first
    return gap


def tick_check(
    cron: str, last_tick_at: datetime | None, started_at: datetime, now: datetime
) -> Check:
    """The worker's tick is late when the last one (or the start, before the first) is older
    than two cadences of the cron that follows it."""
    since = last_tick_at or started_at
    limit = 2 * cadence(cron, since)
    age = now - since
    what = "last tick" if last_tick_at is not None else "no tick yet; started"
    detail = f"{what} {_age(age)} ago (late after {_age(limit)})"
    return Check("tick", age <= limit, detail)


def _age(delta: timedelta) -> str:
    seconds = max(delta.total_seconds(), 0.0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


# -- heartbeats -----------------------------------------------------------------------------


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def register(conn: Connection, worker_id: str, cron: str, now: datetime) -> None:
    """The worker's row (and the pruning of rows of workers gone for a week)."""
    conn.execute(
        sa.delete(worker_heartbeats).where(worker_heartbeats.c.beat_at < now - PRUNE_AFTER)
    )
    conn.execute(
        sa.insert(worker_heartbeats).values(
            worker_id=worker_id,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            reconcile_cron=cron,
            started_at=now,
            beat_at=now,
        )
    )


def beat(
    conn: Connection,
    worker_id: str,
    now: datetime,
    *,
    last_tick_at: datetime | None = None,
    stopped: bool = False,
) -> None:
    values: dict[str, Any] = {"beat_at": now}
    if last_tick_at is not None:
        values["last_tick_at"] = sa.func.greatest(
            sa.func.coalesce(worker_heartbeats.c.last_tick_at, last_tick_at), last_tick_at
        )
    if stopped:
        values["stopped_at"] = now
    conn.execute(
        sa.update(worker_heartbeats)
        .where(worker_heartbeats.c.worker_id == worker_id)
        .values(**values)
    )


@dataclass(frozen=True)
class WorkerState:
    worker_id: str
    hostname: str
    pid: int
    reconcile_cron: str
    started_at: datetime
    beat_at: datetime
    last_tick_at: datetime | None
    stopped_at: datetime | None

    def state(self, now: datetime) -> str:
        if self.stopped_at is not None:
            return "stopped"
        if now - self.beat_at > GONE_AFTER:
            return "gone"
        return "running"

    def tick(self, now: datetime) -> Check:
        return tick_check(self.reconcile_cron, self.last_tick_at, self.started_at, now)

    def to_dict(self, now: datetime) -> dict[str, Any]:
        tick = self.tick(now)
        return {
            "worker_id": self.worker_id,
            "hostname": self.hostname,
            "pid": self.pid,
            "state": self.state(now),
            "reconcile_cron": self.reconcile_cron,
            "started_at": self.started_at.isoformat(),
            "beat_at": self.beat_at.isoformat(),
            "last_tick_at": self.last_tick_at.isoformat() if self.last_tick_at else None,
            "stopped_at": self.stopped_at.isoformat() if self.stopped_at else None,
            "tick_late": not tick.ok,
        }


def workers(conn: Connection) -> list[WorkerState]:
    """Every worker row, the most recent beat first."""
    rows = conn.execute(
        sa.select(
            worker_heartbeats.c.worker_id,
            worker_heartbeats.c.hostname,
            worker_heartbeats.c.pid,
            worker_heartbeats.c.reconcile_cron,
            worker_heartbeats.c.started_at,
            worker_heartbeats.c.beat_at,
            worker_heartbeats.c.last_tick_at,
            worker_heartbeats.c.stopped_at,
        ).order_by(worker_heartbeats.c.beat_at.desc())
    )
    return [WorkerState(*row) for row in rows]


@dataclass(frozen=True)
class Undispatched:
    count: int
    oldest_at: datetime | None  # occurred_at of the oldest emitted, undispatched transition

    def age(self, now: datetime) -> timedelta:
        return max(now - self.oldest_at, timedelta(0)) if self.oldest_at else timedelta(0)


def undispatched(conn: Connection) -> Undispatched:
    """Emitted transitions not yet dispatched (the partial index holds exactly them)."""
    pending = bucket_transitions.c.emitted & bucket_transitions.c.dispatched_at.is_(None)
    count, oldest = conn.execute(
        sa.select(sa.func.count(), sa.func.min(bucket_transitions.c.occurred_at)).where(pending)
    ).one()
    return Undispatched(int(count), oldest)


def worker_checks(states: Sequence[WorkerState], now: datetime) -> list[Check]:
    """For ``buckets status``: a running worker exists and none of the running ones is late."""
    running = [state for state in states if state.state(now) == "running"]
    if not running:
        return [Check("workers", False, "no worker is running (`buckets run`)")]
    late = [state.worker_id for state in running if not state.tick(now).ok]
    if late:
        return [Check("workers", False, f"tick late on {', '.join(late)}")]
    return [Check("workers", True, f"{len(running)} running, ticks on time")]


# --- the server: the settings a large tick's cost depends on ----------------------------------

GIB = 1024**3
MIB = 1024**2
LARGE_DATABASE = GIB  # below it the defaults do (README: The PostgreSQL server)
UNIT_BYTES = {"8kB": 8192, "kB": 1024, "MB": MIB}


@dataclass(frozen=True)
class Server:
    """What ``buckets status`` reports of the PostgreSQL server (sizes in bytes)."""

    version: str
    database_bytes: int
    shared_buffers: int
    wal_buffers: int
    max_wal_size: int

    def advice(self) -> list[str]:
        """The settings still at PostgreSQL's small-machine defaults for a database of a GB or
        more (README, *The PostgreSQL server*: what they cost a tick that meets a backlog)."""
        if self.database_bytes < LARGE_DATABASE:
            return []
        database = size_text(self.database_bytes)
        tips = []
        if self.shared_buffers < GIB and self.shared_buffers * 4 < self.database_bytes:
            tips.append(
                f"shared_buffers {size_text(self.shared_buffers)} for a {database} database:"
                " set about a quarter of the machine's memory"
            )
        if self.wal_buffers < 16 * MIB:
            tips.append(f"wal_buffers {size_text(self.wal_buffers)}: set 16MB")
        if self.max_wal_size < 4 * GIB:
            tips.append(
                f"max_wal_size {size_text(self.max_wal_size)}: set 4GB or more, so a tick that"
                " meets a large backlog does not start a checkpoint half-way"
            )
        return tips

    def describe(self) -> str:
        return (
            f"PostgreSQL {self.version}, database {size_text(self.database_bytes)};"
            f" shared_buffers {size_text(self.shared_buffers)},"
            f" wal_buffers {size_text(self.wal_buffers)},"
            f" max_wal_size {size_text(self.max_wal_size)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "database_bytes": self.database_bytes,
            "shared_buffers_bytes": self.shared_buffers,
            "wal_buffers_bytes": self.wal_buffers,
            "max_wal_size_bytes": self.max_wal_size,
            "advice": self.advice(),
        }


def server(conn: Connection) -> Server:
    """The server's version, this database's size and its buffer and WAL settings."""
    found = {
        name: int(setting) * UNIT_BYTES.get(unit or "", 1)
        for name, setting, unit in conn.execute(
            sa.text(
                "SELECT name, setting, unit FROM pg_settings"
                " WHERE name IN ('shared_buffers', 'wal_buffers', 'max_wal_size')"
            )
        )
    }
    version, size = conn.execute(
        sa.text("SELECT current_setting('server_version'), pg_database_size(current_database())")
    ).one()
    return Server(
        version=str(version).split(" ")[0],
        database_bytes=int(size),
        shared_buffers=found["shared_buffers"],
        wal_buffers=found["wal_buffers"],
        max_wal_size=found["max_wal_size"],
    )


def size_text(size: int) -> str:
    """``128 MB``, ``7.4 GB``: binary units, as PostgreSQL's own settings count them."""
    for unit, scale in (("GB", GIB), ("MB", MIB), ("kB", 1024)):
        if size >= scale:
            value = size / scale
            return f"{value:.1f} {unit}" if value < 10 and value % 1 else f"{value:.0f} {unit}"
    return f"{size} bytes"
