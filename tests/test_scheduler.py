"""APScheduler wiring: the reconcile job's trigger and run policy, and what the job does."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from apscheduler.triggers.cron import CronTrigger

from buckets import b, define_bucket, ingest_event
from buckets.models import bucket_memberships
from workflows.reconcile import reconcile
from workflows.scheduler import build_scheduler, reconcile_job

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
TRIAL = define_bucket(id="trial", criteria=b.prop("plan").eq("trial"), max_dwell="1d")


def test_the_reconcile_job_fires_on_the_configured_crontab_without_overlap(make_runtime):
    rt = make_runtime(TRIAL, reconcile_cron="*/10 * * * *")
    scheduler = build_scheduler(rt)
    job = scheduler.get_job("reconcile")
    assert job.id == "reconcile"
    assert (job.max_instances, job.coalesce) == (1, True)
    assert isinstance(job.trigger, CronTrigger)
    fires = job.trigger.get_next_fire_time(None, datetime(2026, 11, 1, 12, 3, tzinfo=UTC))
    assert fires == datetime(2026, 11, 1, 12, 10, tzinfo=UTC)


def test_the_job_decides_as_of_its_real_start_once_per_slot(make_runtime):
    rt = make_runtime(TRIAL)
    ingest_event("t", "x", {}, contact_properties={"plan": "trial"}, now=T0, runtime=rt)
    started = T0 + timedelta(days=2, seconds=7)
    reconcile_job(rt, clock=lambda: started)  # slot: T0 + 2 days
    with rt.engine.connect() as conn:
        row = conn.execute(sa.select(bucket_memberships)).one()
    assert (row.leave_reason, row.left_at) == ("max_dwell", started)  # not a truncated slot
    again = reconcile(started + timedelta(seconds=20), runtime=rt, slot=T0 + timedelta(days=2))
    assert again.buckets[0].passes_ran.startswith("no (incomplete queue: already done for")
