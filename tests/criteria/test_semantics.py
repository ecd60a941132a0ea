"""Every operator and corner of SPEC §3.2, checked on both executors with the same table.

Each case is (criteria, one contact, expected): the Python evaluator and the compiled SQL (on
a real PostgreSQL) must both give ``expected``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.engine import Connection

from buckets.criteria import Event, b, member_select, parse_criteria
from tests.criteria.support import (
    NOW,
    Person,
    counted_members,
    load,
    probe_members,
    python_members,
    sql_members,
    sql_states,
)

US = timedelta(microseconds=1)
H = timedelta(hours=1)
D = timedelta(days=1)


def prop(key: str, operator: str, *value: Any) -> dict[str, Any]:
    leaf: dict[str, Any] = {"type": "property", "property": key, "operator": operator}
    if value:
        leaf["value"] = value[0]
    return leaf


def ev(name: str, ago: timedelta = H, **properties: Any) -> Event:
    return Event(name, NOW - ago, properties)


CASES: list[tuple[str, dict[str, Any], Person, bool]] = [
    # --- eq: same JSON type and equal ---
    ("eq string", prop("plan", "eq", "pro"), Person({"plan": "pro"}), True),
    ("eq string other", prop("plan", "eq", "pro"), Person({"plan": "free"}), False),
    ("eq is case-sensitive", prop("plan", "eq", "pro"), Person({"plan": "Pro"}), False),
    ("eq number vs numeric string", prop("n", "eq", 5), Person({"n": "5"}), False),
    ("eq string vs number", prop("n", "eq", "5"), Person({"n": 5}), False),
    ("eq bool is not 1", prop("flag", "eq", 1), Person({"flag": True}), False),
    ("eq 1 is not true", prop("flag", "eq", True), Person({"flag": 1}), False),
    ("eq false is not 0", prop("flag", "eq", 0), Person({"flag": False}), False),
    ("eq bool", prop("flag", "eq", False), Person({"flag": False}), True),
    ("eq int equals float", prop("n", "eq", 1), Person({"n": 1.0}), True),
    ("eq float equals int", prop("n", "eq", 2.0), Person({"n": 2}), True),
    ("eq null matches null", prop("k", "eq", None), Person({"k": None}), True),
    ("eq null needs the key", prop("k", "eq", None), Person({}), False),
    ("eq missing key", prop("k", "eq", "x"), Person({}), False),
    ("eq array property vs scalar", prop("k", "eq", "a"), Person({"k": ["a"]}), False),
    ("eq big ints exactly", prop("n", "eq", 2**63 + 1), Person({"n": 2**63 + 1}), True),
    ("eq big ints differ by one", prop("n", "eq", 2**63 + 1), Person({"n": 2**63}), False),
    ("eq key with a dot is literal", prop("a.b", "eq", 1), Person({"a.b": 1}), True),
    ("eq dot key is not a path", prop("a.b", "eq", 1), Person({"a": {"b": 1}}), False),
    ("eq unicode", prop("city", "eq", "Zürich"), Person({"city": "Zürich"}), True),
    # --- neq: not eq; a missing key satisfies it ---
    ("neq missing key", prop("plan", "neq", "pro"), Person({}), True),
    ("neq equal", prop("plan", "neq", "pro"), Person({"plan": "pro"}), False),
    ("neq other value", prop("plan", "neq", "pro"), Person({"plan": "free"}), True),
    ("neq null vs string", prop("plan", "neq", "pro"), Person({"plan": None}), True),
    ("neq null vs null", prop("plan", "neq", None), Person({"plan": None}), False),
    ("neq bool vs 1", prop("flag", "neq", 1), Person({"flag": True}), True),
    ("neq int vs float", prop("n", "neq", 1), Person({"n": 1.0}), False),
    # --- gt gte lt lte: numbers only ---
    ("gt", prop("n", "gt", 5), Person({"n": 6}), True),
    ("gt equal", prop("n", "gt", 5), Person({"n": 5}), False),
    ("gte equal", prop("n", "gte", 5), Person({"n": 5}), True),
    ("gte float vs int", prop("n", "gte", 5), Person({"n": 5.0}), True),
    ("lt", prop("n", "lt", 5), Person({"n": 4.5}), True),
    ("lt equal", prop("n", "lt", 5), Person({"n": 5}), False),
    ("lte equal", prop("n", "lte", 5.5), Person({"n": 5.5}), True),
    ("lte negative", prop("n", "lte", -1), Person({"n": -3}), True),
    ("gt numeric string never", prop("n", "gt", 5), Person({"n": "10"}), False),
    ("gt bool never", prop("flag", "gte", 0), Person({"flag": True}), False),
    ("gt null never", prop("n", "gt", 0), Person({"n": None}), False),
    ("gt missing never", prop("n", "lt", 0), Person({}), False),
    ("lt array never", prop("n", "lt", 10), Person({"n": [1]}), False),
    ("gt big int exact", prop("n", "gt", 2**53), Person({"n": 2**53 + 1}), True),
    ("gt float fraction", prop("n", "gt", 0.1), Person({"n": 0.1}), False),
    ("gte float fraction", prop("n", "gte", 0.1), Person({"n": 0.1}), True),
    ("gt tiny difference", prop("n", "gt", 0.3), Person({"n": 0.1 + 0.2}), True),
    # --- contains ---
    ("contains substring", prop("bio", "contains", "lo w"), Person({"bio": "hello world"}), True),
    ("contains case-sensitive", prop("bio", "contains", "h"), Person({"bio": "Hello"}), False),
    ("contains empty string", prop("bio", "contains", ""), Person({"bio": "abc"}), True),
    ("contains non-string in string", prop("bio", "contains", 1), Person({"bio": "123"}), False),
    ("contains array element", prop("tags", "contains", "a"), Person({"tags": ["b", "a"]}), True),
    ("contains array no element", prop("tags", "contains", "c"), Person({"tags": ["a"]}), False),
    ("contains array substring no", prop("tags", "contains", "a"), Person({"tags": ["ab"]}), False),
    ("contains array int vs float", prop("tags", "contains", 1.0), Person({"tags": [1, 2]}), True),
    ("contains array bool vs 1", prop("tags", "contains", 1), Person({"tags": [True]}), False),
    ("contains array 1 vs bool", prop("tags", "contains", True), Person({"tags": [1]}), False),
    ("contains array string vs num", prop("tags", "contains", 1), Person({"tags": ["1"]}), False),
    ("contains nested array no", prop("tags", "contains", 1), Person({"tags": [[1]]}), False),
    ("contains array null", prop("tags", "contains", None), Person({"tags": [None]}), True),
    ("contains empty array", prop("tags", "contains", ""), Person({"tags": []}), False),
    ("contains number property", prop("n", "contains", 1), Person({"n": 123}), False),
    ("contains object property", prop("o", "contains", "a"), Person({"o": {"a": 1}}), False),
    ("contains missing", prop("bio", "contains", "a"), Person({}), False),
    # --- exists / not_exists: present and not null ---
    ("exists present", prop("k", "exists"), Person({"k": 0}), True),
    ("exists false is present", prop("k", "exists"), Person({"k": False}), True),
    ("exists empty string", prop("k", "exists"), Person({"k": ""}), True),
    ("exists null", prop("k", "exists"), Person({"k": None}), False),
    ("exists missing", prop("k", "exists"), Person({}), False),
    ("not_exists null", prop("k", "not_exists"), Person({"k": None}), True),
    ("not_exists missing", prop("k", "not_exists"), Person({}), True),
    ("not_exists present", prop("k", "not_exists"), Person({"k": []}), False),
    # --- events ---
    ("event exists", b.event("buy").exists(), Person({}, [ev("buy")]), True),
    ("event exists other name", b.event("buy").exists(), Person({}, [ev("view")]), False),
    ("event not_exists no events", b.event("buy").not_exists(), Person(), True),
    ("event count lt, no events", b.event("buy").less_than(3), Person(), True),
    ("event count eq 0", b.event("buy").exactly(0), Person({}, [ev("view")]), True),
    ("count gte", b.event("buy").at_least(2), Person({}, [ev("buy"), ev("buy", 2 * H)]), True),
    ("count gte short", b.event("buy").at_least(3), Person({}, [ev("buy"), ev("buy")]), False),
    ("count gt", b.event("buy").more_than(1), Person({}, [ev("buy"), ev("buy")]), True),
    ("count lte", b.event("buy").at_most(1), Person({}, [ev("buy"), ev("buy")]), False),
    ("count eq", b.event("buy").exactly(2), Person({}, [ev("buy"), ev("buy")]), True),
    ("event at now counts", b.event("buy").exists(), Person({}, [ev("buy", timedelta(0))]), True),
    ("event after now ignored", b.event("buy").exists(), Person({}, [ev("buy", -US)]), False),
    (
        "events after now do not count",
        b.event("buy").at_most(1),
        Person({}, [ev("buy"), ev("buy", -H), ev("buy", -2 * H)]),
        True,
    ),
    (
        "window start is inclusive",
        b.event("buy").within("1d").exists(),
        Person({}, [ev("buy", timedelta(days=1))]),
        True,
    ),
    (
        "window start minus 1us is out",
        b.event("buy").within("1d").exists(),
        Person({}, [ev("buy", timedelta(days=1) + US)]),
        False,
    ),
    (
        "window: future event ignored",
        b.event("buy").within("1d").exists(),
        Person({}, [ev("buy", -US)]),
        False,
    ),
    (
        "windowed not_exists, only old events",
        b.event("buy").within("7d").not_exists(),
        Person({}, [ev("buy", timedelta(days=8))]),
        True,
    ),
    (
        "lapsed pair, lapsed",
        b.all(b.event("use").exists(), b.event("use").within("7d").not_exists()),
        Person({}, [ev("use", timedelta(days=9)), ev("use", timedelta(days=30))]),
        True,
    ),
    (
        "lapsed pair, active",
        b.all(b.event("use").exists(), b.event("use").within("7d").not_exists()),
        Person({}, [ev("use", timedelta(days=9)), ev("use", timedelta(days=6))]),
        False,
    ),
    (
        "lapsed pair, never",
        b.all(b.event("use").exists(), b.event("use").within("7d").not_exists()),
        Person(),
        False,
    ),
    (
        "two windows on one name",
        b.all(b.event("use").within("30d").at_least(2), b.event("use").within("1d").exists()),
        Person({}, [ev("use", timedelta(days=20)), ev("use", H)]),
        True,
    ),
    (
        "two windows on one name, short window empty",
        b.all(b.event("use").within("30d").at_least(2), b.event("use").within("1d").exists()),
        Person({}, [ev("use", timedelta(days=20)), ev("use", timedelta(days=2))]),
        False,
    ),
    # --- where on the event's own properties ---
    (
        "where gte",
        b.event("buy").where(b.prop("amount").gte(50)).exists(),
        Person({}, [ev("buy", amount=49), ev("buy", amount=50)]),
        True,
    ),
    (
        "where filters all out",
        b.event("buy").where(b.prop("amount").gte(50)).exists(),
        Person({}, [ev("buy", amount=49), ev("buy", amount="60"), ev("buy")]),
        False,
    ),
    (
        "where is on event properties, not contact properties",
        b.event("buy").where(b.prop("plan").eq("pro")).exists(),
        Person({"plan": "pro"}, [ev("buy")]),
        False,
    ),
    (
        "where: all conditions must hold",
        b.event("buy").where(b.prop("amount").gte(50), b.prop("currency").eq("EUR")).at_least(1),
        Person({}, [ev("buy", amount=60, currency="USD"), ev("buy", amount=10, currency="EUR")]),
        False,
    ),
    (
        "where and window together",
        b.event("buy").within("1d").where(b.prop("amount").gt(0)).exactly(1),
        Person({}, [ev("buy", amount=1), ev("buy", timedelta(days=2), amount=1), ev("buy")]),
        True,
    ),
    (
        "same name, different wheres",
        b.all(
            b.event("buy").where(b.prop("currency").eq("EUR")).exists(),
            b.event("buy").where(b.prop("currency").eq("USD")).not_exists(),
        ),
        Person({}, [ev("buy", currency="EUR")]),
        True,
    ),
    # --- older_than (SPEC §3.4): occurred_at < now - D, with within: >= now - within ---
    (
        "older_than: at now - D",
        b.event("x").older_than("1d").exists(),
        Person({}, [ev("x", D)]),
        False,
    ),
    (
        "older_than: 1us before",
        b.event("x").older_than("1d").exists(),
        Person({}, [ev("x", D + US)]),
        True,
    ),
    ("older_than: recent", b.event("x").older_than("1d").not_exists(), Person({}, [ev("x")]), True),
    (
        "older_than and within: at now - within",
        b.event("x").within("7d").older_than("1d").exists(),
        Person({}, [ev("x", 7 * D)]),
        True,
    ),
    (
        "older_than and within: 1us before the window",
        b.event("x").within("7d").older_than("1d").exists(),
        Person({}, [ev("x", 7 * D + US), ev("x", D)]),
        False,
    ),
    (
        "older_than count",
        b.event("x").older_than("1h").exactly(2),
        Person({}, [ev("x", H + US), ev("x", 2 * D), ev("x", H), ev("x", -H)]),
        True,
    ),
    (
        "older_than sum",
        b.event("x").within("7d").older_than("1d").sum("amount").eq(3),
        Person({}, [ev("x", 2 * D, amount=1), ev("x", 3 * D, amount=2), ev("x", H, amount=4)]),
        True,
    ),
    (
        "first time in the last 7 days",
        b.all(b.event("x").within("7d").exists(), b.event("x").older_than("7d").not_exists()),
        Person({}, [ev("x", 7 * D), ev("x", H)]),
        True,
    ),
    (
        "not the first time in the last 7 days",
        b.all(b.event("x").within("7d").exists(), b.event("x").older_than("7d").not_exists()),
        Person({}, [ev("x", 7 * D + US), ev("x", H)]),
        False,
    ),
    # --- check last (SPEC §3.4): the most recent event counting by time satisfies where ---
    ("last: none", b.event("x").last(), Person({}, [ev("y")]), False),
    ("last: any", b.event("x").last(), Person({}, [ev("x", 9 * D)]), True),
    (
        "last: the newest decides",
        b.event("p").where(b.prop("to").eq("pro")).last(),
        Person({}, [ev("p", H, to="free"), ev("p", 2 * H, to="pro")]),
        False,
    ),
    (
        "last: where does not choose the events",
        b.event("p").where(b.prop("to").eq("pro")).last(),
        Person({}, [ev("p", 2 * H, to="free"), ev("p", H, to="pro")]),
        True,
    ),
    (
        "last: a future event is not last yet",
        b.event("p").where(b.prop("to").eq("pro")).last(),
        Person({}, [ev("p", -US, to="free"), ev("p", timedelta(0), to="pro")]),
        True,
    ),
    (
        "last: equal instants, the later ingested",
        b.event("p").where(b.prop("to").eq("pro")).last(),
        Person({}, [ev("p", H, to="pro"), ev("p", H, to="free")]),
        False,
    ),
    (
        "last: equal instants, the later ingested holds",
        b.event("p").where(b.prop("to").eq("pro")).last(),
        Person({}, [ev("p", H, to="free"), ev("p", H, to="pro")]),
        True,
    ),
    (
        "last: within, at the window's edge",
        b.event("p").within("1d").where(b.prop("to").eq("pro")).last(),
        Person({}, [ev("p", D, to="pro"), ev("p", 2 * D, to="free")]),
        True,
    ),
    (
        "last: within, out of the window",
        b.event("p").within("1d").last(),
        Person({}, [ev("p", D + US)]),
        False,
    ),
    # --- check regularly (SPEC §3.4): period i covers (now - (i+1)·P, now - i·P] ---
    (
        "regularly: 2 of 3 days",
        b.event("x").regularly("1d", 3, 2),
        Person({}, [ev("x", H), ev("x", 2 * D + H)]),
        True,
    ),
    (
        "regularly: two events in one period count once",
        b.event("x").regularly("1d", 3, 2),
        Person({}, [ev("x", H), ev("x", 2 * H)]),
        False,
    ),
    (
        "regularly: now - P is in period 1",
        b.event("x").regularly("1d", 2, 2),
        Person({}, [ev("x", D), ev("x", D - US)]),
        True,
    ),
    (
        "regularly: now - P and 1us before share period 1",
        b.event("x").regularly("1d", 2, 2),
        Person({}, [ev("x", D), ev("x", D + US)]),
        False,
    ),
    (
        "regularly: now - K·P is out",
        b.event("x").regularly("1d", 2, 2),
        Person({}, [ev("x", D + US), ev("x", 2 * D)]),
        False,
    ),
    (
        "regularly: 1us inside the last period",
        b.event("x").regularly("1d", 2, 2),
        Person({}, [ev("x", H), ev("x", 2 * D - US)]),
        True,
    ),
    (
        "regularly: a future event is not counted",
        b.event("x").regularly("1d", 1, 1),
        Person({}, [ev("x", -US)]),
        False,
    ),
    (
        "regularly: count per period",
        b.event("x").regularly("1d", 2, 2, "gte", 2),
        Person({}, [ev("x", H), ev("x", 2 * H), ev("x", D + H), ev("x", D + 2 * H)]),
        True,
    ),
    (
        "regularly: empty periods satisfy eq 0",
        b.event("x").regularly("1d", 3, 3, "eq", 0),
        Person({}, [ev("y")]),
        True,
    ),
    (
        "regularly: where filters the events",
        b.event("x").where(b.prop("k").eq(1)).regularly("1h", 2, 2),
        Person({}, [ev("x", timedelta(minutes=5), k=1), ev("x", 90 * timedelta(minutes=1))]),
        False,
    ),
    # --- composites ---
    (
        "and",
        b.all(b.prop("plan").eq("pro"), b.event("use").at_least(1)),
        Person({"plan": "pro"}, [ev("use")]),
        True,
    ),
    (
        "and one false",
        b.all(b.prop("plan").eq("pro"), b.event("use").at_least(1)),
        Person({"plan": "pro"}),
        False,
    ),
    (
        "or",
        b.any(b.prop("country").eq("DE"), b.prop("country").eq("FR")),
        Person({"country": "FR"}),
        True,
    ),
    (
        "or none",
        b.any(b.prop("country").eq("DE"), b.event("x").exists()),
        Person({"country": "US"}),
        False,
    ),
    (
        "or with a zero-satisfied event branch",
        b.any(b.prop("country").eq("DE"), b.event("x").not_exists()),
        Person({"country": "US"}),
        True,
    ),
    (
        "nested",
        b.all(
            b.prop("plan").eq("pro"),
            b.event("feature.used").within("14d").at_least(2),
            b.any(b.prop("country").eq("DE"), b.prop("country").eq("FR")),
        ),
        Person({"plan": "pro", "country": "DE"}, [ev("feature.used"), ev("feature.used")]),
        True,
    ),
]


@pytest.mark.parametrize(
    ("criteria", "person", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_both_executors_agree_with_the_spec(
    connection: Connection, criteria: dict[str, Any], person: Person, expected: bool
):
    node = parse_criteria(criteria)
    ids = load(connection, [person])
    wanted = {ids[0]} if expected else set()
    assert python_members(node, [person], ids, NOW) == wanted
    assert sql_members(connection, node, NOW) == wanted
    assert probe_members(connection, node, NOW, ids) == wanted
    assert counted_members(connection, node, NOW, ids) == wanted
    assert sql_states(connection, node, NOW)[ids[0]].value is expected


def test_deleted_contacts_never_match_in_sql(connection: Connection):
    node = parse_criteria(b.prop("plan").eq("pro"))
    people = [Person({"plan": "pro"}), Person({"plan": "pro"}, deleted=True)]
    ids = load(connection, people)
    assert sql_members(connection, node, NOW) == {ids[0]}


def test_restricting_to_contact_ids_examines_only_those(connection: Connection):
    node = parse_criteria(b.any(b.event("use").within("7d").at_least(2), b.prop("plan").eq("pro")))
    people = [
        Person({"plan": "pro"}),
        Person({}, [ev("use"), ev("use")]),
        Person({}, [ev("use")]),
        Person({"plan": "pro"}, [ev("use"), ev("use")]),
    ]
    ids = load(connection, people)
    assert sql_members(connection, node, NOW) == {ids[0], ids[1], ids[3]}
    assert sql_members(connection, node, NOW, contact_ids=[ids[1], ids[2]]) == {ids[1]}
    assert sql_members(connection, node, NOW, contact_ids=[]) == set()


def test_now_is_a_parameter_not_the_database_clock(connection: Connection):
    """The same data, asked as of two instants: the window moves with `now`, nothing else."""
    node = parse_criteria(b.event("use").within("7d").not_exists())
    people = [Person({}, [ev("use", timedelta(days=3))])]
    ids = load(connection, people)
    assert sql_members(connection, node, NOW) == set()
    assert sql_members(connection, node, NOW + timedelta(days=4, microseconds=1)) == {ids[0]}
    assert sql_members(connection, node, NOW - timedelta(days=3, microseconds=1)) == {ids[0]}


def test_naive_now_is_refused():
    node = parse_criteria(b.prop("plan").eq("pro"))
    with pytest.raises(ValueError, match="timezone-aware"):
        member_select(node, NOW.replace(tzinfo=None))


@pytest.mark.parametrize(
    ("criteria", "inner"),
    [
        (b.event("buy").within("30d").sum("amount").gte(500), True),  # sum of nothing: 0 fails
        (b.event("buy").within("30d").sum("amount").lt(500), False),  # 0 < 500 holds
        (b.event("buy").within("30d").less_than(2), False),
        (b.all(b.prop("plan").eq("pro"), b.event("buy").sum("amount").gte(1)), True),
        (b.any(b.prop("plan").eq("pro"), b.event("buy").sum("amount").gte(1)), False),
        (b.not_(b.event("buy").sum("amount").lte(0)), True),  # not(0 <= 0)
        (b.not_(b.event("buy").max("amount").gte(5)), False),  # not(max of nothing fails)
    ],
)
def test_an_aggregate_no_contact_without_events_can_satisfy_is_inner_joined(
    connection: Connection, criteria: Any, inner: bool
):
    """The planner cannot see through ``coalesce(sum, 0) >= 500`` that a contact without
    purchases never matches: the compiler joins such an aggregate with an inner join (and
    keeps the left join wherever a contact without events can match). Same answers both ways."""
    node = parse_criteria(criteria)
    sql = str(member_select(node, NOW).compile())
    assert ("LEFT OUTER JOIN" not in sql) is inner
    people = [
        Person({"plan": "pro"}),
        Person({}, [ev("buy", amount=700)]),
        Person({"plan": "pro"}, [ev("buy", amount=0)]),
        Person({}, [ev("buy", timedelta(days=40), amount=900)]),
    ]
    ids = load(connection, people)
    assert sql_members(connection, node, NOW) == python_members(node, people, ids, NOW)


@pytest.mark.parametrize(
    ("criteria", "anti"),
    [
        (b.event("buy").not_exists(), True),
        (b.all(b.prop("plan").eq("pro"), b.event("buy").within("7d").not_exists()), True),
        # the name is aggregated for the other leaf anyway: its zeros come with that pass
        (b.all(b.event("buy").exists(), b.event("buy").within("7d").not_exists()), False),
        (b.any(b.prop("plan").eq("pro"), b.event("buy").not_exists()), False),  # not a conjunct
        (b.not_(b.event("buy").not_exists()), False),
    ],
)
def test_an_absence_conjunct_is_an_anti_join(connection: Connection, criteria: Any, anti: bool):
    """``never bought`` as NOT EXISTS (planned as an anti-join) instead of counting every
    contact's events to keep the zeros; the answers are the same either way."""
    node = parse_criteria(criteria)
    sql = str(member_select(node, NOW).compile())
    assert ("NOT (EXISTS" in sql and "GROUP BY" not in sql) is anti
    people = [
        Person({"plan": "pro"}),
        Person({"plan": "pro"}, [ev("buy", timedelta(days=10))]),
        Person({}, [ev("buy")]),
    ]
    ids = load(connection, people)
    assert sql_members(connection, node, NOW) == python_members(node, people, ids, NOW)
