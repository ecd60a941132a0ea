"""Event conditions of SPEC §3.4 (``older_than``, ``check: last``, ``check: regularly``)
through ingest, the due queue and explain, on a real PostgreSQL: each clock-driven flip comes
from a due-queue entry at its exact instant (SPEC §6.7)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from buckets import b, define_bucket, ingest_event
from buckets.criteria.clock import TICK
from buckets.explain import explain
from tests.test_due import T0, D, entries, ship, tick, used
from tests.test_reconcile import active, transitions

H = timedelta(hours=1)

VETERANS = define_bucket(id="veterans", criteria=b.event("used").older_than("1d").exists())
FIRST_WEEK = define_bucket(
    id="first-week",
    criteria=b.all(
        b.event("used").within("7d").exists(), b.event("used").older_than("7d").not_exists()
    ),
)


def test_an_event_ages_into_older_than_through_the_queue(make_runtime):
    rt = make_runtime(VETERANS)
    used(rt, "u", T0)
    assert active(rt, "veterans") == set()
    instant = T0 + D + TICK  # occurred_at < now - 1d from here on
    assert entries(rt, "veterans")[("veterans", "u")] == instant  # written by the ingest
    ship(rt, T0 + H)
    assert entries(rt, "veterans")[("veterans", "u")] == instant
    found = explain("veterans", "u", now=T0 + H, runtime=rt).to_dict()
    [leaf] = found["leaves"]
    assert leaf["condition"] == "event 'used' older_than 1d exists"
    assert (leaf["value"], leaf["count"]) == (False, 0)
    assert leaf["detail"] == f"events before {(T0 + H - D).isoformat()} (exclusive) count"
    assert leaf["next_at"] == instant.isoformat()
    assert found["next_change"]["at"] == instant.isoformat()
    assert tick(rt, instant - TICK)["veterans"].passes_ran == "no"
    assert active(rt, "veterans") == set()
    at = tick(rt, instant)["veterans"]
    assert (at.passes_ran, at.due) == ("no", 1)
    assert active(rt, "veterans") == {"u"}
    [joined] = transitions(rt, "veterans")[-1:]
    assert (joined.kind, joined.occurred_at, joined.source) == ("entered", instant, "reconcile")


def test_first_time_in_the_last_week_leaves_when_the_first_event_ages_in(make_runtime):
    rt = make_runtime(FIRST_WEEK)
    used(rt, "u", T0)
    used(rt, "u", T0 + 3 * D)
    assert active(rt, "first-week") == {"u"}
    ship(rt, T0 + 3 * D)
    instant = T0 + 7 * D + TICK  # the first event is older than 7 days: not the first time
    assert entries(rt, "first-week")[("first-week", "u")] == instant
    tick(rt, instant - TICK)
    assert active(rt, "first-week") == {"u"}
    tick(rt, instant)
    assert active(rt, "first-week") == set()
    [left] = transitions(rt, "first-week")[-1:]
    assert (left.kind, left.occurred_at, left.reason) == ("left", instant, "criteria")


PRO_NOW = define_bucket(
    id="pro-now",
    criteria=b.event("plan.changed").within("30d").where(b.prop("to").eq("pro")).last(),
)


def test_the_last_event_decides_and_leaves_through_the_queue(make_runtime):
    rt = make_runtime(PRO_NOW)

    def changed(to: str, at: Any, now: Any = None) -> None:
        ingest_event("u", "plan.changed", {"to": to}, occurred_at=at, now=now or at, runtime=rt)

    changed("pro", T0)
    assert active(rt, "pro-now") == {"u"}
    changed("free", T0 + D)  # the newest event decides: no longer pro
    assert active(rt, "pro-now") == set()
    changed("pro", T0 + 2 * D)
    assert active(rt, "pro-now") == {"u"}
    ship(rt, T0 + 2 * D)
    instant = T0 + 32 * D + TICK  # the last event leaves the 30-day window
    assert entries(rt, "pro-now")[("pro-now", "u")] == instant
    found = explain("pro-now", "u", now=T0 + 3 * D, runtime=rt).to_dict()
    [leaf] = found["leaves"]
    assert leaf["condition"] == "event 'plan.changed' where property 'to' eq 'pro' within 30d last"
    assert leaf["value"] is True
    assert leaf["detail"] == (
        f"the last event, at {(T0 + 2 * D).isoformat()}, satisfies where: {{'to': 'pro'}}"
    )
    assert leaf["next_at"] == instant.isoformat()
    tick(rt, instant - TICK)
    assert active(rt, "pro-now") == {"u"}
    at = tick(rt, instant)["pro-now"]
    assert (at.passes_ran, at.due) == ("no", 1)
    assert active(rt, "pro-now") == set()
    [left] = transitions(rt, "pro-now")[-1:]
    assert (left.kind, left.occurred_at, left.reason) == ("left", instant, "criteria")


def test_a_future_stamped_event_becomes_last_when_now_reaches_it(make_runtime):
    rt = make_runtime(PRO_NOW)
    ingest_event("u", "plan.changed", {"to": "pro"}, now=T0, runtime=rt)
    soon = T0 + timedelta(seconds=30)  # inside the allowed clock skew
    ingest_event("u", "plan.changed", {"to": "free"}, occurred_at=soon, now=T0, runtime=rt)
    assert active(rt, "pro-now") == {"u"}  # the free event is not last yet
    assert entries(rt, "pro-now")[("pro-now", "u")] == soon
    ship(rt, T0)
    tick(rt, soon - TICK)
    assert active(rt, "pro-now") == {"u"}
    tick(rt, soon)
    assert active(rt, "pro-now") == set()


HABIT = define_bucket(
    id="habit", criteria=b.event("used").regularly("1d", periods=3, min_periods=2)
)


def test_regularly_joins_on_ingest_and_leaves_when_a_period_empties(make_runtime):
    rt = make_runtime(HABIT)
    used(rt, "u", T0)
    assert active(rt, "habit") == set()
    used(rt, "u", T0 + D + H)  # periods 0 and 1 now hold an event each
    assert active(rt, "habit") == {"u"}
    ship(rt, T0 + D + H)
    # the T0 event crosses into period 2 at T0 + 2d (still 2 of 3), out at T0 + 3d
    first = T0 + 2 * D
    assert entries(rt, "habit")[("habit", "u")] == first
    found = explain("habit", "u", now=T0 + D + H, runtime=rt).to_dict()
    [leaf] = found["leaves"]
    assert leaf["condition"] == ("event 'used' regularly: 2 of 3 periods of 1d with count gte 1")
    assert leaf["detail"] == (
        "periods that counted: [0, 1] of counts [1, 1, 0] (period 0 ends now), 2 of 2 needed"
    )
    assert leaf["next_at"] == first.isoformat()
    assert found["next_change"]["at"] == (T0 + 3 * D).isoformat()
    tick(rt, first)
    assert active(rt, "habit") == {"u"}
    instant = T0 + 3 * D  # the T0 event leaves the third period: one period left
    assert entries(rt, "habit")[("habit", "u")] == T0 + 2 * D + H
    tick(rt, T0 + 2 * D + H)
    assert entries(rt, "habit")[("habit", "u")] == instant
    tick(rt, instant - TICK)
    assert active(rt, "habit") == {"u"}
    tick(rt, instant)
    assert active(rt, "habit") == set()
    [left] = transitions(rt, "habit")[-1:]
    assert (left.kind, left.occurred_at, left.reason) == ("left", instant, "criteria")
