"""Event conditions of SPEC §3.4: ``older_than``, ``check: last``, ``check: regularly`` —
builder == literal == file forms, fingerprints, validation (located errors) and which buckets
the clock can join."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from buckets import b, define_bucket
from buckets.definitions import DefinitionError, load_definitions

OLDER_THAN_FORMS: list[tuple[dict[str, Any], dict[str, Any]]] = [
    (
        b.event("x").within("7d").older_than("1d").exists(),
        {"type": "event", "event": "x", "check": "exists", "within": "7d", "older_than": "1d"},
    ),
    (
        b.event("x").older_than("30d").where(b.prop("k").eq(1)).at_least(2),
        {
            "type": "event",
            "event": "x",
            "check": "count",
            "operator": "gte",
            "value": 2,
            "older_than": "30d",
            "where": [{"type": "property", "property": "k", "operator": "eq", "value": 1}],
        },
    ),
    (
        b.event("o").within("30d").older_than("7d").sum("amount").gte(100),
        {
            "type": "event",
            "event": "o",
            "check": "sum",
            "property": "amount",
            "operator": "gte",
            "value": 100,
            "within": "30d",
            "older_than": "7d",
        },
    ),
]
LAST_FORMS: list[tuple[dict[str, Any], dict[str, Any]]] = [
    (
        b.event("plan.changed").where(b.prop("to").eq("pro")).last(),
        {
            "type": "event",
            "event": "plan.changed",
            "check": "last",
            "where": [{"type": "property", "property": "to", "operator": "eq", "value": "pro"}],
        },
    ),
    (
        b.event("seen").within("30d").last(),
        {"type": "event", "event": "seen", "check": "last", "within": "30d"},
    ),
]
REGULARLY_FORMS: list[tuple[dict[str, Any], dict[str, Any]]] = [
    (
        b.event("app.opened").regularly("1d", periods=7, min_periods=4),
        {
            "type": "event",
            "event": "app.opened",
            "check": "regularly",
            "period": "1d",
            "periods": 7,
            "min_periods": 4,
        },
    ),
    (
        b.event("order").where(b.prop("amount").gt(0)).regularly("1w", 4, 3, "gte", 2),
        {
            "type": "event",
            "event": "order",
            "check": "regularly",
            "operator": "gte",
            "value": 2,
            "period": "1w",
            "periods": 4,
            "min_periods": 3,
            "where": [{"type": "property", "property": "amount", "operator": "gt", "value": 0}],
        },
    ),
]
FORMS = [*OLDER_THAN_FORMS, *LAST_FORMS, *REGULARLY_FORMS]


def test_regularly_hashes_its_default_count_like_the_written_one():
    default = define_bucket(id="x", criteria=REGULARLY_FORMS[0][0])
    written = define_bucket(id="x", criteria=b.event("app.opened").regularly("24h", 7, 4, "gte", 1))
    assert default.fingerprint == written.fingerprint


def regularly(**fields: Any) -> dict[str, Any]:
    leaf: dict[str, Any] = {"type": "event", "event": "x", "check": "regularly", "period": "1d"}
    leaf.update(periods=7, min_periods=4)
    leaf.update(fields)
    return {key: value for key, value in leaf.items() if value is not None}


@pytest.mark.parametrize(("built", "literal"), FORMS)
def test_builder_is_the_literal_form(built: Any, literal: Any):
    assert built == literal
    one, other = define_bucket(id="x", criteria=built), define_bucket(id="x", criteria=literal)
    assert (one.criteria, one.fingerprint) == (other.criteria, other.fingerprint)


def test_file_forms_load_the_same_buckets(tmp_path: Path):
    import yaml

    buckets = [{"id": f"b{index}", "criteria": literal} for index, (_, literal) in enumerate(FORMS)]
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"buckets": buckets}))
    (tmp_path / "a.json").write_text(json.dumps({"buckets": buckets}))
    from_yaml = [bucket.fingerprint for bucket in load_definitions(tmp_path / "a.yaml")]
    from_json = [bucket.fingerprint for bucket in load_definitions(tmp_path / "a.json")]
    built = [define_bucket(id="b", criteria=built).fingerprint for built, _ in FORMS]
    assert from_yaml == from_json == built


def test_new_fields_hash_only_when_present():
    plain = define_bucket(id="x", criteria=b.event("x").within("7d").exists())
    # what the fingerprint of this definition was before these fields existed
    canonical = '{"check":"exists","event":"x","type":"event","within":604800}'
    assert plain.fingerprint == hashlib.sha256(canonical.encode()).hexdigest()
    unset = define_bucket(id="x", criteria=dict(FORMS[0][1], older_than=None))
    assert unset.fingerprint == plain.fingerprint
    aged = define_bucket(id="x", criteria=FORMS[0][0])
    assert aged.fingerprint != plain.fingerprint
    same = define_bucket(id="x", criteria=dict(FORMS[0][1], older_than="24h"))
    assert aged.fingerprint == same.fingerprint


ERRORS = [
    (
        b.event("x").within("1d").older_than("1d").exists(),
        "x: criteria.older_than: older_than (1d) must be shorter than within (1d):"
        " no event could count",
    ),
    (
        b.event("x").within("1h").older_than("2h").exists(),
        "x: criteria.older_than: older_than (2h) must be shorter than within (1h):"
        " no event could count",
    ),
    (
        b.event("x").older_than("0d").exists(),
        "x: criteria.older_than: duration must be positive",
    ),
    (
        b.all(b.event("x").older_than(7).exists()),  # type: ignore[arg-type]
        "x: criteria.conditions[0].older_than: duration must be a timedelta or a string like"
        " '7d', got int 7",
    ),
]


ERRORS += [
    (
        b.event("x").older_than("1d").last(),
        "x: criteria.older_than: not allowed with check 'last'",
    ),
    (
        {"type": "event", "event": "x", "check": "last", "operator": "eq", "value": 1},
        "x: criteria.operator: check 'last' takes no operator or value",
    ),
    (
        {"type": "event", "event": "x", "check": "last", "property": "k"},
        "x: criteria.property: check 'last' takes no property",
    ),
    (
        b.event("x")
        .where({"type": "property", "property": "t", "operator": "within_past", "value": "1d"})
        .last(),
        "x: criteria.where[0].operator: 'within_past' compares with now and is not allowed in"
        " where (an event's properties are read as of each decision; use before/after)",
    ),
]


ERRORS += [
    (regularly(min_periods=8), "x: criteria.min_periods: must be between 1 and periods (7), got 8"),
    (regularly(min_periods=0), "x: criteria.min_periods: must be between 1 and periods (7), got 0"),
    (regularly(periods=53), "x: criteria.periods: must be between 1 and 52, got 53"),
    (regularly(periods=0), "x: criteria.periods: must be between 1 and 52, got 0"),
    (regularly(periods=None), "x: criteria.periods: check 'regularly' needs periods (1 to 52)"),
    (
        regularly(min_periods=None),
        "x: criteria.min_periods: check 'regularly' needs min_periods (1 to 7)",
    ),
    (regularly(periods="7"), "x: criteria.periods: Input should be a valid integer"),
    (regularly(period=None), "x: criteria.period: check 'regularly' needs a period (a duration)"),
    (regularly(period="0d"), "x: criteria.period: duration must be positive"),
    (
        regularly(period="1000d", periods=52),
        "x: criteria.periods: periods x period must be at most 36,500 days (got 52 x 1000d)",
    ),
    (
        regularly(within="7d"),
        "x: criteria.within: not allowed with check 'regularly' (periods set the span)",
    ),
    (regularly(older_than="1d"), "x: criteria.older_than: not allowed with check 'regularly'"),
    (
        regularly(operator="gte"),
        "x: criteria.value: a period's count needs both operator and value (or neither)",
    ),
    (
        regularly(value=2),
        "x: criteria.operator: a period's count needs both operator and value (or neither)",
    ),
    (regularly(operator="lt", value=0), "x: criteria.value: count lt 0 can never be true"),
    (
        regularly(operator="gte", value=1.5),
        "x: criteria.value: check 'regularly' needs an integer value >= 0",
    ),
    (regularly(property="k"), "x: criteria.property: check 'regularly' takes no property"),
    (
        {"type": "event", "event": "x", "check": "exists", "period": "1d"},
        "x: criteria.period: only allowed with check 'regularly'",
    ),
    (
        {
            "type": "event",
            "event": "x",
            "check": "count",
            "operator": "gte",
            "value": 1,
            "min_periods": 2,
        },
        "x: criteria.min_periods: only allowed with check 'regularly'",
    ),
]


@pytest.mark.parametrize(("criteria", "message"), ERRORS, ids=[m for _, m in ERRORS])
def test_misuse_is_a_located_error(criteria: Any, message: str):
    with pytest.raises(DefinitionError) as raised:
        define_bucket(id="x", criteria=criteria)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("criteria", "time_based", "cron_joins"),
    [
        (b.event("x").older_than("1d").exists(), True, True),  # events age into it
        (b.event("x").older_than("1d").not_exists(), True, False),  # only ever grows
        (b.not_(b.event("x").older_than("1d").not_exists()), True, True),
        (b.event("x").within("7d").older_than("1d").not_exists(), True, True),  # ages out
        (b.not_(b.event("x").older_than("1d").exists()), True, False),
        (b.event("x").older_than("1d").exactly(2), True, True),
        (b.event("x").older_than("1d").sum("a").gt(1), True, True),
        (b.event("x").last(), False, False),  # only new (or future-stamped) events change it
        (b.event("x").within("7d").last(), True, False),  # the last one ages out: false
        (b.not_(b.event("x").within("7d").last()), True, True),
        (b.event("x").regularly("1d", 7, 4), True, True),  # events move between periods
        (b.not_(b.event("x").regularly("1d", 7, 4)), True, True),
    ],
)
def test_which_buckets_the_clock_can_join(criteria: Any, time_based: bool, cron_joins: bool):
    bucket = define_bucket(id="x", criteria=criteria)
    assert (bucket.time_based, bucket.cron_joins) == (time_based, cron_joins)
