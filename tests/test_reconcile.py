"""The cron reconcile (SPEC §6) on a real PostgreSQL; time moves only through ``now``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from buckets import b, define_bucket, ingest_event, ingest_events, set_enabled
from buckets.definitions import Bucket
from buckets.models import (
    backfill_jobs,
    bucket_configs,
    bucket_memberships,
    bucket_transitions,
    contacts,
)
from tests.helpers import active, deployed
from workflows import reconcile as reconcile_module
from workflows.reconcile import join_mode, reconcile

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
H = timedelta(hours=1)
D = timedelta(days=1)

LAPSED = b.all(b.event("feature.used").exists(), b.event("feature.used").within("7d").not_exists())


def transitions(rt: Any, bucket_id: str) -> list[Any]:
    with rt.engine.connect() as conn:
        return conn.execute(
            sa.select(bucket_transitions, contacts.c.external_id)
            .join(contacts, contacts.c.id == bucket_transitions.c.contact_id)
            .where(bucket_transitions.c.bucket_id == bucket_id)
            .order_by(bucket_transitions.c.id)
        ).all()


def used(rt: Any, who: str, at: datetime, now: datetime | None = None, **extra: Any) -> None:
    ingest_event(who, "feature.used", {}, occurred_at=at, now=now or at, runtime=rt, **extra)


def tick(rt: Any, now: datetime, *ids: str) -> Any:
    result = reconcile(now, list(ids) or None, runtime=rt)
    assert not result.failed, result.failed
    return {item.bucket_id: item for item in result.buckets}


# --- absence joins ---------------------------------------------------------------------------


def test_lapsed_pair_joins_lapsed_contacts_once_and_nobody_else(make_runtime):
    dormant = define_bucket(id="went-dormant", criteria=LAPSED)
    rt = make_runtime(dormant)
    deployed(rt, dormant)
    used(rt, "lapsed", T0)
    used(rt, "active", T0 + 6 * D)
    ingest_event("never", "page.viewed", {}, now=T0, runtime=rt)
    assert join_mode(dormant) == "exact"
    result = tick(rt, T0 + 7 * D + H)
    assert active(rt, "went-dormant") == {"lapsed"}
    assert (result["went-dormant"].joined, result["went-dormant"].emitted) == (1, 1)
    [t] = transitions(rt, "went-dormant")
    assert (t.kind, t.source, t.emitted, t.occurred_at) == (
        "entered",
        "reconcile",
        True,
        T0 + 7 * D + H,
    )
    again = tick(rt, T0 + 8 * D)
    assert again["went-dormant"].joined == 0
    assert len(transitions(rt, "went-dormant")) == 1


def test_window_edge_is_inclusive(make_runtime):
    dormant = define_bucket(id="went-dormant", criteria=LAPSED)
    rt = make_runtime(dormant)
    deployed(rt, dormant)
    used(rt, "x", T0)
    tick(rt, T0 + 7 * D)  # the event sits exactly on the window's start: still inside
    assert active(rt, "went-dormant") == set()
    tick(rt, T0 + 7 * D + timedelta(microseconds=1))
    assert active(rt, "went-dormant") == {"x"}


def test_single_windowed_not_exists_joins_set_based(make_runtime):
    quiet = define_bucket(id="quiet", criteria=b.event("email.opened").within("3d").not_exists())
    rt = make_runtime(quiet)
    deployed(rt, quiet)
    ingest_event("opener", "email.opened", {}, now=T0, runtime=rt)
    ingest_event("other", "page.viewed", {}, now=T0, runtime=rt)
    assert join_mode(quiet) == "exact"
    tick(rt, T0 + D)
    assert active(rt, "quiet") == {"other"}  # a contact with no such event qualifies
    tick(rt, T0 + 4 * D)
    assert active(rt, "quiet") == {"other", "opener"}


def test_count_decay_leaves_a_count_bucket(make_runtime):
    power = define_bucket(id="power", criteria=b.event("feature.used").within("30d").at_least(10))
    rt = make_runtime(power)
    now = T0 + 40 * D
    history = [T0 + i * D for i in range(8)] + [now - i * D for i in range(4)]  # 12 events
    ingest_events(
        [{"external_id": "p", "event": "feature.used", "occurred_at": at} for at in history],
        now=now - 20 * D,
        runtime=rt,
    )
    # as of now-20d: 8 old (within 30d) events counted, recent ones are in the future
    ingest_events(
        [{"external_id": "p", "event": "feature.used", "occurred_at": now - 25 * D}] * 2,
        now=now - 20 * D,
        runtime=rt,
    )
    assert active(rt, "power") == {"p"}
    result = tick(rt, now)  # only the 4 recent events remain in the window
    assert active(rt, "power") == set()
    assert result["power"].left == {"criteria": 1}
    [_, left] = transitions(rt, "power")
    assert (left.kind, left.reason, left.emitted, left.source) == (
        "left",
        "criteria",
        True,
        "reconcile",
    )


def test_or_of_two_absence_legs_joins_by_confirmation(make_runtime):
    criteria = b.any(
        b.all(b.event("a").exists(), b.event("a").within("7d").not_exists()),
        b.all(b.event("b").exists(), b.event("b").within("3d").not_exists()),
    )
    legs = define_bucket(id="legs", criteria=criteria, reconcile_joins=True)
    never = define_bucket(id="legs-off", criteria=criteria, reconcile_joins=False)
    rt = make_runtime(legs, never)
    deployed(rt, legs, never)
    ingest_event("x", "a", {}, now=T0, runtime=rt)
    ingest_event("y", "b", {}, now=T0 + 5 * D, runtime=rt)
    ingest_event("z", "a", {}, now=T0 + 7 * D, runtime=rt)
    assert join_mode(legs) == "confirmed"
    assert join_mode(never) == "off"
    result = tick(rt, T0 + 8 * D + H)
    assert active(rt, "legs") == {"x", "y"}
    assert result["legs"].joins == "confirmed"
    assert active(rt, "legs-off") == set()


def test_one_matcher_behind_600_non_matching_candidates_joins_in_one_tick(make_runtime):
    pro_lapsed = define_bucket(id="pro-lapsed", criteria=b.all(b.prop("plan").eq("pro"), LAPSED))
    rt = make_runtime(pro_lapsed)
    deployed(rt, pro_lapsed)
    batch = [
        {
            "external_id": f"free{i:03d}",
            "event": "feature.used",
            "contact_properties": {"plan": "free"},
        }
        for i in range(600)
    ]
    batch.append(
        {"external_id": "zz-pro", "event": "feature.used", "contact_properties": {"plan": "pro"}}
    )
    ingest_events(batch, now=T0, runtime=rt)  # the matcher has the highest contact id
    result = tick(rt, T0 + 8 * D)
    assert active(rt, "pro-lapsed") == {"zz-pro"}
    assert result["pro-lapsed"].joined == 1


def test_chunks_cover_every_contact(make_runtime):
    dormant = define_bucket(id="went-dormant", criteria=LAPSED)
    rt = make_runtime(dormant)
    deployed(rt, dormant)
    ingest_events(
        [{"external_id": f"c{i:03d}", "event": "feature.used"} for i in range(120)],
        now=T0,
        runtime=rt,
    )
    result = reconcile(T0 + 8 * D, runtime=rt, chunk_size=7)
    assert result.buckets[0].joined == 120
    assert len(active(rt, "went-dormant")) == 120


# --- entry limits and the first-time-backfill guard ------------------------------------------


def test_cron_joins_pass_the_entry_limit_across_dormancy_cycles(make_runtime):
    dormant = define_bucket(
        id="went-dormant", criteria=LAPSED, entry_limit="once_per_period", entry_period="30d"
    )
    rt = make_runtime(dormant)
    deployed(rt, dormant)
    used(rt, "u", T0)
    tick(rt, T0 + 8 * D)  # dormant: joins, emitted
    used(rt, "u", T0 + 10 * D)  # back: leaves in real time (left at T0+10d)
    tick(rt, T0 + 18 * D)  # dormant again 8 days after leaving: suppressed
    used(rt, "u", T0 + 20 * D)
    tick(rt, T0 + 60 * D)  # 40 days after the last leave: emitted
    flags = [(t.kind, t.epoch, t.emitted, t.suppressed_by) for t in transitions(rt, "went-dormant")]
    assert flags == [
        ("entered", 1, True, None),
        ("left", 1, True, None),
        ("entered", 2, False, "entry_limit"),
        ("left", 2, True, None),
        ("entered", 3, True, None),
    ]


def test_no_joins_until_the_first_time_backfill_completed_but_leaves_still_run(make_runtime):
    dormant = define_bucket(id="went-dormant", criteria=LAPSED, max_dwell="20d")
    rt = make_runtime(dormant)
    used(rt, "a", T0)
    used(rt, "b", T0 + 9 * D)
    result = tick(rt, T0 + 8 * D)
    assert active(rt, "went-dormant") == set()
    assert result["went-dormant"].joins.startswith("off (the bucket's backfill")
    with rt.engine.begin() as conn:  # deployed, but for criteria that have changed since
        conn.execute(sa.update(bucket_configs).values(criteria_hash="0" * 64))
    assert tick(rt, T0 + 8 * D + H)["went-dormant"].joined == 0
    deployed(rt, dormant)
    tick(rt, T0 + 8 * D + 2 * H)
    assert active(rt, "went-dormant") == {"a"}
    with rt.engine.begin() as conn:  # a re-evaluation job claims the cohort again
        conn.execute(sa.delete(backfill_jobs))  # (the queue_fill job the ticks enqueued)
        conn.execute(
            sa.insert(backfill_jobs).values(bucket_id="went-dormant", mode="reevaluate", as_of=T0)
        )
    used(rt, "b", T0 + 9 * D, now=T0 + 9 * D)
    result = tick(rt, T0 + 30 * D)  # b lapsed but no join; a's max dwell passed: TTL leave
    assert active(rt, "went-dormant") == set()
    assert result["went-dormant"].left == {"max_dwell": 1}
    assert result["went-dormant"].joined == 0


# --- TTL, pending, disabled ------------------------------------------------------------------


def test_ttl_leaves_regardless_of_criteria(make_runtime):
    trial = define_bucket(id="trial", criteria=b.prop("plan").eq("trial"), max_dwell="14d")
    rt = make_runtime(trial)
    for who, at in (("early", T0), ("late", T0 + 5 * D)):
        ingest_event(who, "x", {}, contact_properties={"plan": "trial"}, now=at, runtime=rt)
    result = tick(rt, T0 + 14 * D)  # due exactly now
    assert active(rt, "trial") == {"late"}
    assert result["trial"].left == {"max_dwell": 1}
    [_, left] = [t for t in transitions(rt, "trial") if t.external_id == "early"]
    assert (left.reason, left.emitted) == ("max_dwell", True)
    # still a trial: the real-time path re-joins at the next event (entry limit permitting)
    ingest_event("early", "x", {}, now=T0 + 15 * D, runtime=rt)  # no property change
    assert active(rt, "trial") == {"late"}


def test_pending_min_dwell_leaves_are_completed_or_cleared(make_runtime):
    pro = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"), min_dwell="2d")
    rt = make_runtime(pro)
    for who in ("stays", "goes"):
        ingest_event(who, "x", {}, contact_properties={"plan": "pro"}, now=T0, runtime=rt)
        ingest_event(who, "x", {}, contact_properties={"plan": "free"}, now=T0 + H, runtime=rt)
    ingest_event("stays", "x", {}, contact_properties={"plan": "pro"}, now=T0 + D, runtime=rt)
    with rt.engine.begin() as conn:  # written around the engine: only the cron sees it
        conn.execute(
            sa.update(bucket_memberships)
            .where(
                bucket_memberships.c.contact_id
                == sa.select(contacts.c.id)
                .where(contacts.c.external_id == "stays")
                .scalar_subquery()
            )
            .values(pending_leave_at=T0 + 2 * D)
        )
    early = tick(rt, T0 + D + H)  # not due yet: nothing leaves, "stays" qualifies: cleared
    assert active(rt, "pro") == {"stays", "goes"}
    assert early["pro"].cleared == 1
    result = tick(rt, T0 + 2 * D)
    assert active(rt, "pro") == {"stays"}
    assert result["pro"].left == {"criteria": 1}


def test_disabled_bucket_is_untouched(make_runtime):
    trial = define_bucket(id="trial", criteria=b.prop("plan").eq("trial"), max_dwell="1d")
    rt = make_runtime(trial)
    ingest_event("t", "x", {}, contact_properties={"plan": "trial"}, now=T0, runtime=rt)
    with rt.engine.begin() as conn:
        set_enabled(conn, "trial", False)
    result = reconcile(T0 + 2 * D, runtime=rt)
    assert (result.buckets[0].status, result.buckets[0].reason) == ("skipped", "disabled")
    assert active(rt, "trial") == {"t"}


def test_full_passes_run_once_per_bucket_and_slot(make_runtime):
    trial = define_bucket(id="trial", criteria=b.prop("plan").eq("trial"), max_dwell="1d")
    rt = make_runtime(trial)
    first = reconcile(T0, runtime=rt)
    again = reconcile(T0 + H, runtime=rt, slot=T0)
    later = reconcile(T0 + H, runtime=rt)
    assert first.buckets[0].passes_ran == "incomplete queue"
    assert again.buckets[0].status == "done"  # its due entries, if any, were still processed
    assert again.buckets[0].passes_ran.startswith("no (incomplete queue: already done for")
    assert later.buckets[0].passes_ran == "incomplete queue"


def test_only_cron_buckets_are_ticked_and_unknown_ids_raise(make_runtime):
    plain = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"))
    timed = define_bucket(id="went-dormant", criteria=LAPSED)
    rt = make_runtime(plain, timed)
    assert [item.bucket_id for item in reconcile(T0, runtime=rt).buckets] == ["went-dormant"]
    from buckets.registry import UnknownBucketError

    with pytest.raises(UnknownBucketError):
        reconcile(T0, ["nope"], runtime=rt)


def test_one_failing_bucket_does_not_stop_the_others(make_runtime, monkeypatch):
    broken = define_bucket(id="broken", criteria=LAPSED)
    fine = define_bucket(id="fine", criteria=LAPSED)
    rt = make_runtime(broken, fine)
    deployed(rt, broken, fine)
    used(rt, "u", T0)
    original = reconcile_module.join_mode

    def failing(bucket: Bucket) -> str:
        if bucket.id == "broken":
            raise RuntimeError("boom")
        return original(bucket)

    monkeypatch.setattr(reconcile_module, "join_mode", failing)
    result = reconcile(T0 + 8 * D, runtime=rt)
    statuses = {item.bucket_id: (item.status, item.reason) for item in result.buckets}
    assert statuses == {"broken": ("failed", "RuntimeError: boom"), "fine": ("done", None)}
    assert active(rt, "fine") == {"u"}


def test_criteria_leaves_remove_exactly_the_members_who_fail(make_runtime):
    """Many members, some still qualifying, over several chunks: the per-member probes must be
    correlated to each member."""
    power = define_bucket(id="power", criteria=b.event("feature.used").within("7d").at_least(2))
    rt = make_runtime(power)
    now = T0 + 10 * D
    ingest_events(
        [
            {"external_id": f"m{i:02d}", "event": "feature.used", "occurred_at": T0}
            for i in range(40)
        ]
        * 2,
        now=T0 + D,
        runtime=rt,
    )
    recent = [{"external_id": f"m{i:02d}", "event": "feature.used"} for i in range(0, 40, 3)]
    ingest_events(recent * 2, now=now - D, runtime=rt)  # these still qualify as of now
    assert len(active(rt, "power")) == 40
    result = reconcile(now, runtime=rt, chunk_size=9)
    assert active(rt, "power") == {f"m{i:02d}" for i in range(40) if i % 3 == 0}
    assert result.buckets[0].left == {"criteria": 40 - 14}
