"""Backfills as resumable jobs (SPEC §7, §6.4) on a real PostgreSQL."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from buckets import b, define_bucket, delete_contact, ingest_event, ingest_events
from buckets.membership import Policy, join, pairs
from buckets.models import backfill_jobs, bucket_configs, bucket_transitions, contacts
from buckets.registry import Registry
from buckets.runtime import Runtime
from tests.test_reconcile import active, transitions
from workflows import jobs
from workflows.backfill import Runner, deploy, dry_run, first_time_incomplete, start
from workflows.reconcile import reconcile

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
D = timedelta(days=1)
PRO = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"), max_dwell="30d")
DORMANT = define_bucket(
    id="went-dormant",
    criteria=b.all(
        b.event("feature.used").exists(), b.event("feature.used").within("7d").not_exists()
    ),
)


def history(rt: Any, count: int = 30) -> None:
    """Contacts written around the engine's buckets: plans and feature use, no memberships."""
    with_buckets = rt.registry
    rt.registry = Registry()  # ingest with no buckets registered: nothing materialised yet
    try:
        ingest_events(
            [
                {
                    "external_id": f"c{i:02d}",
                    "event": "feature.used",
                    "occurred_at": T0 - (i % 10) * D,
                    "contact_properties": {"plan": "pro" if i % 3 == 0 else "free"},
                }
                for i in range(count)
            ],
            now=T0,
            runtime=rt,
        )
    finally:
        rt.registry = with_buckets


def run(rt: Runtime, bucket_id: str, now: datetime, **kwargs: Any) -> jobs.Job:
    job, created = start(rt, bucket_id, now, **kwargs)
    assert created
    return Runner(rt, chunk=7).run(job.id)


def stored_hash(rt: Any, bucket_id: str) -> str | None:
    with rt.engine.connect() as conn:
        return conn.execute(
            sa.select(bucket_configs.c.criteria_hash).where(bucket_configs.c.bucket_id == bucket_id)
        ).scalar()


def test_first_time_materialises_silently_and_stores_the_hash(make_runtime):
    rt = make_runtime(PRO)
    history(rt)
    delete_contact("c03", now=T0, runtime=rt)  # deleted contacts are never materialised
    job = run(rt, "pro", T0)
    assert (job.mode, job.status, job.total, job.processed) == ("first_time", "completed", 29, 29)
    expected = {f"c{i:02d}" for i in range(0, 30, 3)} - {"c03"}
    assert active(rt, "pro") == expected
    assert job.joined == len(expected)
    rows = transitions(rt, "pro")
    assert {(t.emitted, t.suppressed_by, t.source) for t in rows} == {
        (False, "backfill", "backfill")
    }
    assert stored_hash(rt, "pro") == PRO.fingerprint
    with rt.engine.connect() as conn:
        assert first_time_incomplete(conn, "pro") is False
        max_dwell = conn.execute(
            sa.text("SELECT DISTINCT max_dwell_at FROM bucket_memberships")
        ).scalar()
    assert max_dwell == T0 + 30 * D
    # a second run (an admin one now) changes nothing
    again = run(rt, "pro", T0)
    assert (again.mode, again.joined, again.left) == ("admin", 0, 0)
    assert len(transitions(rt, "pro")) == len(rows)


def test_prior_history_continues_epochs(make_runtime):
    rt = make_runtime(PRO)
    history(rt, 3)
    with rt.engine.begin() as conn:
        c0 = conn.execute(
            sa.select(contacts.c.id).where(contacts.c.external_id == "c00")
        ).scalar_one()
        join(conn, pairs(["pro"], [c0]), [Policy("pro")], now=T0 - 9 * D, source="ingest")
        conn.execute(
            sa.text(
                "UPDATE bucket_memberships SET status='left', left_at=:t, leave_reason='criteria'"
            ),
            {"t": T0 - 8 * D},
        )
    run(rt, "pro", T0)
    [row] = [t for t in transitions(rt, "pro") if t.kind == "entered" and t.source == "backfill"]
    assert (row.external_id, row.epoch) == ("c00", 2)


def test_reevaluation_after_a_criteria_change_joins_silently_and_leaves_loudly(make_runtime):
    rt = make_runtime(PRO)
    history(rt)
    run(rt, "pro", T0)
    changed = define_bucket(id="pro", criteria=b.prop("plan").eq("free"), max_dwell="30d")
    rt2 = Runtime(engine=rt.engine, registry=Registry([changed]), settings=rt.settings)
    [job] = deploy(rt2, T0 + D)
    assert job.mode == "reevaluate"
    with rt.engine.connect() as conn:  # the cron keeps its join pass off meanwhile
        from workflows.reconcile import joins_blocked

        assert joins_blocked(conn, changed)
    done = Runner(rt2, chunk=11).run(job.id)
    assert done.status == "completed"
    assert active(rt2, "pro") == {f"c{i:02d}" for i in range(30) if i % 3}
    new = [t for t in transitions(rt2, "pro") if t.occurred_at == T0 + D]
    leaves = [t for t in new if t.kind == "left"]
    joins = [t for t in new if t.kind == "entered"]
    assert len(leaves) == 10
    assert all(t.emitted and t.reason == "criteria" for t in leaves)  # journeys exit on these
    assert len(joins) == 20
    assert not any(t.emitted for t in joins)
    assert stored_hash(rt2, "pro") == changed.fingerprint
    assert deploy(rt2, T0 + 2 * D) == []  # nothing more to do


def test_admin_emit_goes_through_the_entry_limit(make_runtime):
    once = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"), entry_limit="once")
    rt = make_runtime(once)
    history(rt, 6)
    run(rt, "pro", T0)  # first-time: c00 and c03 silently
    ingest_event("c00", "x", {}, contact_properties={"plan": "free"}, now=T0 + D, runtime=rt)
    with rt.engine.begin() as conn:  # written around the engine: only a backfill sees them
        conn.execute(sa.text('UPDATE contacts SET properties = properties || \'{"plan": "pro"}\''))
    job = run(rt, "pro", T0 + 2 * D, emit=True)
    assert (job.mode, job.joined) == ("admin", 5)
    new = {t.external_id: t for t in transitions(rt, "pro") if t.occurred_at == T0 + 2 * D}
    assert (new["c00"].emitted, new["c00"].suppressed_by) == (False, "entry_limit")  # once
    assert all(new[f"c0{i}"].emitted for i in (1, 2, 4, 5))


def test_dry_run_reports_and_writes_nothing(make_runtime):
    rt = make_runtime(PRO)
    history(rt)
    report = dry_run(rt, "pro", T0)
    assert (report.mode, report.would_join, report.would_leave, report.would_emit) == (
        "first_time",
        10,
        0,
        0,
    )
    assert active(rt, "pro") == set()
    with rt.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(backfill_jobs)).scalar() == 0
    run(rt, "pro", T0)
    with rt.engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE contacts SET properties = '{\"plan\": \"free\"}' WHERE external_id = 'c00'"
            )
        )
    report = dry_run(rt, "pro", T0 + D)
    assert (report.mode, report.would_join, report.would_leave, report.would_emit) == (
        "admin",
        0,
        1,
        1,
    )


def test_one_non_terminal_job_per_bucket_and_cancel(make_runtime):
    rt = make_runtime(PRO)
    history(rt)
    job, created = start(rt, "pro", T0)
    again, created_again = start(rt, "pro", T0)
    assert created
    assert not created_again
    assert again.id == job.id
    with rt.engine.begin() as conn, pytest.raises(sa.exc.IntegrityError):
        conn.execute(sa.insert(backfill_jobs).values(bucket_id="pro", mode="admin", as_of=T0))
    with rt.engine.begin() as conn:
        cancelled = jobs.cancel(conn, job.id, T0)
    assert cancelled.status == "cancelled"
    with rt.engine.begin() as conn, pytest.raises(jobs.JobError, match="already cancelled"):
        jobs.cancel(conn, job.id, T0)
    with pytest.raises(jobs.JobError, match="cancelled, not claimable"):
        Runner(rt).run(job.id)


def test_cancel_stops_a_running_job_at_its_next_chunk(make_runtime):
    rt = make_runtime(PRO)
    history(rt)
    job, _ = start(rt, "pro", T0)

    def cancel_after_first_chunk(current: jobs.Job) -> None:
        with rt.engine.begin() as conn:
            jobs.cancel(conn, current.id, T0)

    done = Runner(rt, chunk=5).run(job.id, progress=cancel_after_first_chunk)
    assert done.status == "cancelled"
    assert done.processed == 5
    assert stored_hash(rt, "pro") is None


def test_expired_lease_is_reaped_and_resumed_from_the_cursor(make_runtime):
    rt = make_runtime(PRO)
    history(rt)
    job, _ = start(rt, "pro", T0)

    def vanish_after_two_chunks(current: jobs.Job) -> None:
        if current.cursor and current.cursor["after"] >= 10:
            raise _Vanished  # the worker dies here: no release, no failure recorded

    runner = Runner(rt, owner="w1", chunk=5, clock=lambda: T0)
    with rt.engine.begin() as conn:
        claimed = jobs.claim(conn, job.id, "w1", T0, runner.lease)
    assert claimed is not None
    with pytest.raises(_Vanished):
        runner._chunks(claimed, PRO, vanish_after_two_chunks, None)
    with rt.engine.connect() as conn:
        half = jobs.get(conn, job.id)
    assert (half.status, half.cursor, half.processed) == ("running", {"after": 10}, 10)
    with rt.engine.begin() as conn:
        assert jobs.reap(conn, T0 + timedelta(seconds=30)) == (0, 0)  # lease still valid
        assert jobs.reap(conn, T0 + timedelta(minutes=2)) == (1, 0)
    resumed = Runner(rt, owner="w2", chunk=5).run(job.id)
    assert (resumed.status, resumed.processed, resumed.attempts) == ("completed", 30, 2)
    assert len(active(rt, "pro")) == 10
    assert len(transitions(rt, "pro")) == 10  # nothing done twice


class _Vanished(Exception):
    pass


def test_reaper_fails_a_job_that_keeps_dying(make_runtime):
    rt = make_runtime(PRO)
    job, _ = start(rt, "pro", T0)
    with rt.engine.begin() as conn:
        for attempt in range(jobs.MAX_ATTEMPTS):
            assert jobs.claim(conn, job.id, f"w{attempt}", T0 + attempt * D, timedelta(minutes=1))
            jobs.reap(conn, T0 + attempt * D + timedelta(minutes=2))
        failed = jobs.get(conn, job.id)
    assert failed.status == "failed"
    assert "keeps dying" in (failed.error or "")


def test_deploy_from_two_workers_at_once_enqueues_one_job_per_bucket(make_runtime):
    rt = make_runtime(PRO, DORMANT)
    results: list[list[jobs.Job]] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()
        results.append(deploy(rt, T0))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    created = sorted(job.bucket_id for found in results for job in found)
    assert created == ["pro", "went-dormant"]
    with rt.engine.connect() as conn:
        assert len(jobs.jobs(conn)) == 2


def test_disabled_bucket_is_not_backfilled(make_runtime):
    from buckets.registry import set_enabled

    rt = make_runtime(PRO)
    history(rt)
    with rt.engine.begin() as conn:
        set_enabled(conn, "pro", False)
    assert deploy(rt, T0) == []
    job = run(rt, "pro", T0)
    assert job.status == "failed"
    assert "disabled" in (job.error or "")
    assert active(rt, "pro") == set()


def test_historical_cohort_is_never_blasted_while_the_cron_runs(make_runtime):
    """Deploy an absence bucket over thousands of dormant contacts while reconcile ticks run
    concurrently: zero emitted `entered` for the historical cohort; a contact going dormant
    after the backfill completed is joined by the cron and emitted."""
    rt = make_runtime(DORMANT)
    rt.registry = Registry()
    ingest_events(
        [{"external_id": f"d{i:04d}", "event": "feature.used"} for i in range(3000)],
        now=T0,
        runtime=rt,
    )
    rt.registry = Registry([DORMANT])
    now = T0 + 10 * D
    [job] = deploy(rt, now)
    stop = threading.Event()
    ticks: list[Any] = []

    def cron() -> None:
        minute = 0
        while not stop.is_set():
            minute += 1
            ticks.append(reconcile(now + timedelta(minutes=minute), runtime=rt, chunk_size=500))

    thread = threading.Thread(target=cron)
    thread.start()
    done = Runner(rt, chunk=400).run(job.id)
    stop.set()
    thread.join()
    assert done.status == "completed"
    assert len(ticks) >= 1
    assert len(active(rt, "went-dormant")) == 3000
    assert not any(t.emitted for t in transitions(rt, "went-dormant"))
    ingest_event("late", "feature.used", {}, now=now, runtime=rt)  # active now, dormant in 8d
    reconcile(now + 8 * D, runtime=rt)
    late = [t for t in transitions(rt, "went-dormant") if t.external_id == "late"]
    assert [(t.kind, t.emitted, t.source) for t in late] == [("entered", True, "reconcile")]
    with rt.engine.connect() as conn:
        emitted = conn.execute(
            sa.select(sa.func.count()).where(bucket_transitions.c.emitted)
        ).scalar_one()
    assert emitted == 1


def test_an_operator_backfill_meeting_a_completing_first_time_job_starts_no_second(
    make_runtime, monkeypatch
):
    """`buckets backfill ID` while the first-time job completes: the same race as deploy's.
    A second first-time job would join silently contacts the cron was about to join loudly."""
    from workflows import backfill

    rt = make_runtime(PRO)
    [first] = deploy(rt, T0)
    read_incomplete = backfill.first_time_incomplete

    def incomplete_then_complete(conn: Any, bucket_id: str) -> bool:
        incomplete = read_incomplete(conn, bucket_id)
        Runner(rt, clock=lambda: T0).run(first.id)  # commits meanwhile
        return incomplete

    monkeypatch.setattr(backfill, "first_time_incomplete", incomplete_then_complete)
    job, created = start(rt, "pro", T0)
    assert (job.id, created) == (first.id, False)
    with rt.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(backfill_jobs)).scalar() == 1
