"""The worker: deploys on start, runs backfill jobs, dispatches, shuts down gracefully.

The worker is driven by threads and the clock, so this test waits (polling, with a deadline)
for what it started; the decisions themselves are tested with explicit `now` elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from buckets import b, define_bucket, ingest_event, journey
from buckets.models import backfill_jobs, bucket_configs
from buckets.registry import Registry
from workflows.worker import Worker

PRO = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"))


def eventually(check: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_worker_deploys_backfills_and_dispatches(make_runtime):
    delivered: list[str] = []
    welcome = journey(id="welcome", trigger=PRO.entered)(
        lambda enrollment: delivered.append(enrollment.external_id)
    )
    rt = make_runtime(PRO, journeys=[welcome])
    rt.registry = Registry()  # history written before the bucket existed
    ingest_event("old", "x", {}, contact_properties={"plan": "pro"}, runtime=rt)
    rt.registry = Registry([PRO], [welcome])
    worker = Worker(rt)
    try:
        [deployed] = worker.start()
        assert (deployed.bucket_id, deployed.mode) == ("pro", "first_time")

        def backfilled() -> bool:
            with rt.engine.connect() as conn:
                status = conn.execute(sa.select(backfill_jobs.c.status)).scalar()
                stored = conn.execute(sa.select(bucket_configs.c.criteria_hash)).scalar()
            return status == "completed" and stored == PRO.fingerprint

        eventually(backfilled)
        ingest_event("new", "x", {}, contact_properties={"plan": "pro"}, runtime=rt)
        eventually(lambda: delivered == ["new"])  # the silent backfill join was not delivered
    finally:
        started = time.monotonic()
        worker.shutdown()
    assert time.monotonic() - started < 10
    assert not worker.dispatcher.is_alive()


def test_a_second_worker_deploys_nothing_more(make_runtime):
    rt = make_runtime(PRO)
    first, second = Worker(rt, clock=lambda: datetime(2026, 11, 1, tzinfo=UTC)), Worker(rt)
    try:
        assert len(first.start()) == 1
        assert second.start() == []
    finally:
        first.shutdown()
        second.shutdown()


def test_a_job_completing_during_deploy_is_not_enqueued_again(make_runtime, monkeypatch):
    """The race behind a flaky second worker: the first worker's job completed between
    deploy's two reads (no hash yet, then no active job) and a second first-time job ran."""
    from workflows import backfill

    rt = make_runtime(PRO)
    now = datetime(2026, 11, 1, tzinfo=UTC)
    [first] = backfill.deploy(rt, now)
    read_mode = backfill.mode_for

    def mode_then_complete(conn: Any, bucket: Any) -> str | None:
        mode = read_mode(conn, bucket)
        backfill.Runner(rt, clock=lambda: now).run(first.id)  # commits meanwhile
        return mode

    monkeypatch.setattr(backfill, "mode_for", mode_then_complete)
    assert backfill.deploy(rt, now) == []
    with rt.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(backfill_jobs)).scalar() == 1
