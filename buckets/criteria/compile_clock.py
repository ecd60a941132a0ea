"""The clock in SQL: what :mod:`.clock` needs, fetched per contact, or computed set-wide.

* :func:`leaf_facts` — for known contacts (an ingested event's, a due-queue chunk's, confirmed
  candidates), per event leaf: its newest counting events (as many as decide it, newest first)
  and its next arrival; :class:`Facts` turns a row into the evaluator's counter and the leaf
  states of :func:`.clock.state`. One statement for a whole batch; each leaf is two index
  probes per contact (``(event, contact_id, occurred_at)``), stopping after the events that
  decide.
* :func:`clock_select` — for every contact of a chunk (or of a list): ``matches`` and
  ``next_at`` computed set-wide from the compiled criteria's aggregates, by the same rules as
  :func:`.clock.state` (tested equal by the differential suite). Never is ``NULL``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, aggregate_order_by
from sqlalchemy.dialects.postgresql import array as pg_array
from sqlalchemy.sql.elements import ColumnElement

from buckets.criteria.clock import (
    TICK,
    LeafStates,
    State,
    aggregate_state,
    decisive_count,
    event_state,
    last_state,
    property_state,
    reference_state,
    regularly_state,
    sequence_state,
    state,
    static_state,
    threshold,
)
from buckets.criteria.compile import (
    CONTACT_HISTORY,
    TIMESTAMP,
    IdRange,
    LeafColumns,
    _count_predicate,
    aggregate_predicate,
    arrival_instant,
    bucket_memberships,
    compile_criteria,
    contacts,
    event_number,
    last_event_select,
    last_holds,
    leaf_event_scope,
    period_rows,
    property_value,
    reference_predicate,
    regular_columns,
    regular_predicate,
    sample_predicate,
    user_events,
    value_predicate,
)
from buckets.criteria.compile_sequence import sequence_facts
from buckets.criteria.evaluate import EventCounter
from buckets.criteria.held import changed_at_sql, held_sql, with_history
from buckets.criteria.instants import instant_sql, shifted
from buckets.criteria.model import (
    CLOCK_OPERATORS,
    MANUAL_NOT_EVALUATED,
    Aggregate,
    BucketReference,
    Composite,
    EventCondition,
    EventSequence,
    Everyone,
    Leaf,
    Manual,
    Node,
    PropertyCondition,
    Sample,
)
from buckets.criteria.sequences import Chains

# --- per contact ------------------------------------------------------------------------------


FactLeaf = EventCondition | EventSequence  # the leaves whose facts come from the events


def leaf_facts(
    conditions: Sequence[FactLeaf],
    now: datetime,
    contact_ids: Sequence[int],
    *,
    needs: Sequence[str] | None = None,
    properties: bool = True,
    memberships: bool = False,
) -> sa.Select[Any]:
    """``SELECT id, properties, deleted_at, external_id, r0, a0, r1, a1, ..., changed_at,
    created_at`` for ``contact_ids`` (``properties`` and, for ``held_for``, the record of when
    each key changed and ``created_at``, NULL unless asked for: only property leaves need them):
    ``r<i>`` the instants of the newest events counting for ``conditions[i]`` as of ``now``
    (at most :func:`~.clock.decisive_count`, newest first; NULL for none), ``a<i>`` its first
    matching event after ``now``; for a sequence ``s<i>``, ``[witness, upcoming]`` of its
    chains (:mod:`.compile_sequence`). With ``needs`` (per contact, aligned with ``contact_ids``, a
    string with ``"1"`` at position ``i`` when leaf ``i`` is wanted), a leaf is computed only
    for the contacts that want it (NULL for the others): a batch asks each contact only about
    the buckets its own event affects, at a constant cost per check; a ``"1"`` after the
    leaves' positions asks for the contact's properties (else NULL), when ``properties``.
    Row locks are the caller's. (The statement with its values bound: hot paths execute
    :func:`facts_statement` with :func:`facts_params` instead.)
    With ``memberships``, also ``a_bucket``: the ids of the buckets the contact is an active
    member of (what bucket references read; :func:`buckets.decide.decide` fetches them with
    the rest of the contact's membership rows instead)."""
    statement = facts_statement(
        tuple(conditions), needs=needs is not None, properties=properties, memberships=memberships
    )
    return statement.params(facts_params(now, contact_ids, needs))


def facts_params(
    now: datetime, contact_ids: Sequence[int], needs: Sequence[str] | None = None
) -> dict[str, Any]:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    params: dict[str, Any] = {"facts_now": now, "facts_ids": list(contact_ids)}
    if needs is not None:
        params["facts_needs"] = list(needs)
    return params


def raw(column: ColumnElement[Any]) -> ColumnElement[Any]:
    """``column`` read as the driver decodes it (no SQLAlchemy result processing)."""
    return sa.type_coerce(column, sa.types.NullType())


@lru_cache(maxsize=256)
def facts_statement(
    conditions: tuple[FactLeaf, ...], *, needs: bool, properties: bool, memberships: bool = False
) -> sa.Select[Any]:
    """:func:`leaf_facts` as a statement built once per shape, with bound parameters
    (:func:`facts_params`): building it costs more than running it for a contact or two."""
    now = sa.bindparam("facts_now", type_=TIMESTAMP)
    ids = sa.bindparam("facts_ids", type_=ARRAY(sa.BigInteger()))
    occurred = user_events.c.occurred_at
    given: list[ColumnElement[Any]] = [ids]
    names = ["id"]
    if needs:
        given.append(sa.bindparam("facts_needs", type_=ARRAY(sa.Text())))
        names.append("needs")
    wanted = sa.func.unnest(*given).table_valued(*names).render_derived("wanted")
    columns: list[Any] = []
    for index, condition in enumerate(conditions):
        asked = sa.func.substr(wanted.c.needs, index + 1, 1) == "1" if needs else None
        if isinstance(condition, EventSequence):
            chains = sequence_facts(condition, now, contacts.c.id)
            if asked is not None:
                chains = sa.case((asked, chains), else_=sa.null())
            columns.append(chains.label(f"s{index}"))
            continue
        if condition.is_aggregate:
            columns += _aggregate_facts(condition, index, now, asked)
            continue
        if condition.is_last:
            columns += _last_facts(condition, index, now, asked)
            continue
        if condition.is_regularly:
            columns += _regular_facts(condition, index, now, asked)
            continue
        # Explicit correlation: auto-correlation does not reach through the derived table.
        newest = (
            sa.select(occurred)
            .where(*leaf_event_scope(condition, now, contacts.c.id))
            .order_by(occurred.desc())
            .limit(decisive_count(condition))
            .correlate_except(user_events)
            .subquery()
        )
        recent: ColumnElement[Any] = (
            sa.select(
                sa.func.array_agg(
                    aggregate_order_by(newest.c.occurred_at, newest.c.occurred_at.desc()),
                    type_=ARRAY(TIMESTAMP),
                )
            )
            .select_from(newest)
            .scalar_subquery()
        )
        arrival: ColumnElement[Any] = (
            sa.select(arrival_instant(condition, sa.func.min(occurred)))
            .where(*leaf_event_scope(condition, now, contacts.c.id, future=True))
            .correlate_except(user_events)
            .scalar_subquery()
        )
        if asked is not None:
            recent = sa.case((asked, recent), else_=sa.null())
            arrival = sa.case((asked, arrival), else_=sa.null())
        columns += [recent.label(f"r{index}"), arrival.label(f"a{index}")]
    # The driver decodes arrays, numerics and instants itself: typed as ARRAY, SQLAlchemy
    # would walk every array again, item by item, for every row.
    columns = [raw(column.element).label(column.name) for column in columns]
    bag: Any = sa.null()
    record: Any = sa.null()  # when each key changed, and the fallback (held_for)
    created: Any = sa.null()
    if properties:
        bag, record, created = (
            contacts.c.properties,
            contacts.c.property_changed_at,
            contacts.c.created_at,
        )
        if needs:
            asked = sa.func.substr(wanted.c.needs, len(conditions) + 1, 1) == "1"
            bag = sa.case((asked, bag), else_=sa.null())
            record = sa.case((asked, record), else_=sa.null())
            created = sa.case((asked, created), else_=sa.null())
    if memberships:
        held = bucket_memberships.alias("held")
        columns.append(
            sa.func.array(
                sa.select(held.c.bucket_id)
                .where(held.c.contact_id == contacts.c.id, held.c.status == "active")
                .correlate_except(held)
                .scalar_subquery()
            ).label("a_bucket")
        )
    # ``id = ANY``: the contacts are fetched by primary key whatever the table's size (a join
    # alone may be planned as a merge over every contact).
    return (
        sa.select(
            contacts.c.id,
            bag.label("properties"),
            contacts.c.deleted_at,
            contacts.c.external_id,
            *columns,
            record.label("changed_at"),
            created.label("created_at"),
        )
        .select_from(wanted.join(contacts, contacts.c.id == wanted.c.id))
        .where(contacts.c.id == sa.any_(ids))
    )


def _aggregate_facts(
    condition: EventCondition, index: int, now: ColumnElement[Any], asked: Any
) -> list[Any]:
    """An aggregate leaf's facts: the oldest counting numeric value's instant (``r``), the
    next numeric arrival (``a``) and ``[count, sum, min, max]`` of the numbers (``g``)."""
    occurred = user_events.c.occurred_at
    number, is_number = event_number(condition)
    counting = [*leaf_event_scope(condition, now, contacts.c.id), is_number]
    future = [*leaf_event_scope(condition, now, contacts.c.id, future=True), is_number]

    def scalar(column: Any, where: list[Any]) -> Any:
        found = sa.select(column).where(*where).correlate_except(user_events).scalar_subquery()
        return found if asked is None else sa.case((asked, found), else_=sa.null())

    values = pg_array(
        [
            sa.cast(sa.func.count(), sa.Numeric),
            sa.func.coalesce(sa.func.sum(number), 0),
            sa.func.min(number),
            sa.func.max(number),
        ]
    )
    return [
        scalar(sa.func.min(occurred), counting).label(f"r{index}"),
        scalar(arrival_instant(condition, sa.func.min(occurred)), future).label(f"a{index}"),
        scalar(values, counting).label(f"g{index}"),
    ]


def _last_facts(
    condition: EventCondition, index: int, now: ColumnElement[Any], asked: Any
) -> list[Any]:
    """A ``check: last`` leaf's facts: the last event's instant (``r``), the next event of
    the name stamped after now (``a``) and whether the last event satisfies ``where`` (``w``)."""
    last = last_event_select(condition, now, contacts.c.id).subquery(f"last{index}")
    instant: Any = sa.select(last.c.occurred_at).scalar_subquery()
    holds: Any = sa.select(last_holds(condition, last.c.properties)).scalar_subquery()
    arrival = _next_arrival(condition, now)
    return _labelled(index, asked, r=instant, a=arrival, w=holds)


def _regular_facts(
    condition: EventCondition, index: int, now: ColumnElement[Any], asked: Any
) -> list[Any]:
    """A ``check: regularly`` leaf's facts: the next crossing of a period boundary (``r``),
    the next arrival (``a``) and how many periods satisfy their count (``w``)."""
    periods = period_rows(
        condition, now, leaf_event_scope(condition, now, contacts.c.id), by_contact=False
    )
    satisfied, crossing = regular_columns(condition, periods, now)

    def scalar(column: Any) -> Any:
        return sa.select(column).select_from(periods).scalar_subquery()

    found: Any = scalar(satisfied)
    boundary: Any = scalar(crossing)
    arrival = _next_arrival(condition, now)
    return _labelled(index, asked, r=boundary, a=arrival, w=found)


def _next_arrival(condition: EventCondition, now: ColumnElement[Any]) -> Any:
    """The first event of the leaf stamped after ``now`` (per contact)."""
    return (
        sa.select(sa.func.min(user_events.c.occurred_at))
        .where(*leaf_event_scope(condition, now, contacts.c.id, future=True))
        .correlate_except(user_events)
        .scalar_subquery()
    )


def _labelled(index: int, asked: Any, **columns: Any) -> list[Any]:
    """``r<i>``, ``a<i>``, ``w<i>``: NULL for a contact that did not ask for the leaf."""
    return [
        (column if asked is None else sa.case((asked, column), else_=sa.null())).label(
            f"{name}{index}"
        )
        for name, column in columns.items()
    ]


def fact_offsets(conditions: Sequence[FactLeaf], offset: int = 4) -> tuple[int, ...]:
    """Where each condition's columns start in a :func:`leaf_facts` row: a sequence has one
    column, an aggregate, ``regularly`` or ``last`` leaf three, any other event leaf two."""
    found: list[int] = []
    for condition in conditions:
        found.append(offset)
        if isinstance(condition, EventSequence):
            offset += 1
        elif condition.is_aggregate or condition.is_regularly or condition.is_last:
            offset += 3
        else:
            offset += 2
    return tuple(found)


@dataclass(frozen=True)
class Facts:
    """One contact's row of :func:`leaf_facts`: its properties and, per event leaf asked
    for, the newest counting events and the next arrival."""

    properties: Mapping[str, Any]
    recent: Mapping[EventCondition, Sequence[datetime]]
    arrivals: Mapping[EventCondition, datetime | None]
    external_id: str | None = None
    aggregates: Mapping[EventCondition, Aggregate] = field(default_factory=dict)
    # aggregates: the oldest counting number's instant; last: the last event's
    oldest: Mapping[EventCondition, datetime | None] = field(default_factory=dict)
    now: datetime | None = None  # the facts' instant (property leaves that compare with it)
    chains: Mapping[EventSequence, Chains] = field(default_factory=dict)
    regular: Mapping[EventCondition, int] = field(default_factory=dict)  # satisfied periods
    memberships: frozenset[str] = frozenset()  # the buckets the contact is an active member of

    @classmethod
    def of(
        cls,
        row: Any,
        conditions: Sequence[FactLeaf],
        offset: int = 4,
        *,
        now: datetime | None = None,
        wanted: Iterable[int] | None = None,
        offsets: Sequence[int] | None = None,
    ) -> Facts:
        """The facts of ``row`` for ``conditions`` (their columns from ``offset`` on); with
        ``wanted``, only those conditions (indexes into ``conditions``, whose columns start at
        ``offsets``, see :func:`fact_offsets`): a contact reads the leaves it asked for."""
        recent: dict[EventCondition, Sequence[datetime]] = {}
        arrivals: dict[EventCondition, datetime | None] = {}
        aggregates: dict[EventCondition, Aggregate] = {}
        oldest: dict[EventCondition, datetime | None] = {}
        chains: dict[EventSequence, Chains] = {}
        regular: dict[EventCondition, int] = {}
        if offsets is None:
            offsets = fact_offsets(conditions, offset)
        for index in range(len(conditions)) if wanted is None else wanted:
            condition, at = conditions[index], offsets[index]
            if isinstance(condition, EventSequence):
                witness, upcoming = row[at] or (None, None)
                chains[condition] = Chains(witness, upcoming)
            elif condition.is_aggregate:
                oldest[condition], arrivals[condition] = row[at], row[at + 1]
                numbers, total, low, high = row[at + 2] or (0, 0, None, None)
                aggregates[condition] = Aggregate(int(numbers), Decimal(total), low, high)
            elif condition.is_regularly:  # the next crossing, the satisfied periods
                oldest[condition], arrivals[condition] = row[at], row[at + 1]
                satisfied = row[at + 2]
                regular[condition] = (
                    condition.count_without_events if satisfied is None else satisfied
                )
            elif condition.is_last:  # the last event's instant, when it holds
                oldest[condition], arrivals[condition] = row[at], row[at + 1]
                recent[condition] = (row[at],) if row[at + 2] else ()
            else:
                recent[condition] = row[at] or ()
                arrivals[condition] = row[at + 1]
        return cls(
            with_history(row),
            recent,
            arrivals,
            row.external_id,
            aggregates,
            oldest,
            now,
            chains,
            regular,
            frozenset(row._mapping.get("a_bucket") or ()),
        )

    @property
    def counter(self) -> EventCounter:
        """The evaluator's counter (counts capped at what decides each leaf; aggregates)."""

        def count(condition: FactLeaf | BucketReference) -> int | Aggregate | Chains:
            if isinstance(condition, BucketReference):
                return int(condition.bucket in self.memberships)
            if isinstance(condition, EventSequence):
                return self.chains[condition]
            if condition.is_aggregate:
                return self.aggregates[condition]
            if condition.is_regularly:
                return self.regular[condition]
            return len(self.recent[condition])

        return count

    def leaf_state(self, leaf: Leaf) -> State:
        if isinstance(leaf, BucketReference):
            return reference_state(leaf, self.memberships)
        if isinstance(leaf, PropertyCondition):
            return property_state(leaf, self.properties, self.now)
        if isinstance(leaf, EventSequence):
            return sequence_state(leaf, self.chains[leaf])
        if isinstance(leaf, EventCondition) and leaf.is_aggregate:
            return aggregate_state(
                leaf, self.aggregates[leaf], self.oldest[leaf], self.arrivals[leaf]
            )
        if isinstance(leaf, EventCondition) and leaf.is_regularly:
            return regularly_state(leaf, self.regular[leaf], self.oldest[leaf], self.arrivals[leaf])
        if isinstance(leaf, EventCondition) and leaf.is_last:
            recent = self.recent[leaf]
            return last_state(leaf, bool(recent), self.oldest[leaf], self.arrivals[leaf])
        if isinstance(leaf, EventCondition):
            return event_state(leaf, self.recent[leaf], self.arrivals[leaf])
        found = static_state(leaf, self.external_id)
        assert found is not None
        return found

    def state(self, node: Node) -> State:
        leaf_state: LeafStates = self.leaf_state
        return state(node, leaf_state)


# --- set-wide ---------------------------------------------------------------------------------

INFINITY: ColumnElement[Any] = sa.literal_column("'infinity'::timestamptz")
NEG_INFINITY: ColumnElement[Any] = sa.literal_column("'-infinity'::timestamptz")


@dataclass(frozen=True)
class _SqlState:
    value: ColumnElement[bool]  # never NULL
    next_at: ColumnElement[Any]  # 'infinity' for never


def clock_select(
    node: Node,
    now: datetime,
    *,
    contact_ids: Sequence[int] | None = None,
    id_range: IdRange | None = None,
) -> sa.Select[Any]:
    """``SELECT id, matches, next_at`` of every non-deleted contact in scope (``next_at`` NULL:
    the clock alone never changes its answer)."""
    compiled = compile_criteria(node, now, contact_ids=contact_ids, id_range=id_range, clock=True)
    nested: list[Any] = []
    found = _state(node, compiled.columns, nested, now, sequences=compiled.sequences)
    next_at = sa.func.nullif(found.next_at, INFINITY)
    from_clause = compiled.from_clause
    for lateral in nested:  # children before parents: each reads the ones before it
        from_clause = from_clause.join(lateral, sa.true())
    return (
        sa.select(
            contacts.c.id,
            sa.type_coerce(found.value, sa.Boolean).label("matches"),
            sa.type_coerce(next_at, TIMESTAMP).label("next_at"),
        )
        .select_from(from_clause)
        .where(contacts.c.deleted_at.is_(None), *compiled.scope)
    )


def _property_state(node: PropertyCondition, now: datetime) -> _SqlState:
    """:func:`.clock.property_state` in SQL: with ``held_for``, the ``and`` of the value part
    and the held part (which flips at ``changed_at + D`` when that is after ``now``)."""
    found = _value_state(node, now)
    if node.held_for is None:
        return found
    part = held_sql(node, CONTACT_HISTORY, now)
    boundary = changed_at_sql(node, CONTACT_HISTORY) + sa.literal(node.held_for.span, sa.Interval)
    flips = sa.case((boundary > shifted(now, timedelta(0)), boundary), else_=INFINITY)
    value = sa.and_(found.value, part)
    agreeing = sa.func.least(found.next_at, flips)
    deciding = sa.func.greatest(
        sa.case((found.value, NEG_INFINITY), else_=found.next_at),
        sa.case((part, NEG_INFINITY), else_=flips),
    )
    return _SqlState(value, sa.case((value, agreeing), else_=deciding))


def _value_state(node: PropertyCondition, now: datetime) -> _SqlState:
    """:func:`.clock.value_state` in SQL."""
    value = value_predicate(node, contacts.c.properties, now)
    if node.operator not in CLOCK_OPERATORS:
        return _SqlState(value, INFINITY)
    instant = instant_sql(*property_value(node, contacts.c.properties))
    span = node.value
    if node.operator == "within_past":
        nxt = sa.case(
            (instant > shifted(now, timedelta(0)), instant),
            (instant >= shifted(now, -span), instant + sa.literal(span + TICK, sa.Interval)),
            else_=INFINITY,
        )
    else:
        nxt = sa.case(
            (instant > shifted(now, span), instant - sa.literal(span, sa.Interval)),
            (instant >= shifted(now, timedelta(0)), instant + sa.literal(TICK, sa.Interval)),
            else_=INFINITY,
        )
    return _SqlState(value, nxt)


def _state(
    node: Node,
    columns: Mapping[EventCondition, LeafColumns],
    nested: list[Any],
    now: datetime,
    *,
    root: bool = True,
    sequences: Mapping[EventSequence, tuple[Any, Any]] | None = None,
) -> _SqlState:
    """A node's value and next change in SQL. A composite below the root is computed once per
    row in a lateral subquery of its own (``nested``) that its parent reads by column: the
    parent uses each child's value and next change several times, and inlining them would
    double the expression at every level of nesting."""
    if isinstance(node, PropertyCondition):
        return _property_state(node, now)
    if isinstance(node, EventCondition):
        return _event_state(node, columns[node])
    if isinstance(node, EventSequence):
        assert sequences is not None
        return _sequence_state(node, *sequences[node])
    if isinstance(node, Everyone):
        return _SqlState(sa.true(), INFINITY)
    if isinstance(node, Manual):
        raise ValueError(MANUAL_NOT_EVALUATED)
    if isinstance(node, Sample):
        return _SqlState(sample_predicate(node, contacts.c.external_id), INFINITY)
    if isinstance(node, BucketReference):  # the clock alone never moves it (the cascade does)
        return _SqlState(reference_predicate(node, contacts.c.id), INFINITY)
    assert isinstance(node, Composite)
    if node.operator == "not":  # the same instants, the opposite value
        inner = _state(node.conditions[0], columns, nested, now, root=root, sequences=sequences)
        return _SqlState(sa.not_(inner.value), inner.next_at)
    children = [
        _state(child, columns, nested, now, root=False, sequences=sequences)
        for child in node.conditions
    ]
    holds = node.operator == "and"  # the children's value that does not decide alone
    values = [child.value for child in children]
    value = sa.and_(*values) if holds else sa.or_(*values)
    same = value if holds else ~value  # every child agrees: the earliest change of any
    agreeing = sa.func.least(*(child.next_at for child in children))
    # otherwise the latest change among the children that decide ('infinity' wins: never)
    deciding = sa.func.greatest(
        *(
            sa.case((child.value if holds else ~child.value, NEG_INFINITY), else_=child.next_at)
            for child in children
        )
    )
    found = _SqlState(value, sa.case((same, agreeing), else_=deciding))
    if root:
        return found
    one_row = sa.select(sa.literal(1).label("one")).subquery(f"row{len(nested)}")
    lateral = (
        sa.select(found.value.label("v"), found.next_at.label("n"))
        .select_from(one_row)
        .correlate_except(one_row)  # everything else belongs to the enclosing query
        .offset(sa.literal_column("0"))  # kept a subquery: never pulled up and inlined again
        .lateral(f"clock{len(nested)}")
    )
    nested.append(lateral)
    return _SqlState(lateral.c.v, lateral.c.n)


def _sequence_state(sequence: EventSequence, witness: Any, upcoming: Any) -> _SqlState:
    """:func:`.clock.sequence_state` in SQL."""
    value = witness.is_not(None)
    holds: ColumnElement[Any] = INFINITY
    if sequence.within is not None:
        holds = witness + sa.literal(sequence.within + TICK, sa.Interval)
    waits = sa.func.coalesce(upcoming, INFINITY)
    return _SqlState(value, sa.case((value, holds), else_=waits))


def _aggregate_state(condition: EventCondition, found: LeafColumns) -> _SqlState:
    """:func:`.clock.aggregate_state` in SQL."""
    value = sa.func.coalesce(aggregate_predicate(condition, found), sa.false())
    departs: ColumnElement[Any] = INFINITY
    if condition.within is not None and found.oldest is not None:
        instant = found.oldest + sa.literal(condition.within + TICK, sa.Interval)
        departs = sa.func.coalesce(instant, INFINITY)
    arrival = sa.func.coalesce(found.arrival, INFINITY) if found.arrival is not None else INFINITY
    return _SqlState(value, sa.func.least(arrival, departs))


def _event_state(condition: EventCondition, found: LeafColumns) -> _SqlState:
    if condition.is_aggregate:
        return _aggregate_state(condition, found)
    arrival = sa.func.coalesce(found.arrival, INFINITY) if found.arrival is not None else INFINITY
    if condition.is_regularly:  # :func:`.clock.regularly_state`
        crossing = found.crossing if found.crossing is not None else INFINITY
        next_at = sa.func.least(arrival, sa.func.coalesce(crossing, INFINITY))
        return _SqlState(regular_predicate(condition, found.count), next_at)
    count = sa.func.coalesce(found.count, 0)
    value = _count_predicate(condition, count)
    if condition.is_last:  # :func:`.clock.last_state`
        leaves_at: ColumnElement[Any] = INFINITY
        newest = found.newest.get(1)
        if condition.within is not None and newest is not None:
            instant = newest + sa.literal(condition.within + TICK, sa.Interval)
            leaves_at = sa.case((value, sa.func.coalesce(instant, INFINITY)), else_=INFINITY)
        return _SqlState(value, sa.func.least(arrival, leaves_at))
    kind, n = threshold(condition)
    assert condition.within is not None or not found.newest

    def departs(rank: int) -> ColumnElement[Any]:
        column = found.newest.get(rank)
        if column is None or condition.within is None:
            return INFINITY
        # No such event: NULL, i.e. never.
        instant = column + sa.literal(condition.within + TICK, sa.Interval)
        return sa.func.coalesce(instant, INFINITY)

    nxt: ColumnElement[Any]
    if kind == "at_least":
        nxt = sa.case((value, departs(n)), else_=arrival)
    elif kind == "below":
        nxt = sa.case((value, arrival), else_=departs(n))
    else:
        nxt = sa.func.least(arrival, sa.case((value, departs(n)), else_=departs(n + 1)))
    return _SqlState(value, nxt)
