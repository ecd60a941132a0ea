"""APScheduler 3 wiring: a trigger, not a state store (ARCHITECTURE.md, principle 6).

The ``reconcile`` job fires on ``BUCKETS_RECONCILE_CRON`` (UTC). One process never runs two
ticks at once (``max_instances=1``) and a tick missed while the process was busy or down is run
once, not once per missed fire (``coalesce``). Correctness across processes comes from the
database: per-bucket advisory locks and ``bucket_configs.reconciled_at`` (see
:mod:`workflows.reconcile`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from buckets.runtime import Runtime
from workflows.reconcile import Tick, reconcile

log = logging.getLogger("buckets.scheduler")
MISFIRE_GRACE_SECONDS = 300


def reconcile_job(runtime: Runtime, clock: Callable[[], datetime] | None = None) -> Tick:
    """One tick as of its real start (never an earlier instant: decisions are monotone in
    time); its cron slot (the start truncated to the minute, crontab resolution) keeps the full
    passes once per slot when several workers fire the same tick."""
    now = clock() if clock else datetime.now(UTC)
    tick = reconcile(now, runtime=runtime, slot=now.replace(second=0, microsecond=0))
    for failed in tick.failed:
        log.error("bucket %s failed in the tick of %s: %s", failed.bucket_id, now, failed.reason)
    return tick


def full_sweep_job(runtime: Runtime, clock: Callable[[], datetime] | None = None) -> Tick:
    """The full sweep (every member and candidate, the queue rebuilt): it should heal
    nothing; anything it heals is what the due queue missed, logged as a warning."""
    now = clock() if clock else datetime.now(UTC)
    tick = reconcile(now, runtime=runtime, full=True, slot=now.replace(second=0, microsecond=0))
    for failed in tick.failed:
        log.error(
            "bucket %s failed in the full sweep of %s: %s", failed.bucket_id, now, failed.reason
        )
    if tick.healed:
        log.warning(
            "full sweep of %s healed %d changes the due queue had missed",
            now,
            tick.healed,
            extra={"job": "full_sweep", "tick": now.isoformat(), "healed": tick.healed},
        )
    else:
        log.info(
            "full sweep of %s: nothing to heal",
            now,
            extra={"job": "full_sweep", "tick": now.isoformat(), "healed": 0},
        )
    return tick


def build_scheduler(
    runtime: Runtime,
    *,
    tick: Callable[[], object] | None = None,
    sweep: Callable[[], object] | None = None,
    **options: Any,
) -> BackgroundScheduler:
    """A scheduler (not started) with the reconcile job and the full sweep on their configured
    crontabs. ``tick`` / ``sweep`` replace what the jobs call (default: ``reconcile_job(runtime)``
    / ``full_sweep_job(runtime)``; the worker passes outage-resilient wrappers of them)."""
    scheduler = BackgroundScheduler(timezone=UTC, **options)
    scheduler.add_job(
        sweep or full_sweep_job,
        CronTrigger.from_crontab(runtime.settings.full_sweep_cron, timezone=UTC),
        args=[] if sweep else [runtime],
        id="full_sweep",
        name="full sweep",
        max_instances=1,
        coalesce=True,
        misfire_grace_time=MISFIRE_GRACE_SECONDS,
        replace_existing=True,
    )
    scheduler.add_job(
        tick or reconcile_job,
        CronTrigger.from_crontab(runtime.settings.reconcile_cron, timezone=UTC),
        args=[] if tick else [runtime],
        id="reconcile",
        name="reconcile tick",
        max_instances=1,
        coalesce=True,
        misfire_grace_time=MISFIRE_GRACE_SECONDS,
        replace_existing=True,
    )
    return scheduler
