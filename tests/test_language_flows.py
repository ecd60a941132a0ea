"""The criteria language part 2 (SPEC §3.4, §6.7) through ingest, the due queue and explain,
on a real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from buckets import b, define_bucket, ingest_event
from buckets.criteria.clock import TICK
from buckets.criteria.model import Sample
from buckets.explain import explain
from buckets.models import contacts
from tests.test_due import T0, D, H, entries, ship, tick, used
from tests.test_reconcile import active, transitions

pytestmark = pytest.mark.usefixtures("both_deciders")  # due chunks: both deciders

NEVER_BOUGHT = define_bucket(id="never-bought", criteria=b.not_(b.event("purchase").exists()))
EVERYONE = define_bucket(id="everyone", criteria=b.everyone())
HOLDOUT = define_bucket(id="holdout", criteria=b.sample(50))
EU = define_bucket(id="eu", criteria=b.prop(["address", "country"]).in_(["DE", "FR"]))
QUIET = define_bucket(id="quiet", criteria=b.not_(b.event("used").within("1d").exists()))


def test_all_negative_buckets_are_decided_when_a_contact_is_created(make_runtime):
    rt = make_runtime(NEVER_BOUGHT, EVERYONE, HOLDOUT)
    for who in ("a", "b", "c", "d", "e", "f"):
        ingest_event(who, "page.viewed", {}, now=T0, runtime=rt)
    assert active(rt, "never-bought") == set("abcdef")
    assert active(rt, "everyone") == set("abcdef")
    node = HOLDOUT.criteria
    assert isinstance(node, Sample)
    assert active(rt, "holdout") == {who for who in "abcdef" if node.hits(who)}
    ingest_event("a", "purchase", {}, now=T0 + D, runtime=rt)
    assert active(rt, "never-bought") == set("bcdef")
    assert active(rt, "everyone") == set("abcdef")


def test_a_path_condition_follows_its_top_level_key(make_runtime):
    rt = make_runtime(EU)

    def moved(address: Any, at: Any) -> None:
        ingest_event("u", "x", {}, contact_properties={"address": address}, now=at, runtime=rt)

    moved({"country": "DE", "city": "Berlin"}, T0)
    assert active(rt, "eu") == {"u"}
    moved({"country": "US"}, T0 + D)
    assert active(rt, "eu") == set()
    moved({"country": "FR"}, T0 + 2 * D)
    assert active(rt, "eu") == {"u"}
    moved(["FR"], T0 + 3 * D)  # not an object: the path is missing
    assert active(rt, "eu") == set()
    assert [t.kind for t in transitions(rt, "eu")] == ["entered", "left", "entered", "left"]


def test_a_negated_window_joins_through_the_queue_at_its_instant(make_runtime):
    rt = make_runtime(QUIET)
    used(rt, "u", T0)  # a new contact, busy: not quiet
    assert active(rt, "quiet") == set()
    instant = T0 + D + TICK  # the event leaves the 1-day window
    ship(rt, T0 + timedelta(hours=2))
    assert entries(rt, "quiet")[("quiet", "u")] == instant
    early = tick(rt, instant - TICK)["quiet"]
    assert early.passes_ran == "no"
    assert active(rt, "quiet") == set()
    at = tick(rt, instant)["quiet"]
    assert (at.passes_ran, at.due) == ("no", 1)
    assert active(rt, "quiet") == {"u"}
    [joined] = transitions(rt, "quiet")[-1:]
    assert (joined.kind, joined.occurred_at, joined.source) == ("entered", instant, "reconcile")


def test_explain_shows_paths_samples_and_each_leafs_next_change(make_runtime):
    bucket = define_bucket(
        id="mix",
        criteria=b.all(
            b.prop(["address", "country"]).in_(["DE"]),
            b.sample(50, salt="s"),
            b.not_(b.event("used").within("1d").exists()),
        ),
    )
    rt = make_runtime(bucket)
    ingest_event(
        "u", "used", {}, contact_properties={"address": {"country": "DE"}}, now=T0, runtime=rt
    )
    found = explain("mix", "u", now=T0 + timedelta(hours=1), runtime=rt).to_dict()
    path, sample, window = found["leaves"]
    assert (path["value"], path["present"], path["actual"]) == (True, True, "DE")
    assert path["condition"] == "property ['address', 'country'] in ['DE']"
    assert sample["condition"] == "sample 50% (salt 's')"
    assert sample["value"] is Sample(percent=50, salt="s").hits("u")
    assert sample["detail"].startswith("sample slot ")
    assert window["path"] == "criteria.conditions[2].conditions[0]"
    assert (window["value"], window["count"]) == (True, 1)
    assert window["next_at"] == (T0 + D + TICK).isoformat()


SPENDERS = define_bucket(
    id="spenders", criteria=b.event("order.completed").within("30d").sum("amount").gte(100)
)


def test_a_windowed_sum_joins_on_ingest_and_decays_through_the_queue(make_runtime):
    rt = make_runtime(SPENDERS)

    def order(amount: Any, at: Any) -> None:
        ingest_event("u", "order.completed", {"amount": amount}, now=at, runtime=rt)

    order(60, T0)
    order("50", T0 + D)  # not a number: ignored
    assert active(rt, "spenders") == set()
    order(40.5, T0 + 2 * D)
    assert active(rt, "spenders") == {"u"}
    ship(rt, T0 + 2 * D)
    instant = T0 + 30 * D + TICK  # the 60 leaves the window: 40.5 < 100
    assert entries(rt, "spenders")[("spenders", "u")] == instant
    found = explain("spenders", "u", now=T0 + 3 * D, runtime=rt).to_dict()
    [leaf] = found["leaves"]
    assert leaf["detail"] == "sum 100.5 over 2 numeric value(s)"
    assert leaf["next_at"] == instant.isoformat()
    assert tick(rt, instant - TICK)["spenders"].passes_ran == "no"
    assert active(rt, "spenders") == {"u"}
    at = tick(rt, instant)["spenders"]
    assert (at.passes_ran, at.due) == ("no", 1)
    assert active(rt, "spenders") == set()
    [left] = transitions(rt, "spenders")[-1:]
    assert (left.kind, left.occurred_at, left.reason) == ("left", instant, "criteria")


TRIAL_ENDING = define_bucket(id="trial-ending", criteria=b.prop("trial_ends_at").within_next("3d"))


def test_trial_ending_joins_and_leaves_through_the_queue_at_its_instants(make_runtime):
    rt = make_runtime(TRIAL_ENDING)
    ends = T0 + 10 * D
    ingest_event(
        "u",
        "signup",
        {},
        contact_properties={"trial_ends_at": ends.isoformat().replace("+00:00", "Z")},
        now=T0,
        runtime=rt,
    )
    ingest_event(
        "v", "signup", {}, contact_properties={"trial_ends_at": "2026-11-08"}, now=T0, runtime=rt
    )  # a date: midnight UTC, 6.5 days ahead
    assert active(rt, "trial-ending") == set()
    ship(rt, T0 + timedelta(hours=1))
    joins_at = ends - 3 * D
    assert entries(rt, "trial-ending")[("trial-ending", "u")] == joins_at
    # the date-only value is midnight UTC: joined three days before it
    assert entries(rt, "trial-ending")[("trial-ending", "v")] == datetime(2026, 11, 5, tzinfo=UTC)
    found = explain("trial-ending", "u", now=T0 + D, runtime=rt).to_dict()
    [leaf] = found["leaves"]
    assert (leaf["value"], leaf["detail"]) == (False, f"instant {ends.isoformat()}")
    assert leaf["next_at"] == joins_at.isoformat()
    assert tick(rt, joins_at - TICK)["trial-ending"].passes_ran == "no"
    assert active(rt, "trial-ending") == set()
    at = tick(rt, joins_at)["trial-ending"]
    assert (at.passes_ran, at.due) == ("no", 1)
    assert active(rt, "trial-ending") == {"u"}
    tick(rt, ends)
    assert active(rt, "trial-ending") == {"u"}  # the end itself is within the next 3 days
    tick(rt, ends + TICK)
    assert active(rt, "trial-ending") == set()
    kinds = [(t.kind, t.occurred_at) for t in transitions(rt, "trial-ending") if t.kind]
    assert ("entered", joins_at) in kinds
    assert ("left", ends + TICK) in kinds


SETTLED_TRIAL = define_bucket(
    id="settled-trial", criteria=b.prop("plan").eq("trial").held_for(at_least="14d")
)
NEW_TRIAL = define_bucket(
    id="new-trial", criteria=b.prop("plan").eq("trial").held_for(less_than="14d")
)


def test_held_for_joins_and_leaves_through_the_queue_and_ingest_moves_the_entry(make_runtime):
    rt = make_runtime(SETTLED_TRIAL, NEW_TRIAL)
    ship(rt, T0)
    plan = {"plan": "trial"}
    ingest_event("u", "signup", {}, contact_properties=plan, now=T0, runtime=rt)
    # stamped a day earlier: the change is dated by the event's occurred_at
    ingest_event("v", "signup", {}, occurred_at=T0 - D, contact_properties=plan, now=T0, runtime=rt)
    assert active(rt, "settled-trial") == set()
    assert active(rt, "new-trial") == {"u", "v"}
    matures, early = T0 + 14 * D, T0 + 13 * D
    assert entries(rt, "settled-trial") == {
        ("settled-trial", "u"): matures,
        ("settled-trial", "v"): early,
    }
    assert entries(rt, "new-trial") == {("new-trial", "u"): matures, ("new-trial", "v"): early}
    # the same value again changes nothing: the entries stay
    ingest_event("u", "seen", {}, contact_properties=plan, now=T0 + D, runtime=rt)
    assert entries(rt, "settled-trial")[("settled-trial", "u")] == matures
    found = explain("settled-trial", "u", now=T0 + 2 * D, runtime=rt).to_dict()
    [leaf] = found["leaves"]
    assert leaf["condition"] == "property 'plan' eq 'trial', held for at least 2w"
    assert (leaf["value"], leaf["actual"], leaf["changed_at"]) == (False, "trial", T0.isoformat())
    assert leaf["next_at"] == matures.isoformat()
    assert found["next_change"]["at"] == matures.isoformat()
    assert found["queue"]["due_at"] == matures.isoformat()
    # one microsecond before it matures nothing moves; at it, the queue joins (no sweep)
    tick(rt, early - TICK)
    assert active(rt, "settled-trial") == set()
    at = tick(rt, early)
    assert (at["settled-trial"].passes_ran, at["settled-trial"].due) == ("no", 1)
    assert active(rt, "settled-trial") == {"v"}
    assert active(rt, "new-trial") == {"u"}
    # a change of value before u matures: the entry moves to the new changed_at + 14d
    ingest_event(
        "u", "upgraded", {}, contact_properties={"plan": "pro"}, now=T0 + 13 * D + H, runtime=rt
    )
    assert active(rt, "new-trial") == set()
    ingest_event(
        "u", "downgraded", {}, contact_properties=plan, now=T0 + 13 * D + 2 * H, runtime=rt
    )
    assert active(rt, "new-trial") == {"u"}
    later = T0 + 27 * D + 2 * H
    assert entries(rt, "settled-trial")[("settled-trial", "u")] == later
    tick(rt, matures)
    assert active(rt, "settled-trial") == {"v"}
    tick(rt, later)
    assert active(rt, "settled-trial") == {"u", "v"}
    assert active(rt, "new-trial") == set()
    kinds = [(t.kind, t.occurred_at) for t in transitions(rt, "settled-trial") if t.kind]
    assert kinds == [("entered", early), ("entered", later)]


def test_held_for_backfill_fills_the_queue_and_a_key_without_record_takes_created_at(
    make_runtime,
):
    bare = make_runtime()
    ingest_event("u", "signup", {}, contact_properties={"plan": "trial"}, now=T0, runtime=bare)
    with bare.engine.begin() as conn:  # a contact that predates the record
        conn.execute(
            sa.insert(contacts).values(
                external_id="old", properties={"plan": "trial"}, created_at=T0 - 20 * D
            )
        )
    rt = make_runtime(SETTLED_TRIAL)
    ship(rt, T0 + D)  # the first-time backfill and the set-wide queue fill
    assert active(rt, "settled-trial") == {"old"}
    assert entries(rt, "settled-trial") == {("settled-trial", "u"): T0 + 14 * D}
    found = explain("settled-trial", "old", now=T0 + D, runtime=rt).to_dict()
    assert found["leaves"][0]["changed_at"] == (T0 - 20 * D).isoformat()
    tick(rt, T0 + 14 * D)
    assert active(rt, "settled-trial") == {"old", "u"}


ABANDONED = define_bucket(
    id="abandoned-cart",
    criteria=b.sequence(
        b.step("cart.added"), b.step("order.completed", gap="1h", absent=True), within="7d"
    ),
)


def test_an_abandoned_cart_joins_when_the_gap_elapses_and_leaves_when_it_ages_out(make_runtime):
    rt = make_runtime(ABANDONED)
    H = timedelta(hours=1)

    def event(who: str, name: str, at: datetime) -> None:
        ingest_event(who, name, {}, now=at, runtime=rt)

    event("u", "cart.added", T0)
    event("v", "cart.added", T0)
    event("v", "order.completed", T0 + H / 2)  # v ordered within the hour
    ship(rt, T0 + H / 2)
    assert active(rt, "abandoned-cart") == set()
    # u joins when its hour is over (the gap elapsing is clock-joinable); v never does
    assert entries(rt, "abandoned-cart") == {("abandoned-cart", "u"): T0 + H}
    found = explain("abandoned-cart", "u", now=T0 + H / 2, runtime=rt).to_dict()
    [leaf] = found["leaves"]
    assert leaf["condition"] == (
        "sequence 'cart.added', then no 'order.completed' within 1h (first within 1w)"
    )
    assert leaf["value"] is False
    assert leaf["detail"] == (
        f"waiting: no 'order.completed' yet; its gap elapses at {(T0 + H).isoformat()}"
    )
    assert found["next_change"]["at"] == (T0 + H).isoformat()
    assert explain("abandoned-cart", "v", now=T0 + H, runtime=rt).leaves[0].detail == (
        "missing: every chain is followed by 'order.completed' within its gap"
    )
    assert tick(rt, T0 + H - TICK)["abandoned-cart"].passes_ran == "no"
    assert active(rt, "abandoned-cart") == set()
    at = tick(rt, T0 + H)["abandoned-cart"]
    assert (at.passes_ran, at.due) == ("no", 1)
    assert active(rt, "abandoned-cart") == {"u"}
    [joined] = transitions(rt, "abandoned-cart")
    assert (joined.kind, joined.occurred_at, joined.source) == ("entered", T0 + H, "reconcile")
    # a later order does not undo the abandoned hour; the chain ages out of the 7 days
    event("u", "order.completed", T0 + 2 * H)
    assert active(rt, "abandoned-cart") == {"u"}
    leaves_at = T0 + 7 * D + TICK
    assert entries(rt, "abandoned-cart")[("abandoned-cart", "u")] == leaves_at
    found = explain("abandoned-cart", "u", now=T0 + 3 * H, runtime=rt).to_dict()
    assert found["leaves"][0]["detail"] == (
        f"matched: 'cart.added' at {T0.isoformat()}, no 'order.completed' until"
        f" {(T0 + H).isoformat()}"
    )
    assert found["leaves"][0]["next_at"] == leaves_at.isoformat()
    # a new cart on the ingest path: it holds from an hour later, so when the first ages out
    # the queue entry (a lower bound) finds the member still abandoned, until the new one ages out
    event("u", "cart.added", T0 + 6 * D)
    assert entries(rt, "abandoned-cart")[("abandoned-cart", "u")] == leaves_at
    tick(rt, leaves_at)
    assert active(rt, "abandoned-cart") == {"u"}
    assert entries(rt, "abandoned-cart")[("abandoned-cart", "u")] == T0 + 13 * D + TICK
    tick(rt, T0 + 13 * D + TICK)
    assert active(rt, "abandoned-cart") == set()
    [_, left] = transitions(rt, "abandoned-cart")
    assert (left.kind, left.occurred_at, left.reason) == ("left", T0 + 13 * D + TICK, "criteria")
