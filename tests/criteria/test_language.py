"""The criteria language, part 2 (SPEC §3.4): nodes, operators, validation, builder, fingerprint.

No database needed here; the executors are compared by ``test_differential.py``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.engine import Connection

from buckets import DefinitionError, b, define_bucket, load_definitions
from buckets.criteria import Event, evaluate, in_memory_counter
from buckets.criteria.compile import _prefixes_between
from buckets.criteria.evaluate import MISSING, lookup
from buckets.criteria.held import ContactProperties
from buckets.criteria.instants import instant_sql, parse_instant
from buckets.criteria.model import Sample
from buckets.registry import Registry

# --- existing definitions keep their hash (pinned before part 2 changed the model) -----------


def test_part_one_fingerprints_are_pinned():
    """Hashes computed with the code before part 2: upgrading must redeploy nothing."""
    before = {
        "34892e05643034f6295c5beb590e9fe0dc32183f112f1da236bcf588b96e1c9b": b.prop("a.b").exists(),
        "7995cd2a1f8eddacc62a0d3d91a9bfce942c59194961cb99726da5ff7151058c": b.all(
            b.prop("p").not_exists(),
            b.event("e").where(b.prop("k").eq(None)).within("1h").exactly(2),
        ),
        "632829264bbb329326496f888a1038e183a7e7b747a749dc6fa7d2a40e886ab2": b.any(
            b.prop("n").gte(2**63 + 1),
            b.prop("t").neq(""),
            b.event("x").within("7d").less_than(3),
        ),
    }
    for fingerprint, criteria in before.items():
        assert define_bucket(id="x", criteria=criteria).fingerprint == fingerprint


# --- static nodes and operators: paths, in / not_in, not, everyone, sample ---------------------

SLICE_ONE_FORMS = [
    (
        b.prop(["address", "country"]).in_(["DE", "FR"]),
        {
            "type": "property",
            "property": ["address", "country"],
            "operator": "in",
            "value": ["DE", "FR"],
        },
    ),
    (
        b.prop("plan").not_in(["free", 0, True]),
        {"type": "property", "property": "plan", "operator": "not_in", "value": ["free", 0, True]},
    ),
    (
        b.not_(b.event("purchase").exists()),
        {
            "type": "composite",
            "operator": "not",
            "conditions": [{"type": "event", "event": "purchase", "check": "exists"}],
        },
    ),
    (b.everyone(), {"type": "everyone"}),
    (b.sample(12.5), {"type": "sample", "percent": 12.5}),
    (b.sample(10, salt="ab-test-1"), {"type": "sample", "percent": 10, "salt": "ab-test-1"}),
    (
        b.event("order").where(b.prop(["meta", "src"]).eq("app")).exists(),
        {
            "type": "event",
            "event": "order",
            "check": "exists",
            "where": [
                {"type": "property", "property": ["meta", "src"], "operator": "eq", "value": "app"}
            ],
        },
    ),
]


@pytest.mark.parametrize(("built", "literal"), SLICE_ONE_FORMS)
def test_builder_is_the_literal_form(built, literal):
    assert built == literal
    assert (
        define_bucket(id="x", criteria=built).fingerprint
        == define_bucket(id="x", criteria=literal).fingerprint
    )


def test_file_forms_load_the_same_buckets(tmp_path: Path):
    yaml_file = tmp_path / "b.yaml"
    yaml_file.write_text(
        """
buckets:
  - id: eu
    criteria:
      {type: property, property: [address, country], operator: in, value: [DE, FR]}
  - id: never-bought
    criteria:
      type: composite
      operator: not
      conditions: [{type: event, event: purchase, check: exists}]
  - id: holdout
    criteria: {type: sample, percent: 12.5}
  - id: all
    criteria: {type: everyone}
"""
    )
    json_file = tmp_path / "b.json"
    json_file.write_text(
        json.dumps(
            {
                "buckets": [
                    {"id": "eu", "criteria": SLICE_ONE_FORMS[0][1]},
                    {"id": "never-bought", "criteria": SLICE_ONE_FORMS[2][1]},
                    {"id": "holdout", "criteria": SLICE_ONE_FORMS[4][1]},
                    {"id": "all", "criteria": {"type": "everyone"}},
                ]
            }
        )
    )
    from_yaml = {bucket.id: bucket.fingerprint for bucket in load_definitions(yaml_file)}
    from_json = {bucket.id: bucket.fingerprint for bucket in load_definitions(json_file)}
    assert from_yaml == from_json
    built = {
        "eu": SLICE_ONE_FORMS[0][0],
        "never-bought": SLICE_ONE_FORMS[2][0],
        "holdout": SLICE_ONE_FORMS[4][0],
        "all": b.everyone(),
    }
    assert from_yaml == {k: define_bucket(id=k, criteria=v).fingerprint for k, v in built.items()}


def test_fingerprints_of_the_new_forms():
    # a one-key path is that key: same meaning, same hash
    assert (
        define_bucket(id="x", criteria=b.prop(["plan"]).eq("pro")).fingerprint
        == define_bucket(id="x", criteria=b.prop("plan").eq("pro")).fingerprint
    )
    # a path is not the dotted key
    assert (
        define_bucket(id="x", criteria=b.prop(["a", "b"]).exists()).fingerprint
        != define_bucket(id="x", criteria=b.prop("a.b").exists()).fingerprint
    )
    # the default salt is the bucket id: written into the tree, so into the hash
    one = define_bucket(id="one", criteria=b.sample(10))
    two = define_bucket(id="two", criteria=b.sample(10))
    assert one.fingerprint != two.fingerprint
    assert one.fingerprint == define_bucket(id="x", criteria=b.sample(10, salt="one")).fingerprint
    assert one.criteria == define_bucket(id="one", criteria=b.sample(10, salt="one")).criteria


INVALID = [
    (b.prop("c").in_([]), "x: criteria.value: operator 'in' needs a non-empty list"),
    (b.prop("c").not_in(["a", None]), "x: criteria.value[1]: null is not allowed in a list"),
    (b.prop("c").in_("DE"), "x: criteria.value: operator 'in' needs a list, got str"),
    (b.prop("c").in_([{"a": 1}]), "x: criteria.value[0]: must be a string, number or boolean"),
    (b.prop("c").in_([[1]]), "x: criteria.value[0]: must be a string, number or boolean"),
    (b.prop("c").in_([float("nan")]), "x: criteria.value[0]: must be a finite number"),
    (b.prop("c").in_(list(range(1001))), "x: criteria.value: a list has at most 1,000 values"),
    (
        b.all(b.prop("a").exists(), b.prop("c").in_(["a", "b\x00"])),
        "x: criteria.conditions[1].value[1]: contains a NUL character",
    ),
    (b.prop([]).exists(), "x: criteria.property: a path needs at least one key"),
    (b.prop(["a", ""]).exists(), "x: criteria.property: keys must not be empty"),
    (b.prop(["k"] * 17).exists(), "x: criteria.property: a path has at most 16 keys"),
    (
        {"type": "composite", "operator": "not", "conditions": [b.everyone(), b.everyone()]},
        "x: criteria.conditions: 'not' takes exactly one condition, got 2",
    ),
    (
        {"type": "composite", "operator": "not", "conditions": []},
        "x: criteria.conditions: must not be empty",
    ),
    ({"type": "everyone", "percent": 3}, "x: criteria.percent: unknown key"),
    (b.sample(0), "x: criteria.percent: must be between 0 and 100 (exclusive), got 0"),
    (b.sample(100), "x: criteria.percent: must be between 0 and 100 (exclusive), got 100"),
    (b.sample(-5), "x: criteria.percent: must be between 0 and 100"),
    (b.sample(12.345), "x: criteria.percent: at most two decimals, got 12.345"),
    (b.sample(float("inf")), "x: criteria.percent: must be between 0 and 100"),
    ({"type": "sample", "percent": "10"}, "x: criteria.percent: must be a number, got str"),
    ({"type": "sample", "percent": True}, "x: criteria.percent: must be a number, got bool"),
    ({"type": "sample"}, "x: criteria.percent: required"),
    (b.sample(10, salt="s" * 201), "x: criteria.salt: at most 200 characters"),
    (
        b.event("e").where(b.prop(["m", ""]).eq(1)).exists(),
        "x: criteria.where[0].property: keys must not be empty",
    ),
]


@pytest.mark.parametrize(
    ("criteria", "on_creation", "cron_joins"),
    [
        (b.event("purchase").not_exists(), True, False),  # never purchased
        (b.not_(b.event("purchase").exists()), True, False),
        (b.not_(b.event("used").within("7d").exists()), True, True),  # ages out: cron joins
        (b.not_(b.event("used").within("7d").less_than(2)), False, False),
        (b.not_(b.not_(b.event("used").within("7d").not_exists())), True, True),
        (b.everyone(), True, False),
        (b.sample(5), True, False),  # depends on the external id
        (b.all(b.sample(5), b.prop("plan").eq("pro")), False, False),
        (b.any(b.sample(5), b.prop("plan").eq("pro")), True, False),
        (b.prop(["address", "country"]).not_in(["DE"]), True, False),
        (b.prop(["address", "country"]).in_(["DE"]), False, False),
    ],
)
def test_which_buckets_new_contacts_and_the_clock_decide(criteria, on_creation, cron_joins):
    bucket = define_bucket(id="x", criteria=criteria)
    assert bucket.matches_new_contacts is on_creation
    assert bucket.cron_joins is cron_joins


def test_paths_index_their_top_level_key():
    bucket = define_bucket(
        id="x",
        criteria=b.all(
            b.prop(["address", "country"]).in_(["DE"]),
            b.event("e").where(b.prop(["meta", "k"]).eq(1)).exists(),
        ),
    )
    assert bucket.property_keys == {"address"}  # event ``where`` keys are not contact keys
    registry = Registry([bucket])
    assert registry.affected(None, ["address"]) == [bucket]
    assert registry.affected(None, ["meta"]) == []


def test_samples_are_deterministic_and_proportionate():
    node = Sample(percent=10, salt="s")
    ids = [f"contact-{i}" for i in range(20_000)]
    chosen = [i for i in ids if node.hits(i)]
    assert chosen == [i for i in ids if node.hits(i)]
    assert 1_800 < len(chosen) < 2_200
    # nested percentages: 5% is a subset of 10% with the same salt (the split is one slot)
    assert {i for i in ids if Sample(percent=5, salt="s").hits(i)} <= set(chosen)
    # the salt decides: another salt, another sample
    assert {i for i in ids if Sample(percent=10, salt="t").hits(i)} != set(chosen)
    assert Sample(percent=0.29, salt="s").threshold == 29  # exact, not 28.999...


def test_path_lookup_treats_non_objects_as_missing():
    data = {"address": {"country": "DE", "geo": [1, 2]}, "tags": ["a"], "n": 1}
    assert lookup(data, ("address", "country")) == "DE"
    assert lookup(data, ("address", "geo", "0")) is MISSING  # arrays are not indexed
    assert lookup(data, ("tags", "0")) is MISSING
    assert lookup(data, ("n", "x")) is MISSING
    assert lookup(data, ("missing", "x")) is MISSING
    eu = define_bucket(id="x", criteria=b.prop(["address", "country"]).not_in(["FR"]))
    assert evaluate(eu.criteria, {"address": "FR"}, lambda _: 0)  # missing: not in


# --- aggregates over events ------------------------------------------------------------------

SPENT = b.event("order.completed").within("30d").sum("amount").gte(100)


def test_aggregate_builder_is_the_literal_form():
    assert SPENT == {
        "type": "event",
        "event": "order.completed",
        "check": "sum",
        "property": "amount",
        "operator": "gte",
        "value": 100,
        "within": "30d",
    }
    assert b.event("o").avg(["totals", "net"]).lt(2.5) == {
        "type": "event",
        "event": "o",
        "check": "avg",
        "property": ["totals", "net"],
        "operator": "lt",
        "value": 2.5,
    }
    assert b.event("o").min("a").eq(0)["check"] == "min"
    assert b.event("o").max("a").gt(0)["check"] == "max"
    assert (
        define_bucket(id="x", criteria=SPENT).fingerprint
        == load_definitions_text(
            "criteria: {type: event, event: order.completed, check: sum, property: amount,"
            " operator: gte, value: 100, within: 30d}"
        ).fingerprint
    )


def load_definitions_text(criteria_line: str) -> Any:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "one.yaml"
        path.write_text(f"buckets:\n  - id: x\n    {criteria_line}\n")
        [bucket] = load_definitions(path)
    return bucket


AGGREGATE_ERRORS = [
    (
        {"type": "event", "event": "o", "check": "sum", "operator": "gte", "value": 1},
        "x: criteria.property: check 'sum' needs the property to aggregate",
    ),
    (
        {"type": "event", "event": "o", "check": "avg", "property": "a", "value": 1},
        "x: criteria.operator: check 'avg' needs one of gt, gte, lt, lte, eq",
    ),
    (
        {"type": "event", "event": "o", "check": "min", "property": "a", "operator": "eq"},
        "x: criteria.value: check 'min' needs a number",
    ),
    (
        b.event("o").max("a").gt("100"),
        "x: criteria.value: check 'max' needs a number, got '100'",
    ),
    (b.event("o").max("a").gt(True), "x: criteria.value: check 'max' needs a number, got True"),
    (b.event("o").sum("a").gt(float("inf")), "x: criteria.value: must be a finite number"),
    (b.event("o").sum([]).gt(1), "x: criteria.property: a path needs at least one key"),
    (
        {"type": "event", "event": "o", "check": "exists", "property": "a"},
        "x: criteria.property: check 'exists' takes no property",
    ),
    (
        {"type": "event", "event": "o", "check": "count", "operator": "gt", "value": 1.5},
        "x: criteria.value: check 'count' needs an integer value >= 0",
    ),
]


def test_aggregates_compute_exactly_and_ignore_non_numbers():
    at = datetime(2026, 1, 1, tzinfo=UTC)
    amounts = [0.1, 0.2, True, "5", None, {"x": 1}, [3]]
    events = [Event("o", at, {"amount": amount}) for amount in amounts]
    counter = in_memory_counter(events, at)

    def holds(criteria: Any) -> bool:
        return evaluate(define_bucket(id="x", criteria=criteria).criteria, {}, counter)

    assert holds(b.event("o").sum("amount").eq(0.3))  # exact: not 0.30000000000000004
    assert holds(b.event("o").avg("amount").eq(0.15))
    assert holds(b.event("o").min("amount").eq(0.1))
    assert holds(b.event("o").max("amount").eq(0.2))
    nothing = in_memory_counter([Event("o", at, {"amount": "12"})], at)
    assert evaluate(
        define_bucket(id="x", criteria=b.event("o").sum("amount").eq(0)).criteria, {}, nothing
    )
    for check in ("avg", "min", "max"):  # of no values: false, whatever the comparison
        for operator in ("gt", "gte", "lt", "lte", "eq"):
            criteria = {
                "type": "event",
                "event": "o",
                "check": check,
                "property": "amount",
                "operator": operator,
                "value": 0,
            }
            assert not evaluate(define_bucket(id="x", criteria=criteria).criteria, {}, nothing)


# --- instants in properties ------------------------------------------------------------------


def test_instant_builder_is_the_literal_form():
    assert b.prop("trial_ends_at").within_next("3d") == {
        "type": "property",
        "property": "trial_ends_at",
        "operator": "within_next",
        "value": "3d",
    }
    assert b.prop(["sub", "renews"]).within_past("7d")["operator"] == "within_past"
    assert b.prop("signed_up").before("2026-01-01")["value"] == "2026-01-01"
    assert b.prop("signed_up").after("2026-01-01T09:00:00+01:00")["operator"] == "after"
    three_days = define_bucket(id="x", criteria=b.prop("t").within_next("3d"))
    assert (
        three_days.fingerprint
        == define_bucket(id="x", criteria=b.prop("t").within_next(timedelta(hours=72))).fingerprint
        == load_definitions_text(
            "criteria: {type: property, property: t, operator: within_next, value: 72h}"
        ).fingerprint
    )
    assert three_days.time_based
    assert three_days.cron_joins
    assert not define_bucket(id="x", criteria=b.prop("t").before("2026-01-01")).time_based


INSTANT_CASES: list[tuple[Any, datetime | None]] = [
    ("2026-03-01", datetime(2026, 3, 1, tzinfo=UTC)),
    ("2026-03-01T09:00Z", datetime(2026, 3, 1, 9, tzinfo=UTC)),
    ("2026-03-01T09:00:00.5+05:30", datetime(2026, 3, 1, 3, 30, 0, 500_000, tzinfo=UTC)),
    ("2024-02-29T23:59:59.999999-23:59", datetime(2024, 3, 1, 23, 58, 59, 999_999, tzinfo=UTC)),
    ("2026-03-01T09:00", None),  # no offset
    ("2026-03-01T09Z", None),
    ("2026-02-29", None),  # no such day
    ("2026-04-31", None),
    ("0000-01-01", None),
    ("2026-03-01T24:00Z", None),
    ("2026-03-01T23:59:60Z", None),
    ("2026-03-01T09:00+24:00", None),
    ("2026-03-01T09:00+05:60", None),
    ("2026-03-01T09:00:00.1234567Z", None),
    ("\uff12026-03-01", None),  # not ASCII digits
    ("2026-03-01Z", None),
    ("2026-03-01T09:00:00Z\n", None),
    (" 2026-03-01", None),
    (20260301, None),
    (None, None),
    # the fields' ranges, which SQL checks apart from the digit mask
    ("2026-00-10", None),
    ("2026-01-00", None),
    ("2026-01-32", None),
    ("2026-03-01T09:60Z", None),
    ("2026-03-01T9:00Z", None),
    ("2026-03-01T09:00:00.Z", None),
    ("2026-03-01T09:00+05:5", None),
    ("2026-03-01T09:00-23:59", datetime(2026, 3, 2, 8, 59, tzinfo=UTC)),
    ("2026-03-01T23:59:59.999999+00:00", datetime(2026, 3, 1, 23, 59, 59, 999999, UTC)),
    ("2026-1-01", None),
    ("2026-03-01T09:00:00ZZ", None),
]


@pytest.mark.parametrize(("text", "expected"), INSTANT_CASES)
def test_what_is_an_instant(text, expected):
    assert parse_instant(text) == expected


def test_sql_names_the_same_instants(connection: Connection):
    """The SQL form (a digit mask and the fields as numbers, no regex) agrees with Python on
    every case above, in one statement."""
    values = sa.values(sa.column("i", sa.Integer), sa.column("v", JSONB), name="cases").data(
        [(index, text) for index, (text, _) in enumerate(INSTANT_CASES)]
    )
    found = sa.select(
        values.c.i, instant_sql(values.c.v, values.c.v.op("#>>")(sa.literal([], ARRAY(sa.Text))))
    ).order_by(values.c.i)
    got = [instant for _, instant in connection.execute(found)]
    assert got == [expected for _, expected in INSTANT_CASES]


def test_sql_after_a_date_prefilter_names_the_same_instants(connection: Connection):
    """The form used behind the listed-prefix prefilter (the text is known to start with a real
    date in 0002-9998; only the rest is tested) agrees with Python on every such case."""
    cases = [
        (text, expected)
        for text, expected in INSTANT_CASES
        if isinstance(text, str) and parse_instant(text[:10]) is not None and text[:4] >= "0002"
    ]
    assert len(cases) > 10
    values = sa.values(sa.column("i", sa.Integer), sa.column("v", JSONB), name="cases").data(
        [(index, text) for index, (text, _) in enumerate(cases)]
    )
    text = values.c.v.op("#>>")(sa.literal([], ARRAY(sa.Text)))
    found = sa.select(values.c.i, instant_sql(values.c.v, text, real_date=True))
    got = [instant for _, instant in connection.execute(found.order_by(values.c.i))]
    assert got == [expected for _, expected in cases]


@settings(max_examples=300, deadline=None)
@given(
    lower=st.datetimes(datetime(2000, 1, 1), datetime(2100, 1, 1), timezones=st.just(UTC)),
    span=st.timedeltas(timedelta(minutes=1), timedelta(days=40)),
    where=st.floats(0, 1),
    offset=st.integers(-(24 * 60 - 1), 24 * 60 - 1),
    shape=st.sampled_from(["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S.%f"]),
    zulu=st.booleans(),
)
def test_an_instant_in_a_span_starts_with_one_of_its_prefixes(
    *, lower, span, where, offset, shape, zulu
):
    """The prefilter's prefixes (hours for spans up to 31 days, dates beyond) cover every
    instant of the span whatever its offset (±23:59), and every date alone in it."""
    upper = lower + span
    at = lower + span * where
    if "%S" not in shape:
        at = at.replace(second=0, microsecond=0)
    elif "%f" not in shape:
        at = at.replace(microsecond=0)
    if not lower <= at <= upper:
        return
    zone = timezone(timedelta(minutes=0 if zulu else offset))
    local = at.astimezone(zone)
    text = local.strftime(shape) + (
        "Z" if zulu else local.strftime("%z")[:3] + ":" + local.strftime("%z")[3:]
    )
    assert parse_instant(text) == at
    listed = _prefixes_between(lower, upper)
    assert listed is not None
    length, prefixes = listed
    assert text[:length] in prefixes
    midnight = datetime.combine(at.date(), datetime.min.time(), UTC)
    if lower <= midnight <= upper:
        assert midnight.date().isoformat()[:length] in prefixes


INSTANT_ERRORS = [
    (
        b.prop("t").before("2026-03-01T09:00"),
        "x: criteria.value: operator 'before' needs an instant with an offset",
    ),
    (b.prop("t").after("2026-02-30"), "x: criteria.value: operator 'after' needs an instant"),
    (b.prop("t").after(20260301), "x: criteria.value: operator 'after' needs an instant"),
    (b.prop("t").within_next("0d"), "x: criteria.value: duration must be positive"),
    (b.prop("t").within_past(3), "x: criteria.value: "),
    (
        {"type": "property", "property": "t", "operator": "within_next"},
        "x: criteria.value: operator 'within_next' needs a value",
    ),
    (
        b.all(b.prop("a").exists(), b.event("e").where(b.prop("t").within_next("1d")).exists()),
        "x: criteria.conditions[1].where[0].operator: 'within_next' compares with now",
    ),
]


HELD_ERRORS = [
    (
        b.prop("plan").eq("trial").held_for(),
        "x: criteria.held_for: needs exactly one of at_least, less_than",
    ),
    (
        b.prop("plan").eq("trial").held_for(at_least="1d", less_than="2d"),
        "x: criteria.held_for: needs exactly one of at_least, less_than",
    ),
    (
        b.prop("plan").eq("trial").held_for(at_least="0d"),
        "x: criteria.held_for.at_least: duration must be positive",
    ),
    (
        b.prop("plan").eq("trial").held_for(less_than="fortnight"),
        "x: criteria.held_for.less_than: ",
    ),
    (
        {**b.prop("plan").exists(), "held_for": {"at_most": "1d"}},
        "x: criteria.held_for.at_most: unknown key",
    ),
    (
        {**b.prop("plan").exists(), "held_for": "14d"},
        "x: criteria.held_for: ",
    ),
    (
        b.all(
            b.prop("a").exists(),
            b.event("e").where(b.prop("plan").eq("trial").held_for(at_least="1d")).exists(),
        ),
        "x: criteria.conditions[1].where[0].held_for: held_for is not allowed in where",
    ),
]


# --- sequences ----------------------------------------------------------------------------

CART = b.step("cart.added")
NO_ORDER = b.step("order.completed", gap="1h", absent=True)
ABANDONED = b.sequence(CART, NO_ORDER, within="7d")


def test_sequence_builder_is_the_literal_form():
    assert ABANDONED == {
        "type": "sequence",
        "steps": [
            {"event": "cart.added"},
            {"event": "order.completed", "gap": "1h", "absent": True},
        ],
        "within": "7d",
    }
    assert b.sequence(b.step("a", b.prop("k").eq(1), gap="2h"), b.step("b")) == {
        "type": "sequence",
        "steps": [
            {"event": "a", "where": [b.prop("k").eq(1)], "gap": "2h"},
            {"event": "b"},
        ],
    }
    literal = define_bucket(id="x", criteria=json.loads(json.dumps(ABANDONED)))
    assert literal.criteria == define_bucket(id="x", criteria=ABANDONED).criteria


def test_sequence_fingerprints_and_index():
    bucket = define_bucket(id="x", criteria=ABANDONED)
    spelled = {
        "type": "sequence",
        "within": "168h",
        "steps": [
            {"event": "cart.added", "absent": False},
            {"event": "order.completed", "gap": "60m", "absent": True},
        ],
    }
    assert define_bucket(id="x", criteria=spelled).fingerprint == bucket.fingerprint
    reordered = b.sequence(b.step("order.completed"), b.step("cart.added", gap="1h"))
    assert define_bucket(id="x", criteria=reordered).fingerprint != bucket.fingerprint
    # every step's name, the absent one included (its event breaks a chain)
    assert bucket.event_names == {"cart.added", "order.completed"}
    registry = Registry([bucket])
    assert registry.affected("order.completed") == [bucket]
    assert bucket.time_based
    assert bucket.clocked


def test_an_abandoned_cart_is_any_cart_without_an_order_within_the_gap():
    now = datetime(2026, 3, 1, 12, tzinfo=UTC)
    hour = timedelta(hours=1)
    node = define_bucket(id="x", criteria=ABANDONED).criteria

    def holds(*events: tuple[str, timedelta]) -> bool:
        history = [Event(name, now - ago) for name, ago in events]
        return evaluate(node, {}, in_memory_counter(history, now), now=now)

    assert holds(("cart.added", 2 * hour))
    assert not holds(("cart.added", 2 * hour), ("order.completed", hour))
    assert holds(("cart.added", 2 * hour), ("order.completed", hour - timedelta(microseconds=1)))
    # an order at the cart's instant is not in (cart, cart + 1h]: the cart is abandoned
    assert holds(("cart.added", 2 * hour), ("order.completed", 2 * hour))
    assert not holds(("cart.added", hour - timedelta(microseconds=1)))  # the hour is not over
    assert holds(("cart.added", hour))  # exactly over
    # an earlier cart whose hour had no order witnesses it, whatever came later
    assert holds(("cart.added", 5 * hour), ("cart.added", 2 * hour), ("order.completed", hour))
    assert holds(("cart.added", 7 * 24 * hour))  # the first event exactly at now - within
    assert not holds(("cart.added", 7 * 24 * hour + timedelta(microseconds=1)))


def test_sequence_steps_chain_strictly_in_order_within_their_gaps():
    now = datetime(2026, 3, 1, 12, tzinfo=UTC)
    hour = timedelta(hours=1)
    node = define_bucket(
        id="x", criteria=b.sequence(b.step("a"), b.step("b", gap="1h"), b.step("c"))
    ).criteria

    def holds(*events: tuple[str, timedelta]) -> bool:
        history = [Event(name, now - ago) for name, ago in events]
        return evaluate(node, {}, in_memory_counter(history, now), now=now)

    assert holds(("a", 3 * hour), ("b", 2 * hour), ("c", hour))
    assert not holds(("a", 3 * hour), ("b", 3 * hour), ("c", hour))  # equal: not after
    assert not holds(("a", 4 * hour), ("b", 2 * hour), ("c", hour))  # b two hours after a
    assert holds(("a", 4 * hour), ("a", 3 * hour), ("b", 2 * hour), ("c", hour))
    assert not holds(("a", 3 * hour), ("b", 2 * hour), ("c", -hour))  # c in the future
    assert not holds(("c", 4 * hour), ("a", 3 * hour), ("b", 2 * hour))


def test_sequences_and_new_contacts_and_the_cron():
    assert not define_bucket(id="x", criteria=ABANDONED).matches_new_contacts
    assert define_bucket(id="x", criteria=ABANDONED).cron_joins  # the gap elapsing joins
    plain = b.sequence(b.step("a"), b.step("b"), within="7d")
    assert not define_bucket(id="x", criteria=plain).cron_joins
    assert define_bucket(id="x", criteria=b.not_(plain)).cron_joins  # ages out: joins
    assert define_bucket(id="x", criteria=b.not_(plain)).matches_new_contacts


SEQUENCE_ERRORS = [
    (b.sequence(CART), "x: criteria.steps: a sequence needs at least two steps, got 1"),
    ({"type": "sequence"}, "x: criteria.steps: required"),
    ({"type": "sequence", "steps": "cart"}, "x: criteria.steps: expected a list, got str"),
    (
        b.sequence(b.step("a", gap="1h"), b.step("b")),
        "x: criteria.steps[0].gap: the first step has no gap",
    ),
    (
        b.sequence(b.step("a"), b.step("b", gap="1h", absent=True), b.step("c")),
        "x: criteria.steps[1].absent: only the last step may be absent",
    ),
    (
        b.sequence(b.step("a"), b.step("b", absent=True)),
        "x: criteria.steps[1].gap: an absent step needs a gap",
    ),
    (
        b.sequence(b.step("a"), b.step("b", gap="8d", absent=True), within="7d"),
        "x: criteria.steps[1].gap: an absent step's gap longer than the sequence's within",
    ),
    (b.sequence(b.step("a"), b.step("b", gap="0s")), "x: criteria.steps[1].gap: duration must"),
    (b.sequence(b.step("a"), b.step("b"), within="1x"), "x: criteria.within: cannot parse"),
    (
        b.sequence(b.step("a"), b.step("bucket:entered:y")),
        "x: criteria.steps[1].event: event names starting with 'bucket:' are reserved",
    ),
    (
        b.sequence(b.step(""), b.step("b")),
        "x: criteria.steps[0].event: String should have at least 1 character",
    ),
    (b.sequence(b.step("a\x00"), b.step("b")), "x: criteria.steps[0].event: contains a NUL"),
    (
        b.sequence(b.step("a"), {"event": "b", "absent": "yes", "gap": "1h"}),
        "x: criteria.steps[1].absent: ",
    ),
    (
        b.sequence(b.step("a"), {"event": "b", "after": "1h"}),
        "x: criteria.steps[1].after: unknown key",
    ),
    (
        {"type": "sequence", "steps": [b.step("a"), "b"]},
        "x: criteria.steps[1]: expected a step object, got str",
    ),
    (
        b.all(b.everyone(), b.sequence(b.step("a"), b.step("b", b.prop("t").within_past("1d")))),
        "x: criteria.conditions[1].steps[1].where[0].operator: 'within_past' compares with now",
    ),
    (
        b.sequence(b.step("a", {"type": "everyone"}), b.step("b")),
        "x: criteria.steps[0].where[0].type: where conditions must be of type 'property'",
    ),
    (
        b.sequence(*[b.step(f"e{i}") for i in range(17)]),
        "x: criteria.steps: a sequence has at most 16 steps (the limit)",
    ),
    (
        b.any(*[b.sequence(*[b.step(f"e{i}") for i in range(16)])] * 5),
        "x: criteria.conditions[4].steps[0]: more than 64 event conditions",
    ),
]

MISUSES = INVALID + AGGREGATE_ERRORS + INSTANT_ERRORS + HELD_ERRORS + SEQUENCE_ERRORS


@pytest.mark.parametrize(("criteria", "message"), MISUSES, ids=[m for _, m in MISUSES])
def test_misuse_is_a_located_error(criteria, message):
    """Every misuse of a node of this part (static nodes, aggregates, instants)."""
    with pytest.raises(DefinitionError) as raised:
        define_bucket(id="x", criteria=criteria)
    assert str(raised.value).startswith(message), str(raised.value)
    assert raised.value.bucket_id == "x"


def test_instant_operators_at_their_bounds():
    now = datetime(2026, 3, 1, 12, tzinfo=UTC)
    day = timedelta(days=1)
    tick = timedelta(microseconds=1)

    def holds(criteria: Any, instant: datetime) -> bool:
        node = define_bucket(id="x", criteria=criteria).criteria
        return evaluate(node, {"t": instant.isoformat()}, lambda _: 0, now=now)

    assert holds(b.prop("t").within_next("1d"), now)
    assert holds(b.prop("t").within_next("1d"), now + day)
    assert not holds(b.prop("t").within_next("1d"), now + day + tick)
    assert not holds(b.prop("t").within_next("1d"), now - tick)
    assert holds(b.prop("t").within_past("1d"), now - day)
    assert not holds(b.prop("t").within_past("1d"), now - day - tick)
    assert not holds(b.prop("t").within_past("1d"), now + tick)
    assert holds(b.prop("t").before("2026-03-01T12:00:00.000001Z"), now)
    assert not holds(b.prop("t").before("2026-03-01T12:00Z"), now)
    assert holds(b.prop("t").after("2026-03-01T13:00+01:01"), now)  # 11:59 UTC


# --- held for --------------------------------------------------------------------------------


def test_held_for_builder_is_the_literal_form_and_one_fingerprint():
    built = b.prop("plan").eq("trial").held_for(at_least="14d")
    assert built == {
        "type": "property",
        "property": "plan",
        "operator": "eq",
        "value": "trial",
        "held_for": {"at_least": "14d"},
    }
    assert b.prop(["sub", "tier"]).exists().held_for(less_than="1h")["held_for"] == {
        "less_than": "1h"
    }
    trial = define_bucket(id="x", criteria=built)
    assert (
        trial.fingerprint
        == define_bucket(
            id="x", criteria=b.prop("plan").eq("trial").held_for(at_least=timedelta(weeks=2))
        ).fingerprint
        == load_definitions_text(
            "criteria: {type: property, property: plan, operator: eq, value: trial,"
            " held_for: {at_least: 336h}}"
        ).fingerprint
    )
    plain = define_bucket(id="x", criteria=b.prop("plan").eq("trial"))
    assert plain.fingerprint != trial.fingerprint
    less = define_bucket(id="x", criteria=b.prop("plan").eq("trial").held_for(less_than="14d"))
    assert less.fingerprint not in (trial.fingerprint, plain.fingerprint)
    # held_for null is absent: the fingerprint of the definition without it
    assert (
        define_bucket(id="x", criteria={**b.prop("plan").eq("trial"), "held_for": None}).fingerprint
        == plain.fingerprint
    )
    assert trial.time_based
    assert less.time_based
    assert not plain.time_based
    assert trial.cron_joins  # at_least matures with the clock alone
    assert not less.cron_joins  # less_than only expires
    assert define_bucket(
        id="x", criteria=b.not_(b.prop("plan").eq("trial").held_for(less_than="14d"))
    ).cron_joins
    assert trial.property_keys == frozenset({"plan"})  # indexed for the real-time path


def test_held_for_at_its_bounds():
    now = datetime(2026, 3, 1, 12, tzinfo=UTC)
    day = timedelta(days=1)
    tick = timedelta(microseconds=1)
    created = now - 30 * day

    def holds(criteria: Any, changed: datetime | None, properties: Any = None) -> bool:
        node = define_bucket(id="x", criteria=criteria).criteria
        record = {} if changed is None else {"plan": changed.isoformat()}
        bag = ContactProperties(
            {"plan": "trial"} if properties is None else properties, record, created
        )
        return evaluate(node, bag, lambda _: 0, now=now)

    at_least = b.prop("plan").eq("trial").held_for(at_least="14d")
    less_than = b.prop("plan").eq("trial").held_for(less_than="14d")
    assert holds(at_least, now - 14 * day)  # changed_at <= now - D
    assert not holds(at_least, now - 14 * day + tick)
    assert not holds(less_than, now - 14 * day)  # changed_at > now - D
    assert holds(less_than, now - 14 * day + tick)
    assert holds(at_least, None)  # no record: created_at, 30 days ago
    assert not holds(less_than, None)
    assert not holds(at_least, now - 20 * day, {"plan": "pro"})  # the value must hold too
    missing = b.prop("plan").not_exists().held_for(at_least="14d")
    assert holds(missing, now - 20 * day, {})  # removed 20 days ago
    assert not holds(missing, now - day, {})
    with pytest.raises(ValueError, match="held_for needs"):  # no record given: never a guess
        evaluate(
            define_bucket(id="x", criteria=at_least).criteria,
            {"plan": "trial"},
            lambda _: 0,
            now=now,
        )
