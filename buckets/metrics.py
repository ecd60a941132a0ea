"""Prometheus metrics (``prometheus-client``): what ``GET /metrics`` serves on the admin API
and on the worker (``BUCKETS_WORKER_HTTP``). The names and labels are documented in the
README ("Operating buckets").

Two kinds:

* **Counters and histograms of this process** (transitions written, ticks and passes, ingest,
  journey handlers). Transitions are counted when the transaction that wrote them commits (a
  dry run, a rolled-back chunk count nothing). With ``PROMETHEUS_MULTIPROC_DIR`` set (several
  processes behind one endpoint, e.g. ``uvicorn --workers``), prometheus-client's
  multi-process mode keeps them in files of that directory and :func:`render` aggregates them
  (empty the directory when the processes start; see prometheus-client's docs).
* **State read from PostgreSQL at scrape time** (members, due backlog and lag, undispatched
  transitions, backfill progress, worker heartbeats): the same whichever process serves it,
  so never doubled by multi-process aggregation. A few index scans per scrape; the member
  counts read the active-membership index (about 0.1 s per million members).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import REGISTRY, Collector
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

if TYPE_CHECKING:
    from buckets.membership import Changes
    from buckets.runtime import Runtime

# Histogram buckets for operations from a millisecond to a few minutes.
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

TRANSITIONS = Counter(
    "buckets_transitions",
    "Membership transitions committed by this process.",
    ["bucket", "kind", "source", "emitted"],
)
TICK_SECONDS = Histogram(
    "buckets_tick_duration_seconds",
    "Duration of a reconcile run: job=reconcile (the cron tick), waker, full_sweep.",
    ["job"],
    buckets=SECONDS,
)
PASS_SECONDS = Histogram(
    "buckets_pass_duration_seconds",
    "Duration of one full pass of a bucket in a tick (criteria leaves, joins, ttl, ...).",
    ["bucket", "pass"],
    buckets=SECONDS,
)
DUE_DECIDED = Counter(
    "buckets_due_entries_decided",
    "Due-queue entries decided by ticks and the waker.",
    ["bucket"],
)
TICK_FAILURES = Counter(
    "buckets_tick_bucket_failures",
    "Buckets that failed in a reconcile run (the others went on).",
    ["bucket", "job"],
)
INGEST_EVENTS = Counter(
    "buckets_ingest_events",
    "Events given to ingest, by outcome: accepted, duplicate, contact_deleted, rejected.",
    ["outcome"],
)
INGEST_SECONDS = Histogram(
    "buckets_ingest_duration_seconds",
    "Latency of one ingest call: mode=event (ingest_event) or batch (ingest_events).",
    ["mode"],
    buckets=SECONDS,
)
HANDLER_CALLS = Counter(
    "buckets_handler_calls",
    "Journey handler calls, by result: delivered, failed (then retried or given up).",
    ["journey", "result"],
)
HANDLER_RETRIES = Counter(
    "buckets_handler_retries",
    "Failed journey deliveries scheduled for another attempt.",
    ["journey"],
)
ENROLLMENTS_FAILED = Counter(
    "buckets_enrollments_failed",
    "Enrollments marked failed after their last attempt.",
    ["journey"],
)

# -- transitions, counted at commit ---------------------------------------------------------

# Counts written by a connection's open transaction, by connection (not `conn.info`: an
# invalidated connection raises on reading it, and these handlers must never raise).
_pending: weakref.WeakKeyDictionary[Connection, dict[tuple[str, str, str, str], int]] = (
    weakref.WeakKeyDictionary()
)
_watched: weakref.WeakSet[Engine] = weakref.WeakSet()
_watch_lock = threading.Lock()


def watch(engine: Engine) -> None:
    """Count transitions written through ``engine`` when their transaction commits."""
    with _watch_lock:
        if engine in _watched:
            return
        event.listen(engine, "commit", _flush)
        event.listen(engine, "rollback", _discard)
        _watched.add(engine)


def _flush(conn: Connection) -> None:
    pending = _pending.pop(conn, None)
    for labels, count in (pending or {}).items():
        TRANSITIONS.labels(*labels).inc(count)


def _discard(conn: Connection) -> None:
    _pending.pop(conn, None)


def transitions(conn: Connection, kind: str, source: str, changes: Changes) -> None:
    """Count ``changes`` (of one join or leave statement) when ``conn``'s transaction commits."""
    if not changes.per_bucket:
        return
    watch(conn.engine)
    pending = _pending.setdefault(conn, {})
    for bucket_id, counts in changes.per_bucket.items():
        for emitted, count in (("true", counts.emitted), ("false", counts.suppressed)):
            if count:
                key = (bucket_id, kind, source, emitted)
                pending[key] = pending.get(key, 0) + count


# -- scrape-time state from the database ----------------------------------------------------


class DatabaseState(Collector):
    """Gauges read from PostgreSQL when scraped (see the module doc)."""

    def __init__(self, runtime: Runtime, now: datetime | None = None) -> None:
        self.runtime = runtime
        self.now = now

    def collect(self) -> Iterable[Metric]:
        now = self.now or datetime.now(UTC)
        up = GaugeMetricFamily("buckets_database_up", "1 when PostgreSQL answered the scrape.")
        try:
            with self.runtime.engine.connect() as conn:
                found = list(self._read(conn, now))
        except DBAPIError:
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        return [up, *found]

    def _read(self, conn: Connection, now: datetime) -> Iterator[Metric]:
        from buckets import due, health
        from buckets.migrations import current_revision, head_revision
        from buckets.models import backfill_jobs, bucket_memberships

        at_head = GaugeMetricFamily(
            "buckets_schema_at_head", "1 when the schema is at this code's head revision."
        )
        current = current_revision(conn)
        at_head.add_metric([], 1 if current == head_revision() else 0)
        yield at_head
        if current != head_revision():
            return
        registry = self.runtime.registry
        ids = [bucket.id for bucket in registry]
        members = GaugeMetricFamily(
            "buckets_members", "Active members per bucket.", labels=["bucket"]
        )
        rows = conn.execute(
            sa.select(bucket_memberships.c.bucket_id, sa.func.count())
            .where(bucket_memberships.c.status == "active")
            .group_by(bucket_memberships.c.bucket_id)
        )
        counts: dict[str, int] = {row[0]: row[1] for row in rows}
        for bucket_id in ids:
            members.add_metric([bucket_id], counts.get(bucket_id, 0))
        yield members

        backlog = due.backlog(conn, [bucket.id for bucket in registry if bucket.clocked], now)
        entries = GaugeMetricFamily(
            "buckets_due_entries", "Due-queue entries per bucket.", labels=["bucket"]
        )
        due_now = GaugeMetricFamily(
            "buckets_due_backlog", "Due-queue entries due now per bucket.", labels=["bucket"]
        )
        lag = GaugeMetricFamily(
            "buckets_due_oldest_age_seconds",
            "How long the oldest due entry of the bucket has waited (0: nothing due).",
            labels=["bucket"],
        )
        for bucket_id, item in backlog.items():
            entries.add_metric([bucket_id], item.entries)
            due_now.add_metric([bucket_id], item.due)
            lag.add_metric([bucket_id], item.lag(now).total_seconds())
        yield from (entries, due_now, lag)

        pending = health.undispatched(conn)
        count = GaugeMetricFamily(
            "buckets_undispatched_transitions", "Emitted transitions not yet dispatched."
        )
        count.add_metric([], pending.count)
        oldest = GaugeMetricFamily(
            "buckets_undispatched_oldest_age_seconds",
            "Age of the oldest emitted, undispatched transition (0: none).",
        )
        oldest.add_metric([], pending.age(now).total_seconds())
        yield from (count, oldest)

        labels = ["bucket", "job", "mode", "status"]
        processed = GaugeMetricFamily(
            "buckets_backfill_processed",
            "Contacts processed by a pending/running job.",
            labels=labels,
        )
        total = GaugeMetricFamily(
            "buckets_backfill_total", "Contacts a pending/running job will process.", labels=labels
        )
        jobs = conn.execute(
            sa.select(
                backfill_jobs.c.bucket_id,
                backfill_jobs.c.id,
                backfill_jobs.c.mode,
                backfill_jobs.c.status,
                backfill_jobs.c.processed,
                backfill_jobs.c.total,
            ).where(backfill_jobs.c.status.in_(("pending", "running")))
        )
        for bucket_id, job_id, mode, status, done, planned in jobs:
            values = [bucket_id, str(job_id), mode, status]
            processed.add_metric(values, done)
            if planned is not None:
                total.add_metric(values, planned)
        yield from (processed, total)

        beat = GaugeMetricFamily(
            "buckets_worker_heartbeat_timestamp_seconds",
            "Last heartbeat of each running worker (Unix time).",
            labels=["worker"],
        )
        tick = GaugeMetricFamily(
            "buckets_worker_last_tick_timestamp_seconds",
            "The `now` of each running worker's last reconcile tick (Unix time).",
            labels=["worker"],
        )
        for state in health.workers(conn):
            if state.state(now) != "running":
                continue
            beat.add_metric([state.worker_id], state.beat_at.timestamp())
            if state.last_tick_at is not None:
                tick.add_metric([state.worker_id], state.last_tick_at.timestamp())
        yield from (beat, tick)


class _ProcessMetrics(Collector):
    """This process's own metrics (the default registry: ours and the process collectors)."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def render(runtime: Runtime, now: datetime | None = None) -> tuple[bytes, str]:
    """The exposition text and its content type: this process's metrics (or, in multi-process
    mode, every process's) followed by the database state."""
    import os

    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client.multiprocess import MultiProcessCollector

        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(_ProcessMetrics())
    registry.register(DatabaseState(runtime, now))
    return generate_latest(registry), CONTENT_TYPE_LATEST
