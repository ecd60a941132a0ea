"""Hostile definitions (issue 15, item 6): refused at load with a located, one-line error, in
bounded time and memory; what the limits still accept compiles and runs on PostgreSQL."""

from __future__ import annotations

import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

from buckets import DefinitionError, b, define_bucket, ingest_event, load_definitions
from buckets.criteria import (
    Composite,
    EventCondition,
    clock_select,
    evaluate,
    in_memory_counter,
    leaf_facts,
    member_select,
    probe_predicate,
)
from buckets.criteria.evaluate import Event
from buckets.criteria.model import (
    MAX_CONDITIONS,
    MAX_COUNT,
    MAX_DEPTH,
    MAX_EVENT_CONDITIONS,
    leaves,
)
from buckets.explain import explain
from buckets.models import bucket_memberships, contacts
from workflows.cli import main

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
NOWHERE = "postgresql://nobody@127.0.0.1:1/none"
LEAF = {"type": "event", "event": "e", "check": "exists"}


def chain(depth: int) -> dict[str, Any]:
    """Composites nested so that the innermost leaf is at level ``depth`` (the root is 1)."""
    node: dict[str, Any] = dict(LEAF)
    for _ in range(depth - 1):
        node = {"type": "composite", "operator": "and", "conditions": [node]}
    return node


def any_of(count: int) -> dict[str, Any]:
    """An OR of ``count`` conditions on distinct events (one aggregate each in SQL)."""
    return b.any(*[b.event(f"e{i}").within("7d").exists() for i in range(count)])


def widest(events: int, properties: int) -> dict[str, Any]:
    """An OR of ``events`` event conditions and ``properties`` property conditions."""
    plans = [b.prop(f"p{i % 5}").eq(f"v{i}") for i in range(properties)]
    return b.any(*any_of(events)["conditions"], *plans)


def deep_and_wide(depth: int, events: int, properties: int) -> dict[str, Any]:
    """A flat OR of conditions under ``depth - 1`` more levels of composites, each adding one
    event condition (the shape whose clock query doubles per level)."""
    node: dict[str, Any] = widest(events, properties)
    for _ in range(depth - 1):
        node = b.all(node, b.event("z").within("1d").exists())
    return node


def shared_bomb(levels: int, fan: int = 10) -> dict[str, Any]:
    """``fan ** levels`` leaves out of ``levels`` objects, each sharing its child."""
    node: dict[str, Any] = dict(LEAF)
    for _ in range(levels):
        node = {"type": "composite", "operator": "or", "conditions": [node] * fan}
    return node


def cyclic() -> dict[str, Any]:
    node: dict[str, Any] = {"type": "composite", "operator": "or", "conditions": []}
    node["conditions"].append(node)
    return node


def within(value: str) -> dict[str, Any]:
    return {**LEAF, "within": value}


def count(value: int) -> dict[str, Any]:
    return {"type": "event", "event": "e", "check": "count", "operator": "gte", "value": value}


PROP = {"type": "property", "property": "plan", "operator": "eq", "value": "pro"}
DEEP_PATH = "criteria" + ".conditions[0]" * MAX_DEPTH
HOSTILE: list[tuple[str, dict[str, Any], str]] = [
    ("within 1000000d", {"criteria": within("1000000d")}, "criteria.within: duration '1000000d'"),
    ("within 999999999d", {"criteria": within("999999999d")}, "criteria.within: duration"),
    ("within 36501d", {"criteria": within("36501d")}, "criteria.within: duration '36501d' is"),
    ("within 10**30 s", {"criteria": within("1" + "0" * 30 + "s")}, "criteria.within: duration"),
    ("within Arabic-Indic", {"criteria": within("\u0663d")}, "criteria.within: cannot parse"),
    ("within timedelta", {"criteria": within(timedelta(days=40_000))}, "criteria.within: duration"),  # type: ignore[arg-type]
    (
        "entry_period 999999999d",
        {"criteria": PROP, "entry_limit": "once_per_period", "entry_period": "999999999d"},
        "entry_period: duration '999999999d' is longer than the maximum of 36,500 days",
    ),
    ("max_dwell 999999999d", {"criteria": PROP, "max_dwell": "999999999d"}, "max_dwell: duration"),
    ("min_dwell 1000000d", {"criteria": PROP, "min_dwell": "1000000d"}, "min_dwell: duration"),
    ("count 10**20", {"criteria": count(10**20)}, "criteria.value: count value must be at most"),
    ("count max + 1", {"criteria": count(MAX_COUNT + 1)}, "criteria.value: count value must be"),
    ("count 10**5000", {"criteria": count(10**5000)}, "criteria.value: count value must be"),
    ("value 10**5000", {"criteria": {**PROP, "value": 10**5000}}, "criteria.value: cannot be"),
    ("NUL in event", {"criteria": {**LEAF, "event": "e\x00"}}, "criteria.event: contains a NUL"),
    ("NUL in property", {"criteria": {**PROP, "property": "p\x00"}}, "criteria.property: contains"),
    (
        "NUL in a value",
        {"criteria": {**PROP, "value": "pro\x00"}},
        "criteria.value: contains a NUL",
    ),
    (
        "NUL in a where key",
        {"criteria": {**LEAF, "where": [{**PROP, "property": "\x00"}]}},
        "criteria.where[0].property: contains a NUL",
    ),
    (
        "surrogate in event",
        {"criteria": {**LEAF, "event": "\ud800"}},
        "criteria.event: contains a lone surrogate",
    ),
    (
        "surrogate in a value",
        {"criteria": {**PROP, "value": "a\udfff"}},
        "criteria.value: contains a lone surrogate",
    ),
    ("NUL in name", {"criteria": PROP, "name": "x\x00"}, "name: contains a NUL"),
    ("surrogate in name", {"criteria": PROP, "name": "\ud800"}, "name: contains a lone surrogate"),
    ("NUL in description", {"criteria": PROP, "description": "\x00"}, "description: contains"),
    (
        f"{MAX_CONDITIONS + 1} conditions",
        {"criteria": widest(1, MAX_CONDITIONS)},
        f"criteria.conditions[{MAX_CONDITIONS}]: more than {MAX_CONDITIONS} conditions",
    ),
    (
        f"{MAX_EVENT_CONDITIONS + 1} event conditions",
        {"criteria": any_of(MAX_EVENT_CONDITIONS + 1)},
        f"criteria.conditions[{MAX_EVENT_CONDITIONS}]: more than {MAX_EVENT_CONDITIONS} event",
    ),
    ("OR of 1,000 events", {"criteria": any_of(1000)}, "criteria.conditions[64]: more than 64"),
    ("1,665 leaves", {"criteria": widest(0, 1665)}, "criteria.conditions[256]: more than 256"),
    (
        "where of 300",
        {"criteria": {**LEAF, "where": [PROP] * 300}},
        "criteria.where[255]: more than 256 conditions",
    ),
    (f"depth {MAX_DEPTH + 1}", {"criteria": chain(MAX_DEPTH + 1)}, f"{DEEP_PATH}: nested deeper"),
    ("depth 500", {"criteria": chain(500)}, f"{DEEP_PATH}: nested deeper than 12 levels"),
    ("depth 10,000", {"criteria": chain(10_000)}, f"{DEEP_PATH}: nested deeper than 12 levels"),
    ("self-reference", {"criteria": cyclic()}, f"{DEEP_PATH}: nested deeper than 12 levels"),
    ("shared 10**9 leaves", {"criteria": shared_bomb(9)}, "more than 64 event conditions"),
    (
        "held_for 999999999d",
        {"criteria": {**PROP, "held_for": {"at_least": "999999999d"}}},
        "criteria.held_for.at_least: duration '999999999d' is longer than the maximum",
    ),
    (
        "held_for a list",
        {"criteria": {**PROP, "held_for": [{"at_least": "1d"}]}},
        "criteria.held_for: ",
    ),
    (
        "held_for in a where",
        {"criteria": {**LEAF, "where": [{**PROP, "held_for": {"less_than": "1d"}}]}},
        "criteria.where[0].held_for: held_for is not allowed in where",
    ),
    (
        "where under where",
        {"criteria": {**LEAF, "where": [LEAF]}},
        "criteria.where[0].type: where conditions must be of type 'property'",
    ),
]


@pytest.mark.parametrize(("name", "fields", "message"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_definitions_are_refused_with_a_located_error(name, fields, message):
    started = time.perf_counter()
    with pytest.raises(DefinitionError) as raised:
        define_bucket(id="hostile", **fields)
    assert time.perf_counter() - started < 1
    text = str(raised.value)
    assert text.startswith("hostile: ")
    assert message in text
    assert "\n" not in text
    assert len(text) < 1000


def test_existing_fingerprints_are_unchanged():
    """The hash of every definition that was valid before the limits (computed with the code
    before them) is unchanged: upgrading redeploys nothing."""
    before = {
        "ebf86032f789d56636b5584a660104042630690ef158ee4ef55b7af6a29d2161": b.all(
            b.event("feature.used").exists(), b.event("feature.used").within("7d").not_exists()
        ),
        "7a52ef2fbceb01c7b1857c1dcce1564d3caf9141b1085f27fedd5f4a1667ebd8": b.event("feature.used")
        .within("30d")
        .at_least(10),
        "fb6f8d40a4b1846bfb694b7a35fb687fa6ca91cb1a229f04e78faffdeff32f83": b.prop("plan").eq(
            "trial"
        ),
        "25007b2911164758ecc6e0f0226146b4620ed04469ea5251a82703877e9c7e4f": b.all(
            b.prop("plan").eq("pro"),
            b.event("purchase")
            .within("2w")
            .where(b.prop("amount").gte(49.99), b.prop("currency").eq("EUR"))
            .count("gte", 5),
            b.any(
                b.prop("country").eq("DE"),
                b.prop("country").eq("FR"),
                b.prop("vip").eq(True),
                b.prop("x").eq(None),
            ),
            b.event("login").within(timedelta(hours=36)).less_than(3),
            b.prop("tags").contains("beta"),
            b.prop("score").lt(-1.5),
        ),
        "ec0b35e8b5a5eb2ce2b7482438ecbdfa48aa97c1b01b496f37c4da932dfad740": b.any(
            b.event("a").within("90m").exists(),
            b.event("b").within("86400s").exists(),
            b.event("c").within("0007d").exists(),
            b.event("d").within("36500d").exists(),
        ),
        "f6a1701b514e0bf794d4c9cba8f7bf289dc25b22e9e870877c715350a31c32ae": b.all(
            b.prop("ville").eq("Zürich ✓"), b.event("café.ouvert").exists()
        ),
        "5df45dae658d7b0e79eafccb29952d7295547be01e0b2efed74538e6d61b0b94": b.event("e").count(
            "gte", 1_000_000_000
        ),
    }
    for fingerprint, criteria in before.items():
        assert define_bucket(id="x", criteria=criteria).fingerprint == fingerprint


# --- files: bounded parsing, one-line errors ---------------------------------------------------


def alias_bomb(levels: int = 9, fan: int = 10) -> str:
    """A YAML bucket whose criteria expand to ``fan ** levels`` leaves through nested aliases
    (under 1 KB for 10**9)."""
    inner = "&n0 {type: event, event: e, check: exists}"
    for level in range(1, levels + 1):
        items = ", ".join([inner] + [f"*n{level - 1}"] * (fan - 1))
        inner = f"&n{level} {{type: composite, operator: or, conditions: [{items}]}}"
    return f"buckets:\n  - id: bomb\n    criteria: {inner}\n"


def deep_yaml(depth: int) -> str:
    return "buckets: " + "[" * depth + "]" * depth + "\n"


def deep_json(depth: int) -> str:
    return '{"buckets": ' + "[" * depth + "]" * depth + "}"


def criteria_yaml(depth: int) -> str:
    """A valid-looking YAML bucket whose criteria are nested ``depth`` levels."""
    text = "{type: event, event: e, check: exists}"
    for _ in range(depth - 1):
        text = f"{{type: composite, operator: and, conditions: [{text}]}}"
    return f"buckets:\n  - id: deep\n    criteria: {text}\n"


FILES: list[tuple[str, str, str, str]] = [
    ("alias bomb", "bomb.yaml", alias_bomb(), "cannot read: YAML document expands to more than"),
    ("self anchor", "self.yaml", "buckets: &b [*b]\n", "cannot read: YAML alias refers to a node"),
    ("merge onto itself", "merge.yaml", "buckets: &m {<<: *m}\n", "cannot read: YAML alias"),
    ("YAML 10,000 deep", "deep.yaml", deep_yaml(10_000), "cannot read: YAML nested more than 80"),
    ("JSON 500 deep", "deep.json", deep_json(500), "cannot read: JSON nested 501 levels deep"),
    ("JSON 100,000 deep", "huge.json", deep_json(100_000), "cannot read: JSON nested 100001"),
    ("criteria 33 deep", "c.yaml", criteria_yaml(33), f"deep: {DEEP_PATH}: nested deeper"),
    ("invalid UTF-8", "bad.yaml", "buckets: [\udcff]\n", "cannot read: 'utf-8' codec can't decode"),
    ("Arabic-Indic", "d.yaml", criteria_yaml(1).replace("}", ", within: \u0663d}"), "cannot parse"),
    (
        "YAML syntax",
        "syntax.yaml",
        "buckets:\n  - id: a\n   criteria: [\n",
        "cannot read: while parsing a block collection: expected <block end>, but found"
        " '<block mapping start>' (line 3, column 4)",
    ),
]


@pytest.mark.parametrize(("name", "file", "text", "message"), FILES, ids=[f[0] for f in FILES])
def test_hostile_files_are_refused_quickly_in_one_line(tmp_path: Path, name, file, text, message):
    path = tmp_path / file
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    started = time.perf_counter()
    with pytest.raises(DefinitionError) as raised:
        load_definitions(path)
    seconds = time.perf_counter() - started
    tracemalloc.start()
    try:
        with pytest.raises(DefinitionError):
            load_definitions(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(raised.value).startswith(f"{path}: ")
    assert message in str(raised.value)
    assert seconds < 2
    assert peak < 50 * 2**20
    # the definitions are loaded before the first connection: the address is never dialled
    code, out, err = _cli("list", "--definitions", str(path), "--database-url", NOWHERE)
    assert (code, out) == (2, "")  # a definition error: configuration, exit 2
    assert err.startswith("buckets: error: ")
    assert err.count("\n") == 1
    assert message in err


def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_yaml_aliases_within_the_bounds_still_load(tmp_path: Path):
    """Anchors sharing a fragment are legitimate: they load, to the fingerprint of the
    written-out form; a UTF-8 byte order mark is not content."""
    shared = tmp_path / "shared.yaml"
    shared.write_text(
        "\ufeffbuckets:\n"
        "  - id: a\n"
        "    criteria: &used {type: event, event: feature.used, check: exists}\n"
        "  - id: b\n"
        "    criteria: {type: composite, operator: and, conditions: [*used, &pro "
        "{type: property, property: plan, operator: eq, value: pro}]}\n"
        "  - id: c\n"
        "    criteria: {type: composite, operator: or, conditions: [*pro, *pro]}\n",
        encoding="utf-8",
    )
    a, b_, c = load_definitions(shared)
    assert (
        a.fingerprint
        == define_bucket(id="a", criteria=b.event("feature.used").exists()).fingerprint
    )
    assert len(leaves(b_.criteria)) == 2
    assert len(leaves(c.criteria)) == 2


# --- at the limits, everything still compiles and runs ---------------------------------------


def test_an_or_of_the_most_conditions_compiles_evaluates_and_runs(make_runtime):
    largest = MAX_CONDITIONS - MAX_EVENT_CONDITIONS
    widest_ = define_bucket(id="widest", criteria=widest(MAX_EVENT_CONDITIONS, largest))
    deepest = define_bucket(id="deepest", criteria=chain(MAX_DEPTH))
    heaviest = define_bucket(id="heaviest", criteria=deep_and_wide(3, 62, 192))
    rt = make_runtime(widest_, deepest, heaviest)
    last = f"e{MAX_EVENT_CONDITIONS - 1}"
    result = ingest_event("a", last, now=T0, runtime=rt)
    assert [t.bucket_id for t in result.transitions] == ["widest"]
    assert [t.bucket_id for t in ingest_event("b", "e", now=T0, runtime=rt).transitions] == [
        "deepest"
    ]
    ingest_event("c", "z", now=T0, runtime=rt)
    joined = ingest_event("c", "e0", now=T0, runtime=rt)
    assert sorted(t.bucket_id for t in joined.transitions) == ["heaviest", "widest"]
    conditions = [leaf for leaf in leaves(widest_.criteria) if isinstance(leaf, EventCondition)]
    assert len(leaves(widest_.criteria)) == MAX_CONDITIONS
    with rt.engine.connect() as conn:
        for bucket, members in (
            (widest_, ["a", "c"]),
            (deepest, ["b"]),
            (heaviest, ["c"]),
        ):
            assert_compiled_members(conn, bucket.criteria, T0, members)
            clocked = conn.execute(clock_select(bucket.criteria, T0)).all()
            assert sorted(row.id for row in clocked if row.matches) == sorted(
                conn.execute(
                    sa.select(contacts.c.id).where(contacts.c.external_id.in_(members))
                ).scalars()
            )
        rows = conn.execute(leaf_facts(conditions, T0, [1, 2, 3])).all()
        assert len(rows) == 3
    history = [Event(last, T0)]
    assert evaluate(widest_.criteria, {}, in_memory_counter(history, T0)) is True
    assert explain("widest", "a", now=T0, runtime=rt).member is True
    str(member_select(widest_.criteria, T0).compile(dialect=postgresql.dialect()))


def test_the_largest_count_and_duration_run_at_the_edges_of_time(make_runtime):
    """``count <= MAX_COUNT`` fits the probes' bigint offsets; durations up to 36,500 days
    stay inside Python's and PostgreSQL's ranges from BUCKETS_MIN_INSTANT to
    BUCKETS_MAX_INSTANT: ``now - within`` at the earliest instant, ``now + max_dwell`` at the
    latest, and explain reading both back."""
    most = define_bucket(
        id="most",
        criteria=b.any(
            b.event("e").within("36500d").count("gte", MAX_COUNT),
            b.event("e").within("36500d").count("eq", MAX_COUNT),
            b.event("e").within("36500d").exists(),
            b.prop("plan").exists().held_for(at_least="36500d"),
            b.prop("plan").exists().held_for(less_than="36500d"),
        ),
        max_dwell="36500d",
        min_dwell="36500d",
    )
    rt = make_runtime(most)
    earliest, latest = rt.settings.min_instant, rt.settings.max_instant
    plan = {"plan": "x"}  # changed_at at each edge: held_for's flip is 36,500 days later
    ingest_event(
        "early", "e", occurred_at=earliest, contact_properties=plan, now=earliest, runtime=rt
    )
    late = ingest_event(
        "late", "e", occurred_at=latest, contact_properties=plan, now=latest, runtime=rt
    )
    assert [t.kind for t in late.transitions] == ["entered"]
    with rt.engine.connect() as conn:
        stamped = conn.execute(
            sa.select(bucket_memberships.c.max_dwell_at).where(
                bucket_memberships.c.contact_id == late.contact_id
            )
        ).scalar_one()
        assert stamped == latest + timedelta(days=36_500)
        for now in (earliest, latest):
            conn.execute(
                sa.select(sa.func.count())
                .select_from(contacts)
                .where(probe_predicate(most.criteria, now))
            ).scalar_one()
            conn.execute(member_select(most.criteria, now)).all()
    for who, now in (("early", earliest), ("late", latest)):
        explained = explain("most", who, now=now, runtime=rt)
        assert explained.member is True
    assert isinstance(most.criteria, Composite)


def test_the_clock_query_grows_with_the_tree_not_with_its_depth():
    """Each nested composite is computed once (a lateral its parent reads): 254 conditions five
    levels deep stay a small statement (it was 1.8 MB when children were inlined)."""
    from datetime import UTC, datetime

    from sqlalchemy.dialects import postgresql

    from buckets.criteria import parse_criteria
    from buckets.criteria.compile_clock import clock_select

    now = datetime(2026, 11, 22, tzinfo=UTC)
    sizes = [
        len(
            str(
                clock_select(parse_criteria(deep_and_wide(depth, 60, 190)), now).compile(
                    dialect=postgresql.dialect()
                )
            )
        )
        for depth in (3, 5)
    ]
    assert sizes[1] < 300_000
    assert sizes[1] < 2 * sizes[0]


def test_the_longest_sequences_compile_evaluate_and_run(make_runtime):
    """Four sequences of 16 steps (the event-condition budget), the last step absent, with the
    longest durations, under the deepest composites: the nested EXISTS, the window-function
    clock and the per-contact facts all compile and run."""
    steps = [b.step("e0")] + [b.step(f"e{i}", gap="36500d") for i in range(1, 15)]
    steps.append(b.step("stop", gap="1h", absent=True))
    sequence = b.sequence(*steps, within="36500d")
    criteria = b.any(sequence, sequence, sequence, sequence)
    for _ in range(MAX_DEPTH - 3):  # the steps' where would be one level deeper
        criteria = b.any(criteria)
    longest = define_bucket(id="longest", criteria=criteria)
    rt = make_runtime(longest)
    minute = timedelta(minutes=1)
    for i in range(15):
        at = T0 + i * minute
        ingest_event("a", f"e{i}", occurred_at=at, now=at, runtime=rt)
        ingest_event("b", f"e{i}", occurred_at=at, now=at, runtime=rt)
    last = T0 + 14 * minute
    ingest_event("b", "stop", occurred_at=last + minute, now=last + minute, runtime=rt)
    done = last + timedelta(hours=1)
    with rt.engine.connect() as conn:
        for now, members in ((done - timedelta(microseconds=1), []), (done, ["a"])):
            assert_compiled_members(conn, longest.criteria, now, members)
            clocked = {row.id: row for row in conn.execute(clock_select(longest.criteria, now))}
            assert sum(row.matches for row in clocked.values()) == len(members)
    explained = explain("longest", "a", now=last, runtime=rt)
    assert explained.next_change is not None
    assert explained.next_change.at == done
    assert explain("longest", "a", now=done, runtime=rt).matches is True


def assert_compiled_members(
    conn: Connection, criteria: Any, now: datetime, members: list[str]
) -> None:
    """The set-wide compiled query and the per-contact probes both hold exactly ``members``."""
    found = conn.execute(
        sa.select(contacts.c.external_id).where(contacts.c.id.in_(member_select(criteria, now)))
    ).scalars()
    assert sorted(found) == members
    probed = conn.execute(
        sa.select(contacts.c.external_id).where(probe_predicate(criteria, now))
    ).scalars()
    assert sorted(probed) == members
