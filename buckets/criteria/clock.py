"""When can the clock alone change a contact's answer? (SPEC §6.7, the due queue)

Every criteria node has, for one contact as of ``now``, a :class:`State`: its value, and
``next_at`` — the first instant after ``now`` at which that value *may* differ, assuming no new
data arrives (``None``: never). ``next_at`` is a **lower bound**: the answer never changes
before it, and at it the answer changes or a later ``next_at`` is computed from there. Queue
entries and explain both come from :func:`state`; the SQL form in :mod:`.compile_clock`
implements the same rules set-wide and is tested equal to this one.

Event leaves (SPEC §1: an event counts while ``now - within <= occurred_at <= now``). With
``recent`` the contact's counting events as of ``now``, newest first (as many as decide the
leaf: :func:`~.compile.decisive_count`), and ``arrival`` its first matching event stamped after
``now``:

* an event *departs* from a window one microsecond after ``occurred_at + within``;
* an event *arrives* at its ``occurred_at`` (a future-stamped event starts to count), or with
  ``older_than: D`` one microsecond after ``occurred_at + D`` (it ages into the count);
* "at least ``n``" leaves (``exists``, ``count gte|gt``) that hold stop holding when the ``n``-th
  newest event departs; that fail start holding no earlier than the next arrival;
* "fewer than ``n``" leaves (``not_exists``, ``count lt|lte``) mirror that;
* ``count eq n`` may change at the next arrival or the departure that brings the count to (or
  away from) ``n``.

Composites combine the children's states: an ``and`` that holds may fail when its first child
changes (the minimum); one that fails cannot hold before every failing child has changed (the
maximum of theirs, never if one of them never changes). ``or`` mirrors that. Property leaves
move with the clock through ``within_past`` / ``within_next`` and ``held_for``. Sequences: see
:func:`sequence_state`. :func:`exact_flip` walks the lower bounds to the instant the answer really
flips (explain shows it).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from buckets.criteria.evaluate import (
    Event,
    aggregate_of,
    aggregated_value,
    event_counts,
    last_event,
    last_matches,
    lookup,
    property_matches,
    regular_periods,
    value_matches,
)
from buckets.criteria.held import changed_at
from buckets.criteria.instants import parse_instant
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
from buckets.criteria.sequences import Chains, chains_of

TICK = timedelta(microseconds=1)  # the resolution of timestamps (Python and PostgreSQL)
EXACT_FLIP_STEPS = 10_000  # lower bounds walked by exact_flip before it gives up


@dataclass(frozen=True)
class State:
    """A node's value as of ``now`` and the first later instant it may change (None: never)."""

    value: bool
    next_at: datetime | None


def earliest(*instants: datetime | None) -> datetime | None:
    """The earliest of ``instants`` (None is "never", later than any instant)."""
    found = [instant for instant in instants if instant is not None]
    return min(found) if found else None


def latest(instants: Iterable[datetime | None]) -> datetime | None:
    """The latest of ``instants``, "never" if any of them is."""
    found = list(instants)
    if not found or any(instant is None for instant in found):
        return None
    return max(instant for instant in found if instant is not None)


def decisive_count(condition: EventCondition) -> int:
    """Counting beyond this many events cannot change ``condition``'s answer; as many of the
    newest counting events also decide when it changes."""
    if condition.check != "count":
        return 1
    return condition.count_value + 1


def threshold(condition: EventCondition) -> tuple[str, int]:
    """``("at_least", n)``, ``("below", n)`` or ``("eq", n)``: the leaf in terms of its count."""
    if condition.check in ("exists", "last"):  # last: 1 when the last event holds
        return "at_least", 1
    if condition.check == "not_exists":
        return "below", 1
    value = condition.count_value
    match condition.operator:
        case "gte":
            return "at_least", value
        case "gt":
            return "at_least", value + 1
        case "lt":
            return "below", value
        case "lte":
            return "below", value + 1
    return "eq", value


def event_state(
    condition: EventCondition, recent: Sequence[datetime], arrival: datetime | None
) -> State:
    """An event leaf's state from its counting events (newest first, at least
    :func:`decisive_count` of them when there are that many) and its next arrival."""
    value = condition.satisfied_by(len(recent))
    kind, n = threshold(condition)

    def departs(rank: int) -> datetime | None:  # when the rank-th newest stops counting
        if condition.within is None or rank < 1 or rank > len(recent):
            return None
        return recent[rank - 1] + condition.within + TICK

    if kind == "at_least":
        return State(value, departs(n) if value else arrival)
    if kind == "below":
        return State(value, arrival if value else departs(n))
    return State(value, earliest(arrival, departs(n) if value else departs(n + 1)))


def last_state(
    condition: EventCondition, value: bool, last_at: datetime | None, arrival: datetime | None
) -> State:
    """A ``check: last`` leaf's state: any event of the name arriving (stamped after ``now``)
    becomes the last one; with ``within``, a last event that holds leaves the window one
    microsecond after ``occurred_at + within``, and no other event counts then (they are no
    newer), so the leaf turns false."""
    departs = None
    if value and condition.within is not None and last_at is not None:
        departs = last_at + condition.within + TICK
    return State(value, earliest(arrival, departs))


def regularly_state(
    condition: EventCondition, satisfied: int, crossing: datetime | None, arrival: datetime | None
) -> State:
    """A ``check: regularly`` leaf's state: its periods' counts change only when an event
    crosses a period boundary (an event at ``t`` is in period ``i`` while
    ``t + i·period <= now < t + (i+1)·period``; ``crossing``: the first such instant after now
    of any counting event) or a future-stamped event arrives in period 0."""
    return State(condition.satisfied_by(satisfied), earliest(arrival, crossing))


def next_crossing(
    condition: EventCondition, events: Iterable[Event], now: datetime
) -> datetime | None:
    """The first instant after ``now`` a counting event of ``check: regularly`` moves to the
    next period (or out of the last one)."""
    assert condition.period is not None
    return earliest(
        *(
            now + condition.period - (now - e.occurred_at) % condition.period
            for e in events
            if event_counts(condition, e, now)
        )
    )


def aggregate_state(
    condition: EventCondition,
    found: Aggregate,
    oldest: datetime | None,
    arrival: datetime | None,
) -> State:
    """An aggregate leaf's state: its value may change when a numeric value stops counting
    (the oldest counting one departs first, one microsecond after ``occurred_at + within``)
    or starts to (the next future-stamped event with a numeric value arrives)."""
    departs = None
    if condition.within is not None and oldest is not None:
        departs = oldest + condition.within + TICK
    return State(found.satisfies(condition), earliest(arrival, departs))


def property_state(
    leaf: PropertyCondition, properties: Mapping[str, Any], now: datetime | None
) -> State:
    """A property leaf's state: its value part's (:func:`value_state`), and with ``held_for``
    the ``and`` of that and the held part, which flips at ``changed_at + D`` (``at_least``
    matures, ``less_than`` expires; :meth:`.HeldFor.flips_at`)."""
    found = value_state(leaf, properties, now)
    if leaf.held_for is None:
        return found
    if now is None:
        raise ValueError("held_for needs the decision's now")
    at = changed_at(leaf, properties)
    part = State(leaf.held_for.holds(at, now), leaf.held_for.flips_at(at, now))
    return combine(True, [found, part])


def value_state(
    leaf: PropertyCondition, properties: Mapping[str, Any], now: datetime | None
) -> State:
    """The state of a property leaf's value part. Only ``within_past`` / ``within_next`` move
    with the clock: an instant ``t`` is within the past ``d`` from ``now = t`` until one
    microsecond after ``t + d``, and within the next ``d`` from ``now = t - d`` until one
    microsecond after ``t`` (bounds inclusive)."""
    value = value_matches(leaf, properties, now)
    if leaf.operator not in CLOCK_OPERATORS:
        return State(value, None)
    instant = parse_instant(lookup(properties, leaf.path))
    if instant is None:
        return State(value, None)
    assert now is not None  # property_matches needed it already
    span: timedelta = leaf.value
    if leaf.operator == "within_past":
        if instant > now:
            return State(value, instant)
        return State(value, instant + span + TICK if instant >= now - span else None)
    if instant > now + span:
        return State(value, instant - span)
    return State(value, instant + TICK if instant >= now else None)


def sequence_state(sequence: EventSequence, chains: Chains) -> State:
    """A sequence's state (:mod:`.sequences`): while a chain holds, at least until one
    microsecond after its first event leaves ``within`` (the latest such first event; never
    without ``within``); otherwise from the next start of a chain (an absent step's gap
    elapsing, a future-stamped event arriving)."""
    if chains.witness is not None:
        if sequence.within is None:
            return State(True, None)
        return State(True, chains.witness + sequence.within + TICK)
    return State(False, chains.upcoming)


LeafStates = Callable[[Leaf], State]


def state(node: Node, leaf_state: LeafStates) -> State:
    """The node's state from its leaves' states (see the module docstring)."""
    if isinstance(node, Manual):
        raise ValueError(MANUAL_NOT_EVALUATED)
    if not isinstance(node, Composite):
        return leaf_state(node)
    if node.operator == "not":  # the same instants, the opposite value
        inner = state(node.conditions[0], leaf_state)
        return State(not inner.value, inner.next_at)
    children = [state(child, leaf_state) for child in node.conditions]
    return combine(node.operator == "and", children)


def combine(holds: bool, children: Sequence[State]) -> State:
    """An ``and`` (``holds``) or ``or`` of ``children``'s states."""
    value = all(c.value for c in children) if holds else any(c.value for c in children)
    if value == holds:  # every child agrees: the first child to change may change the node
        return State(value, earliest(*(c.next_at for c in children)))
    deciding = [c.next_at for c in children if c.value != holds]
    return State(value, latest(deciding))


# --- one contact in memory (explain, tests) ---------------------------------------------------


def counting(condition: EventCondition, events: Iterable[Event], now: datetime) -> list[datetime]:
    """The instants of the events counting for ``condition`` as of ``now``, newest first."""
    return sorted((e.occurred_at for e in events if event_counts(condition, e, now)), reverse=True)


def arrival(condition: EventCondition, events: Iterable[Event], now: datetime) -> datetime | None:
    """The first instant after ``now`` an event matching ``condition`` (name, ``where``; for an
    aggregate, with a numeric value) starts to count: one stamped after ``now``, or with
    ``older_than`` one that is not old enough yet (:attr:`~.EventCondition.lag`)."""
    return earliest(
        *(
            e.occurred_at + condition.lag
            for e in events
            if e.name == condition.event
            and e.occurred_at + condition.lag > now
            and all(property_matches(w, e.properties) for w in condition.filtering or ())
            and (not condition.is_aggregate or aggregated_value(condition, e) is not None)
        )
    )


def oldest_number(
    condition: EventCondition, events: Iterable[Event], now: datetime
) -> datetime | None:
    """The oldest event counting for the aggregate ``condition`` whose value is a number."""
    found = [
        e.occurred_at
        for e in events
        if event_counts(condition, e, now) and aggregated_value(condition, e) is not None
    ]
    return min(found) if found else None


def static_state(leaf: Leaf, external_id: str | None) -> State | None:
    """The state of a leaf no clock moves (``everyone``, ``sample``); None for the others."""
    if isinstance(leaf, Everyone):
        return State(True, None)
    if isinstance(leaf, Sample):
        if external_id is None:
            raise ValueError("a sample needs the contact's external_id")
        return State(leaf.hits(external_id), None)
    return None


def reference_state(leaf: BucketReference, memberships: Collection[str]) -> State:
    """A bucket reference: the clock alone never moves it here. (A referenced bucket's flips
    reach the buckets that refer to it through the cascade, :mod:`buckets.references`.)"""
    return State(leaf.holds(leaf.bucket in memberships), None)


def in_memory_leaf_states(
    properties: Mapping[str, Any],
    events: Sequence[Event],
    now: datetime,
    external_id: str | None = None,
    memberships: Iterable[str] = (),
) -> LeafStates:
    active = frozenset(memberships)

    def leaf_state(leaf: Leaf) -> State:
        if isinstance(leaf, BucketReference):
            return reference_state(leaf, active)
        if isinstance(leaf, PropertyCondition):
            return property_state(leaf, properties, now)
        if isinstance(leaf, EventSequence):
            return sequence_state(leaf, chains_of(leaf, events, now))
        if isinstance(leaf, EventCondition) and leaf.is_aggregate:
            return aggregate_state(
                leaf,
                aggregate_of(leaf, events, now),
                oldest_number(leaf, events, now),
                arrival(leaf, events, now),
            )
        if isinstance(leaf, EventCondition) and leaf.is_regularly:
            return regularly_state(
                leaf,
                regular_periods(leaf, events, now),
                next_crossing(leaf, events, now),
                arrival(leaf, events, now),
            )
        if isinstance(leaf, EventCondition) and leaf.is_last:
            last = last_event(leaf, events, now)
            last_at = last.occurred_at if last is not None else None
            return last_state(leaf, last_matches(leaf, last), last_at, arrival(leaf, events, now))
        if isinstance(leaf, EventCondition):
            return event_state(leaf, counting(leaf, events, now), arrival(leaf, events, now))
        found = static_state(leaf, external_id)
        assert found is not None
        return found

    return leaf_state


def in_memory_state(
    node: Node,
    properties: Mapping[str, Any],
    events: Sequence[Event],
    now: datetime,
    external_id: str | None = None,
    *,
    memberships: Iterable[str] = (),
) -> State:
    """:func:`state` of a contact whose properties, events and active memberships (bucket
    ids) are in memory."""
    return state(node, in_memory_leaf_states(properties, events, now, external_id, memberships))


def exact_flip(
    node: Node,
    properties: Mapping[str, Any],
    events: Sequence[Event],
    now: datetime,
    external_id: str | None = None,
    *,
    memberships: Iterable[str] = (),
) -> datetime | None:
    """The first instant after ``now`` at which the answer really differs (None: never, or
    not within :data:`EXACT_FLIP_STEPS` lower bounds). Memberships are held as they are."""
    active = frozenset(memberships)
    current = in_memory_state(node, properties, events, now, external_id, memberships=active)
    at = current.next_at
    for _ in range(EXACT_FLIP_STEPS):
        if at is None:
            return None
        there = in_memory_state(node, properties, events, at, external_id, memberships=active)
        if there.value != current.value:
            return at
        at = there.next_at
    return None
