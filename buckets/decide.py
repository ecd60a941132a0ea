"""Deciding known (bucket, contact) pairs: the real-time path, due-queue chunks, confirms.

:func:`decide` takes pairs whose contacts the caller has locked, and, as of ``now``:

1. fetches in **one statement** every contact's properties, the facts of every event leaf its
   pairs involve (:func:`~buckets.criteria.compile_clock.leaf_facts`: the newest counting events
   and the next arrival) and its active memberships in those buckets;
2. evaluates each pair in Python — the criteria's value and its next change by the clock
   (:mod:`buckets.criteria.clock`); in a clock-driven call, a bucket with
   :data:`SET_WIDE_FROM` pairs or more gets both from its compiled criteria over those
   contacts instead (:func:`~buckets.criteria.compile_clock.clock_select`, one statement)
   — and decides: join, leave (``min_dwell`` may defer it),
   clear a deferred leave, or touch ``last_evaluated_at``; with ``clock`` (the cron's view) also
   the maximum dwell, and joins only where the cron may join;
3. applies each kind with one set-based statement of :mod:`buckets.membership`, and writes every
   pair's due-queue entry with one statement of :mod:`buckets.due`.

``now`` must be at least every instant the contacts were already decided as of (the caller
takes it from :func:`buckets.membership.lock_contacts` or its own locking query).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache, partial
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection

from buckets import due
from buckets.criteria import EventCondition, Facts
from buckets.criteria.clock import State
from buckets.criteria.compile_clock import (
    clock_select,
    fact_offsets,
    facts_params,
    facts_statement,
    raw,
)
from buckets.criteria.model import EventSequence, leaves
from buckets.definitions import Bucket
from buckets.membership import (
    Changes,
    LeaveReason,
    Pairs,
    Policy,
    Source,
    join,
    latest_of,
    latest_row,
    leave,
    pairs,
    record_decided,
    settle,
)
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

    changes: Changes = field(default_factory=Changes)  # counts per bucket; transitions if asked
    left: dict[str, dict[str, int]] = field(default_factory=dict)  # bucket -> reason -> leaves
    cleared: dict[str, int] = field(default_factory=dict)  # bucket -> deferred leaves dropped
    entries: int = 0  # due-queue entries written or removed
    as_of: datetime | None = None  # the instant the pairs were decided as of

    def merge(self, other: Outcome) -> None:
        self.changes.add(other.changes)
        self.changes.transitions.sort(key=lambda t: t.id)
        for bucket_id, reasons in other.left.items():
            mine = self.left.setdefault(bucket_id, {})
            for reason, count in reasons.items():
                mine[reason] = mine.get(reason, 0) + count
        for bucket_id, count in other.cleared.items():
            self.cleared[bucket_id] = self.cleared.get(bucket_id, 0) + count
        self.entries += other.entries
        if other.as_of is not None and (self.as_of is None or other.as_of > self.as_of):
            self.as_of = other.as_of


# A facts query has two columns per event leaf; PostgreSQL allows 1,664 in a select list.
MAX_FACT_LEAVES = 400


def _event_leaves(bucket: Bucket) -> list[EventCondition | EventSequence]:
    """The leaves whose facts come from the events (sequences: their chains' two instants)."""
    return [
        leaf for leaf in leaves(bucket.criteria) if isinstance(leaf, EventCondition | EventSequence)
    ]


FactLeaf = EventCondition | EventSequence


@dataclass(frozen=True, eq=False)  # hashed by identity: the cache key of its statement
class _Layout:
    """Which event leaves a facts statement covers, and where each bucket's leaves sit in it."""

    conditions: tuple[FactLeaf, ...]
    positions: dict[str, tuple[int, ...]]  # bucket id -> its leaves' indexes in conditions
    buckets: dict[str, Bucket]
    offsets: tuple[int, ...]  # where each condition's columns start in a facts row

    def covers(self, buckets: dict[str, Bucket]) -> bool:
        return all(self.buckets.get(key) is bucket for key, bucket in buckets.items())


@lru_cache(maxsize=64)
def _layout(buckets: tuple[Bucket, ...]) -> _Layout | None:
    """The layout of ``buckets``' leaves (None past :data:`MAX_FACT_LEAVES`). Buckets hash by
    identity, so this is a lookup for a registry's (or a tick's) buckets after the first call:
    the same statement object every time, which SQLAlchemy compiles once."""
    conditions = tuple(dict.fromkeys(leaf for bucket in buckets for leaf in _event_leaves(bucket)))
    if len(conditions) > MAX_FACT_LEAVES:
        return None
    index = {condition: at for at, condition in enumerate(conditions)}
    return _Layout(
        conditions,
        {bucket.id: tuple(index[leaf] for leaf in _event_leaves(bucket)) for bucket in buckets},
        {bucket.id: bucket for bucket in buckets},
        fact_offsets(conditions),
    )


# From this many pairs of one bucket in a clock-driven call (a due chunk), the bucket's state
# for those contacts comes from its compiled criteria over them (one statement: the same
# value and next change as the facts' evaluation, proven equal by the differential suite),
# ~20 µs a pair cheaper than evaluating each pair's facts in Python.
SET_WIDE_FROM = 200


def _set_wide(asks: Sequence[Ask]) -> dict[str, list[int]]:
    """The buckets whose state ``asks`` compute set-wide: bucket id -> its contact ids."""
    by_bucket: dict[str, list[int]] = {}
    for ask in asks:
        by_bucket.setdefault(ask.bucket.id, []).append(ask.contact_id)
    return {key: sorted(ids) for key, ids in by_bucket.items() if len(ids) >= SET_WIDE_FROM}


def _groups(asks: Sequence[Ask]) -> list[list[Ask]]:
    """``asks`` split by bucket so that no group involves more than :data:`MAX_FACT_LEAVES`
    distinct event leaves (one group, almost always)."""
    by_bucket: dict[str, list[Ask]] = {}
    for ask in asks:
        by_bucket.setdefault(ask.bucket.id, []).append(ask)
    if len(by_bucket) == 1:
        return [list(asks)]
    groups: list[tuple[set[EventCondition | EventSequence], list[Ask]]] = []
    for bucket_asks in by_bucket.values():
        mine = set(_event_leaves(bucket_asks[0].bucket))
        for held, members in groups:
            if len(held | mine) <= MAX_FACT_LEAVES:
                held.update(mine)
                members.extend(bucket_asks)
                break
        else:
            groups.append((mine, list(bucket_asks)))
    return [members for _, members in groups]


@dataclass
class _Plan:
    joins: list[Ask] = field(default_factory=list)
    leaves: dict[str, list[Ask]] = field(default_factory=dict)  # by reason
    stable: list[Ask] = field(default_factory=list)
    cleared: list[Ask] = field(default_factory=list)
    entries: list[due.Entry] = field(default_factory=list)
    unrecorded: set[int] = field(default_factory=set)  # contacts of non-members that stay so


def decide(
    conn: Connection,
    asks: Sequence[Ask],
    now: datetime,
    *,
    source: Source,
    clock: bool = False,
    blocked: frozenset[str] = frozenset(),
    rows: bool = True,
    record: bool = False,
    universe: Sequence[Bucket] = (),
) -> Outcome:
    """Decide ``asks`` as of ``now`` — or as of the latest instant any of these pairs was
    already decided as of, if later (``Outcome.as_of``). ``clock``: the cron's view (maximum
    dwell, no joins where ``reconcile_joins`` is false or ``blocked`` names the bucket).
    ``rows``: return the transitions themselves (else only counts). ``record``: record the
    decisions no membership row records (non-members that stay so) in the contacts'
    ``decided_at`` (the caller did not). ``universe``: the buckets the caller's asks come
    from (a registry's, a tick's): the facts statement then covers all their leaves (those no
    contact asked for cost nothing but columns of NULL), so every call shares one statement
    instead of building and compiling one per combination of buckets."""
    if not asks:
        return Outcome()
    involved = {ask.bucket.id: ask.bucket for ask in asks}
    layout = _layout(tuple(universe)) if universe else None
    if layout is None or not layout.covers(involved):
        layout = _layout(tuple(sorted(involved.values(), key=lambda bucket: bucket.id)))
    if layout is not None:
        return _decide(
            conn, asks, involved, layout, now, source, clock, blocked, rows=rows, record=record
        )
    outcome = Outcome()
    for group in _groups(asks):  # too many leaves for one statement's columns: one per group
        outcome.merge(
            decide(
                conn,
                group,
                now,
                source=source,
                clock=clock,
                blocked=blocked,
                rows=rows,
                record=record,
            )
        )
    return outcome


def _decide(  # noqa: PLR0917 - decide's arguments, resolved
    conn: Connection,
    asks: Sequence[Ask],
    involved: dict[str, Bucket],
    layout: _Layout,
    now: datetime,
    source: Source,
    clock: bool,
    blocked: frozenset[str],
    *,
    rows: bool,
    record: bool,
) -> Outcome:
    conditions = layout.conditions
    wide = _set_wide(asks) if clock else {}
    needs: dict[int, bytearray] = {}  # per contact: its leaves, then its properties
    asked: dict[int, set[int]] = {}  # per contact: the indexes of its leaves
    for ask in asks:
        wanted = needs.setdefault(ask.contact_id, bytearray(b"0" * (len(conditions) + 1)))
        if ask.bucket.id in wide:  # its state comes from the set-wide statement
            continue
        positions = layout.positions[ask.bucket.id]
        asked.setdefault(ask.contact_id, set()).update(positions)
        for at in positions:
            wanted[at] = ord("1")
        if ask.bucket.property_keys:
            wanted[-1] = ord("1")
    properties = any(b.property_keys for b in involved.values() if b.id not in wide)
    full = sorted(asked)  # contacts with a pair evaluated from its facts
    given = [needs[i].decode() for i in full]
    # the other contacts' pairs are all set-wide: only those pairs' rows are read
    slim = sorted((a.contact_id, a.bucket.id) for a in asks if a.contact_id not in asked)

    def facts(as_of: datetime) -> dict[int, Any]:
        found: dict[int, Any] = {}
        if full:
            params = facts_params(as_of, full, given)
            found = {row.id: row for row in conn.execute(_facts(layout, properties), params).all()}
        if slim:
            pairs_ = {"pair_contacts": [c for c, _ in slim], "pair_buckets": [b for _, b in slim]}
            found.update((row.id, row) for row in conn.execute(_pair_rows(), pairs_).all())
        return found

    found = facts(now)
    later = latest_of(row.watermark for row in found.values())
    if later is not None and later > now:  # decided as of a later instant already
        now = later
        found = facts(now)
    plan = _Plan()
    known: dict[tuple[str, int], State] = {}
    for bucket_id, ids in wide.items():
        statement = clock_select(involved[bucket_id].criteria, now, contact_ids=ids)
        known.update(((bucket_id, i), State(m, n)) for i, m, n in conn.execute(statement).all())
    facts_of: dict[int, Facts] = {}  # once per contact, whatever its number of pairs

    def state(ask: Ask, row: Any) -> State:
        if ask.bucket.id in wide:
            return known[ask.bucket.id, ask.contact_id]
        facts_ = facts_of.get(ask.contact_id)
        if facts_ is None:
            facts_ = facts_of[ask.contact_id] = Facts.of(
                row, conditions, now=now, wanted=asked[ask.contact_id], offsets=layout.offsets
            )
        return facts_.state(ask.bucket.criteria)

    for ask in asks:
        row = found.get(ask.contact_id)
        if row is not None:
            _plan(plan, ask, row, partial(state, ask, row), now, clock=clock, blocked=blocked)
    outcome = _apply(conn, plan, involved.values(), now, source=source, rows=rows)
    outcome.as_of = now
    if record and plan.unrecorded:  # no row records these decisions: the contact does
        record_decided(conn, sorted(plan.unrecorded), now)
    return outcome


@lru_cache(maxsize=256)
def _facts(layout: _Layout, properties: bool) -> sa.Select[Any]:
    """The facts of the leaves (see leaf_facts) and, through one index scan, the contact's
    membership rows (:func:`_held`)."""
    rows_of = (
        sa.select(*_held(memberships))
        # every bucket's rows (a handful per contact, through the contact_id index): cheaper than
        # a probe per involved bucket, and the watermark over all of them is only stricter
        .where(memberships.c.contact_id == contacts.c.id)
        .lateral("rows_of")
    )
    return (
        facts_statement(layout.conditions, needs=True, properties=properties)
        .join_from(contacts, rows_of, sa.true())
        .add_columns(*_planned(rows_of))
    )


def _held(rows: Any) -> list[Any]:
    """Aggregates over a contact's membership ``rows``: the active ones (as arrays, which the
    driver decodes natively) and the latest instant any was decided as of."""
    active = rows.c.status == "active"

    def actives(column: Any) -> Any:
        return raw(sa.func.array_agg(column).filter(active))

    return [
        actives(rows.c.bucket_id).label("a_bucket"),
        actives(rows.c.entered_at).label("a_entered"),
        actives(rows.c.max_dwell_at).label("a_dwell"),
        actives(rows.c.pending_leave_at).label("a_pending"),
        sa.func.max(rows.c.last_evaluated_at).label("evaluated"),
    ]


def _planned(rows_of: Any) -> list[Any]:
    """What :func:`_plan` reads of them, with the watermark (never decide earlier)."""
    watermark = sa.func.greatest(contacts.c.decided_at, rows_of.c.evaluated).label("watermark")
    return [
        rows_of.c.a_bucket,
        rows_of.c.a_entered,
        rows_of.c.a_dwell,
        rows_of.c.a_pending,
        watermark,
    ]


@lru_cache(maxsize=1)
def _pair_rows() -> sa.Select[Any]:
    """What :func:`_plan` reads of a contact whose pairs are all decided set-wide, from those
    pairs' rows alone (an index probe each for the pair's latest row): its active rows among
    them and the watermark, which only needs the rows of the pairs decided (every decision
    records its instant in the pair's latest row, or in the contact's ``decided_at`` when no
    row records it). Reading all of a contact's rows instead costs several heap pages each."""
    given = (
        sa.func.unnest(
            sa.bindparam("pair_contacts", type_=ARRAY(sa.BigInteger())),
            sa.bindparam("pair_buckets", type_=ARRAY(sa.Text())),
        )
        .table_valued("contact_id", "bucket_id")
        .render_derived("given")
    )
    latest = latest_row(
        given,
        memberships.c.bucket_id,
        memberships.c.status,
        memberships.c.entered_at,
        memberships.c.max_dwell_at,
        memberships.c.pending_leave_at,
        memberships.c.last_evaluated_at,
    )
    rows_of = (
        sa.select(given.c.contact_id, *_held(latest))
        .select_from(given.outerjoin(latest, sa.true()))
        .group_by(given.c.contact_id)
        .subquery("rows_of")
    )
    return (
        sa.select(contacts.c.id, contacts.c.deleted_at, *_planned(rows_of))
        .join_from(rows_of, contacts, contacts.c.id == rows_of.c.contact_id)
        # by primary key, whatever the planner believes of the pairs' count
        .where(contacts.c.id == sa.any_(sa.bindparam("pair_contacts")))
    )


def _plan(
    plan: _Plan,
    ask: Ask,
    row: Any,
    state_of: Callable[[], State],
    now: datetime,
    *,
    clock: bool,
    blocked: frozenset[str],
) -> None:
    bucket = ask.bucket
    stored = bucket.id in (row.a_bucket or ())
    entered_at = max_dwell_at = pending_at = None
    if stored:
        index = row.a_bucket.index(bucket.id)
        entered_at, max_dwell_at = row.a_entered[index], row.a_dwell[index]
        pending_at = row.a_pending[index]
    after: due.Member | None = None
    if row.deleted_at is not None:  # deletion left every bucket; the queue forgets it
        if bucket.clocked:
            plan.entries.append((ask.contact_id, bucket.id, None))
        return
    state = state_of()  # a deleted contact's is never computed
    if stored:
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
    else:
        plan.unrecorded.add(ask.contact_id)
    if bucket.clocked:
        entry = due.due_at(bucket, state, after, now, blocked=bucket.id in blocked)
        plan.entries.append((ask.contact_id, bucket.id, entry))


def _pairs(asks: Sequence[Ask], *, events: bool = True) -> Pairs:
    """The pairs as statement parameters; their event ids only when some pair has one (the
    clock's decisions have none, and their statements then skip the lookup)."""
    with_events = events and any(ask.event_id is not None for ask in asks)
    return pairs(
        [ask.bucket.id for ask in asks],
        [ask.contact_id for ask in asks],
        [ask.event_id for ask in asks] if with_events else None,
    )


def _apply(
    conn: Connection, plan: _Plan, buckets: Any, now: datetime, *, source: Source, rows: bool
) -> Outcome:
    outcome = Outcome()
    policies = [Policy.of(bucket) for bucket in buckets]
    if plan.joins:
        outcome.changes.add(
            join(conn, _pairs(plan.joins), policies, now=now, source=source, rows=rows)
        )
    for reason, asks in plan.leaves.items():
        reason_: LeaveReason = "max_dwell" if reason == "max_dwell" else "criteria"
        changes = leave(
            conn, _pairs(asks), policies, now=now, reason=reason_, source=source, rows=rows
        )
        outcome.changes.add(changes)
        for bucket_id, counts in changes.per_bucket.items():
            if counts.left:
                by_reason = outcome.left.setdefault(bucket_id, {})
                by_reason[reason] = by_reason.get(reason, 0) + counts.left
    if plan.stable:
        settle(conn, _pairs(plan.stable, events=False), now=now, clear_pending=False)
    if plan.cleared:
        settle(conn, _pairs(plan.cleared, events=False), now=now, clear_pending=True)
        for ask in plan.cleared:
            outcome.cleared[ask.bucket.id] = outcome.cleared.get(ask.bucket.id, 0) + 1
    if plan.entries:
        due.write(conn, plan.entries)
        outcome.entries = len(plan.entries)
    outcome.changes.transitions.sort(key=lambda t: t.id)
    return outcome
