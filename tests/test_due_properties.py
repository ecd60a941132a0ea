"""Property tests of the due queue and of monotone decisions, on a real PostgreSQL.

Hypothesis draws runs of operations over a few contacts and the buckets below: ingests of
events (some stamped ahead of ``now`` within the clock skew, some in the past, property changes
among them) and cron ticks, each at a ``now`` that may go *backwards* (several processes'
clocks). After every run:

* no pair's transitions go back in time (``occurred_at`` never decreases along the ledger of a
  (bucket, contact)): no decision as of an older ``now`` was applied over a newer one;
* the queue missed nothing: a tick and then a full sweep as of the latest ``now`` seen find
  nothing to heal (no transition, no missing or late entry);
* the membership of every bucket without a dwell limit equals its criteria as of that ``now``
  (the invariant of SPEC §6.3; dwell limits legitimately differ).

``BUCKETS_DUE_PROPERTY_EXAMPLES`` sets the example count (default 25 in CI).
"""

from __future__ import annotations

import os
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buckets import b, define_bucket, ingest_event
from buckets.criteria import Event, evaluate, in_memory_counter
from buckets.models import bucket_memberships, bucket_transitions, contacts, user_events
from tests.conftest import CloneDB
from workflows.backfill import Runner, deploy
from workflows.reconcile import reconcile

pytestmark = pytest.mark.usefixtures("both_deciders")  # due chunks: both deciders

EXAMPLES = int(os.environ.get("BUCKETS_DUE_PROPERTY_EXAMPLES", "25"))
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
CONTACTS = ("a", "b", "c")

BUCKETS = [
    define_bucket(
        id="lapsed",
        criteria=b.all(b.event("used").exists(), b.event("used").within("2h").not_exists()),
    ),
    define_bucket(id="busy", criteria=b.event("used").within("1h").at_least(2)),
    define_bucket(id="quiet", criteria=b.event("used").within("1h").less_than(2)),
    define_bucket(id="exactly-one", criteria=b.event("used").within("90m").exactly(1)),
    define_bucket(id="buyer", criteria=b.event("purchase").exists()),
    define_bucket(
        id="pro-busy",
        criteria=b.all(b.prop("plan").eq("pro"), b.event("used").within("1h").at_least(1)),
    ),
    define_bucket(id="trial", criteria=b.prop("plan").eq("trial"), max_dwell="90m"),
    define_bucket(
        id="sticky",
        criteria=b.any(b.prop("plan").eq("pro"), b.event("purchase").within("1h").exists()),
        min_dwell="30m",
    ),
]
UNDWELLED = [bucket for bucket in BUCKETS if not (bucket.min_dwell or bucket.max_dwell)]

MINUTES = st.integers(min_value=0, max_value=600)
INGEST = st.fixed_dictionaries(
    {
        "op": st.just("ingest"),
        "who": st.sampled_from(CONTACTS),
        "event": st.sampled_from(["used", "used", "purchase", "other"]),
        "now": MINUTES,
        "offset": st.sampled_from([0, 0, -1, -30, -60, -61, -120, 1, 4]),  # minutes vs now
        "plan": st.sampled_from([None, None, "pro", "trial", "free"]),
    }
)
TICK = st.fixed_dictionaries({"op": st.just("tick"), "now": MINUTES})
RUNS = st.lists(st.one_of(INGEST, INGEST, TICK), min_size=1, max_size=14)


def _reset(db: CloneDB) -> None:
    with db.engine.begin() as conn:
        conn.execute(
            sa.text(
                "TRUNCATE journey_enrollments, bucket_transitions, bucket_memberships,"
                " bucket_configs, backfill_jobs, bucket_due, user_events, contacts"
            )
        )


def _run(rt: Any, ops: list[dict[str, Any]]) -> datetime:
    latest = T0
    for op in ops:
        now = T0 + timedelta(minutes=op["now"])
        latest = max(latest, now)
        if op["op"] == "tick":
            assert not reconcile(now, runtime=rt).failed
            continue
        patch = {"plan": op["plan"]} if op["plan"] else None
        ingest_event(
            op["who"],
            op["event"],
            {},
            occurred_at=now + timedelta(minutes=op["offset"]),
            contact_properties=patch,
            now=now,
            runtime=rt,
        )
    return latest


def _ledger_is_monotone(rt: Any) -> None:
    with rt.engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                bucket_transitions.c.bucket_id,
                bucket_transitions.c.contact_id,
                bucket_transitions.c.occurred_at,
            ).order_by(bucket_transitions.c.id)
        ).all()
    last: dict[tuple[str, int], datetime] = {}
    for bucket_id, contact_id, at in rows:
        previous = last.get((bucket_id, contact_id))
        assert previous is None or at >= previous, (bucket_id, contact_id, previous, at)
        last[(bucket_id, contact_id)] = at


def _membership_matches_criteria(rt: Any, now: datetime) -> None:
    with rt.engine.connect() as conn:
        people = conn.execute(sa.select(contacts.c.id, contacts.c.properties)).all()
        history: dict[int, list[Event]] = defaultdict(list)
        for row in conn.execute(sa.select(user_events)):
            history[row.contact_id].append(Event(row.event, row.occurred_at, row.properties))
        active = {
            (row.bucket_id, row.contact_id)
            for row in conn.execute(
                sa.select(bucket_memberships.c.bucket_id, bucket_memberships.c.contact_id).where(
                    bucket_memberships.c.status == "active"
                )
            )
        }
    for bucket in UNDWELLED:
        expected = {
            person.id
            for person in people
            if evaluate(
                bucket.criteria, person.properties, in_memory_counter(history[person.id], now)
            )
        }
        members = {contact_id for bucket_id, contact_id in active if bucket_id == bucket.id}
        assert members == expected, (bucket.id, now)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(before=RUNS, after=RUNS)
def test_random_runs_leave_nothing_to_heal_and_never_go_back_in_time(
    clone_db: CloneDB, make_runtime: Any, before: list[dict[str, Any]], after: list[dict[str, Any]]
):
    _reset(clone_db)
    rt = make_runtime(*BUCKETS)
    shipped = _run(rt, before)  # history, then the buckets ship (backfills fill the queue)
    deploy(rt, shipped)
    for job in Runner(rt, clock=lambda: shipped, chunk=2).run_pending():
        assert job.status == "completed"
    latest = max(shipped, _run(rt, after))
    _ledger_is_monotone(rt)
    assert not reconcile(latest, runtime=rt).failed
    sweep = reconcile(latest, runtime=rt, full=True)
    healed = [bucket.to_dict() for bucket in sweep.buckets if bucket.healed]
    assert sweep.healed == 0, (before, after, healed)
    _ledger_is_monotone(rt)
    _membership_matches_criteria(rt, latest)
