"""Event conditions of SPEC §3.4 (``older_than``, ``check: last``, ``check: regularly``)
through ingest, the due queue and explain, on a real PostgreSQL: each clock-driven flip comes
from a due-queue entry at its exact instant (SPEC §6.7)."""

from __future__ import annotations

from datetime import timedelta

from buckets import b, define_bucket
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
