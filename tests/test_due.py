"""The due queue (buckets.due) on a real PostgreSQL: every clock shape flips exactly at its
instant, through the queue alone; producers keep the entries; monotone decisions."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from buckets import b, define_bucket, delete_contact, erase_contact, ingest_event, set_enabled
from buckets.criteria.clock import TICK
from buckets.models import bucket_due, bucket_memberships, bucket_transitions, contacts
from tests.test_reconcile import active, transitions
from workflows import jobs
from workflows.backfill import Runner, deploy
from workflows.reconcile import reconcile

pytestmark = pytest.mark.usefixtures("both_deciders")  # due chunks: both deciders

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
H = timedelta(hours=1)
D = timedelta(days=1)

LAPSED = define_bucket(
    id="went-dormant",
    criteria=b.all(b.event("used").exists(), b.event("used").within("7d").not_exists()),
    max_dwell="30d",
)
BUSY = define_bucket(id="busy", criteria=b.event("used").within("1d").at_least(2))
QUIET = define_bucket(id="quiet", criteria=b.event("used").within("1d").less_than(2))
TRIAL = define_bucket(id="trial", criteria=b.prop("plan").eq("trial"), max_dwell="2d")
PRO = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"), min_dwell="1d")
BUYER = define_bucket(id="buyer", criteria=b.event("purchase").exists())
PRO_BUSY = define_bucket(
    id="pro-busy",
    criteria=b.all(b.prop("plan").eq("pro"), b.event("used").within("1d").at_least(2)),
)


def ship(rt: Any, now: datetime) -> None:
    """Deploy: first-time backfills (and queue fills) run to completion as of ``now``."""
    deploy(rt, now)
    for job in Runner(rt, clock=lambda: now, chunk=50).run_pending():
        assert job.status == "completed", job


def used(rt: Any, who: str, at: datetime, now: datetime | None = None, **extra: Any) -> None:
    ingest_event(who, "used", {}, occurred_at=at, now=now or at, runtime=rt, **extra)


def tick(rt: Any, now: datetime, **options: Any) -> Any:
    result = reconcile(now, runtime=rt, **options)
    assert not result.failed, result.failed
    return {item.bucket_id: item for item in result.buckets}


def entries(rt: Any, bucket_id: str | None = None) -> dict[tuple[str, str], datetime]:
    query = sa.select(bucket_due.c.bucket_id, contacts.c.external_id, bucket_due.c.due_at).join(
        contacts, contacts.c.id == bucket_due.c.contact_id
    )
    if bucket_id is not None:
        query = query.where(bucket_due.c.bucket_id == bucket_id)
    with rt.engine.connect() as conn:
        return {(row[0], row[1]): row[2] for row in conn.execute(query)}


# --- each clock shape flips exactly at its instant, through the queue alone --------------------


def _lapsed(rt: Any) -> datetime:
    used(rt, "u", T0)
    return T0 + 7 * D + TICK  # the last event ages out of the 7-day window


def _busy(rt: Any) -> datetime:
    used(rt, "u", T0)
    used(rt, "u", T0 + H)  # member from here (ingest joins)
    return T0 + D + TICK  # the 2nd newest event leaves the window


def _quiet(rt: Any) -> datetime:
    used(rt, "u", T0)
    used(rt, "u", T0 + H)  # two in a day: not quiet
    return T0 + D + TICK  # one ages out: fewer than two


def _trial(rt: Any) -> datetime:
    ingest_event("u", "x", {}, contact_properties={"plan": "trial"}, now=T0, runtime=rt)
    return T0 + 2 * D  # the maximum dwell


def _pro(rt: Any) -> datetime:
    ingest_event("u", "x", {}, contact_properties={"plan": "pro"}, now=T0, runtime=rt)
    ingest_event("u", "x", {}, contact_properties={"plan": "free"}, now=T0 + H, runtime=rt)
    return T0 + D  # the deferred leave (min dwell) falls due


def _buyer(rt: Any) -> datetime:
    later = T0 + timedelta(minutes=2)  # stamped ahead, inside the allowed clock skew
    ingest_event("u", "purchase", {}, occurred_at=later, now=T0, runtime=rt)
    return later  # it starts to count


def _pro_busy(rt: Any) -> datetime:
    ingest_event("u", "used", {}, contact_properties={"plan": "pro"}, now=T0, runtime=rt)
    used(rt, "u", T0 + H)
    return T0 + D + TICK


SHAPES = {
    "lapsed pair joins": (LAPSED, _lapsed, "entered"),
    "count gte within leaves": (BUSY, _busy, "left"),
    "count lt within joins (decay)": (QUIET, _quiet, "entered"),
    "max dwell leaves": (TRIAL, _trial, "left"),
    "min dwell deferred leave completes": (PRO, _pro, "left"),
    "future-stamped event joins": (BUYER, _buyer, "entered"),
    "composite leaves": (PRO_BUSY, _pro_busy, "left"),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_clock_shape_flips_exactly_at_its_instant(make_runtime, shape: str):
    bucket, setup, kind = SHAPES[shape]
    rt = make_runtime(bucket)
    instant = setup(rt)
    ship(rt, min(T0 + 2 * H, instant - timedelta(minutes=1)))
    before = len(transitions(rt, bucket.id))
    assert entries(rt, bucket.id)[(bucket.id, "u")] == instant
    early = tick(rt, instant - TICK)[bucket.id]
    assert early.passes_ran == "no"  # the queue alone: no sweep of the bucket
    assert len(transitions(rt, bucket.id)) == before
    at = tick(rt, instant)[bucket.id]
    assert (at.passes_ran, at.due) == ("no", 1)
    flipped = transitions(rt, bucket.id)[before:]
    assert [(t.kind, t.occurred_at, t.source) for t in flipped] == [(kind, instant, "reconcile")]


def test_a_tick_with_nothing_due_sweeps_nothing(make_runtime):
    rt = make_runtime(LAPSED, BUSY, TRIAL)
    for i in range(20):
        used(rt, f"c{i}", T0 + i * H)
    ship(rt, T0 + D)
    result = tick(rt, T0 + D + H)
    assert {item.passes_ran for item in result.values()} == {"no"}
    assert sum(item.due for item in result.values()) == 0


# --- producers keep the entries --------------------------------------------------------------


def test_an_ingest_racing_a_due_entry_reschedules_it(make_runtime):
    rt = make_runtime(LAPSED)
    used(rt, "u", T0)
    ship(rt, T0 + H)
    assert entries(rt) == {("went-dormant", "u"): T0 + 7 * D + TICK}
    used(rt, "u", T0 + 7 * D)  # active again just before going dormant
    assert entries(rt) == {("went-dormant", "u"): T0 + 14 * D + TICK}
    tick(rt, T0 + 7 * D + H)
    assert active(rt, "went-dormant") == set()


def test_joins_wait_while_the_backfill_has_not_completed(make_runtime):
    rt = make_runtime(LAPSED)
    used(rt, "u", T0)  # the entry is written by ingest, before any deployment
    assert entries(rt) == {("went-dormant", "u"): T0 + 7 * D + TICK}
    result = tick(rt, T0 + 8 * D)["went-dormant"]  # no backfill yet: no historical blast
    assert active(rt, "went-dormant") == set()
    assert entries(rt)[("went-dormant", "u")] >= T0 + 8 * D  # retried later, not in a loop
    assert result.joined == 0


def test_deleted_and_erased_contacts_leave_no_entries(make_runtime):
    rt = make_runtime(LAPSED, BUSY)
    for who in ("a", "b", "c"):
        used(rt, who, T0)
    assert {who for _, who in entries(rt)} == {"a", "b", "c"}
    delete_contact("a", now=T0 + H, runtime=rt)
    erase_contact("b", runtime=rt)
    assert {who for _, who in entries(rt)} == {"c"}


def test_disable_then_enable_rebuilds_the_entries(make_runtime):
    rt = make_runtime(LAPSED)
    used(rt, "u", T0)
    ship(rt, T0 + H)
    with rt.engine.begin() as conn:
        set_enabled(conn, "went-dormant", False)
    used(rt, "v", T0 + 2 * H)  # ingest skips a disabled bucket: no entry for v
    assert ("went-dormant", "v") not in entries(rt)
    with rt.engine.begin() as conn:
        set_enabled(conn, "went-dormant", True)
    result = tick(rt, T0 + 3 * H)["went-dormant"]
    assert result.passes_ran == "incomplete queue"  # swept until the queue is filled again
    with rt.engine.connect() as conn:
        [job] = [j for j in jobs.jobs(conn) if j.mode == "queue_fill"]
    Runner(rt, clock=lambda: T0 + 3 * H).run(job.id)
    assert entries(rt)[("went-dormant", "v")] == T0 + 2 * H + 7 * D + TICK
    assert tick(rt, T0 + 4 * H)["went-dormant"].passes_ran == "no"
    tick(rt, T0 + 2 * H + 7 * D + TICK)
    assert active(rt, "went-dormant") == {"u", "v"}


def test_a_criteria_change_rebuilds_the_entries(make_runtime):
    rt = make_runtime(BUSY)
    used(rt, "u", T0)
    used(rt, "u", T0 + H)
    ship(rt, T0 + 2 * H)
    assert entries(rt) == {("busy", "u"): T0 + D + TICK}
    wider = define_bucket(id="busy", criteria=b.event("used").within("2d").at_least(2))
    rt2 = make_runtime(wider)
    assert tick(rt2, T0 + 3 * H)["busy"].passes_ran == "incomplete queue"
    ship(rt2, T0 + 3 * H)  # the re-evaluation job rebuilds the entries for the new criteria
    assert entries(rt2) == {("busy", "u"): T0 + 2 * D + TICK}
    assert tick(rt2, T0 + 4 * H)["busy"].passes_ran == "no"


def test_an_upgraded_database_is_swept_until_its_queue_is_filled(make_runtime):
    rt = make_runtime(LAPSED)
    used(rt, "u", T0)
    ship(rt, T0 + H)
    with rt.engine.begin() as conn:  # what an upgrade from 0003 leaves: no entries, no hash
        conn.execute(sa.delete(bucket_due))
        conn.execute(sa.text("UPDATE bucket_configs SET due_hash = NULL"))
    created = deploy(rt, T0 + 2 * H)
    assert [(job.mode, job.bucket_id) for job in created] == [("queue_fill", "went-dormant")]
    assert tick(rt, T0 + 3 * H)["went-dormant"].passes_ran == "incomplete queue"
    Runner(rt, clock=lambda: T0 + 3 * H).run(created[0].id)
    assert entries(rt) == {("went-dormant", "u"): T0 + 7 * D + TICK}
    assert tick(rt, T0 + 4 * H)["went-dormant"].passes_ran == "no"


# --- several workers, monotone decisions -----------------------------------------------------


def test_two_workers_on_the_same_due_entries_flip_each_once(make_runtime):
    rt = make_runtime(LAPSED)
    from buckets import ingest_events

    ingest_events(
        [{"external_id": f"c{i:04d}", "event": "used"} for i in range(600)], now=T0, runtime=rt
    )
    ship(rt, T0 + H)
    barrier = threading.Barrier(2)
    reports: list[Any] = []

    def worker() -> None:
        barrier.wait()
        reports.append(reconcile(T0 + 8 * D, runtime=rt, due_only=True, due_chunk=40))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r.buckets[0].due for r in reports) == 600
    assert len(active(rt, "went-dormant")) == 600
    keys = [t.idempotency_key for t in transitions(rt, "went-dormant")]
    assert len(keys) == len(set(keys)) == 600


def test_a_large_backlog_is_decided_on_two_connections_each_pair_once(make_runtime, monkeypatch):
    """From five full chunks due, a tick decides on two connections, each the contacts of its
    half of the ids (they never wait for each other); every pair flips once, the tick's report
    adds both halves up, and nothing due is left."""
    from buckets import due, ingest_events

    rt = make_runtime(LAPSED, BUSY, due_connections=2)
    batch = [{"external_id": f"c{i:04d}", "event": "used"} for i in range(300)]
    ingest_events(batch + batch, now=T0, runtime=rt)  # two uses each: busy, then lapsed
    ship(rt, T0 + H)
    assert len(active(rt, "busy")) == 300
    parts: list[Any] = []
    claim = due.claim

    def spy(conn: Any, bucket_id: str, now: datetime, limit: int, part: Any = due.WHOLE) -> Any:
        parts.append(part)
        return claim(conn, bucket_id, now, limit, part)

    monkeypatch.setattr(due, "claim", spy)
    report = tick(rt, T0 + 8 * D, due_chunk=25)
    assert set(parts) == {(0, 2), (1, 2)}
    assert (report["busy"].due, report["busy"].left) == (300, {"criteria": 300})
    assert (report["went-dormant"].due, report["went-dormant"].joined) == (300, 300)
    assert active(rt, "busy") == set()
    assert len(active(rt, "went-dormant")) == 300
    keys = [t.idempotency_key for b in ("busy", "went-dormant") for t in transitions(rt, b)]
    assert len(keys) == len(set(keys)) == 900  # the backfill's 300 silent joins, then the tick
    with rt.engine.connect() as conn:
        assert due.due_count(conn, ["busy", "went-dormant"], T0 + 8 * D, 10) == 0
    parts.clear()
    tick(rt, T0 + 9 * D, due_chunk=25)  # little due: one connection
    assert set(parts) <= {due.WHOLE}


def test_a_decision_as_of_an_older_now_never_undoes_a_newer_one(make_runtime):
    """The issue's scenario: an ingest at t1 joins; a tick deciding as of t0 < t1 must not
    leave (it re-decides as of t1), and nothing contradicts the criteria afterwards."""
    bucket = define_bucket(id="busy", criteria=b.event("used").within("1d").at_least(1))
    rt = make_runtime(bucket)
    used(rt, "u", T0 - 2 * D, now=T0 - 2 * D)  # a member once, long ago
    ship(rt, T0 - 2 * D + H)
    t1 = T0 + 10 * timedelta(seconds=1)
    used(rt, "u", t1)  # re-joins as of t1
    assert active(rt, "busy") == {"u"}
    tick(rt, T0, full=True)  # as of t0 < t1 the event does not count yet: a stale decision
    assert active(rt, "busy") == {"u"}
    flips = [(t.kind, t.occurred_at) for t in transitions(rt, "busy")]
    assert flips == sorted(flips, key=lambda flip: flip[1])  # monotone in time
    # a later ingest as of an older now decides as of the contact's latest instant
    ingest_event("u", "x", {}, now=T0, runtime=rt)
    with rt.engine.connect() as conn:
        decided = conn.execute(sa.select(contacts.c.decided_at)).scalar_one()
    assert decided == t1


def test_an_older_tick_does_not_join_what_a_newer_ingest_decided_against(make_runtime):
    """No row records the ingest's decision (a non-member stays one): the contact's
    ``decided_at`` makes the older tick's join candidate stale; re-decided as of t1: no join."""
    idle = define_bucket(id="idle", criteria=b.event("used").within("1d").not_exists())
    rt = make_runtime(idle)
    used(rt, "u", T0 - 3 * D, now=T0 - 3 * D)
    ship(rt, T0 - 3 * D)  # u used the product just now: not idle
    t1 = T0 + timedelta(seconds=30)
    used(rt, "u", t1)  # as of t1 not idle; as of T0 (before this event) idle
    assert active(rt, "idle") == set()
    tick(rt, T0, full=True)
    assert active(rt, "idle") == set()


def test_a_due_chunk_meeting_a_pair_decided_later_decides_as_of_that_instant(make_runtime):
    """The pair's own row carries a decision later than the chunk's now (written behind the
    queue's back here; a producer racing the tick in real life): the chunk decides as of that
    instant, with either decider — the leave is stamped then, not at the older now."""
    one = define_bucket(id="one", criteria=b.event("used").within("1d").at_least(1))
    rt = make_runtime(one, BUYER)
    used(rt, "u", T0)
    ingest_event("u", "purchase", {}, occurred_at=T0, now=T0, runtime=rt)
    ship(rt, T0 + H)
    assert entries(rt, "one") == {("one", "u"): T0 + D + TICK}
    later = T0 + D + 5 * H
    with rt.engine.begin() as conn:
        conn.execute(
            sa.update(bucket_memberships)
            .where(bucket_memberships.c.bucket_id == "one")
            .values(last_evaluated_at=later)
        )
    report = tick(rt, T0 + D + TICK)
    assert report["one"].due == 1
    assert active(rt, "one") == set()
    assert [(t.kind, t.occurred_at) for t in transitions(rt, "one")][-1] == ("left", later)


def test_full_sweep_heals_nothing_and_reports_what_it_would(make_runtime):
    rt = make_runtime(LAPSED, BUSY, QUIET, TRIAL, PRO)
    for i in range(30):
        used(rt, f"c{i}", T0 + i * H, contact_properties={"plan": ["trial", "pro", "free"][i % 3]})
    ship(rt, T0 + 2 * D)
    for now in (T0 + 3 * D, T0 + 5 * D, T0 + 9 * D):
        tick(rt, now)
    sweep = reconcile(T0 + 9 * D + H, runtime=rt, full=True)
    assert sweep.healed == 0, sweep.to_dict()
    with rt.engine.begin() as conn:  # now lose an entry behind the engine's back
        conn.execute(sa.delete(bucket_due).where(bucket_due.c.bucket_id == "went-dormant"))
    healed = reconcile(T0 + 9 * D + 2 * H, runtime=rt, full=True)
    assert healed.healed > 0


def test_members_and_ledger_stay_consistent(make_runtime):
    rt = make_runtime(LAPSED)
    used(rt, "u", T0)
    ship(rt, T0 + H)
    tick(rt, T0 + 8 * D)
    with rt.engine.connect() as conn:
        rows = conn.execute(sa.select(bucket_memberships)).all()
        ledger = conn.execute(sa.select(bucket_transitions)).all()
    assert [(r.status, r.entry_count) for r in rows] == [("active", 1)]
    assert [(t.kind, t.epoch, t.emitted) for t in ledger] == [("entered", 1, True)]
