"""The next change by the clock alone (buckets.criteria.clock), against brute force.

For random clock-heavy criteria (windowed event leaves under and/or) and event streams on the
window edges and in the future, the brute-force answer is the first instant among every
event's arrival and every (event, window) departure at which the evaluator's answer differs.
Contact properties carry when each key changed, around now, for ``held_for``. The clock's
``next_at`` must be a lower bound of it (the answer is unchanged one microsecond
before), never "never" when a flip exists, and :func:`exact_flip` must find it exactly. The
three executors (memory, per-contact SQL facts, set-wide SQL) must agree on these trees too.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Connection

from buckets.criteria import Event, evaluate, in_memory_counter, parse_criteria
from buckets.criteria.clock import TICK, exact_flip, in_memory_state
from buckets.criteria.held import ContactProperties
from buckets.criteria.instants import parse_instant
from buckets.criteria.model import EventCondition, EventSequence, leaves
from tests.criteria.support import NOW, Person, facts_states, load, python_states, sql_states
from tests.criteria.test_differential import (
    AGES,
    EXAMPLES,
    INSTANT_POINTS,
    PROPERTY_KEYS,
    SEQUENCE_EVENTS,
    VALID_INSTANTS,
    WINDOWS,
    chains_by_brute_force,
    instant_text,
    property_leaf,
    regular_leaf,
    sequence_leaf,
)

# Instants around now (the brute force steps through their window edges).
NEAR_INSTANTS = st.builds(
    instant_text,
    st.sampled_from(INSTANT_POINTS),
    st.sampled_from([timedelta(0), timedelta(hours=5)]),
)

# changed_at / created_at whose held_for edges (changed + D) fall around now and after it
HELD_POINTS = st.sampled_from(
    [NOW - w + delta for w in WINDOWS for delta in (-TICK, timedelta(0), TICK, timedelta(hours=2))]
    + [NOW, NOW - timedelta(days=30)]
)

NAMES = ("e1", "e2")
# Event times: window edges and around them, now, and the future (arrivals).
OFFSETS = st.sampled_from(
    [timedelta(0), TICK, -TICK, -timedelta(minutes=3), -timedelta(days=2)]
    + [
        edge + delta
        for edge in (*WINDOWS, *AGES)
        for delta in (-TICK, timedelta(0), TICK, timedelta(hours=2))
    ]
)


@st.composite
def clock_leaf(draw: st.DrawFn) -> dict[str, Any]:
    leaf: dict[str, Any] = {"type": "event", "event": draw(st.sampled_from(NAMES))}
    check = draw(
        st.sampled_from(
            ["exists", "not_exists", "count", "count", "sum", "avg", "max", "last", "regularly"]
        )
    )
    if check == "regularly":
        return draw(regular_leaf(leaf["event"]))
    leaf["check"] = check
    if check in ("sum", "avg", "max"):  # windowed aggregates decay (SPEC §6.7)
        leaf["property"] = "k"
        leaf["operator"] = draw(st.sampled_from(["gt", "gte", "lt", "lte", "eq"]))
        leaf["value"] = draw(st.sampled_from([0, 1, 1.5, 2, 3]))
    if check == "count":
        operator = draw(st.sampled_from(["gt", "gte", "lt", "lte", "eq"]))
        leaf["operator"] = operator
        leaf["value"] = draw(st.integers(min_value=1 if operator == "lt" else 0, max_value=3))
    if draw(st.integers(0, 3)):  # mostly windowed
        leaf["within"] = draw(st.sampled_from(WINDOWS))
    if check != "last" and not draw(st.integers(0, 2)):  # events ageing in
        ages = [age for age in AGES if age < leaf.get("within", timedelta.max)]
        if ages:
            leaf["older_than"] = draw(st.sampled_from(ages))
    if not draw(st.integers(0, 5)):
        leaf["where"] = [{"type": "property", "property": "k", "operator": "eq", "value": 1}]
    return leaf


def composite(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(
        lambda operator, conditions: {
            "type": "composite",
            "operator": operator,
            "conditions": conditions[:1] if operator == "not" else conditions,
        },
        st.sampled_from(["and", "or", "not"]),
        st.lists(children, min_size=1, max_size=3),
    )


LEAVES = st.one_of(clock_leaf(), clock_leaf(), property_leaf(PROPERTY_KEYS))
TREES = st.one_of(LEAVES, composite(LEAVES), composite(composite(LEAVES)))
EVENTS = st.lists(
    st.builds(
        lambda name, offset, kind: Event(name, NOW - offset, {"k": kind}),
        st.sampled_from(NAMES),
        OFFSETS,
        st.sampled_from([1, 2, 0.5, "x"]),  # "x": not a number, ignored by aggregates
    ),
    max_size=6,
)


def brute_force_flip(node: Any, properties: dict[str, Any], events: list[Event]) -> datetime | None:
    windows = {leaf.within for leaf in leaves(node) if isinstance(leaf, EventCondition)}
    ages = {leaf.older_than for leaf in leaves(node) if isinstance(leaf, EventCondition)}
    instants = {e.occurred_at for e in events}
    instants |= {e.occurred_at + w + TICK for e in events for w in windows if w is not None}
    instants |= {e.occurred_at + a + TICK for e in events for a in ages if a is not None}
    for leaf in leaves(node):  # regularly: an event moves to the next period at t + j·period
        if isinstance(leaf, EventCondition) and leaf.period is not None:
            assert leaf.periods is not None
            span = range(leaf.periods + 1)
            instants |= {e.occurred_at + j * leaf.period for e in events for j in span}
    at = parse_instant(properties.get("at"))
    if at is not None:  # within_past / within_next edges
        instants |= {at, at + TICK} | {at + w + TICK for w in WINDOWS} | {at - w for w in WINDOWS}
    if isinstance(properties, ContactProperties):  # held_for matures / expires at changed + D
        changes = [*properties.changed.values(), properties.created_at]
        instants |= {change + w for change in changes for w in WINDOWS}
    now_value = evaluate(node, properties, in_memory_counter(events, NOW), now=NOW)
    for instant in sorted(i for i in instants if i > NOW):
        if evaluate(node, properties, in_memory_counter(events, instant), now=instant) != now_value:
            return instant
    return None


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    criteria=TREES,
    events=EVENTS,
    plan=st.sampled_from(["pro", "free"]),
    at=st.one_of(st.none(), NEAR_INSTANTS),
    changed=st.dictionaries(st.sampled_from(["plan", "at", "n"]), HELD_POINTS, max_size=2),
    created=HELD_POINTS,
)
def test_next_change_is_a_lower_bound_and_exact_flip_is_exact(  # noqa: PLR0917
    criteria: dict[str, Any],
    events: list[Event],
    plan: str,
    at: str | None,
    changed: dict[str, datetime],
    created: datetime,
):
    node = parse_criteria(criteria)
    values: dict[str, Any] = {"plan": plan} if at is None else {"plan": plan, "at": at}
    properties = ContactProperties(values, changed, created)
    state = in_memory_state(node, properties, events, NOW)
    flip = brute_force_flip(node, properties, events)
    assert state.value == evaluate(node, properties, in_memory_counter(events, NOW), now=NOW)
    if flip is None:
        assert exact_flip(node, properties, events, NOW) is None
    else:
        assert state.next_at is not None, "a flip exists, the clock said never"
        assert state.next_at <= flip
        assert exact_flip(node, properties, events, NOW) == flip
    if state.next_at is not None:  # unchanged up to the bound
        before = state.next_at - TICK
        assert (
            evaluate(node, properties, in_memory_counter(events, before), now=before) == state.value
        )


@settings(
    max_examples=EXAMPLES // 2,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    criteria=TREES,
    people=st.lists(
        st.builds(Person, st.fixed_dictionaries({}, optional={"at": VALID_INSTANTS}), EVENTS),
        max_size=4,
    ),
)
def test_clock_executors_agree_on_clock_heavy_trees(
    connection: Connection, criteria: dict[str, Any], people: list[Person]
):
    node = parse_criteria(criteria)
    savepoint = connection.begin_nested()
    try:
        ids = load(connection, people)
        expected = python_states(node, people, ids, NOW)
        assert facts_states(connection, node, NOW, ids) == expected
        assert sql_states(connection, node, NOW) == expected
    finally:
        savepoint.rollback()


@settings(max_examples=EXAMPLES, deadline=None)
@given(sequence=sequence_leaf(), events=st.lists(SEQUENCE_EVENTS, max_size=8))
def test_a_sequences_next_change_is_a_lower_bound_and_exact_flip_is_exact(
    sequence: dict[str, Any], events: list[Event]
):
    """A sequence changes only where a chain starts (its last event, or that plus an absent
    step's gap) or ends (one microsecond after its first event leaves ``within``): the brute
    force of SPEC §3.4 tried at every such instant finds the first flip."""
    node = parse_criteria(sequence)
    assert isinstance(node, EventSequence)
    spans = [step.gap for step in node.steps if step.gap is not None]
    instants = {e.occurred_at for e in events}
    instants |= {e.occurred_at + span for e in events for span in spans}
    if node.within is not None:
        instants |= {e.occurred_at + node.within + TICK for e in events}
    now_value = chains_by_brute_force(node, events, NOW)
    flip = next(
        (
            at
            for at in sorted(i for i in instants if i > NOW)
            if chains_by_brute_force(node, events, at) != now_value
        ),
        None,
    )
    state = in_memory_state(node, {}, events, NOW)
    assert state.value == now_value
    assert exact_flip(node, {}, events, NOW) == flip
    if state.next_at is not None:  # unchanged up to the bound, which is never past the flip
        assert chains_by_brute_force(node, events, state.next_at - TICK) == now_value
        assert flip is not None
        assert state.next_at <= flip
    else:
        assert flip is None
