"""One semantics, two executors: random criteria x random data, on a real PostgreSQL.

Hypothesis draws criteria trees (depth <= 4, every node kind and operator, windows, ``where``)
and small datasets built to sit on the edges the semantics care about: mixed JSON types
(bools next to 0/1, numbers next to numeric strings, JSON null next to missing keys, arrays),
events exactly on, just inside and just outside window bounds, and events after ``now``. The
compiled SQL member set must equal the evaluator's, over all contacts and over a random
subset of contact ids (the confirm form); so must the correlated probe form and the evaluator
fed with capped counts fetched by SQL. ``held_for`` rides on contact property leaves, over
``changed_at`` and ``created_at`` exactly at ``now - D`` and 1us either side. The clock (each
contact's value and the next instant the clock alone may change it) must agree the same way:
in memory, from per-contact SQL facts, and set-wide in SQL.

``BUCKETS_DIFFERENTIAL_EXAMPLES`` sets the example count (default 400; CI runs the default).
Failures hypothesis finds are kept below as ``@example`` regression cases.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from typing import Any

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Connection

from buckets.criteria import Event, parse_criteria
from tests.criteria.support import (
    NOW,
    Person,
    counted_members,
    decided_members,
    facts_states,
    load,
    probe_members,
    python_members,
    python_states,
    sql_members,
    sql_states,
)

EXAMPLES = int(os.environ.get("BUCKETS_DIFFERENTIAL_EXAMPLES", "400"))

PROPERTY_KEYS = ("plan", "n", "tags", "a.b", "addr", "at")
# Paths into nested objects (SPEC §3.4): through objects, arrays ("0" is no index), scalars.
PROPERTY_PATHS = (("addr", "country"), ("addr", "geo", "lat"), ("tags", "0"), ("n", "x"))
EVENT_NAMES = ("e1", "e2")
EVENT_KEYS = ("amount", "kind", "meta", "at")
EVENT_PATHS = (("meta", "kind"), ("amount", "x"))
WINDOWS = (timedelta(hours=1), timedelta(days=1), timedelta(days=7))
# older_than ages (SPEC §3.4): shorter than some windows, equal to others' (1h, 1d).
AGES = (timedelta(minutes=30), timedelta(hours=1), timedelta(days=1))
US = timedelta(microseconds=1)

# Values chosen to collide across JSON types: 0/1/True/False, 5 vs "5", 1 vs 1.0, "" vs null.
NUMBERS = st.sampled_from([0, 1, 2, 5, -1, 1.0, 0.5, 2.5, 2**63 + 1])
STRINGS = st.sampled_from(["", "a", "ab", "pro", "5", "1", "A", "bä"])
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, STRINGS)


def instant_text(at: datetime, zone: timedelta) -> str:
    return at.astimezone(timezone(zone)).isoformat()


# Instants at now, at now +- each window, 1us either side, written in three offsets; date-only
# and minute-only forms; and the instant regex's edges that are not instants.
INSTANT_POINTS = [
    NOW + sign * edge + delta
    for edge in (timedelta(0), *WINDOWS)
    for sign in (1, -1)
    for delta in (-US, timedelta(0), US)
]
VALID_INSTANTS = st.one_of(
    # UTC written "Z" or "-00:00", to the second or the microsecond (the SQL form compares those
    # as text with the span's ends, to the second)
    st.builds(
        lambda at, suffix: instant_text(at, timedelta(0)).replace("+00:00", suffix),
        st.sampled_from(INSTANT_POINTS),
        st.sampled_from(["Z", "-00:00"]),
    ),
    st.builds(
        instant_text,
        st.sampled_from(INSTANT_POINTS),
        # extreme offsets both ways: the local date a day off the UTC one (the SQL form
        # prefilters on the local date)
        st.sampled_from(
            [
                timedelta(0),
                timedelta(hours=5, minutes=30),
                timedelta(hours=23, minutes=59),
                -timedelta(hours=23, minutes=59),
            ]
        ),
    ),
    st.sampled_from(
        [
            "2026-11-22",
            "2026-11-23",
            "2026-11-22T12:00Z",
            "2024-02-29",
            "0001-01-01T00:00-00:01",
            "9999-12-31T00:00:00+23:59",
        ]
    ),
)
NOT_INSTANTS = st.sampled_from(
    [
        "2026-11-22T12:00",
        "2026-02-29",
        "2026-11-22T24:00:00Z",
        "2026-11-22T23:59:60Z",
        "0000-01-01",
        "\uff12026-11-22",
        "2026-11-22T12:00:00.1234567Z",
        "2026-11-22T12:00+24:00",
        "2026-11-22T12:00:00Z\n",
        "2026-13-01",
        "0001-01-01T00:00+00:01",  # before year 1 in UTC
        "9999-12-31T23:59:59.999999-23:59",  # after 9999 in UTC
        "2026-11-22 12:00:00Z",
    ]
)
INSTANT_TEXTS = st.one_of(VALID_INSTANTS, NOT_INSTANTS)
NESTED = st.recursive(
    st.one_of(SCALARS, st.lists(SCALARS, max_size=2)),
    lambda inner: st.dictionaries(
        st.sampled_from(["country", "geo", "lat", "kind", "x"]), inner, max_size=3
    ),
    max_leaves=4,
)
JSON_VALUES = st.one_of(
    SCALARS, st.lists(SCALARS, max_size=3), st.just({"x": 1}), NESTED, INSTANT_TEXTS
)
# Aggregated values: sums that are exact only in decimal (0.1 + 0.2 = 0.3), averages between
# integers, a huge integer, next to the non-numbers of JSON_VALUES (ignored by aggregates).
AMOUNTS = st.sampled_from([0, 1, 2, 3, 1.5, 2.5, -1, 0.1, 0.2, 0.3, 2**63 + 1])
AGGREGATED = ("amount", ["meta", "x"], ["amount", "x"])
LISTS = st.lists(st.one_of(st.booleans(), NUMBERS, STRINGS), min_size=1, max_size=3)

# Event times relative to now: window edges (on, 1us inside, 1us outside), now, the future.
OFFSETS = st.sampled_from(
    [timedelta(0), -US, -timedelta(hours=1), timedelta(days=30)]
    + [edge + delta for edge in (*WINDOWS, *AGES) for delta in (-US, timedelta(0), US)]
)


HELD = st.builds(
    lambda kind, span: {kind: span},
    st.sampled_from(["at_least", "less_than"]),
    st.sampled_from(WINDOWS),
)
# changed_at / created_at: exactly now - D for every held span, 1us either side, now, later
# than now (a late-stamped change), and long ago.
CHANGE_POINTS = st.sampled_from(
    [NOW - span + delta for span in WINDOWS for delta in (-US, timedelta(0), US)]
    + [NOW, NOW + timedelta(minutes=1), NOW - timedelta(days=400)]
)


def property_leaf(
    keys: tuple[str, ...], paths: tuple[tuple[str, ...], ...] = (), *, clock: bool = True
) -> st.SearchStrategy[dict[str, Any]]:
    def build(key: Any, operator: str, value: Any) -> dict[str, Any]:
        leaf: dict[str, Any] = {"type": "property", "property": key, "operator": operator}
        if operator not in ("exists", "not_exists"):
            leaf["value"] = value
        return leaf

    keyed: st.SearchStrategy[Any] = st.sampled_from(keys)
    if paths:
        keyed = st.one_of(keyed, st.sampled_from([list(path) for path in paths]))
    operators = [
        st.builds(build, keyed, st.sampled_from(["eq", "neq", "contains"]), SCALARS),
        st.builds(build, keyed, st.sampled_from(["gt", "gte", "lt", "lte"]), NUMBERS),
        st.builds(build, keyed, st.sampled_from(["exists", "not_exists"]), st.none()),
        st.builds(build, keyed, st.sampled_from(["in", "not_in"]), LISTS),
        st.builds(build, st.just("at"), st.sampled_from(["before", "after"]), VALID_INSTANTS),
    ]
    if clock:  # compare with now: contact properties only (not allowed in where)
        operators.append(
            st.builds(
                build,
                st.just("at"),
                st.sampled_from(["within_past", "within_next"]),
                st.sampled_from(WINDOWS),
            )
        )
        # held_for on any of them, half of the time (contact properties only, like the clock)
        return st.builds(
            lambda leaf, held: leaf if held is None else {**leaf, "held_for": held},
            st.one_of(*operators),
            st.one_of(st.none(), HELD),
        )
    return st.one_of(*operators)


# Bucket references (SPEC §3.5) over two bucket ids; people hold active, left, and left then
# active rows in them (only an active row counts).
REFERENCED = ("ra", "rb")
REFERENCE_LEAVES = st.builds(
    lambda bucket, check: {"type": "bucket", "bucket": bucket, "check": check},
    st.sampled_from(REFERENCED),
    st.sampled_from(["member", "not_member"]),
)
MEMBERSHIPS = st.dictionaries(
    st.sampled_from(REFERENCED), st.sampled_from(["active", "left", "left+active"]), max_size=2
)

STATIC_LEAVES = st.one_of(
    REFERENCE_LEAVES,
    st.just({"type": "everyone"}),
    st.builds(
        lambda percent, salt: {"type": "sample", "percent": percent, "salt": salt},
        st.sampled_from([0.01, 1, 12.5, 33.33, 50, 99.99]),
        st.sampled_from(["s", "bucket-a"]),
    ),
)


@st.composite
def event_leaf(draw: st.DrawFn, *, aged: bool = False) -> dict[str, Any]:
    leaf: dict[str, Any] = {"type": "event", "event": draw(st.sampled_from(EVENT_NAMES))}
    checks = ["exists", "not_exists", "count", "sum", "avg", "min", "max", "last", "regularly"]
    check = draw(st.sampled_from(checks[:-2] if aged else checks))
    if check == "regularly":
        return draw(regular_leaf(leaf["event"]))
    leaf["check"] = check
    if check in ("sum", "avg", "min", "max"):
        leaf["property"] = draw(st.sampled_from(AGGREGATED))
        leaf["operator"] = draw(st.sampled_from(["gt", "gte", "lt", "lte", "eq"]))
        leaf["value"] = draw(AMOUNTS)
    if check == "count":
        operator = draw(st.sampled_from(["gt", "gte", "lt", "lte", "eq"]))
        leaf["operator"] = operator
        leaf["value"] = draw(st.integers(min_value=1 if operator == "lt" else 0, max_value=3))
    within = draw(st.sampled_from((None, *WINDOWS)))
    if within is not None:
        leaf["within"] = within
    if check != "last" and (aged or draw(st.integers(0, 2)) == 0):  # events ageing in
        ages = [age for age in AGES if within is None or age < within]
        if ages:
            leaf["older_than"] = draw(st.sampled_from(ages))
    if draw(st.integers(0, 2)) == 0:
        leaf["where"] = draw(
            st.lists(property_leaf(EVENT_KEYS, EVENT_PATHS, clock=False), min_size=1, max_size=2)
        )
    return leaf


PERIODS = (timedelta(hours=1), timedelta(days=1))


@st.composite
def regular_leaf(draw: st.DrawFn, name: str = "e1") -> dict[str, Any]:
    """``check: regularly`` with a few short periods (events land on their boundaries)."""
    periods = draw(st.integers(1, 4))
    leaf: dict[str, Any] = {
        "type": "event",
        "event": name,
        "check": "regularly",
        "period": draw(st.sampled_from(PERIODS)),
        "periods": periods,
        "min_periods": draw(st.integers(1, periods)),
    }
    if draw(st.booleans()):  # the per-period count, zero-satisfied ones included
        operator = draw(st.sampled_from(["gt", "gte", "lt", "lte", "eq"]))
        leaf["operator"] = operator
        leaf["value"] = draw(st.integers(min_value=1 if operator == "lt" else 0, max_value=2))
    if not draw(st.integers(0, 3)):
        leaf["where"] = [draw(property_leaf(EVENT_KEYS, clock=False))]
    return leaf


@st.composite
def last_leaf(draw: st.DrawFn) -> dict[str, Any]:
    """``check: last`` over events of one name whose ``where`` key is often set, often not."""
    leaf: dict[str, Any] = {"type": "event", "event": "e1", "check": "last"}
    within = draw(st.sampled_from((None, *WINDOWS)))
    if within is not None:
        leaf["within"] = within
    if draw(st.integers(0, 3)):  # about half the events have "kind"
        kind = {"type": "property", "property": "kind", "operator": "eq", "value": "a"}
        leaf["where"] = [draw(st.one_of(st.just(kind), property_leaf(EVENT_KEYS, clock=False)))]
    return leaf


def composite(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        st.builds(
            lambda operator, conditions: {
                "type": "composite",
                "operator": operator,
                "conditions": conditions,
            },
            st.sampled_from(["and", "or"]),
            st.lists(children, min_size=1, max_size=3),
        ),
        st.builds(
            lambda child: {"type": "composite", "operator": "not", "conditions": [child]},
            children,
        ),
    )


# Event leaves twice as likely as the others: they carry the clock.
LEAVES = st.one_of(
    property_leaf(PROPERTY_KEYS, PROPERTY_PATHS), event_leaf(), event_leaf(), STATIC_LEAVES
)
# Depth <= 4: up to three composite levels above the leaves.
TREES = st.one_of(
    LEAVES,
    composite(LEAVES),
    composite(composite(LEAVES)),
    composite(composite(composite(LEAVES))),
    # event leaves alone: the clock's edges (departures, arrivals, equal timestamps) more often
    composite(event_leaf()),
    composite(composite(event_leaf())),
    composite(event_leaf(aged=True)),  # older_than's edges: events at now - D +- 1us
    composite(last_leaf()),  # check last: equal timestamps (ties by ingestion), the future
)

EVENTS = st.builds(
    lambda name, offset, properties: Event(name, NOW - offset, properties),
    st.sampled_from(EVENT_NAMES),
    OFFSETS,
    st.dictionaries(
        st.sampled_from(EVENT_KEYS),
        st.one_of(JSON_VALUES, AMOUNTS, st.fixed_dictionaries({"x": AMOUNTS})),
        max_size=3,
    ),
)
PEOPLE = st.lists(
    st.builds(
        Person,
        st.dictionaries(st.sampled_from(PROPERTY_KEYS), JSON_VALUES, max_size=4),
        st.lists(EVENTS, max_size=5),
        # keys with a recorded change (present or not: a removed key has one), the others
        # taking created_at
        changed=st.dictionaries(st.sampled_from(PROPERTY_KEYS), CHANGE_POINTS, max_size=4),
        created_at=CHANGE_POINTS,
        memberships=MEMBERSHIPS,
    ),
    min_size=1,
    max_size=5,
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(criteria=TREES, people=PEOPLE, subset=st.lists(st.booleans(), min_size=5, max_size=5))
@example(  # the empty-string needle: strpos('', '') = 1 and '' in '' agree
    criteria={"type": "property", "property": "plan", "operator": "contains", "value": ""},
    people=[Person({"plan": ""}), Person({"plan": []})],
    subset=[True] * 5,
)
def test_sql_and_python_agree(
    connection: Connection, criteria: dict[str, Any], people: list[Person], subset: list[bool]
):
    agree(connection, parse_criteria(criteria), people, subset)


# held_for alone, dense at its edges: every leaf holds a key whose changed_at (or the contact's
# created_at, for keys with no record) is mostly exactly now - D or 1us either side.
HELD_EDGES = st.sampled_from(
    [NOW - span + delta for span in WINDOWS for delta in (-US, timedelta(0), US)]
)
HELD_LEAF = st.builds(
    lambda key, operator, held: {
        "type": "property",
        "property": key,
        "operator": operator,
        **({"value": "pro"} if operator in ("eq", "neq") else {}),
        "held_for": held,
    },
    st.sampled_from(["plan", "n", ["plan", "x"]]),
    st.sampled_from(["exists", "not_exists", "eq", "neq"]),
    HELD,
)
HELD_PEOPLE = st.lists(
    st.builds(
        Person,
        st.dictionaries(
            st.sampled_from(["plan", "n"]), st.sampled_from(["pro", "free", None]), max_size=2
        ),
        changed=st.dictionaries(
            st.sampled_from(["plan", "n"]), st.one_of(HELD_EDGES, CHANGE_POINTS), max_size=2
        ),
        created_at=HELD_EDGES,
    ),
    min_size=1,
    max_size=5,
)


# The edge-dense generators below: a quarter of the examples each.
EDGE_SETTINGS = settings(
    max_examples=max(EXAMPLES // 4, 50),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@EDGE_SETTINGS
@given(
    criteria=st.one_of(HELD_LEAF, composite(HELD_LEAF), composite(composite(HELD_LEAF))),
    people=HELD_PEOPLE,
    subset=st.lists(st.booleans(), min_size=5, max_size=5),
)
def test_held_for_executors_agree_at_the_edges(
    connection: Connection, criteria: dict[str, Any], people: list[Person], subset: list[bool]
):
    agree(connection, parse_criteria(criteria), people, subset)


# Bucket references mixed with event and property leaves, denser than in the trees above.
MIXED_WITH_REFERENCES = st.one_of(
    REFERENCE_LEAVES, REFERENCE_LEAVES, event_leaf(), property_leaf(PROPERTY_KEYS)
)


@EDGE_SETTINGS
@given(
    criteria=st.one_of(
        REFERENCE_LEAVES,
        composite(MIXED_WITH_REFERENCES),
        composite(composite(MIXED_WITH_REFERENCES)),
    ),
    people=PEOPLE,
    subset=st.lists(st.booleans(), min_size=5, max_size=5),
)
@example(  # only the active row counts: a left epoch alone is not membership
    criteria={
        "type": "composite",
        "operator": "and",
        "conditions": [
            {"type": "bucket", "bucket": "ra", "check": "member"},
            {"type": "bucket", "bucket": "rb", "check": "not_member"},
        ],
    },
    people=[
        Person(memberships={"ra": "active"}),
        Person(memberships={"ra": "left"}),
        Person(memberships={"ra": "left+active", "rb": "left"}),
        Person(memberships={"ra": "active", "rb": "left+active"}),
        Person(deleted=True, memberships={"ra": "active"}),
    ],
    subset=[True, False, True, False, True],
)
def test_bucket_references_agree(
    connection: Connection, criteria: dict[str, Any], people: list[Person], subset: list[bool]
):
    agree(connection, parse_criteria(criteria), people, subset)


# Few instants, so that events share them: check last's ties (the later ingested wins).
CROWDED = st.lists(
    st.builds(
        lambda offset, kind: Event("e1", NOW - offset, {} if kind is None else {"kind": kind}),
        st.sampled_from([timedelta(0), timedelta(hours=1), -timedelta(hours=1), WINDOWS[1]]),
        st.sampled_from([None, "a", "b"]),
    ),
    max_size=6,
)


@EDGE_SETTINGS
@given(
    criteria=st.one_of(last_leaf(), composite(last_leaf())),
    people=st.lists(st.builds(Person, st.just({}), CROWDED), min_size=1, max_size=4),
    subset=st.lists(st.booleans(), min_size=5, max_size=5),
)
def test_last_breaks_ties_alike(
    connection: Connection, criteria: dict[str, Any], people: list[Person], subset: list[bool]
):
    agree(connection, parse_criteria(criteria), people, subset)


# Events on the periods' boundaries: k periods ago, 1us either side, and in the future.
ON_BOUNDARIES = st.lists(
    st.builds(
        lambda period, k, delta, kind: Event(
            "e1", NOW - k * period + delta, {} if kind is None else {"kind": kind}
        ),
        st.sampled_from(PERIODS),
        st.integers(-1, 5),
        st.sampled_from([-US, timedelta(0), US]),
        st.sampled_from([None, "a"]),
    ),
    max_size=8,
)


@EDGE_SETTINGS
@given(
    criteria=st.one_of(regular_leaf(), composite(regular_leaf())),
    people=st.lists(st.builds(Person, st.just({}), ON_BOUNDARIES), min_size=1, max_size=4),
    subset=st.lists(st.booleans(), min_size=5, max_size=5),
)
def test_regularly_at_period_boundaries(
    connection: Connection, criteria: dict[str, Any], people: list[Person], subset: list[bool]
):
    agree(connection, parse_criteria(criteria), people, subset)


def agree(connection: Connection, node: Any, people: list[Person], subset: list[bool]) -> None:
    """Every executor and every clock form gives the evaluator's answer."""
    savepoint = connection.begin_nested()
    try:
        ids = load(connection, people)
        expected = python_members(node, people, ids, NOW)
        # Shown by --hypothesis-show-statistics: how often the sets are non-trivial.
        event(
            "members: "
            + ("none" if not expected else "all" if len(expected) == len(ids) else "some")
        )
        assert sql_members(connection, node, NOW) == expected
        chosen = [contact_id for contact_id, keep in zip(ids, subset, strict=False) if keep]
        assert sql_members(connection, node, NOW, contact_ids=chosen) == expected & set(chosen)
        middle = (ids[len(ids) // 2], ids[-1])  # a chunk of a set-wide pass
        in_range = {i for i in expected if middle[0] <= i <= middle[1]}
        assert sql_members(connection, node, NOW, id_range=middle) == in_range
        # The forms restricted to known contacts: correlated probes, and capped counts fed to
        # the evaluator (what per-member confirms and the real-time path use).
        assert probe_members(connection, node, NOW, chosen) == expected & set(chosen)
        assert counted_members(connection, node, NOW, ids) == expected
        assert decided_members(connection, node, NOW, ids) == expected
        # The clock (value and next change) agrees across its three executors too.
        clock = python_states(node, people, ids, NOW)
        assert {i for i, state in clock.items() if state.value} == expected
        event("clock: " + ("never" if all(s.next_at is None for s in clock.values()) else "some"))
        assert facts_states(connection, node, NOW, ids) == clock
        assert sql_states(connection, node, NOW) == clock
        assert sql_states(connection, node, NOW, contact_ids=chosen) == {
            i: state for i, state in clock.items() if i in chosen
        }
        assert sql_states(connection, node, NOW, id_range=middle) == {
            i: state for i, state in clock.items() if middle[0] <= i <= middle[1]
        }
    finally:
        savepoint.rollback()


# --- sequences (SPEC §3.4) ------------------------------------------------------------------
# Steps over two names (a name may repeat: [e1, e1]), gaps and windows drawn from a few
# durations, and events on a lattice of instants built from the same durations, so that chains
# land exactly on their bounds: equal timestamps across steps, a step exactly `gap` after the
# previous one, a first event exactly at now - within, an absent step's event exactly at
# ek + gap, and each of these one microsecond either side; events after now too.
SEQUENCE_SPANS = (timedelta(hours=1), timedelta(hours=2), timedelta(days=1))
SEQUENCE_WINDOWS = (None, timedelta(hours=2), timedelta(hours=3), timedelta(days=1))
KINDS = st.sampled_from(["a", "b"])
SEQUENCE_OFFSETS = sorted(
    {
        timedelta(hours=hours) + delta
        for hours in (-2, -1, 0, 1, 2, 3, 4, 24, 25, 26)
        for delta in (-US, timedelta(0), US)
    }
)


@st.composite
def sequence_step(draw: st.DrawFn, *, first: bool, absent: bool) -> dict[str, Any]:
    step: dict[str, Any] = {"event": draw(st.sampled_from(EVENT_NAMES))}
    if not first and (absent or draw(st.booleans())):
        step["gap"] = draw(st.sampled_from(SEQUENCE_SPANS))
    if absent:
        step["absent"] = True
    if draw(st.integers(0, 3)) == 0:
        step["where"] = [
            {"type": "property", "property": "kind", "operator": "eq", "value": draw(KINDS)}
        ]
    return step


@st.composite
def sequence_leaf(draw: st.DrawFn) -> dict[str, Any]:
    length = draw(st.integers(2, 3))
    absent = draw(st.booleans())
    steps = [
        draw(sequence_step(first=index == 0, absent=absent and index == length - 1))
        for index in range(length)
    ]
    node: dict[str, Any] = {"type": "sequence", "steps": steps}
    within = draw(st.sampled_from(SEQUENCE_WINDOWS))
    if within is not None and not (absent and steps[-1]["gap"] > within):
        node["within"] = within
    return node


SEQUENCE_EVENTS = st.builds(
    lambda name, offset, kind: Event(name, NOW - offset, {} if kind is None else {"kind": kind}),
    st.sampled_from(EVENT_NAMES),
    st.sampled_from(SEQUENCE_OFFSETS),
    st.one_of(st.none(), KINDS),
)
SEQUENCE_PEOPLE = st.lists(
    st.builds(
        Person,
        st.dictionaries(st.sampled_from(PROPERTY_KEYS), JSON_VALUES, max_size=2),
        st.lists(SEQUENCE_EVENTS, max_size=8),
    ),
    min_size=1,
    max_size=5,
)
SEQUENCE_TREES = st.one_of(
    sequence_leaf(),
    sequence_leaf(),
    composite(st.one_of(sequence_leaf(), event_leaf())),
    composite(composite(st.one_of(sequence_leaf(), LEAVES))),
)


def chains_by_brute_force(node: Any, events: list[Event], now: datetime) -> bool:
    """SPEC §3.4 read literally: try every choice of events for the steps."""
    from itertools import product

    from buckets.criteria.sequences import step_matches

    present, absent = node.present, node.absent
    choices = [[e for e in events if step_matches(step, e)] for step in present]
    for chain in product(*choices):
        times = [e.occurred_at for e in chain]
        if any(t > now for t in times):
            continue
        if node.within is not None and times[0] < now - node.within:
            continue
        if any(
            later <= earlier or (step.gap is not None and later - earlier > step.gap)
            for earlier, later, step in zip(times, times[1:], present[1:], strict=False)
        ):
            continue
        if absent is not None:
            end = times[-1] + absent.gap
            if end > now or any(
                times[-1] < e.occurred_at <= end for e in events if step_matches(absent, e)
            ):
                continue
        return True
    return False


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    criteria=SEQUENCE_TREES,
    people=SEQUENCE_PEOPLE,
    subset=st.lists(st.booleans(), min_size=5, max_size=5),
)
def test_sequences_agree(
    connection: Connection, criteria: dict[str, Any], people: list[Person], subset: list[bool]
):
    node = parse_criteria(criteria)
    from buckets.criteria.model import EventSequence, leaves
    from buckets.criteria.sequences import chains_of

    for leaf in leaves(node):
        if isinstance(leaf, EventSequence):
            for person in people:
                expected = chains_by_brute_force(leaf, list(person.events), NOW)
                event(f"sequence: {expected}")
                assert chains_of(leaf, person.events, NOW).value == expected
    agree(connection, node, people, subset)
