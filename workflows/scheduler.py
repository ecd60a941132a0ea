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
    """One tick as of its cron slot: the clock truncated to the minute (crontab resolution),
    so workers firing the same tick decide as of the same ``now`` and each bucket runs once."""
    now = (clock() if clock else datetime.now(UTC)).replace(second=0, microsecond=0)
    tick = reconcile(now, runtime=runtime)
    for failed in tick.failed:
        log.error("bucket %s failed in the tick of %s: %s", failed.bucket_id, now, failed.reason)
    return tick


def build_scheduler(
    runtime: Runtime, *, tick: Callable[[], object] | None = None, **options: Any
) -> BackgroundScheduler:
    """A scheduler (not started) with the reconcile job on the configured crontab. ``tick``
    replaces what the job calls (default: ``reconcile_job(runtime)``; the worker passes its
    outage-resilient wrapper of it)."""
    scheduler = BackgroundScheduler(timezone=UTC, **options)
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
