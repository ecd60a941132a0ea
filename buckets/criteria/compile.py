"""The SQL executor: criteria -> a set-based query of the matching contacts as of ``now``.

Shape (chosen from the plans, see PERFORMANCE-NOTES.md):

* each event *name* the criteria mention is aggregated **once**: one ``GROUP BY contact_id``
  over ``user_events`` (index ``(event, contact_id, occurred_at)``) with one
  ``count(*) FILTER (...)`` column per distinct event condition (its window and ``where``);
  the common part (the widest window, a shared ``where``) goes into the ``WHERE`` clause;
* the aggregates are ``LEFT JOIN``-ed to ``contacts``; a condition zero events cannot satisfy
  (``exists``, ``count gte 3``) is compared *strictly* (``n >= 3``, false on NULL) so the
  planner reduces its outer join to an inner join and drives from the aggregate, while a
  condition zero satisfies (``not_exists``, ``count lt 3``) compares ``coalesce(n, 0)``;
* property conditions are exactly as type-strict as the Python evaluator: ``eq`` / ``neq`` are
  jsonb containment of ``{key: value}`` (equality of scalars, numbers compared numerically),
  the others branch on ``jsonb_typeof`` (numbers compare as ``numeric``: exact, and never an
  error on odd data).

Two further forms serve work restricted to known contacts (members, candidates, one ingested
contact), where probing each contact's index range beats aggregating every contact's events:

* :func:`probe_predicate` — the criteria as a correlated predicate: each event leaf asks "does
  an n-th matching event exist" (``EXISTS (... OFFSET n-1 LIMIT 1)``), which stops after n index
  entries (PERFORMANCE-NOTES.md: the fastest form for leaves over members);
* :func:`.compile_clock.leaf_facts` — per contact, each event leaf's newest counting events
  (as many as decide it) and next arrival, for the Python evaluator and clock (the real-time
  path, due-queue chunks, per-member confirms).

``now`` is always a bound parameter (never the database's ``now()``): the same ``now`` over
the same data gives the same answer. Soft-deleted contacts never match.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, BIT, JSONB, aggregate_order_by
from sqlalchemy.sql.elements import ColumnElement

from buckets.criteria.clock import threshold
from buckets.criteria.held import History, held_sql
from buckets.criteria.instants import instant_sql, parse_instant, shifted
from buckets.criteria.model import (
    CLOCK_OPERATORS,
    INSTANT_OPERATORS,
    MANUAL_NOT_EVALUATED,
    Aggregate,
    BucketReference,
    Composite,
    EventCondition,
    EventSequence,
    Everyone,
    Manual,
    Node,
    PropertyCondition,
    Sample,
    leaves,
)
from buckets.models import BucketMembership, Contact, UserEvent

contacts = Contact.__table__
user_events = UserEvent.__table__
bucket_memberships = BucketMembership.__table__
CONTACT_HISTORY = History(contacts.c.property_changed_at, contacts.c.created_at)

TIMESTAMP = sa.DateTime(timezone=True)


def _json(value: object) -> ColumnElement[Any]:
    """A jsonb literal (bound parameter) for a JSON value, including JSON null."""
    return sa.cast(sa.literal(json.dumps(value), sa.Text), JSONB)


def _numeric(value: int | float) -> ColumnElement[Any]:
    # Exact decimal of the number as written (floats by their shortest repr), so comparisons
    # against jsonb numbers (exact numerics) order like Python's exact int/float comparisons.
    return sa.literal(Decimal(repr(value)) if isinstance(value, float) else value, sa.Numeric)


def _nested(path: tuple[str, ...], value: object) -> object:
    """``{k1: {k2: ... value}}``: what containment of ``value`` at ``path`` looks for."""
    for key in reversed(path):
        value = {key: value}
    return value


def instant_predicate(
    condition: PropertyCondition,
    value: ColumnElement[Any],
    text: ColumnElement[Any],
    now: datetime | ColumnElement[Any] | None,
) -> ColumnElement[bool]:
    """``before`` / ``after`` / ``within_past`` / ``within_next``: false (never NULL) unless the
    value is an instant (:func:`.instants.instant_sql`).

    The full test (shape, calendar, offset) is costly per row, so it runs only for values that
    can name an instant of the span: for a span known here, values starting with one of its
    listed prefixes (:func:`_prefixes_between`), which leaves only the time of day to test;
    otherwise values whose first ten characters, compared as text, fall within a day of the
    span (an instant's local date is its UTC date shifted by its offset, under a day, and dates
    in the shape order as text as they do in time). The span is one range containment, so the
    instant is computed once per row."""
    lower: datetime | ColumnElement[Any] | None
    upper: datetime | ColumnElement[Any] | None
    if condition.operator in ("before", "after"):
        wanted = parse_instant(condition.value)
        assert wanted is not None  # validated
        lower, upper = (None, wanted) if condition.operator == "before" else (wanted, None)
        bounds = "()"
    else:
        if now is None:
            raise ValueError(f"operator {condition.operator!r} needs the decision's now")
        span: timedelta = condition.value
        past = condition.operator == "within_past"
        if isinstance(now, datetime):  # bounds known here: the prefilter's dates are constants
            lower, upper = (now - span, now) if past else (now, now + span)
        else:
            lower = shifted(now, -span if past else timedelta(0))
            upper = shifted(now, timedelta(0) if past else span)
        bounds = "[]"
    date_part = sa.func.left(text, 10).collate("C")  # byte order, whatever the database's
    near: list[ColumnElement[bool]] = []
    if (listed := _prefixes_between(lower, upper)) is not None:
        # One lookup of the value per row (a range of two comparisons reads it twice), and
        # what passes starts with a real date: only the time of day is left to test.
        length, prefixes = listed
        near.append(sa.func.left(text, length) == sa.any_(sa.literal(prefixes, ARRAY(sa.Text))))
    else:
        if lower is not None and (low := _date_text(lower, -DAY)) is not None:
            near.append(date_part >= low)
        if upper is not None and (high := _date_text(upper, DAY)) is not None:
            near.append(date_part <= high)
    span_range = sa.func.tstzrange(_bound(lower), _bound(upper), bounds)
    contained = span_range.op("@>")(instant_sql(value, text, real_date=listed is not None))
    return sa.case(
        (sa.and_(sa.true(), *near), sa.func.coalesce(contained, sa.false())), else_=sa.false()
    )


DAY = timedelta(days=1)


def _bound(at: datetime | ColumnElement[Any] | None) -> ColumnElement[Any]:
    if at is None:
        return sa.cast(sa.null(), TIMESTAMP)  # unbounded
    return sa.literal(at, TIMESTAMP) if isinstance(at, datetime) else at


# A span of up to this long lists the hours an instant in it can start with; up to this many
# days, its dates (a hashed lookup per row either way); longer spans compare.
MAX_LISTED_HOURS = timedelta(days=31)
MAX_LISTED_DATES = 1000


def _prefixes_between(
    lower: datetime | ColumnElement[Any] | None, upper: datetime | ColumnElement[Any] | None
) -> tuple[int, list[str]] | None:
    """What an instant between ``lower`` and ``upper`` (known here) can start with: its local
    time is its UTC time shifted by its offset (under a day either way), so its hour
    (``YYYY-MM-DDTHH``) is one of the hours from a day before the span to a day after it, and a
    date alone (midnight UTC) is one of the span's dates; for a long span, its date
    (``YYYY-MM-DD``) within a day of the span. Returns (prefix length, prefixes), or None when
    the span is open, not known here, too long, or reaches the years 0001 or 9999 (where an
    offset can take a local date out of the years an instant can have)."""
    if not isinstance(lower, datetime) or not isinstance(upper, datetime):
        return None
    try:
        first = (lower - DAY).astimezone(UTC)
        last = (upper + DAY).astimezone(UTC)
    except OverflowError:
        return None
    if (last - first).days >= MAX_LISTED_DATES or first.year < 2 or last.year > 9998:
        return None
    if upper - lower > MAX_LISTED_HOURS:
        return 10, _dates(first, last)
    hour = first.replace(minute=0, second=0, microsecond=0)
    hours = []
    while hour <= last:
        hours.append(f"{hour.date().isoformat()}T{hour.hour:02d}")
        hour += timedelta(hours=1)
    return 13, hours + _dates(lower.astimezone(UTC), upper.astimezone(UTC))


def _dates(first: datetime, last: datetime) -> list[str]:
    """``YYYY-MM-DD`` of every day from ``first``'s to ``last``'s."""
    days = (last.date() - first.date()).days + 1
    return [(first.date() + timedelta(days=n)).isoformat() for n in range(days)]


def _date_text(at: datetime | ColumnElement[Any], shift: timedelta) -> ColumnElement[Any] | None:
    """``YYYY-MM-DD`` (UTC) of ``at + shift``; None past the years an instant can have."""
    if isinstance(at, datetime):
        try:
            day = (at + shift).astimezone(UTC)
        except OverflowError:
            return None
        return sa.literal(f"{day.year:04d}-{day.month:02d}-{day.day:02d}", sa.Text)
    return sa.func.to_char(
        sa.func.timezone("UTC", at + sa.literal(shift, sa.Interval)), "YYYY-MM-DD"
    )


def property_value(
    condition: PropertyCondition, column: ColumnElement[Any]
) -> tuple[ColumnElement[Any], ColumnElement[Any]]:
    """The jsonb value at the condition's path, and its text (``->>``)."""
    parent = column
    for key in condition.path[:-1]:
        parent = parent.op("->")(sa.literal(key, sa.Text))
    last = sa.literal(condition.path[-1], sa.Text)
    return parent.op("->")(last), parent.op("->>")(last)


def property_predicate(
    condition: PropertyCondition,
    column: ColumnElement[Any],
    now: datetime | ColumnElement[Any] | None = None,
    history: History | None = None,
) -> ColumnElement[bool]:
    """``condition`` over the jsonb object ``column`` (contacts.properties or an event's);
    with ``held_for``, also over the contact's ``history`` (:mod:`.held`)."""
    found = value_predicate(condition, column, now)
    if condition.held_for is None:
        return found
    return sa.and_(found, held_sql(condition, history, now))


def value_predicate(
    condition: PropertyCondition,
    column: ColumnElement[Any],
    now: datetime | ColumnElement[Any] | None = None,
) -> ColumnElement[bool]:
    """The value part of ``condition`` over the jsonb object ``column``.
    A path reads nested objects with ``->`` and text keys, which is NULL through anything but
    an object (an array is not indexed by ``"0"``): missing, as the spec says."""
    value, text = property_value(condition, column)
    kind = sa.func.jsonb_typeof(value)
    wanted = condition.value
    if condition.operator in INSTANT_OPERATORS or condition.operator in CLOCK_OPERATORS:
        return instant_predicate(condition, value, text, now)
    match condition.operator:
        case "exists":
            return sa.func.coalesce(kind, sa.literal("null")) != "null"
        case "not_exists":
            return sa.func.coalesce(kind, sa.literal("null")) == "null"
        case "eq":
            # Containment of {key: scalar} is type-strict equality (1 = 1.0, true <> 1, a
            # missing key never matches) and needs no extraction: ~3x faster than `->` =.
            # Nested objects contain nested objects only: {a: [{b: 1}]} does not hold {a: {b: 1}}.
            return _contains(column, _nested(condition.path, wanted))
        case "neq":
            return sa.not_(_contains(column, _nested(condition.path, wanted)))
        case "in":
            return _contains_any(column, [_nested(condition.path, one) for one in wanted])
        case "not_in":
            return sa.not_(_contains_any(column, [_nested(condition.path, one) for one in wanted]))
        case "gt" | "gte" | "lt" | "lte":
            number = sa.cast(text, sa.Numeric)
            compared = number.op(_SQL_OPERATORS[condition.operator])(_numeric(wanted))
            return sa.case((kind == "number", compared), else_=sa.false())
        case "contains":
            in_array = _contains(value, [wanted])
            if isinstance(wanted, str):
                return sa.case(
                    (kind == "string", sa.func.strpos(text, wanted) > 0),
                    (kind == "array", in_array),
                    else_=sa.false(),
                )
            return sa.case((kind == "array", in_array), else_=sa.false())
    raise AssertionError(condition.operator)  # pragma: no cover - validated


def _contains_any(container: ColumnElement[Any], values: list[object]) -> ColumnElement[bool]:
    """jsonb ``@> ANY`` of literal JSON values (one bound array)."""
    array = sa.cast(sa.literal([json.dumps(v) for v in values], ARRAY(sa.Text)), ARRAY(JSONB))
    return container.op("@>", is_comparison=True)(sa.any_(array))


def sample_predicate(node: Sample, external_id: ColumnElement[Any]) -> ColumnElement[bool]:
    """``node`` over the contact's ``external_id``: the same sha256 as :meth:`.Sample.hits`."""
    salted = sa.literal(f"{node.salted()}:", sa.Text).concat(external_id)
    digest = sa.func.encode(sa.func.sha256(sa.func.convert_to(salted, "UTF8")), "hex")
    bits = sa.cast(sa.literal("x", sa.Text).concat(sa.func.substr(digest, 1, 8)), BIT(32))
    number = sa.cast(bits, sa.BigInteger)
    return (number % 10_000) < node.threshold


def reference_predicate(
    node: BucketReference, contact_id: ColumnElement[Any]
) -> ColumnElement[bool]:
    """Whether the contact ``contact_id`` has (``member``) / has not (``not_member``) an active
    row in the referenced bucket, as the statement's snapshot sees it: one probe of the
    one-active-row unique index. An alias of its own, so that a statement over the
    memberships table (a bucket's leaves) never correlates the probe to its own rows."""
    held = bucket_memberships.alias()
    found = sa.exists(
        sa.select(sa.literal(1))
        .select_from(held)
        .where(
            held.c.bucket_id == node.bucket,
            held.c.contact_id == contact_id,
            held.c.status == "active",
        )
        .correlate_except(held)
    )
    return found if node.check == "member" else sa.not_(found)


_SQL_OPERATORS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<=", "eq": "="}


def _contains(container: ColumnElement[Any], contained: object) -> ColumnElement[bool]:
    """jsonb ``@>`` of a literal JSON value."""
    return container.op("@>", is_comparison=True)(_json(contained))


@dataclass(frozen=True)
class LeafColumns:
    """What the aggregates give about one event condition (clock columns only when asked)."""

    count: ColumnElement[Any]
    newest: dict[int, ColumnElement[Any]]  # rank (1 = newest) -> occurred_at of that event
    arrival: ColumnElement[Any] | None  # the first matching event stamped after now
    # aggregate conditions: over the counting events whose value is a number
    numbers: ColumnElement[Any] | None = None  # how many
    total: ColumnElement[Any] | None = None  # their sum
    low: ColumnElement[Any] | None = None
    high: ColumnElement[Any] | None = None
    oldest: ColumnElement[Any] | None = None  # the oldest one's occurred_at (clock)
    crossing: ColumnElement[Any] | None = None  # regularly: an event's next period (clock)


def event_number(condition: EventCondition) -> tuple[ColumnElement[Any], ColumnElement[bool]]:
    """The aggregated value of an event as ``numeric``, and whether it is a number (SPEC §3.4:
    other values, booleans included, are ignored). The cast fails on anything but a number:
    read it only where ``is_number`` already filters the rows — in ``WHERE``, or in the
    aggregate's ``FILTER``, which PostgreSQL evaluates before the aggregate's argument."""
    parent: ColumnElement[Any] = user_events.c.properties
    path = condition.aggregated
    for key in path[:-1]:
        parent = parent.op("->")(sa.literal(key, sa.Text))
    last = sa.literal(path[-1], sa.Text)
    is_number = sa.func.jsonb_typeof(parent.op("->")(last)) == "number"
    return sa.cast(parent.op("->>")(last), sa.Numeric), is_number


def aggregate_predicate(condition: EventCondition, found: LeafColumns) -> ColumnElement[bool]:
    """An aggregate condition over its columns (NULL where it is false for want of values)."""
    assert condition.operator is not None
    assert condition.value is not None
    wanted = _numeric(condition.value)
    operator = _SQL_OPERATORS[condition.operator]
    match condition.check:
        case "sum":
            assert found.total is not None
            return sa.func.coalesce(found.total, 0).op(operator)(wanted)
        case "avg":
            assert found.total is not None
            assert found.numbers is not None
            return sa.and_(found.numbers > 0, found.total.op(operator)(wanted * found.numbers))
        case "min":
            assert found.low is not None
            return found.low.op(operator)(wanted)
        case "max":
            assert found.high is not None
            return found.high.op(operator)(wanted)
    raise AssertionError(condition.check)  # pragma: no cover - validated


@dataclass(frozen=True)
class CompiledCriteria:
    """The member set as SQL: ``from_clause`` (contacts + aggregates) and ``predicate``."""

    from_clause: sa.FromClause
    predicate: ColumnElement[bool]
    scope: tuple[ColumnElement[bool], ...] = ()  # restrictions on contacts.id
    columns: dict[EventCondition, LeafColumns] = field(default_factory=dict)
    # with the clock: each sequence's (witness, upcoming) columns (.compile_sequence)
    sequences: dict[EventSequence, tuple[Any, Any]] = field(default_factory=dict)

    def members(self) -> sa.Select[Any]:
        """``SELECT contacts.id`` of every non-deleted contact that matches."""
        return (
            sa.select(contacts.c.id)
            .select_from(self.from_clause)
            .where(contacts.c.deleted_at.is_(None), self.predicate, *self.scope)
        )


def _ids(contact_ids: Sequence[int]) -> ColumnElement[Any]:
    return sa.literal(list(contact_ids), ARRAY(sa.BigInteger))


IdRange = tuple[int, int]


def _scope(
    column: ColumnElement[Any], contact_ids: Sequence[int] | None, id_range: IdRange | None
) -> list[ColumnElement[bool]]:
    scope: list[ColumnElement[bool]] = []
    if contact_ids is not None:
        scope.append(column == sa.any_(_ids(contact_ids)))
    if id_range is not None:
        scope.append(column.between(id_range[0], id_range[1]))
    return scope


def compile_criteria(
    node: Node,
    now: datetime,
    *,
    contact_ids: Sequence[int] | None = None,
    id_range: IdRange | None = None,
    clock: bool = False,
) -> CompiledCriteria:
    """Compile ``node`` as of ``now``. ``contact_ids`` restricts it to those contacts (per
    contact index probes, not a scan of every event); ``id_range`` (inclusive) to a slice of
    contact ids, pushed into every aggregate (a chunk of a set-wide pass). With ``clock``, the
    aggregates also read future-stamped events and give the columns the next clock change
    needs (:mod:`.compile_clock`)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    columns: dict[EventCondition, LeafColumns] = {}
    from_clause: sa.FromClause = contacts
    by_name: dict[str, list[EventCondition]] = {}
    regular: list[EventCondition] = []  # check regularly: a subquery each
    absent = {} if clock else _absences(node, now, contact_ids, id_range)
    for leaf in leaves(node):
        if leaf in absent:
            continue
        if isinstance(leaf, EventCondition) and leaf.is_regularly:
            if leaf not in regular:
                regular.append(leaf)
        elif isinstance(leaf, EventCondition) and leaf not in by_name.get(leaf.event, []):
            by_name.setdefault(leaf.event, []).append(leaf)
    for index, condition in enumerate(regular):
        periods, arrivals, found_ = _regular_aggregate(
            index, condition, now, contact_ids=contact_ids, id_range=id_range, clock=clock
        )
        from_clause = _join(from_clause, periods, node, [condition], clock)
        if arrivals is not None:
            from_clause = from_clause.outerjoin(arrivals, arrivals.c.contact_id == contacts.c.id)
        columns[condition] = found_
    for index, (name, conditions) in enumerate(by_name.items()):
        aggregate, found = _aggregate(
            index, name, conditions, now, contact_ids=contact_ids, id_range=id_range, clock=clock
        )
        from_clause = _join(from_clause, aggregate, node, conditions, clock)
        columns.update(found)
    scope = _scope(contacts.c.id, contact_ids, id_range)

    def events_scope(events: Any) -> list[ColumnElement[bool]]:
        return _scope(events.c.contact_id, contact_ids, id_range)

    sequences: dict[EventSequence, tuple[Any, Any]] = {}
    if clock:
        from buckets.criteria.compile_sequence import sequence_chains

        for leaf in leaves(node):
            if isinstance(leaf, EventSequence) and leaf not in sequences:
                chains = sequence_chains(leaf, now, events_scope, f"seq{len(sequences)}")
                from_clause = from_clause.outerjoin(chains, chains.c.contact_id == contacts.c.id)
                sequences[leaf] = (chains.c.witness, chains.c.upcoming)
    predicate = _predicate(node, columns, now, events_scope, absent)
    return CompiledCriteria(from_clause, predicate, tuple(scope), columns, sequences)


def _absences(
    node: Node, now: datetime, contact_ids: Sequence[int] | None, id_range: IdRange | None
) -> dict[EventCondition, ColumnElement[bool]]:
    """``not_exists`` leaves that are, everywhere they occur, conjuncts of the whole criteria
    (``never purchased``, ``plan = pro and no purchase in 7d``), of event names no other leaf
    reads, as ``NOT EXISTS``: PostgreSQL plans
    those as a (parallel) anti-join, where counting every contact's events and keeping the
    zeros aggregates them all first. Elsewhere (under ``or`` / ``not``) a correlated
    ``NOT EXISTS`` would probe per contact, so the aggregate stays."""

    def conjuncts(part: Node) -> list[Node]:
        if isinstance(part, Composite) and part.operator == "and":
            return [found for child in part.conditions for found in conjuncts(child)]
        return [part]

    top = [
        part
        for part in conjuncts(node)
        if isinstance(part, EventCondition) and part.check == "not_exists"
    ]
    everywhere = leaves(node)
    # a name other leaves aggregate anyway (``ever used, but not in 7d``): its zeros come with
    # that pass at no cost, while an anti-join would read the events a second time
    aggregated = {
        leaf.event for leaf in everywhere if isinstance(leaf, EventCondition) and leaf not in top
    }
    return {
        condition: ~sa.exists(
            _leaf_events(condition, now, contacts.c.id).where(
                *_scope(user_events.c.contact_id, contact_ids, id_range)
            )
        )
        for condition in top
        if everywhere.count(condition) == top.count(condition) and condition.event not in aggregated
    }


def _join(
    from_clause: sa.FromClause,
    aggregate: sa.Subquery,
    node: Node,
    conditions: Sequence[EventCondition],
    clock: bool,
) -> sa.FromClause:
    """Join an aggregate (a row per contact with events in its scope) to ``contacts``: an inner
    join when the criteria are false for every contact without such a row, so the query drives
    from the aggregate (``sum >= 500``: the sum of nothing, 0, fails, but the planner cannot see
    it through the ``coalesce``); otherwise a left join. With the clock every contact keeps its
    row: arrivals are read for non-members too."""
    on = aggregate.c.contact_id == contacts.c.id
    if not clock and without_events(node, frozenset(conditions)) is False:
        return from_clause.join(aggregate, on)
    return from_clause.outerjoin(aggregate, on)


def without_events(node: Node, absent: frozenset[EventCondition]) -> bool | None:
    """The criteria's answer for a contact none of whose events count for the ``absent``
    conditions, in three-valued logic: None where it depends on the other leaves."""
    if isinstance(node, EventCondition) and node in absent:
        return node.holds(Aggregate() if node.is_aggregate else node.count_without_events)
    if not isinstance(node, Composite):
        return None
    verdicts = [without_events(child, absent) for child in node.conditions]
    if node.operator == "not":
        return None if verdicts[0] is None else not verdicts[0]
    decisive = node.operator == "or"  # one True decides an or, one False an and
    if decisive in verdicts:
        return decisive
    return None if None in verdicts else not decisive


def member_select(
    node: Node,
    now: datetime,
    *,
    contact_ids: Sequence[int] | None = None,
    id_range: IdRange | None = None,
) -> sa.Select[Any]:
    """``SELECT contacts.id`` of the members as of ``now`` (see :func:`compile_criteria`)."""
    return compile_criteria(node, now, contact_ids=contact_ids, id_range=id_range).members()


def newest_ranks(condition: EventCondition) -> tuple[int, ...]:
    """Which of the newest counting events decide when ``condition`` changes (see
    :func:`.clock.event_state`); none without a window (events never stop counting)."""
    if condition.within is None or condition.is_aggregate:
        return ()
    kind, n = threshold(condition)
    ranks = (n, n + 1) if kind == "eq" else (n,)
    return tuple(rank for rank in ranks if rank >= 1)


def _aggregate(
    index: int,
    name: str,
    conditions: list[EventCondition],
    now: datetime,
    *,
    contact_ids: Sequence[int] | None,
    id_range: IdRange | None,
    clock: bool,
) -> tuple[sa.Subquery, dict[EventCondition, LeafColumns]]:
    """One pass over the events called ``name``: a count column per condition (and, with
    ``clock``, its newest counting events' instants and its next arrival)."""
    windows = [condition.within for condition in conditions]
    widest: timedelta | None = None
    if all(window is not None for window in windows):
        widest = max(window for window in windows if window is not None)
    wheres = {condition.filtering for condition in conditions}
    shared_where = next(iter(wheres)) if len(wheres) == 1 else None
    at = sa.literal(now, TIMESTAMP)
    occurred = user_events.c.occurred_at

    scope = [user_events.c.event == name]
    if not clock:  # with the clock, future events are read too (arrivals)
        scope.append(occurred <= at)
    if widest is not None:
        scope.append(occurred >= sa.literal(now - widest, TIMESTAMP))
    for where in shared_where or ():
        scope.append(property_predicate(where, user_events.c.properties))
    scope.extend(_scope(user_events.c.contact_id, contact_ids, id_range))
    # Aggregates of one property alone: only its numbers matter, so the scan drops the rest
    # (a contact with none has no row, which reads as no values, as before).
    numbers_only = all(c.is_aggregate for c in conditions) and (
        len({c.aggregated for c in conditions}) == 1
    )
    if numbers_only:
        scope.append(event_number(conditions[0])[1])

    selected: list[Any] = []
    names: dict[EventCondition, tuple[str, dict[int, str], str | None]] = {}
    extra: dict[EventCondition, dict[str, str]] = {}  # aggregates: field -> label
    for position, condition in enumerate(conditions):
        matching: list[ColumnElement[bool]] = []  # name, where (beyond the shared scope)
        if condition.filtering is not None and shared_where is None:
            matching.extend(
                property_predicate(where, user_events.c.properties) for where in condition.filtering
            )
        counting = list(matching)
        if clock:
            counting.append(occurred <= at)
        if condition.within is not None and condition.within != widest:
            counting.append(occurred >= sa.literal(now - condition.within, TIMESTAMP))
        if condition.older_than is not None:
            counting.append(occurred < sa.literal(now - condition.older_than, TIMESTAMP))

        columns, newest, arrival, extra[condition] = _condition_columns(
            condition, position, matching, counting, now, clock=clock, numbers=numbers_only
        )
        selected.extend(columns)
        names[condition] = (f"n{position}", newest, arrival)
    subquery = (
        sa.select(user_events.c.contact_id, *selected)
        .where(*scope)
        .group_by(user_events.c.contact_id)
        .subquery(f"ev{index}")
    )
    found = {
        condition: LeafColumns(
            subquery.c[count],
            {rank: subquery.c[label] for rank, label in newest.items()},
            subquery.c[arrival] if arrival is not None else None,
            **{name_: subquery.c[label] for name_, label in extra.get(condition, {}).items()},
        )
        for condition, (count, newest, arrival) in names.items()
    }
    return subquery, found


def _micros(instant: datetime | ColumnElement[Any]) -> ColumnElement[Any]:
    """Microseconds since the epoch, exactly (``numeric``)."""
    at = instant if isinstance(instant, ColumnElement) else sa.literal(instant, TIMESTAMP)
    return sa.extract("epoch", at) * 1_000_000


def period_rows(
    condition: EventCondition,
    now: datetime | ColumnElement[Any],
    where: list[ColumnElement[bool]],
    *,
    by_contact: bool,
) -> sa.Subquery:
    """``check: regularly``: one row per (contact,) period with events — its index ``i``, its
    count ``c`` and ``m``, the largest ``(now - occurred_at) mod period`` in it in
    microseconds (its oldest event's; the next crossing is ``now + period - m``). ``where``:
    the events (name, ``where``, the span, ``occurred_at <= now``, the contacts)."""
    assert condition.period is not None
    ago = _micros(now) - _micros(user_events.c.occurred_at)
    length = sa.literal(int(condition.period / timedelta(microseconds=1)), sa.Numeric)
    index = sa.func.div(ago, length)
    keys = [user_events.c.contact_id] if by_contact else []
    return (
        sa.select(
            *keys,
            index.label("i"),
            sa.func.count().label("c"),
            sa.func.max(sa.func.mod(ago, length)).label("m"),
        )
        .where(*where)
        .group_by(*keys, index)
        .correlate_except(user_events)  # per contact: the contact belongs to the outer query
        .subquery("periods")
    )


def regular_columns(
    condition: EventCondition, periods: sa.Subquery, now: datetime | ColumnElement[Any]
) -> tuple[ColumnElement[Any], ColumnElement[Any]]:
    """Over :func:`period_rows`: how many periods satisfy their count (periods without
    events count when an empty period does) and the next crossing (NULL: none)."""
    assert condition.period is not None
    assert condition.periods is not None
    if condition.operator is None:
        holds: ColumnElement[bool] = periods.c.c >= 1
    else:
        holds = periods.c.c.op(_SQL_OPERATORS[condition.operator])(condition.value)
    satisfied = _filtered(sa.func.count(), [holds])
    if condition.period_holds(0):
        satisfied = satisfied + (condition.periods - sa.func.count())
    length = sa.literal(int(condition.period / timedelta(microseconds=1)), sa.Numeric)
    at = now if isinstance(now, ColumnElement) else sa.literal(now, TIMESTAMP)
    step = sa.literal(timedelta(microseconds=1), sa.Interval)
    remaining = (length - sa.func.max(periods.c.m)).self_group()  # microseconds to go
    crossing = at + step.op("*", return_type=sa.Interval())(remaining).self_group()
    return satisfied, crossing


def _regular_aggregate(
    index: int,
    condition: EventCondition,
    now: datetime,
    *,
    contact_ids: Sequence[int] | None,
    id_range: IdRange | None,
    clock: bool,
) -> tuple[sa.Subquery, sa.Subquery | None, LeafColumns]:
    """A ``check: regularly`` condition over every contact in scope: the periods that
    satisfy their count and (with ``clock``) the next crossing and arrival."""
    scope = [
        user_events.c.event == condition.event,
        *(property_predicate(where, user_events.c.properties) for where in condition.where or ()),
        *_scope(user_events.c.contact_id, contact_ids, id_range),
    ]
    span = [
        user_events.c.occurred_at <= sa.literal(now, TIMESTAMP),
        user_events.c.occurred_at > sa.literal(now - condition.span, TIMESTAMP),
    ]
    periods = period_rows(condition, now, [*scope, *span], by_contact=True)
    satisfied, crossing = regular_columns(condition, periods, now)
    selected = [periods.c.contact_id, satisfied.label("n")]
    if clock:
        selected.append(crossing.label("x"))
    grouped = sa.select(*selected).group_by(periods.c.contact_id).subquery(f"rg{index}")
    arrivals = None
    if clock:
        arrivals = (
            sa.select(
                user_events.c.contact_id,
                sa.func.min(user_events.c.occurred_at).label("a"),
            )
            .where(*scope, user_events.c.occurred_at > sa.literal(now, TIMESTAMP))
            .group_by(user_events.c.contact_id)
            .subquery(f"ra{index}")
        )
    found = LeafColumns(
        grouped.c.n,
        {},
        arrivals.c.a if arrivals is not None else None,
        crossing=grouped.c.x if clock else None,
    )
    return grouped, arrivals, found


def _filtered(aggregate: Any, where: list[ColumnElement[bool]]) -> Any:
    return aggregate.filter(sa.and_(*where)) if where else aggregate


def _condition_columns(
    condition: EventCondition,
    position: int,
    matching: list[ColumnElement[bool]],
    counting: list[ColumnElement[bool]],
    now: datetime,
    *,
    clock: bool,
    numbers: bool = False,
) -> tuple[list[Any], dict[int, str], str | None, dict[str, str]]:
    """One condition's columns in its name's aggregate: the count, an aggregate's functions,
    and with ``clock`` the newest counting events' instants and the next arrival. ``numbers``:
    the scan keeps only events whose aggregated value is a number (no need to test again)."""
    occurred = user_events.c.occurred_at
    count = _filtered(sa.func.count(), counting)
    if condition.is_last:  # 1 when the last counting event satisfies where, else 0
        count = sa.case((last_holds(condition, _last_properties(counting)), 1), else_=0)
    selected: list[Any] = [count.label(f"n{position}")]
    newest: dict[int, str] = {}
    arrival: str | None = None
    extra: dict[str, str] = {}
    if condition.is_aggregate:
        number, is_number = event_number(condition)
        if not numbers:  # arrivals: only numbers change an aggregate
            matching, counting = [*matching, is_number], [*counting, is_number]
        for field_, column in _aggregate_columns(condition, number, clock=clock).items():
            label = f"{field_}{position}"
            selected.append(_filtered(column, counting).label(label))
            extra[field_] = label
    if clock:
        for rank in newest_ranks(condition):
            label = f"r{position}_{rank}"
            if rank == 1:
                value = _filtered(sa.func.max(occurred), counting)
            else:
                ordered = aggregate_order_by(occurred, occurred.desc())
                value = _filtered(sa.func.array_agg(ordered, type_=ARRAY(TIMESTAMP)), counting)
                value = value[rank]
            selected.append(value.label(label))
            newest[rank] = label
        arrival = f"a{position}"
        first = _filtered(sa.func.min(occurred), [*matching, not_yet_counting(condition, now)])
        selected.append(arrival_instant(condition, first).label(arrival))
    return selected, newest, arrival, extra


def _last_properties(counting: list[ColumnElement[bool]]) -> ColumnElement[Any]:
    """The properties of the last counting event: the latest ``occurred_at``, of equal ones
    the later ingested (the higher id)."""
    ordered = aggregate_order_by(
        user_events.c.properties, user_events.c.occurred_at.desc(), user_events.c.id.desc()
    )
    found: ColumnElement[Any] = _filtered(sa.func.array_agg(ordered, type_=ARRAY(JSONB)), counting)
    return found[1]


def last_holds(condition: EventCondition, properties: ColumnElement[Any]) -> ColumnElement[bool]:
    """The last event (its ``properties``; NULL: there is none) satisfies every ``where``."""
    tests = [property_predicate(where, properties) for where in condition.where or ()]
    return sa.func.coalesce(sa.and_(properties.is_not(None), *tests), sa.false())


def _aggregate_columns(
    condition: EventCondition, number: ColumnElement[Any], *, clock: bool
) -> dict[str, Any]:
    """The aggregate functions (over the counting numbers) an aggregate condition reads."""
    occurred = user_events.c.occurred_at
    functions = {
        "numbers": sa.func.count(),
        "total": sa.func.sum(number),
        "low": sa.func.min(number),
        "high": sa.func.max(number),
        "oldest": sa.func.min(occurred),
    }
    keep = {"sum": ["total"], "avg": ["total", "numbers"], "min": ["low"], "max": ["high"]}
    fields = keep[condition.check] + (["oldest"] if clock else [])
    return {field_: functions[field_] for field_ in fields}


EventsScope = Callable[[Any], list[ColumnElement[bool]]]  # restrictions on user_events rows


def _predicate(
    node: Node,
    columns: dict[EventCondition, LeafColumns],
    now: datetime,
    scope: EventsScope | None = None,
    absent: dict[EventCondition, ColumnElement[bool]] | None = None,
) -> ColumnElement[bool]:
    if absent and node in absent:
        return absent[node]
    if isinstance(node, PropertyCondition):
        return property_predicate(node, contacts.c.properties, now, CONTACT_HISTORY)
    if isinstance(node, EventSequence):
        from buckets.criteria.compile_sequence import sequence_exists

        return sequence_exists(node, now, contacts.c.id, scope)
    if isinstance(node, EventCondition) and node.is_aggregate:
        return aggregate_predicate(node, columns[node])
    if isinstance(node, EventCondition) and node.is_regularly:
        return regular_predicate(node, columns[node].count)
    if isinstance(node, EventCondition):
        count = columns[node].count
        if node.satisfied_by(0):  # no events row => NULL: count it as 0
            count = sa.func.coalesce(count, 0)
        return _count_predicate(node, count)
    if isinstance(node, Everyone):
        return sa.true()
    if isinstance(node, Manual):
        raise ValueError(MANUAL_NOT_EVALUATED)
    if isinstance(node, Sample):
        return sample_predicate(node, contacts.c.external_id)
    if isinstance(node, BucketReference):
        return reference_predicate(node, contacts.c.id)
    assert isinstance(node, Composite)
    parts = [_predicate(child, columns, now, scope, absent) for child in node.conditions]
    return _combine(node, parts)


def regular_predicate(
    condition: EventCondition, satisfied: ColumnElement[Any]
) -> ColumnElement[bool]:
    """``check: regularly`` from its satisfied periods (NULL: a contact without events in
    its span, whose periods are all empty)."""
    assert condition.min_periods is not None
    counted = sa.func.coalesce(satisfied, condition.count_without_events)
    return counted >= condition.min_periods


def _combine(node: Composite, parts: list[ColumnElement[bool]]) -> ColumnElement[bool]:
    if node.operator == "not":
        # A strict comparison is NULL for a contact without events (see the module doc):
        # false before it is negated.
        return sa.not_(sa.func.coalesce(parts[0], sa.false()))
    return sa.and_(*parts) if node.operator == "and" else sa.or_(*parts)


def _count_predicate(node: EventCondition, count: ColumnElement[Any]) -> ColumnElement[bool]:
    if node.check in ("exists", "last"):
        return count > 0
    if node.check == "not_exists":
        return count == 0
    assert node.operator is not None
    compared: ColumnElement[bool] = count.op(_SQL_OPERATORS[node.operator])(node.value)
    return compared


# --- forms restricted to known contacts ---------------------------------------------------


def not_yet_counting(
    condition: EventCondition, now: datetime | ColumnElement[Any]
) -> ColumnElement[bool]:
    """Events (matching name and ``where``) that start to count after ``now``: stamped after
    it, or with ``older_than: D`` not older than ``D`` yet (``occurred_at >= now - D``)."""
    occurred = user_events.c.occurred_at
    if condition.older_than is None:
        return occurred > (now if isinstance(now, ColumnElement) else sa.literal(now, TIMESTAMP))
    return occurred >= shifted(now, -condition.older_than)


def arrival_instant(condition: EventCondition, first: ColumnElement[Any]) -> ColumnElement[Any]:
    """When the event stamped ``first`` starts to count (:attr:`.EventCondition.lag`)."""
    if condition.older_than is None:
        return first
    return first + sa.literal(condition.lag, sa.Interval)


def leaf_event_scope(
    condition: EventCondition,
    now: datetime | ColumnElement[Any],
    contact_id: ColumnElement[Any],
    *,
    future: bool = False,
) -> list[ColumnElement[bool]]:
    """The events of the contact ``contact_id`` counting for ``condition`` as of ``now`` (with
    ``future``: those matching its name and ``where`` that start to count after ``now``).
    ``now`` may be a bound parameter (a statement built once, executed for many instants)."""
    bound = isinstance(now, ColumnElement)
    at = now if isinstance(now, ColumnElement) else sa.literal(now, TIMESTAMP)
    scope = [user_events.c.contact_id == contact_id, user_events.c.event == condition.event]
    if future:
        scope.append(not_yet_counting(condition, now))
    else:
        scope.append(user_events.c.occurred_at <= at)
        if condition.within is not None:
            if bound:
                start = at - sa.literal(condition.within, sa.Interval)
            else:
                assert isinstance(now, datetime)
                start = sa.literal(now - condition.within, TIMESTAMP)
            scope.append(user_events.c.occurred_at >= start)
        if condition.older_than is not None:
            scope.append(user_events.c.occurred_at < shifted(now, -condition.older_than))
        if condition.is_regularly:
            scope.append(user_events.c.occurred_at > shifted(now, -condition.span))
    scope.extend(
        property_predicate(where, user_events.c.properties) for where in condition.filtering or ()
    )
    return scope


def _leaf_events(condition: EventCondition, now: datetime, contact_id: ColumnElement[Any]) -> Any:
    """``SELECT 1`` of the events counting for ``condition`` of the contact ``contact_id``."""
    # Explicit correlation, because auto-correlation does not reach through derived tables;
    # everything but user_events (contacts, or the table ``contact_id`` comes from, e.g.
    # bucket_memberships) belongs to the enclosing query.
    scope = leaf_event_scope(condition, now, contact_id)
    return sa.select(sa.literal(1)).where(*scope).correlate_except(user_events)


def _reached(
    condition: EventCondition, n: int, now: datetime, contact_id: ColumnElement[Any]
) -> ColumnElement[bool]:
    """At least ``n`` events count for ``condition``: stops after ``n`` index entries."""
    if n <= 0:
        return sa.true()
    probe = _leaf_events(condition, now, contact_id).limit(1)
    if n > 1:
        probe = probe.offset(n - 1)
    return sa.exists(probe)


def _probe_aggregate(
    condition: EventCondition, now: datetime, contact_id: ColumnElement[Any]
) -> ColumnElement[bool]:
    """An aggregate over the contact's counting events: one grouped-away row (an aggregate
    without ``GROUP BY`` always has one) kept by ``HAVING`` when the condition holds."""
    number, is_number = event_number(condition)
    scope = [*leaf_event_scope(condition, now, contact_id), is_number]
    found = LeafColumns(
        sa.func.count(),
        {},
        None,
        numbers=sa.func.count(),
        total=sa.func.sum(number),
        low=sa.func.min(number),
        high=sa.func.max(number),
    )
    probe = (
        sa.select(sa.literal(1))
        .where(*scope)
        .having(aggregate_predicate(condition, found))
        .correlate_except(user_events)
    )
    return sa.exists(probe)


def last_event_select(
    condition: EventCondition, now: datetime | ColumnElement[Any], contact_id: ColumnElement[Any]
) -> Any:
    """``SELECT occurred_at, properties`` of the contact's last event counting by time for
    ``check: last`` (latest ``occurred_at``, then the higher id): one index probe."""
    occurred = user_events.c.occurred_at
    return (
        sa.select(occurred, user_events.c.properties)
        .where(*leaf_event_scope(condition, now, contact_id))
        .order_by(occurred.desc(), user_events.c.id.desc())
        .limit(1)
        .correlate_except(user_events)
    )


def _probe_last(
    condition: EventCondition, now: datetime, contact_id: ColumnElement[Any]
) -> ColumnElement[bool]:
    last = last_event_select(condition, now, contact_id).subquery("last_event")
    return sa.exists(
        sa.select(sa.literal(1))
        .select_from(last)
        .where(last_holds(condition, last.c.properties))
        .correlate_except(last)
    )


def _probe_leaf(
    condition: EventCondition, now: datetime, contact_id: ColumnElement[Any]
) -> ColumnElement[bool]:
    if condition.is_aggregate:
        return _probe_aggregate(condition, now, contact_id)
    if condition.is_last:
        return _probe_last(condition, now, contact_id)
    if condition.is_regularly:
        periods = period_rows(
            condition, now, leaf_event_scope(condition, now, contact_id), by_contact=False
        )
        satisfied, _ = regular_columns(condition, periods, now)
        probe = sa.select(satisfied).select_from(periods).correlate_except(user_events, periods)
        return regular_predicate(condition, probe.scalar_subquery())
    if condition.check == "exists":
        return _reached(condition, 1, now, contact_id)
    if condition.check == "not_exists":
        return sa.not_(_reached(condition, 1, now, contact_id))
    value = condition.count_value
    match condition.operator:
        case "gt":
            return _reached(condition, value + 1, now, contact_id)
        case "gte":
            return _reached(condition, value, now, contact_id)
        case "lt":
            return sa.not_(_reached(condition, value, now, contact_id))
        case "lte":
            return sa.not_(_reached(condition, value + 1, now, contact_id))
        case "eq":
            return sa.and_(
                _reached(condition, value, now, contact_id),
                sa.not_(_reached(condition, value + 1, now, contact_id)),
            )
    raise AssertionError(condition.operator)  # pragma: no cover - validated


def probe_predicate(
    node: Node,
    now: datetime,
    contact_id: ColumnElement[Any] | None = None,
    *,
    properties: ColumnElement[Any] | None = None,
    external_id: ColumnElement[Any] | None = None,
    history: History | None = None,
) -> ColumnElement[bool]:
    """``node`` as a correlated predicate: event leaves probe the events of ``contact_id``
    (default ``contacts.id``) as of ``now``; property leaves read ``properties`` (and
    ``history`` for ``held_for``) and samples ``external_id`` (default ``contacts.properties``
    / ``contacts.property_changed_at`` and ``created_at`` / ``contacts.external_id``, which
    must then be in the query's FROM). Soft-deleted contacts are not excluded here: callers
    scope the rows they examine."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    contact = contacts.c.id if contact_id is None else contact_id
    bag = contacts.c.properties if properties is None else properties
    name = contacts.c.external_id if external_id is None else external_id
    kept = CONTACT_HISTORY if history is None else history
    if isinstance(node, PropertyCondition):
        return property_predicate(node, bag, now, kept)
    if isinstance(node, EventCondition):
        return _probe_leaf(node, now, contact)
    if isinstance(node, EventSequence):
        from buckets.criteria.compile_sequence import sequence_exists

        return sequence_exists(node, now, contact)
    if isinstance(node, Everyone):
        return sa.true()
    if isinstance(node, Manual):
        raise ValueError(MANUAL_NOT_EVALUATED)
    if isinstance(node, Sample):
        return sample_predicate(node, name)
    if isinstance(node, BucketReference):
        return reference_predicate(node, contact)
    assert isinstance(node, Composite)
    parts = [
        probe_predicate(child, now, contact, properties=bag, external_id=name, history=kept)
        for child in node.conditions
    ]
    return _combine(node, parts)
