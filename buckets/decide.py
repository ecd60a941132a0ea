"""Deciding known (bucket, contact) pairs: the real-time path, due-queue chunks, confirms.

:func:`decide` takes pairs whose contacts the caller has locked, and, as of ``now``:

1. fetches in **one statement** every contact's properties, the facts of every event leaf its
   pairs involve (:func:`~buckets.criteria.compile_clock.leaf_facts`: the newest counting events
   and the next arrival) and its active memberships in those buckets;
2. evaluates each pair in Python — the criteria's value and its next change by the clock
   (:mod:`buckets.criteria.clock`) — and decides: join, leave (``min_dwell`` may defer it),
   clear a deferred leave, or touch ``last_evaluated_at``; with ``clock`` (the cron's view) also
   the maximum dwell, and joins only where the cron may join;
3. applies each kind with one set-based statement of :mod:`buckets.membership`, and writes every
   pair's due-queue entry with one statement of :mod:`buckets.due`.

``now`` must be at least every instant the contacts were already decided as of (the caller
takes it from :func:`buckets.membership.lock_contacts` or its own locking query).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection

from buckets import due
from buckets.criteria import EventCondition, Facts, leaf_facts
from buckets.criteria.clock import State
from buckets.criteria.model import leaves
from buckets.definitions import Bucket
from buckets.membership import Changes, LeaveReason, Policy, Source, join, leave, pairs, settle
from buckets.models import bucket_memberships as memberships
from buckets.models import contacts


@dataclass(frozen=True)
class Ask:
    """A pair to decide (``event_id``: the ingested event its transitions are attributed to)."""

    bucket: Bucket
    contact_id: int
    event_id: int | None = None


@dataclass
class Outcome:
    """What :func:`decide` did."""

    changes: Changes = field(default_factory=Changes)  # with the transitions
    left: dict[str, int] = field(default_factory=dict)  # leaves by reason
    cleared: int = 0  # deferred leaves dropped (the contact qualifies again)
    entries: int = 0  # due-queue entries written or removed


@dataclass
class _Plan:
    joins: list[Ask] = field(default_factory=list)
    leaves: dict[str, list[Ask]] = field(default_factory=dict)  # by reason
    stable: list[Ask] = field(default_factory=list)
    cleared: list[Ask] = field(default_factory=list)
    entries: list[due.Entry] = field(default_factory=list)


def _when(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def decide(
    conn: Connection,
    asks: Sequence[Ask],
    now: datetime,
    *,
    source: Source,
    clock: bool = False,
    blocked: frozenset[str] = frozenset(),
) -> Outcome:
    """Decide ``asks`` as of ``now`` (see the module). ``clock``: the cron's view (maximum
    dwell, no joins where ``reconcile_joins`` is false or ``blocked`` names the bucket)."""
    if not asks:
        return Outcome()
    involved = {ask.bucket.id: ask.bucket for ask in asks}
    conditions = list(
        dict.fromkeys(
            leaf
            for bucket in involved.values()
            for leaf in leaves(bucket.criteria)
            if isinstance(leaf, EventCondition)
        )
    )
    needed_by: dict[EventCondition, set[int]] = {condition: set() for condition in conditions}
    for ask in asks:
        for leaf in leaves(ask.bucket.criteria):
            if isinstance(leaf, EventCondition):
                needed_by[leaf].add(ask.contact_id)
    active = (
        sa.select(
            sa.func.json_object_agg(
                memberships.c.bucket_id,
                sa.func.json_build_array(
                    memberships.c.entered_at,
                    memberships.c.max_dwell_at,
                    memberships.c.pending_leave_at,
                ),
            )
        )
        .where(
            memberships.c.contact_id == contacts.c.id,
            memberships.c.status == "active",
            memberships.c.bucket_id == sa.any_(sa.literal(sorted(involved), ARRAY(sa.Text()))),
        )
        .correlate(contacts)
        .scalar_subquery()
        .label("active")
    )
    contact_ids = sorted({ask.contact_id for ask in asks})
    query = leaf_facts(
        conditions,
        now,
        contact_ids,
        needed_by=[sorted(needed_by[condition]) for condition in conditions],
    ).add_columns(active)
    rows = {row.id: row for row in conn.execute(query)}
    plan = _Plan()
    for ask in asks:
        row = rows.get(ask.contact_id)
        if row is not None:
            _plan(plan, ask, row, Facts.of(row, conditions), now, clock=clock, blocked=blocked)
    return _apply(conn, plan, involved.values(), now, source=source)


def _plan(
    plan: _Plan,
    ask: Ask,
    row: Any,
    facts: Facts,
    now: datetime,
    *,
    clock: bool,
    blocked: frozenset[str],
) -> None:
    bucket = ask.bucket
    stored = (row.active or {}).get(bucket.id)
    entered_at, max_dwell_at, pending_at = (
        (_when(stored[0]), _when(stored[1]), _when(stored[2])) if stored else (None, None, None)
    )
    after: due.Member | None = None
    if row.deleted_at is not None:  # deletion left every bucket; the queue forgets it
        if bucket.clocked:
            plan.entries.append((ask.contact_id, bucket.id, None))
        return
    state: State = facts.state(bucket.criteria)
    if stored is not None:
        assert entered_at is not None
        if clock and max_dwell_at is not None and max_dwell_at <= now:
            plan.leaves.setdefault("max_dwell", []).append(ask)
        elif state.value:
            (plan.cleared if pending_at is not None else plan.stable).append(ask)
            after = due.Member(max_dwell_at)
        else:
            plan.leaves.setdefault("criteria", []).append(ask)
            if bucket.min_dwell is not None and entered_at > now - bucket.min_dwell:
                after = due.Member(max_dwell_at, pending_at or entered_at + bucket.min_dwell)
    elif state.value and (
        not clock or (bucket.reconcile_joins is not False and bucket.id not in blocked)
    ):
        plan.joins.append(ask)
        after = due.Member(now + bucket.max_dwell if bucket.max_dwell is not None else None)
    if bucket.clocked:
        entry = due.due_at(bucket, state, after, now, blocked=bucket.id in blocked)
        plan.entries.append((ask.contact_id, bucket.id, entry))


def _pairs(asks: Sequence[Ask], *, events: bool = True) -> sa.Select[Any]:
    return pairs(
        [ask.bucket.id for ask in asks],
        [ask.contact_id for ask in asks],
        [ask.event_id for ask in asks] if events else None,
    )


def _apply(
    conn: Connection, plan: _Plan, buckets: Any, now: datetime, *, source: Source
) -> Outcome:
    outcome = Outcome()
    policies = [Policy.of(bucket) for bucket in buckets]
    if plan.joins:
        outcome.changes.add(
            join(conn, _pairs(plan.joins), policies, now=now, source=source, rows=True)
        )
    for reason, asks in plan.leaves.items():
        reason_: LeaveReason = "max_dwell" if reason == "max_dwell" else "criteria"
        changes = leave(
            conn, _pairs(asks), policies, now=now, reason=reason_, source=source, rows=True
        )
        outcome.changes.add(changes)
        if changes.left:
            outcome.left[reason] = outcome.left.get(reason, 0) + changes.left
    if plan.stable:
        settle(conn, _pairs(plan.stable, events=False), now=now, clear_pending=False)
    if plan.cleared:
        outcome.cleared = len(
            settle(conn, _pairs(plan.cleared, events=False), now=now, clear_pending=True)
        )
    if plan.entries:
        due.write(conn, plan.entries)
        outcome.entries = len(plan.entries)
    outcome.changes.transitions.sort(key=lambda t: t.id)
    return outcome
