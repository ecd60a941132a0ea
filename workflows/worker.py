"""``buckets run``: the worker — reconcile on its cron, the waker (due-queue flips as they fall
due), the daily full sweep, the dispatcher, backfill jobs, the reaper.

Several workers may share one database: the reconcile takes per-bucket locks and runs a tick
once per bucket, jobs are leased, transitions are claimed with ``SKIP LOCKED``. On start a
worker migrates the schema (serialised by an advisory lock) and deploys the definitions
(enqueues the first-time / re-evaluation backfills they need, once). On SIGTERM / SIGINT it
stops taking work, lets a reconcile tick in flight finish, releases a backfill job at its next
chunk boundary (pending again: another worker resumes it from its cursor) and lets the
dispatcher finish the batch in hand.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from apscheduler.triggers.interval import IntervalTrigger

from buckets.dispatcher import run_dispatcher
from buckets.migrations import upgrade
from buckets.runtime import Runtime
from workflows import jobs
from workflows.backfill import Runner, deploy
from workflows.scheduler import build_scheduler
from workflows.waker import Waker

log = logging.getLogger("buckets.worker")
BACKFILL_POLL_SECONDS = 2
REAPER_SECONDS = 30


class Worker:
    def __init__(
        self, runtime: Runtime, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self.runtime = runtime
        self.clock = clock
        self.stop = threading.Event()
        self.runner = Runner(runtime, clock=clock)
        self.scheduler = build_scheduler(runtime)
        self.scheduler.add_job(
            self._backfills,
            IntervalTrigger(seconds=BACKFILL_POLL_SECONDS),
            id="backfills",
            max_instances=1,
            coalesce=True,
        )
        self.scheduler.add_job(
            self._reap,
            IntervalTrigger(seconds=REAPER_SECONDS),
            id="reaper",
            max_instances=1,
            coalesce=True,
        )
        self.dispatcher = threading.Thread(
            target=run_dispatcher, args=(runtime, self.stop), name="dispatcher", daemon=True
        )
        self.waker = threading.Thread(
            target=Waker(runtime, clock=clock).run, args=(self.stop,), name="waker", daemon=True
        )

    def start(self) -> list[Any]:
        """Migrate, deploy, start the scheduler and the dispatcher; returns the jobs deployed."""
        upgrade(self.runtime.engine)
        created = deploy(self.runtime, self.clock())
        for job in created:
            log.info("deployed: %s backfill job %d for %s", job.mode, job.id, job.bucket_id)
        self.scheduler.start()
        self.dispatcher.start()
        self.waker.start()
        return created

    def shutdown(self) -> None:
        """Graceful: finish or release what is in flight."""
        self.stop.set()
        self.scheduler.shutdown(wait=True)
        self.dispatcher.join(timeout=30)
        self.waker.join(timeout=30)

    def _backfills(self) -> None:
        for job in self.runner.run_pending(self.stop):
            log.info("backfill job %d (%s): %s", job.id, job.bucket_id, job.status)

    def _reap(self) -> None:
        with self.runtime.engine.begin() as conn:
            resumed, failed = jobs.reap(conn, self.clock())
        if resumed or failed:
            log.warning("reaper: %d jobs resumable, %d failed (expired leases)", resumed, failed)


def run_worker(runtime: Runtime) -> None:
    """Run until SIGTERM or SIGINT."""
    worker = Worker(runtime)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: worker.stop.set())
    worker.start()
    log.info("worker running (reconcile cron %s)", runtime.settings.reconcile_cron)
    worker.stop.wait()
    log.info("shutting down")
    worker.shutdown()
