"""``buckets run``: the worker — reconcile on its cron, the waker (due-queue flips as they fall
due), the daily full sweep, the dispatcher, backfill jobs, the reaper.

Several workers may share one database: the reconcile takes per-bucket locks and runs a tick
once per bucket, jobs are leased, transitions are claimed with ``SKIP LOCKED``. On start a
worker migrates the schema (serialised by an advisory lock) and deploys the definitions
(enqueues the first-time / re-evaluation backfills they need, once). On SIGTERM / SIGINT it
stops taking work, lets a reconcile tick in flight finish, releases a backfill job at its next
chunk boundary (pending again: another worker resumes it from its cursor) and lets the
dispatcher finish the batch in hand.

Every long-lived loop runs through :mod:`buckets.resilience`: the dispatcher, the waker, the
backfill runner and the reaper are threads of the worker's :class:`~buckets.resilience.Supervisor`
(``resilience.forever`` steps), the reconcile tick and the full sweep retry themselves while
the database is away.
A lost database is ridden out (each loop logs the outage once, and its end); one unavailable
for longer than ``BUCKETS_MAX_OUTAGE``, or any loop dying of anything else, stops the whole
worker, which then exits non-zero (:class:`WorkerError`): never a half-alive worker.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from buckets import health, resilience
from buckets.dispatcher import run_dispatcher
from buckets.errors import BucketsError, DatabaseUnavailableError
from buckets.migrations import upgrade
from buckets.runtime import Runtime
from workflows import jobs
from workflows.backfill import Runner, deploy
from workflows.reconcile import Tick
from workflows.scheduler import build_scheduler, full_sweep_job, reconcile_job
from workflows.waker import Waker
from workflows.worker_http import WorkerHttp

log = logging.getLogger("buckets.worker")
BACKFILL_POLL_SECONDS = 2
REAPER_SECONDS = 30
SHUTDOWN_SECONDS = 30


class WorkerError(BucketsError):
    """A loop of the worker died (or the database stayed away too long): the worker stopped."""


class Worker:
    def __init__(
        self, runtime: Runtime, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self.runtime = runtime
        self.clock = clock
        self.stop = threading.Event()
        self.supervisor = resilience.Supervisor(self.stop)
        self.max_outage = runtime.settings.max_outage
        self.runner = Runner(runtime, clock=clock, max_outage=self.max_outage)
        self.scheduler = build_scheduler(
            runtime,
            tick=lambda: self._cron("reconcile", reconcile_job),
            sweep=lambda: self._cron("full sweep", full_sweep_job),
        )
        self._lost_connections = resilience.lost_connections(runtime.engine)
        self.waker = Waker(runtime, clock=clock)
        self.worker_id = health.new_worker_id()
        self.started_at: datetime | None = None
        self.last_tick_at: datetime | None = None
        self.http: WorkerHttp | None = None

    def start(self) -> list[Any]:
        """Migrate, deploy, start the scheduler and the loops; returns the jobs deployed."""

        engine = self.runtime.engine
        address = self.runtime.settings.worker_http
        if address is not None:  # first: a busy port is a configuration error, said at once
            self.http = WorkerHttp(address, self)
            log.info("worker HTTP on %s (/healthz, /readyz, /metrics)", self.http.address)

        def prepare() -> list[Any]:
            upgrade(self.runtime.engine)
            now = self.clock()
            created = deploy(self.runtime, now)
            with engine.begin() as conn:
                health.register(conn, self.worker_id, self.runtime.settings.reconcile_cron, now)
            self.started_at = now
            return created

        created = resilience.retry_outages(
            "worker start", prepare, stop=self.stop, max_outage=self.max_outage, engine=engine
        )
        for job in created:
            log.info(
                "deployed: %s backfill job %d for %s",
                job.mode,
                job.id,
                job.bucket_id,
                extra={"bucket": job.bucket_id, "job": job.id, "mode": job.mode},
            )
        self._warn_never_seen()
        self.scheduler.start()
        limit = self.max_outage
        self.supervisor.start(
            "dispatcher", lambda: run_dispatcher(self.runtime, self.stop, max_outage=limit)
        )
        for name, step, every in (
            ("waker", lambda: self.waker.step_and_wait(self.stop), 0.0),
            ("backfills", self._backfills, BACKFILL_POLL_SECONDS),
            ("reaper", self._reap, REAPER_SECONDS),
            ("heartbeat", self._beat, health.HEARTBEAT_SECONDS),
        ):
            loop = resilience.forever(
                name, step, self.stop, every=every, max_outage=limit, engine=engine
            )
            self.supervisor.start(name, loop)
        return created

    @property
    def dispatcher(self) -> threading.Thread:
        return self.supervisor.threads["dispatcher"]

    def shutdown(self) -> None:
        """Graceful: finish or release what is in flight."""
        self.stop.set()
        self.scheduler.shutdown(wait=True)
        running = self.supervisor.join(timeout=SHUTDOWN_SECONDS)
        if running:
            log.warning("still running after %d s: %s", SHUTDOWN_SECONDS, ", ".join(running))
        if self.started_at is not None:
            try:
                with self.runtime.engine.begin() as conn:
                    health.beat(conn, self.worker_id, self.clock(), stopped=True)
            except Exception as exc:  # the database may be the reason we stop
                log.warning("could not record the worker's stop: %s", resilience.first_line(exc))
        if self.http is not None:
            self.http.close()

    def _warn_never_seen(self) -> None:
        """One warning per bucket and name the catalogue never saw (a typo, usually)."""
        from buckets.catalog import never_seen

        try:
            with self.runtime.engine.connect() as conn:
                unseen = never_seen(conn, self.runtime.registry)
        except Exception as exc:  # advisory: never a reason not to start
            log.warning("could not read the catalogue: %s", resilience.first_line(exc))
            return
        for item in unseen:
            log.warning(
                "%s",
                item,
                extra={"bucket": item.bucket_id, "kind": item.kind, "never_seen": item.name},
            )

    def _beat(self) -> None:
        with self.runtime.engine.begin() as conn:
            health.beat(conn, self.worker_id, self.clock(), last_tick_at=self.last_tick_at)

    def readiness(self, now: datetime) -> health.Readiness:
        """Ready: database reachable, schema at head, definitions loaded, the last reconcile
        tick (or the start) not older than two cadences, every loop alive."""
        registry = self.runtime.registry
        checks = [
            *health.database_checks(self.runtime.engine),
            health.definitions_check(len(registry), len(registry.journeys)),
        ]
        cron = self.runtime.settings.reconcile_cron
        if self.started_at is None:
            checks.append(health.Check("tick", False, "the worker is starting"))
        else:
            checks.append(health.tick_check(cron, self.last_tick_at, self.started_at, now))
        failure = self.supervisor.failure
        checks.append(health.Check("loops", failure is None, failure or "all alive"))
        return health.Readiness(checks, {"worker_id": self.worker_id})

    def _backfills(self) -> None:
        for job in self.runner.run_pending(self.stop):
            log.info(
                "backfill job %d (%s): %s",
                job.id,
                job.bucket_id,
                job.status,
                extra={
                    "bucket": job.bucket_id,
                    "job": job.id,
                    "status": job.status,
                    "processed": job.processed,
                    "joined": job.joined,
                    "left": job.left,
                },
            )

    def _reap(self) -> None:
        with self.runtime.engine.begin() as conn:
            resumed, failed = jobs.reap(conn, self.clock())
        if resumed or failed:
            log.warning("reaper: %d jobs resumable, %d failed (expired leases)", resumed, failed)

    def _cron(self, name: str, job: Callable[[Runtime], Tick]) -> None:
        """A cron job (the tick, the full sweep), run again while the database is away. A tick
        isolates buckets (a failing one is reported, the others go on), so a bucket that failed
        while this thread lost a connection counts as an outage: the job is retried (its full
        passes run once per cron slot; due entries already decided are no longer due)."""

        def run() -> None:
            before = self._lost_connections()
            result = job(self.runtime)
            if result.failed and self._lost_connections() > before:
                names = ", ".join(bucket.bucket_id for bucket in result.failed)
                raise DatabaseUnavailableError(f"the connection was lost reconciling {names}")
            log.debug(
                "%s as of %s: %d buckets, %d transitions",
                name,
                result.now.isoformat(),
                len(result.buckets),
                result.transitions,
                extra={
                    "job": name.replace(" ", "_"),
                    "tick": result.now.isoformat(),
                    "buckets": len(result.buckets),
                    "transitions": result.transitions,
                },
            )
            if job is reconcile_job:
                self.last_tick_at = result.now
                self._beat()

        try:
            resilience.retry_outages(
                name, run, stop=self.stop, max_outage=self.max_outage, engine=self.runtime.engine
            )
        except Exception as exc:
            if not (self.stop.is_set() and resilience.is_outage(exc)):
                self.supervisor.fail(name, exc)


def run_worker(runtime: Runtime) -> None:
    """Run until SIGTERM or SIGINT; raises :class:`WorkerError` when a loop of the worker died
    (the worker has then shut down, and the command exits non-zero)."""
    worker = Worker(runtime)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: worker.stop.set())
    try:
        worker.start()
    except resilience.OutageTimeout as exc:
        raise WorkerError(str(exc)) from exc
    except Exception as exc:
        if worker.stop.is_set() and resilience.is_outage(exc):
            return  # stopped while waiting for the database to start
        raise
    log.info("worker running (reconcile cron %s)", runtime.settings.reconcile_cron)
    worker.stop.wait()
    log.info("shutting down")
    worker.shutdown()
    if worker.supervisor.failure is not None:
        raise WorkerError(f"worker stopped: {worker.supervisor.failure}")
