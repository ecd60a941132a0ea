"""The waker: apply the clock's flips as they fall due, between cron ticks (SPEC §6.7).

The cron tick processes what is due every few minutes; the waker makes a flip happen within a
second or so of its instant instead. It sleeps until the earliest due-queue entry of the
enabled buckets (at most ``poll`` seconds, so entries written meanwhile by ingest are seen),
then runs :func:`workflows.reconcile.reconcile` with ``due_only`` over the buckets with
something due, as of the clock (at or after each entry's instant: never earlier). Several
workers' wakers split the work (entries are claimed with ``SKIP LOCKED``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from buckets import due, resilience
from buckets.errors import DatabaseUnavailableError
from buckets.runtime import Runtime
from workflows.reconcile import Tick, reconcile

log = logging.getLogger("buckets.waker")
POLL_SECONDS = 0.5


class Waker:
    def __init__(
        self,
        runtime: Runtime,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        poll: float = POLL_SECONDS,
    ) -> None:
        self.runtime, self.clock, self.poll = runtime, clock, poll
        self.bucket_ids = [bucket.id for bucket in runtime.registry if bucket.clocked]
        self._lost_connections = resilience.lost_connections(runtime.engine)

    def step(self) -> tuple[Tick | None, float]:
        """Process what is due now; returns the tick (None: nothing was due) and how long to
        sleep before the next step. A bucket that failed because the connection was lost
        raises :class:`~buckets.errors.DatabaseUnavailableError` (an outage, retried by the
        worker's loop)."""
        now = self.clock()
        with self.runtime.engine.connect() as conn:
            ready = due.due_buckets(conn, self.bucket_ids, now)
        tick = None
        if ready:
            before = self._lost_connections()
            tick = reconcile(now, ready, runtime=self.runtime, due_only=True)
            if tick.failed and self._lost_connections() > before:
                names = ", ".join(bucket.bucket_id for bucket in tick.failed)
                raise DatabaseUnavailableError(f"the connection was lost deciding {names}")
        with self.runtime.engine.connect() as conn:
            upcoming = due.next_due(conn, self.bucket_ids)
        if upcoming is None:
            return tick, self.poll
        wait = (upcoming - self.clock()).total_seconds()
        return tick, min(self.poll, max(wait, 0.0))

    def step_and_wait(self, stop: threading.Event) -> None:
        """One step, then sleep until the next entry falls due (at most ``poll``) or ``stop``:
        the worker's loop (``resilience.forever``) calls it again and again."""
        tick, wait = self.step()
        if tick is not None and tick.transitions:
            log.info(
                "waker: %d transitions as of %s",
                tick.transitions,
                tick.now.isoformat(),
                extra={
                    "job": "waker",
                    "tick": tick.now.isoformat(),
                    "transitions": tick.transitions,
                },
            )
        for failed in tick.failed if tick is not None else ():
            log.error("waker: bucket %s failed: %s", failed.bucket_id, failed.reason)
        stop.wait(wait)
