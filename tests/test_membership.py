"""The shared join / leave / entry-limit / dwell primitives, on a real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from buckets.membership import Policy, join, leave, pairs, settle
from buckets.models import bucket_memberships as memberships
from buckets.models import contacts

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def contact(conn: Connection, external_id: str = "alice") -> int:
    return conn.execute(
        sa.insert(contacts).values(external_id=external_id).returning(contacts.c.id)
    ).scalar_one()


def enter(conn, policy, contact_id, now, **kwargs):
    return join(
        conn,
        pairs([policy.bucket_id], [contact_id]),
        [policy],
        now=now,
        source=kwargs.pop("source", "ingest"),
        rows=True,
        **kwargs,
    )


def exit_(conn, policy, contact_id, now, reason="criteria"):
    return leave(
        conn,
        pairs([policy.bucket_id], [contact_id]),
        [policy],
        now=now,
        reason=reason,
        source="ingest",
        rows=True,
    )


def rows(conn, contact_id):
    return conn.execute(
        sa.select(memberships).where(memberships.c.contact_id == contact_id).order_by("id")
    ).all()


def test_first_join_is_epoch_one_emitted_with_the_spec_key(connection):
    alice = contact(connection)
    changes = enter(connection, Policy("b1", max_dwell=2 * DAY), alice, T0)
    [t] = changes.transitions
    assert (t.kind, t.epoch, t.emitted, t.suppressed_by) == ("entered", 1, True, None)
    assert t.idempotency_key == "bucket:b1:alice:entered:1"
    assert (changes.joined, changes.emitted) == (1, 1)
    [row] = rows(connection, alice)
    assert (row.status, row.entry_count, row.entered_at, row.max_dwell_at) == (
        "active",
        1,
        T0,
        T0 + 2 * DAY,
    )


def test_join_of_an_active_member_does_nothing(connection):
    alice = contact(connection)
    enter(connection, Policy("b1"), alice, T0)
    again = enter(connection, Policy("b1"), alice, T0 + DAY)
    assert again.transitions == []
    assert again.joined == 0
    assert len(rows(connection, alice)) == 1


def test_leave_flips_the_row_and_is_emitted(connection):
    alice = contact(connection)
    enter(connection, Policy("b1"), alice, T0)
    changes = exit_(connection, Policy("b1"), alice, T0 + DAY)
    [t] = changes.transitions
    assert (t.kind, t.epoch, t.reason, t.emitted) == ("left", 1, "criteria", True)
    assert t.idempotency_key == "bucket:b1:alice:left:1"
    [row] = rows(connection, alice)
    assert (row.status, row.left_at, row.leave_reason) == ("left", T0 + DAY, "criteria")
    assert exit_(connection, Policy("b1"), alice, T0 + 2 * DAY).transitions == []  # CAS


def cycle(conn, policy, contact_id, joins):
    """Join at each instant in ``joins``, leaving one hour later; the emitted flags."""
    flags = []
    for at in joins:
        [t] = enter(conn, policy, contact_id, at).transitions
        flags.append((t.epoch, t.emitted, t.suppressed_by))
        exit_(conn, policy, contact_id, at + timedelta(hours=1))
    return flags


def test_entry_limit_unlimited(connection):
    flags = cycle(connection, Policy("b1"), contact(connection), [T0, T0 + DAY, T0 + 2 * DAY])
    assert flags == [(1, True, None), (2, True, None), (3, True, None)]


def test_entry_limit_once(connection):
    flags = cycle(connection, Policy("b1", "once"), contact(connection), [T0, T0 + DAY])
    assert flags == [(1, True, None), (2, False, "entry_limit")]


def test_entry_limit_once_per_period_counts_from_the_latest_left_at(connection):
    policy = Policy("b1", "once_per_period", entry_period=7 * DAY)
    hour = timedelta(hours=1)
    # left at T0+1h; re-join 7d later minus 1us: suppressed; then exactly 7d after that leave.
    joins = [T0, T0 + hour + 7 * DAY - timedelta(microseconds=1)]
    flags = cycle(connection, policy, contact(connection), joins)
    assert flags == [(1, True, None), (2, False, "entry_limit")]
    # epoch 2 left at joins[1] + 1h; exactly one period later is allowed (>=).
    flags = cycle(connection, policy, contact(connection, "bob"), [T0, T0 + hour + 7 * DAY])
    assert flags == [(1, True, None), (2, True, None)]


def test_silent_join_is_recorded_as_backfill_and_counts_for_once(connection):
    alice = contact(connection)
    policy = Policy("b1", "once")
    [t] = enter(connection, policy, alice, T0, silent=True, source="backfill").transitions
    assert (t.emitted, t.suppressed_by) == (False, "backfill")
    exit_(connection, policy, alice, T0 + DAY)
    [again] = enter(connection, policy, alice, T0 + 2 * DAY).transitions
    assert (again.epoch, again.emitted, again.suppressed_by) == (2, False, "entry_limit")


def test_min_dwell_defers_a_criteria_leave_until_due(connection):
    alice = contact(connection)
    policy = Policy("b1", min_dwell=DAY)
    enter(connection, policy, alice, T0)
    early = exit_(connection, policy, alice, T0 + timedelta(hours=3))
    assert early.transitions == []
    assert early.deferred == 1
    [row] = rows(connection, alice)
    assert (row.status, row.pending_leave_at) == ("active", T0 + DAY)
    # asked again before it is due: still deferred, the due instant does not move
    assert exit_(connection, policy, alice, T0 + timedelta(hours=5)).deferred == 1
    assert rows(connection, alice)[0].pending_leave_at == T0 + DAY
    done = exit_(connection, policy, alice, T0 + DAY)
    assert [t.kind for t in done.transitions] == ["left"]
    [row] = rows(connection, alice)
    assert (row.status, row.pending_leave_at) == ("left", None)


def test_settle_clears_a_pending_leave(connection):
    alice = contact(connection)
    policy = Policy("b1", min_dwell=DAY)
    enter(connection, policy, alice, T0)
    exit_(connection, policy, alice, T0 + timedelta(hours=1))
    settled = settle(
        connection, pairs(["b1"], [alice]), now=T0 + timedelta(hours=2), clear_pending=True
    )
    assert settled == [alice]
    [row] = rows(connection, alice)
    assert (row.pending_leave_at, row.last_evaluated_at) == (None, T0 + timedelta(hours=2))


@pytest.mark.parametrize("reason", ["max_dwell", "admin"])
def test_other_leaves_ignore_min_dwell_and_are_emitted(connection, reason):
    alice = contact(connection)
    policy = Policy("b1", min_dwell=7 * DAY)
    enter(connection, policy, alice, T0)
    [t] = exit_(connection, policy, alice, T0 + DAY, reason=reason).transitions
    assert (t.reason, t.emitted) == (reason, True)


def test_contact_deleted_leave_is_not_emitted(connection):
    alice = contact(connection)
    enter(connection, Policy("b1"), alice, T0)
    [t] = exit_(connection, Policy("b1"), alice, T0 + DAY, reason="contact_deleted").transitions
    assert (t.emitted, t.suppressed_by) == (False, "contact_deleted")


def test_a_statement_covers_many_buckets_with_their_own_policies(connection):
    alice, bob = contact(connection), contact(connection, "bob")
    p1, p2 = Policy("b1", max_dwell=DAY), Policy("b2", "once")
    enter(connection, p2, bob, T0)
    exit_(connection, p2, bob, T0 + DAY)
    changes = join(
        connection,
        pairs(["b1", "b2", "b2", "b2"], [alice, alice, bob, bob]),  # a duplicate pair
        [p1, p2],
        now=T0 + 2 * DAY,
        source="reconcile",
        rows=True,
    )
    got = sorted((t.bucket_id, t.external_id, t.epoch, t.emitted) for t in changes.transitions)
    assert got == [("b1", "alice", 1, True), ("b2", "alice", 1, True), ("b2", "bob", 2, False)]
    assert (changes.joined, changes.emitted, changes.suppressed) == (3, 2, 1)


def test_pairs_with_a_stale_revision_are_reported_not_written(connection):
    alice, bob = contact(connection), contact(connection, "bob")
    connection.execute(sa.update(contacts).where(contacts.c.id == bob).values(revision=5))
    candidates = sa.select(
        sa.literal("b1").label("bucket_id"),
        contacts.c.id.label("contact_id"),
        sa.literal(0, sa.BigInteger).label("revision"),  # what an older snapshot saw
    ).where(contacts.c.id.in_([alice, bob]))
    changes = join(connection, candidates, [Policy("b1")], now=T0, source="reconcile")
    assert changes.joined == 1
    assert changes.stale == [("b1", bob)]
    assert rows(connection, bob) == []
