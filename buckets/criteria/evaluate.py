"""The Python executor: does one contact match, as of ``now``? (SPEC §3.2)

The evaluator never reads the clock or the database itself. It is given the contact's
``properties`` and a *counter*: a function returning how many of the contact's events match an
event condition as of the decision's ``now``. The real-time path passes a counter that queries
inside its transaction; tests and explain use :func:`in_memory_counter` over a list of events.
``and`` / ``or`` short-circuit, so a counter is asked only for the leaves that decide.

Type-strictness, exactly as the SQL compiler implements it with ``jsonb_typeof``:

* JSON kinds are null, boolean, number (int or float, never bool), string, array and object;
  ``eq`` needs the same kind (``True`` does not equal ``1``; ``"5"`` does not equal ``5``);
* a missing key and a JSON null differ for ``eq null`` but both satisfy ``not_exists``;
* ``contains``: substring of a string (case-sensitive), or an array element ``eq`` the value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from buckets.criteria.held import held
from buckets.criteria.instants import parse_instant
from buckets.criteria.model import (
    CLOCK_OPERATORS,
    INSTANT_OPERATORS,
    LIST_OPERATORS,
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
    is_number,
)

if TYPE_CHECKING:
    from buckets.criteria.sequences import Chains

# What a contact's events give a leaf: a count, an aggregate, or a sequence's chains; for a
# bucket reference, 1 when the contact is an active member of the bucket, else 0.
EventCounter = Callable[
    ["EventCondition | EventSequence | BucketReference"], "int | Aggregate | Chains"
]

_MISSING = object()
MISSING = _MISSING  # what lookup returns for a missing path


def json_kind(value: object) -> str:
    """The ``jsonb_typeof`` of a Python value decoded from JSON."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if is_number(value):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    return "object"


def json_equal(left: object, right: object) -> bool:
    """Type-strict equality of two JSON scalars (``1 == 1.0``, ``True != 1``)."""
    return json_kind(left) == json_kind(right) and left == right


def lookup(properties: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """The value at ``path`` (keys from the top level down), or :data:`MISSING` when a key is
    missing or a value on the way is not an object (SPEC §3.4)."""
    value: Any = properties
    for key in path:
        if not isinstance(value, Mapping):
            return _MISSING
        value = value.get(key, _MISSING)
        if value is _MISSING:
            return _MISSING
    return value


_PART_TWO = LIST_OPERATORS | INSTANT_OPERATORS | CLOCK_OPERATORS


def listed(condition: PropertyCondition, actual: Any, now: datetime | None = None) -> bool:
    """``in`` / ``not_in``: ``eq`` to one of the values / not (a missing key is in none)."""
    found = actual is not _MISSING and any(json_equal(actual, one) for one in condition.value)
    return found == (condition.operator == "in")


def instant_matches(condition: PropertyCondition, actual: Any, now: datetime | None) -> bool:
    """``before`` / ``after`` / ``within_past`` / ``within_next`` (SPEC §3.4): the value must
    be an instant; bounds inclusive."""
    instant = parse_instant(actual)
    if instant is None:
        return False
    match condition.operator:
        case "before" | "after":
            wanted = parse_instant(condition.value)
            assert wanted is not None  # validated
            return instant < wanted if condition.operator == "before" else instant > wanted
    if now is None:
        raise ValueError(f"operator {condition.operator!r} needs the decision's now")
    span: timedelta = condition.value
    if condition.operator == "within_past":
        return now - span <= instant <= now
    return now <= instant <= now + span


def property_matches(
    condition: PropertyCondition, properties: Mapping[str, Any], now: datetime | None = None
) -> bool:
    """Whether ``properties`` satisfy ``condition`` as of ``now`` (only ``within_past`` /
    ``within_next`` and ``held_for`` read it; ``held_for`` needs the properties as
    :class:`~.held.ContactProperties`)."""
    found = value_matches(condition, properties, now)
    if condition.held_for is None:
        return found
    return found and held(condition, properties, now)


def value_matches(
    condition: PropertyCondition, properties: Mapping[str, Any], now: datetime | None = None
) -> bool:
    """The value part of ``condition`` (everything but ``held_for``)."""
    actual = lookup(properties, condition.path)
    wanted = condition.value
    if condition.operator in _PART_TWO:
        match = listed if condition.operator in LIST_OPERATORS else instant_matches
        return match(condition, actual, now)
    match condition.operator:
        case "exists":
            return actual is not _MISSING and actual is not None
        case "not_exists":
            return actual is _MISSING or actual is None
        case "eq":
            return actual is not _MISSING and json_equal(actual, wanted)
        case "neq":
            return actual is _MISSING or not json_equal(actual, wanted)
        case "contains":
            if isinstance(actual, str):
                return isinstance(wanted, str) and wanted in actual
            if isinstance(actual, list | tuple):
                return any(json_equal(element, wanted) for element in actual)
            return False
        case "gt":
            return is_number(actual) and actual > wanted
        case "gte":
            return is_number(actual) and actual >= wanted
        case "lt":
            return is_number(actual) and actual < wanted
        case "lte":
            return is_number(actual) and actual <= wanted
    raise AssertionError(condition.operator)  # pragma: no cover - validated


def evaluate(
    node: Node,
    properties: Mapping[str, Any],
    count_events: EventCounter,
    *,
    external_id: str | None = None,
    now: datetime | None = None,
) -> bool:
    """Whether a contact with ``properties`` (and events seen by ``count_events``) matches.
    ``external_id`` is needed by ``sample`` nodes, ``now`` by ``within_past`` /
    ``within_next`` only."""
    if isinstance(node, PropertyCondition):
        return property_matches(node, properties, now)
    if isinstance(node, EventSequence):
        return bool(count_events(node).value)  # type: ignore[union-attr]
    if isinstance(node, EventCondition):
        return node.holds(count_events(node))  # type: ignore[arg-type]
    if isinstance(node, Everyone):
        return True
    if isinstance(node, Manual):
        raise ValueError(MANUAL_NOT_EVALUATED)
    if isinstance(node, Sample):
        if external_id is None:
            raise ValueError("a sample needs the contact's external_id")
        return node.hits(external_id)
    if isinstance(node, BucketReference):
        return node.holds(bool(count_events(node)))
    assert isinstance(node, Composite)
    children = (
        evaluate(child, properties, count_events, external_id=external_id, now=now)
        for child in node.conditions
    )
    if node.operator == "not":
        return not next(children)
    if node.operator == "and":
        return all(children)
    return any(children)


@dataclass(frozen=True)
class Event:
    """One event of a contact, as the evaluator sees it."""

    name: str
    occurred_at: datetime
    properties: Mapping[str, Any] = field(default_factory=dict)


def event_counts(condition: EventCondition, event: Event, now: datetime) -> bool:
    """Whether ``event`` counts for ``condition`` as of ``now`` (SPEC §1: bounds inclusive;
    with ``older_than: D`` only events with ``occurred_at < now - D``, SPEC §3.4)."""
    if event.name != condition.event or event.occurred_at + condition.lag > now:
        return False
    if condition.within is not None and event.occurred_at < now - condition.within:
        return False
    if condition.is_regularly and event.occurred_at <= now - condition.span:
        return False
    return all(property_matches(where, event.properties) for where in condition.filtering or ())


def last_event(condition: EventCondition, events: Iterable[Event], now: datetime) -> Event | None:
    """The most recent event counting for ``check: last`` by time (name, window, not
    ``where``); of equal ``occurred_at`` the later ingested: events are given in ingestion
    order (SPEC §3.4)."""
    found: Event | None = None
    for event in events:
        if event_counts(condition, event, now) and (
            found is None or event.occurred_at >= found.occurred_at
        ):
            found = event
    return found


def last_matches(condition: EventCondition, last: Event | None) -> bool:
    """Whether the last event exists and satisfies every ``where`` condition."""
    return last is not None and all(
        property_matches(where, last.properties) for where in condition.where or ()
    )


def period_counts(condition: EventCondition, events: Iterable[Event], now: datetime) -> list[int]:
    """``check: regularly``: the matching events in each period, period ``i`` (0-based)
    covering ``(now - (i+1)·period, now - i·period]``."""
    assert condition.period is not None
    assert condition.periods is not None
    counts = [0] * condition.periods
    for event in events:
        if event_counts(condition, event, now):
            counts[(now - event.occurred_at) // condition.period] += 1
    return counts


def regular_periods(condition: EventCondition, events: Iterable[Event], now: datetime) -> int:
    """How many periods satisfy their count (what ``min_periods`` is compared with)."""
    return sum(1 for n in period_counts(condition, events, now) if condition.period_holds(n))


def aggregated_value(condition: EventCondition, event: Event) -> Any:
    """The number an aggregate reads from ``event`` (None when it is not a number: ignored)."""
    value = lookup(event.properties, condition.aggregated)
    return value if is_number(value) else None


def aggregate_of(condition: EventCondition, events: Iterable[Event], now: datetime) -> Aggregate:
    """The aggregate of ``condition`` over the events that count as of ``now``."""
    values = (aggregated_value(condition, e) for e in events if event_counts(condition, e, now))
    return Aggregate.of([value for value in values if value is not None])


def counts_counter(counts: Mapping[Any, Any]) -> EventCounter:
    """A counter over counts fetched beforehand (e.g. by :func:`~.compile.leaf_counts`)."""
    return counts.__getitem__


def in_memory_counter(
    events: Iterable[Event], now: datetime, memberships: Iterable[str] = ()
) -> EventCounter:
    """A counter over a contact's events held in memory (in ingestion order) and the ids of
    the buckets it is an active member of."""
    history = tuple(events)
    active = frozenset(memberships)

    def count(
        condition: EventCondition | EventSequence | BucketReference,
    ) -> int | Aggregate | Chains:
        if isinstance(condition, BucketReference):
            return int(condition.bucket in active)
        if isinstance(condition, EventSequence):
            from buckets.criteria.sequences import chains_of

            return chains_of(condition, history, now)
        if condition.is_aggregate:
            return aggregate_of(condition, history, now)
        if condition.is_last:
            return int(last_matches(condition, last_event(condition, history, now)))
        if condition.is_regularly:
            return regular_periods(condition, history, now)
        return sum(1 for event in history if event_counts(condition, event, now))

    return count
