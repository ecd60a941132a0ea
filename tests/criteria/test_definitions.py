"""Bucket definitions (SPEC §3.3, §4): the builder, every validation rule, the fingerprint,
transition names, and loading from modules, files and directories. No database needed."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from buckets import DefinitionError, b, define_bucket, load_definitions
from buckets.definitions import definition_modules

LAPSED = b.all(b.event("feature.used").exists(), b.event("feature.used").within("7d").not_exists())


# --- the builder is the literal form ---------------------------------------------------------


@pytest.mark.parametrize(
    ("built", "literal"),
    [
        (
            b.prop("plan").eq("pro"),
            {"type": "property", "property": "plan", "operator": "eq", "value": "pro"},
        ),
        (b.prop("n").neq(1), {"type": "property", "property": "n", "operator": "neq", "value": 1}),
        (b.prop("n").gt(1), {"type": "property", "property": "n", "operator": "gt", "value": 1}),
        (b.prop("n").gte(1), {"type": "property", "property": "n", "operator": "gte", "value": 1}),
        (b.prop("n").lt(1), {"type": "property", "property": "n", "operator": "lt", "value": 1}),
        (b.prop("n").lte(1), {"type": "property", "property": "n", "operator": "lte", "value": 1}),
        (
            b.prop("t").contains("a"),
            {"type": "property", "property": "t", "operator": "contains", "value": "a"},
        ),
        (b.prop("t").exists(), {"type": "property", "property": "t", "operator": "exists"}),
        (b.prop("t").not_exists(), {"type": "property", "property": "t", "operator": "not_exists"}),
        (b.event("e").exists(), {"type": "event", "event": "e", "check": "exists"}),
        (b.event("e").not_exists(), {"type": "event", "event": "e", "check": "not_exists"}),
        (
            b.event("e").count("gt", 2),
            {"type": "event", "event": "e", "check": "count", "operator": "gt", "value": 2},
        ),
        (
            b.event("e").at_least(2),
            {"type": "event", "event": "e", "check": "count", "operator": "gte", "value": 2},
        ),
        (
            b.event("e").at_most(2),
            {"type": "event", "event": "e", "check": "count", "operator": "lte", "value": 2},
        ),
        (
            b.event("e").more_than(2),
            {"type": "event", "event": "e", "check": "count", "operator": "gt", "value": 2},
        ),
        (
            b.event("e").less_than(2),
            {"type": "event", "event": "e", "check": "count", "operator": "lt", "value": 2},
        ),
        (
            b.event("e").exactly(2),
            {"type": "event", "event": "e", "check": "count", "operator": "eq", "value": 2},
        ),
        (
            b.event("e").within("7d").where(b.prop("amount").gte(50)).exists(),
            {
                "type": "event",
                "event": "e",
                "check": "exists",
                "within": "7d",
                "where": [
                    {"type": "property", "property": "amount", "operator": "gte", "value": 50}
                ],
            },
        ),
        (
            b.any(b.prop("a").exists(), b.prop("b").exists()),
            {
                "type": "composite",
                "operator": "or",
                "conditions": [
                    {"type": "property", "property": "a", "operator": "exists"},
                    {"type": "property", "property": "b", "operator": "exists"},
                ],
            },
        ),
    ],
)
def test_the_builder_produces_the_literal_tree(built, literal):
    assert built == literal


def test_builder_literal_and_file_forms_have_one_fingerprint(tmp_path: Path):
    built = define_bucket(id="went-dormant", criteria=LAPSED)
    literal = define_bucket(
        id="went-dormant",
        criteria={
            "type": "composite",
            "operator": "and",
            "conditions": [
                {"type": "event", "event": "feature.used", "check": "exists"},
                {
                    "check": "not_exists",
                    "within": timedelta(days=7),
                    "event": "feature.used",
                    "type": "event",
                },
            ],
        },
    )
    yaml_file = tmp_path / "b.yaml"
    yaml_file.write_text(
        "buckets:\n"
        "  - id: went-dormant\n"
        "    criteria:\n"
        "      type: composite\n"
        "      operator: and\n"
        "      conditions:\n"
        "        - {type: event, event: feature.used, check: exists}\n"
        "        - {type: event, event: feature.used, check: not_exists, within: 1w}\n"
    )
    [from_yaml] = load_definitions(yaml_file)
    assert built.fingerprint == literal.fingerprint == from_yaml.fingerprint
    assert len(built.fingerprint) == 64


def test_fingerprint_changes_with_meaning_only():
    base = define_bucket(id="p", criteria=b.event("e").within("7d").at_least(3))
    same = define_bucket(id="other-id", criteria=b.event("e").within("168h").at_least(3), name="x")
    assert base.fingerprint == same.fingerprint  # durations normalised; metadata is not criteria
    for changed in (
        b.event("e").within("6d").at_least(3),
        b.event("e").within("7d").at_least(4),
        b.event("f").within("7d").at_least(3),
        b.event("e").within("7d").where(b.prop("x").eq(1)).at_least(3),
    ):
        assert define_bucket(id="p", criteria=changed).fingerprint != base.fingerprint
    assert base.to_dict()["criteria"] == {
        "type": "event",
        "event": "e",
        "check": "count",
        "operator": "gte",
        "value": 3,
        "within": 604800,
    }


# --- every validation rule, each error naming the bucket and the path ------------------------

PROP = b.prop("plan").eq("pro")
ERRORS: list[tuple[dict[str, Any], str]] = [
    (
        {"criteria": {"type": "composite", "operator": "and", "conditions": []}},
        "x: criteria.conditions: must not be empty",
    ),
    (
        {
            "criteria": {
                "type": "property",
                "property": "p",
                "operator": "eq",
                "value": 1,
                "extra": 1,
            }
        },
        "x: criteria.extra: unknown key",
    ),
    (
        {"criteria": {"type": "event", "event": "e", "check": "exists", "oops": 1}},
        "x: criteria.oops: unknown key",
    ),
    (
        {"criteria": {"type": "composite", "operator": "and", "conditions": [PROP], "x": 1}},
        "x: criteria.x: unknown key",
    ),
    (
        {"criteria": {"type": "property", "property": "p", "operator": "eq"}},
        "x: criteria.value: operator 'eq' needs a value",
    ),
    (
        {"criteria": {"type": "property", "property": "p", "operator": "exists", "value": 1}},
        "x: criteria.value: operator 'exists' takes no value",
    ),
    (
        {"criteria": b.prop("p").gt(True)},
        "x: criteria.value: operator 'gt' needs a number, got True",
    ),
    (
        {"criteria": b.prop("p").lte("5")},
        "x: criteria.value: operator 'lte' needs a number, got '5'",
    ),
    (
        {"criteria": b.prop("p").eq([1])},
        "x: criteria.value: operator 'eq' needs a string, number, boolean or null, got list",
    ),
    (
        {"criteria": b.prop("p").contains({"a": 1})},
        "x: criteria.value: operator 'contains' needs a string, number, boolean or null, got dict",
    ),
    (
        {"criteria": b.prop("p").eq(float("inf"))},
        "x: criteria.value: must be a finite number, got inf",
    ),
    (
        {"criteria": {"type": "event", "event": "e", "check": "count"}},
        "x: criteria.operator: check 'count' needs one of gt, gte, lt, lte, eq",
    ),
    (
        {"criteria": {"type": "event", "event": "e", "check": "count", "operator": "gt"}},
        "x: criteria.value: check 'count' needs an integer value >= 0",
    ),
    ({"criteria": b.event("e").less_than(0)}, "x: criteria.value: count lt 0 can never be true"),
    (
        {"criteria": b.event("e").at_least(-1)},
        "x: criteria.value: count value must be >= 0, got -1",
    ),
    (
        {"criteria": {"type": "event", "event": "e", "check": "exists", "operator": "gt"}},
        "x: criteria.operator: check 'exists' takes no operator or value",
    ),
    (
        {"criteria": {"type": "event", "event": "e", "check": "exists", "where": []}},
        "x: criteria.where: must list at least one condition (or be left out)",
    ),
    (
        {
            "criteria": {
                "type": "event",
                "event": "e",
                "check": "exists",
                "where": [b.event("f").exists()],
            }
        },
        "x: criteria.where[0].type: where conditions must be of type 'property'",
    ),
    (
        {"criteria": b.all(PROP, b.event("e").within("0d").not_exists())},
        "x: criteria.conditions[1].within: duration must be positive",
    ),
    (
        {"criteria": b.event("e").within("-3d").exists()},
        "x: criteria.within: cannot parse duration '-3d'",
    ),
    (
        {"criteria": b.event("e").within("1.5d").exists()},
        "x: criteria.within: cannot parse duration '1.5d'",
    ),
    (
        {"criteria": {"type": "event", "event": "e", "check": "exists", "within": 7}},
        "x: criteria.within: duration must be a timedelta or a string like '7d', got int 7",
    ),
    (
        {"criteria": b.event("e").within(timedelta(milliseconds=1500)).exists()},
        "x: criteria.within: duration must be a whole number of seconds",
    ),
    (
        {"criteria": b.event("bucket:entered:y").exists()},
        "x: criteria.event: event names starting with 'bucket:' are reserved",
    ),
    (
        {"criteria": {"type": "nope"}},
        "x: criteria.type: must be one of 'property', 'event', 'composite', 'everyone',"
        " 'sample', 'sequence', 'bucket', 'manual', got 'nope'",
    ),
    ({"criteria": {"property": "p"}}, "x: criteria.type: required"),
    ({"criteria": "plan = pro"}, "x: criteria: expected a condition object, got str"),
    (
        {"criteria": {"type": "composite", "operator": "and", "conditions": "p"}},
        "x: criteria.conditions: expected a list, got str",
    ),
    (
        {"criteria": PROP, "min_dwell": "2d", "max_dwell": "1d"},
        "x: max_dwell: must be at least min_dwell",
    ),
    ({"criteria": PROP, "max_dwell": "0s"}, "x: max_dwell: duration must be positive"),
    (
        {"criteria": PROP, "entry_limit": "once_per_period"},
        "x: entry_period: required with entry_limit 'once_per_period'",
    ),
    (
        {"criteria": PROP, "entry_period": "1d"},
        "x: entry_period: only allowed with entry_limit 'once_per_period'",
    ),
    (
        {"criteria": PROP, "entry_limit": "twice"},
        "x: entry_limit: must be one of unlimited, once, once_per_period, got 'twice'",
    ),
    ({"criteria": PROP, "enabled": "yes"}, "x: enabled: must be true or false, got 'yes'"),
    (
        {"criteria": PROP, "reconcile_joins": "sometimes"},
        "x: reconcile_joins: must be true, false or unset, got 'sometimes'",
    ),
    ({"criteria": PROP, "name": 3}, "x: name: must be a string, got int"),
]


@pytest.mark.parametrize(
    ("fields", "message"),
    ERRORS,
    ids=[m.split(": ", 2)[1] + f"-{i}" for i, (_, m) in enumerate(ERRORS)],
)
def test_invalid_definitions_are_rejected_naming_bucket_and_path(fields, message):
    with pytest.raises(DefinitionError) as raised:
        define_bucket(id="x", **fields)
    assert str(raised.value).startswith(message)
    assert raised.value.bucket_id == "x"


@pytest.mark.parametrize(
    "criteria",
    [
        b.prop("p").neq(1),
        b.prop("p").not_exists(),
        b.event("e").not_exists(),
        b.event("e").less_than(3),
        b.event("e").at_most(3),
        b.event("e").at_least(0),
        b.all(b.prop("p").neq(1), b.event("e").not_exists()),
        b.any(b.prop("p").not_exists(), b.event("e").where(b.prop("a").eq(1)).not_exists()),
    ],
)
def test_all_negative_criteria_are_allowed_and_decided_on_creation(criteria):
    """SPEC §3.4 replaced the positive-leaf rule: a contact with no data matches these, so
    they are decided for every new contact."""
    bucket = define_bucket(id="x", criteria=criteria)
    assert bucket.matches_new_contacts


@pytest.mark.parametrize(
    "criteria",
    [
        b.event("e").within("7d").not_exists(),  # windowed absence: clock-joinable
        b.event("e").within("7d").less_than(3),
        b.event("e").within("7d").at_most(3),
        b.event("e").within("7d").exactly(0),
        b.all(b.prop("p").neq(1), b.prop("q").exists()),
    ],
)
def test_positive_or_clock_joinable_leaves_are_accepted(criteria):
    assert define_bucket(id="x", criteria=criteria).id == "x"


@pytest.mark.parametrize("bad", ["Bad", "a--b", "-a", "a b", "", "a" * 65, "é"])
def test_ids_are_slugs(bad):
    with pytest.raises(DefinitionError, match="id: must be"):
        define_bucket(id=bad, criteria=PROP)


def test_names_properties_and_transition_names():
    bucket = define_bucket(id="went-dormant", criteria=LAPSED, max_dwell="60d")
    assert bucket.entered == "bucket:entered:went-dormant"
    assert bucket.left == "bucket:left:went-dormant"
    assert isinstance(bucket.entered, str)
    assert (bucket.entered.kind, bucket.entered.bucket_id) == ("entered", "went-dormant")
    assert bucket.name == "went-dormant"  # defaults to the id
    assert (bucket.time_based, bucket.on_cron) == (True, True)
    assert bucket.event_names == frozenset({"feature.used"})
    plain = define_bucket(id="pro", criteria=b.all(PROP, b.event("login").exists()))
    assert (plain.time_based, plain.on_cron) == (False, False)
    assert plain.property_keys == frozenset({"plan"})
    assert define_bucket(id="pro", criteria=PROP, min_dwell="1d").on_cron is True
    assert define_bucket(id="pro", criteria=PROP, max_dwell="1d").on_cron is True


# --- loading ---------------------------------------------------------------------------------

PY = """
from buckets import b, define_bucket
pro = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"))
both = [define_bucket(id="trial", criteria=b.prop("plan").eq("trial")), pro]
"""
YAML = """
buckets:
  - id: power-users
    name: Power users
    entry_limit: once_per_period
    entry_period: 7d
    criteria: {type: event, event: feature.used, check: count, operator: gte, value: 10,
               within: 30d}
"""


def test_loading_from_every_kind_of_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    package = tmp_path / "pkg_defs_a"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "buckets_mod.py").write_text(PY)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert [x.id for x in load_definitions("pkg_defs_a.buckets_mod")] == ["pro", "trial"]

    py_file = tmp_path / "one.py"
    py_file.write_text(PY)
    assert [x.id for x in load_definitions(py_file)] == ["pro", "trial"]

    for suffix in (".yaml", ".yml"):
        path = tmp_path / f"defs{suffix}"
        path.write_text(YAML)
        [power] = load_definitions(path)
        assert (power.id, power.entry_limit, power.entry_period) == (
            "power-users",
            "once_per_period",
            timedelta(days=7),
        )

    json_file = tmp_path / "defs.json"
    json_file.write_text(json.dumps({"buckets": [{"id": "j", "criteria": PROP}]}))
    assert [x.id for x in load_definitions(json_file)] == ["j"]

    directory = tmp_path / "dir"
    (directory / "nested").mkdir(parents=True)
    (directory / "a.yaml").write_text(YAML)
    (directory / "b.py").write_text(PY)
    (directory / "_skipped.py").write_text("raise RuntimeError('must not be imported')")
    (directory / ".hidden.yaml").write_text("nonsense: [")
    (directory / "nested" / "c.yaml").write_text("nonsense: [")
    (directory / "notes.txt").write_text("ignored")
    assert [x.id for x in load_definitions(directory)] == ["power-users", "pro", "trial"]

    modules = definition_modules(directory)
    assert [m.pro.id for m in modules] == ["pro"]
    assert definition_modules("pkg_defs_a.buckets_mod")[0].__name__ == "pkg_defs_a.buckets_mod"
    assert definition_modules(json_file) == []


def test_duplicate_ids_across_files_name_both(tmp_path: Path):
    (tmp_path / "a.yaml").write_text(YAML)
    (tmp_path / "b.yaml").write_text(YAML)
    with pytest.raises(DefinitionError) as raised:
        load_definitions(tmp_path)
    message = str(raised.value)
    assert message.startswith("power-users: id: duplicate bucket id (defined in ")
    assert str(tmp_path / "a.yaml") in message
    assert str(tmp_path / "b.yaml") in message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("buckets: [", "cannot read:"),
        ("- just a list", "expected a mapping with a 'buckets:' list at the top"),
        ("other: []", "other: unknown top-level key (expected 'buckets')"),
        ("buckets: {}", "buckets: expected a list of bucket definitions"),
        (
            "buckets:\n  - id: a\n    colour: red\n"
            "    criteria: {type: property, property: p, operator: exists}",
            "a: colour: unknown field",
        ),
        ("buckets:\n  - id: a", "a: criteria: required"),
        (
            "buckets:\n  - criteria: {type: property, property: p, operator: exists}",
            "buckets[0]: id: required",
        ),
        (
            "buckets:\n  - id: a\n    criteria: {type: event, event: e, check: exists, within: 0d}",
            "a: criteria.within: duration must be positive",
        ),
    ],
)
def test_file_errors_are_located(tmp_path: Path, text: str, message: str):
    path = tmp_path / "defs.yaml"
    path.write_text(text)
    with pytest.raises(DefinitionError) as raised:
        load_definitions(path)
    assert str(raised.value).startswith(f"{path}: {message}")


def test_python_errors_and_unknown_sources(tmp_path: Path):
    broken = tmp_path / "broken.py"
    broken.write_text(
        "from buckets import define_bucket\nx = define_bucket(id='Nope', criteria={})\n"
    )
    with pytest.raises(DefinitionError, match=r"broken\.py: Nope: id: must be a slug"):
        load_definitions(broken)
    crashing = tmp_path / "crashing.py"
    crashing.write_text("raise ValueError('boom')\n")
    with pytest.raises(DefinitionError, match=r"crashing\.py: cannot import: ValueError: boom"):
        load_definitions(crashing)
    with pytest.raises(DefinitionError, match="no such file or directory"):
        load_definitions(tmp_path / "missing.yaml")
    with pytest.raises(DefinitionError, match="not a module path, nor an existing"):
        load_definitions("not a/valid source")
    with pytest.raises(DefinitionError, match="cannot import: ModuleNotFoundError"):
        load_definitions("no_such_module_xyz.defs")
