"""Buckets that refer to buckets (SPEC §3.5): validation, the graph, and the cascade through
ingest, ticks and backfills, on a real PostgreSQL; time moves through ``now``."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from buckets import b, define_bucket, due, ingest_event, set_enabled
from buckets.criteria import parse_criteria
from buckets.criteria.model import BucketReference, CriteriaError
from buckets.definitions import DefinitionError, criteria_fingerprint
from buckets.explain import explain
from buckets.models import (
    bucket_due,
    bucket_memberships,
    bucket_transitions,
    contacts,
)
from buckets.registry import Registry
from tests.helpers import active, deployed
from workflows.backfill import Runner, deploy
from workflows.reconcile import reconcile

pytestmark = pytest.mark.usefixtures("both_deciders")  # due chunks and cascades: both deciders

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
H = timedelta(hours=1)
D = timedelta(days=1)

PRO = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"))
PRO_FAN = define_bucket(id="pro-fan", criteria=b.in_bucket(PRO))
PRO_FAN_DE = define_bucket(
    id="pro-fan-de", criteria=b.all(b.in_bucket("pro-fan"), b.prop("country").eq("de"))
)


def ledger(rt: Any) -> list[tuple[str, str, str]]:
    with rt.engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                bucket_transitions.c.bucket_id, bucket_transitions.c.kind, contacts.c.external_id
            )
            .join(contacts, contacts.c.id == bucket_transitions.c.contact_id)
            .order_by(bucket_transitions.c.id)
        ).all()
    return [tuple(row) for row in rows]


def kinds(result: Any) -> list[tuple[str, str]]:
    return [(t.bucket_id, t.kind) for t in result.transitions]


# --- the node, the builder, the fingerprint ---------------------------------------------------


def test_builder_gives_the_literal_form_with_a_bucket_or_its_id():
    assert b.in_bucket(PRO) == {"type": "bucket", "bucket": "pro", "check": "member"}
    assert b.in_bucket("pro") == b.in_bucket(PRO)
    assert b.not_in_bucket(PRO) == {"type": "bucket", "bucket": "pro", "check": "not_member"}
    node = parse_criteria(b.not_in_bucket("staff"))
    assert node == BucketReference(bucket="staff", check="not_member")
    assert json.loads(json.dumps(b.in_bucket(PRO))) == b.in_bucket(PRO)  # JSON / YAML form


def test_fingerprint_of_a_reference_is_its_canonical_json_and_older_ones_keep_theirs():
    import hashlib

    expected = hashlib.sha256(b'{"bucket":"pro","check":"member","type":"bucket"}').hexdigest()
    assert criteria_fingerprint(parse_criteria(b.in_bucket("pro"))) == expected
    # a part 1 definition's hash does not move with the new node kind
    assert (
        PRO.fingerprint
        == hashlib.sha256(
            b'{"operator":"eq","property":"plan","type":"property","value":"pro"}'
        ).hexdigest()
    )


@pytest.mark.parametrize(
    ("literal", "path", "message"),
    [
        ({"type": "bucket", "bucket": "pro"}, "check", "required"),
        ({"type": "bucket", "bucket": "pro", "check": "in"}, "check", "member"),
        ({"type": "bucket", "bucket": "Not A Slug", "check": "member"}, "bucket", "bucket id"),
        ({"type": "bucket", "bucket": "pro", "check": "member", "x": 1}, "x", "unknown key"),
    ],
)
def test_malformed_references_are_located(literal, path, message):
    with pytest.raises(CriteriaError) as caught:
        parse_criteria({"type": "composite", "operator": "and", "conditions": [literal]})
    assert caught.value.path == f"conditions[0].{path}"
    assert message in caught.value.message


def test_an_unknown_bucket_is_named_with_the_path_of_the_reference():
    orphan = define_bucket(
        id="orphan", criteria=b.all(b.prop("plan").exists(), b.in_bucket("ghost"))
    )
    with pytest.raises(DefinitionError) as caught:
        Registry([PRO, orphan])
    assert caught.value.bucket_id == "orphan"
    assert caught.value.path == "criteria.conditions[1].bucket"
    assert "'ghost'" in str(caught.value)


def test_an_unknown_reference_in_a_yaml_file_fails_loading(tmp_path):
    path = tmp_path / "buckets.yaml"
    path.write_text(
        "buckets:\n  - id: fans\n    criteria: {type: bucket, bucket: nobody, check: member}\n"
    )
    with pytest.raises(DefinitionError, match=r"buckets.yaml: fans: criteria\.bucket: refers to"):
        Registry.load(str(path))


def test_references_across_files_of_a_directory_load_in_dependency_order(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "buckets:\n  - id: fans\n    criteria: {type: bucket, bucket: pro, check: member}\n"
    )
    (tmp_path / "b.json").write_text(
        json.dumps({"buckets": [{"id": "pro", "criteria": b.prop("plan").eq("pro")}]})
    )
    registry = Registry.load(str(tmp_path))
    assert [bucket.id for bucket in registry] == ["fans", "pro"]
    assert [bucket.id for bucket in registry.ordered(registry)] == ["pro", "fans"]
    assert registry.get("fans").criteria == parse_criteria(b.in_bucket("pro"))


def test_cycles_are_named_and_a_self_reference_is_one():
    first = define_bucket(id="a", criteria=b.all(b.prop("x").exists(), b.in_bucket("b")))
    second = define_bucket(id="b", criteria=b.in_bucket("a"))
    with pytest.raises(DefinitionError) as caught:
        Registry([first, second])
    assert "reference cycle: a → b → a" in str(caught.value)
    assert caught.value.path == "criteria.conditions[1]"
    itself = define_bucket(id="me", criteria=b.not_in_bucket("me"))
    with pytest.raises(DefinitionError, match="reference cycle: me → me"):
        Registry([itself])
    longer = [
        define_bucket(id="c1", criteria=b.in_bucket("c2")),
        define_bucket(id="c2", criteria=b.in_bucket("c3")),
        define_bucket(id="c3", criteria=b.any(b.prop("x").exists(), b.in_bucket("c1"))),
    ]
    with pytest.raises(DefinitionError, match="c1 → c2 → c3 → c1"):
        Registry(longer)


def test_the_registry_orders_by_dependency_and_knows_dependents():
    registry = Registry([PRO_FAN_DE, PRO_FAN, PRO])  # defined dependents first
    assert [bucket.id for bucket in registry.ordered(registry)] == ["pro", "pro-fan", "pro-fan-de"]
    assert [bucket.id for bucket in registry.dependents("pro")] == ["pro-fan", "pro-fan-de"]
    assert registry.dependents("pro-fan-de") == []


# --- ingest: the cascade ----------------------------------------------------------------------


def test_ingest_cascades_a_to_b_to_c_in_one_transaction_in_order(make_runtime):
    rt = make_runtime(PRO_FAN_DE, PRO_FAN, PRO)
    joined = ingest_event(
        "u1", "profile", contact_properties={"plan": "pro", "country": "de"}, now=T0, runtime=rt
    )
    assert kinds(joined) == [
        ("pro", "entered"),
        ("pro-fan", "entered"),
        ("pro-fan-de", "entered"),
    ]
    assert {t.event_id for t in joined.transitions} == {joined.event_id}
    again = ingest_event(  # a repeated key returns the first result, cascade included
        "u2", "profile", contact_properties={"plan": "pro"}, idempotency_key="k", now=T0, runtime=rt
    )
    repeated = ingest_event(
        "u2", "profile", contact_properties={"plan": "pro"}, idempotency_key="k", now=T0, runtime=rt
    )
    assert repeated.status == "duplicate"
    assert kinds(repeated) == kinds(again) == [("pro", "entered"), ("pro-fan", "entered")]
    left = ingest_event(
        "u1", "profile", contact_properties={"plan": "free"}, now=T0 + H, runtime=rt
    )
    assert kinds(left) == [("pro", "left"), ("pro-fan", "left"), ("pro-fan-de", "left")]
    assert ledger(rt) == [
        ("pro", "entered", "u1"),
        ("pro-fan", "entered", "u1"),
        ("pro-fan-de", "entered", "u1"),
        ("pro", "entered", "u2"),
        ("pro-fan", "entered", "u2"),
        ("pro", "left", "u1"),
        ("pro-fan", "left", "u1"),
        ("pro-fan-de", "left", "u1"),
    ]


def test_a_batch_cascades_per_event(make_runtime):
    from buckets import ingest_events

    rt = make_runtime(PRO, PRO_FAN)
    result = ingest_events(
        [
            {"external_id": "u1", "event": "p", "contact_properties": {"plan": "pro"}},
            {"external_id": "u2", "event": "p", "contact_properties": {"plan": "free"}},
            {"external_id": "u1", "event": "p", "contact_properties": {"plan": "free"}},
        ],
        now=T0,
        runtime=rt,
    )
    first, second, third = result.results
    assert kinds(first) == [("pro", "entered"), ("pro-fan", "entered")]
    assert kinds(second) == []
    assert kinds(third) == [("pro", "left"), ("pro-fan", "left")]


def test_a_dependent_the_event_affects_too_is_decided_after_its_reference(make_runtime):
    """B mentions the event itself: deciding it before A would join it and leave it again."""
    used = define_bucket(id="used", criteria=b.event("x").exists())
    fresh = define_bucket(id="fresh", criteria=b.all(b.not_in_bucket(used), b.event("x").exists()))
    rt = make_runtime(fresh, used)
    result = ingest_event("u1", "x", now=T0, runtime=rt)
    assert kinds(result) == [("used", "entered")]
    assert ledger(rt) == [("used", "entered", "u1")]


def test_suppression_list_keeps_staff_out_and_lets_them_in_when_they_leave_it(make_runtime):
    power_users = define_bucket(
        id="power-users", criteria=b.event("feature.used").within("30d").at_least(3)
    )
    staff = define_bucket(id="staff", criteria=b.prop("staff").eq(True))
    target = define_bucket(
        id="target", criteria=b.all(b.in_bucket(power_users), b.not_in_bucket(staff))
    )
    rt = make_runtime(target, power_users, staff)
    for who in ("alice", "bob"):
        props = {"staff": who == "bob"}
        for n in range(3):
            ingest_event(who, "feature.used", contact_properties=props, now=T0 + n * H, runtime=rt)
    assert active(rt, "power-users") == {"alice", "bob"}
    assert active(rt, "staff") == {"bob"}
    assert active(rt, "target") == {"alice"}
    result = ingest_event("bob", "hr", contact_properties={"staff": False}, now=T0 + D, runtime=rt)
    assert kinds(result) == [("staff", "left"), ("target", "entered")]
    assert active(rt, "target") == {"alice", "bob"}


def test_a_disabled_referenced_bucket_is_read_as_it_stands(make_runtime):
    rt = make_runtime(PRO, PRO_FAN_DE, PRO_FAN)
    ingest_event("u1", "p", contact_properties={"plan": "pro"}, now=T0, runtime=rt)
    assert active(rt, "pro-fan") == {"u1"}
    with rt.engine.begin() as conn:
        set_enabled(conn, "pro", False)
    # pro is not decided any more: its member stays, and its dependents read that row
    result = ingest_event(
        "u1", "p", contact_properties={"plan": "free", "country": "de"}, now=T0 + H, runtime=rt
    )
    assert kinds(result) == [("pro-fan-de", "entered")]
    assert active(rt, "pro") == {"u1"}
    # a disabled dependent is not re-decided by the cascade either
    with rt.engine.begin() as conn:
        set_enabled(conn, "pro", True)
        set_enabled(conn, "pro-fan", False)
    result = ingest_event("u1", "p", now=T0 + 2 * H, runtime=rt, contact_properties={"plan": "x"})
    assert kinds(result) == [("pro", "left")]
    assert active(rt, "pro-fan") == {"u1"}  # left as it stood...
    assert active(rt, "pro-fan-de") == {"u1"}  # ...and read as it stands by its dependent


def test_a_new_contact_joins_a_not_member_bucket_and_not_if_it_joins_the_reference(make_runtime):
    everyone = define_bucket(id="everyone", criteria=b.everyone())
    outside = define_bucket(id="outside", criteria=b.not_in_bucket(everyone))
    not_pro = define_bucket(id="not-pro", criteria=b.not_in_bucket(PRO))
    rt = make_runtime(outside, not_pro, everyone, PRO)
    first = ingest_event("u1", "p", contact_properties={"plan": "free"}, now=T0, runtime=rt)
    assert sorted(kinds(first)) == [("everyone", "entered"), ("not-pro", "entered")]
    second = ingest_event("u1", "p", contact_properties={"plan": "pro"}, now=T0 + H, runtime=rt)
    assert kinds(second) == [("pro", "entered"), ("not-pro", "left")]
    assert active(rt, "outside") == set()


def test_explain_shows_the_referenced_membership(make_runtime):
    rt = make_runtime(PRO, PRO_FAN_DE, PRO_FAN)
    ingest_event("u1", "p", contact_properties={"plan": "pro"}, now=T0, runtime=rt)
    found = explain("pro-fan-de", "u1", now=T0 + H, runtime=rt).to_dict()
    reference, country = found["leaves"]
    assert reference["value"] is True
    assert reference["membership"]["bucket_id"] == "pro-fan"
    assert reference["membership"]["epoch"] == 1
    assert reference["membership"]["since"] == T0.isoformat()
    assert "since" in reference["detail"]
    assert country["value"] is False
    ingest_event("u2", "p", contact_properties={"plan": "free"}, now=T0, runtime=rt)
    outside = explain("pro-fan", "u2", now=T0 + H, runtime=rt).to_dict()
    [leaf] = outside["leaves"]
    assert leaf["value"] is False
    assert "membership" not in leaf
    assert leaf["detail"] == "no active membership in 'pro'"


# --- the cron ---------------------------------------------------------------------------------

LAPSED = define_bucket(
    id="lapsed",
    criteria=b.all(
        b.event("feature.used").exists(), b.event("feature.used").within("7d").not_exists()
    ),
)
LAPSED_PRO = define_bucket(
    id="lapsed-pro", criteria=b.all(b.in_bucket(LAPSED), b.prop("plan").eq("pro"))
)


@pytest.mark.parametrize("queue", ["complete", "incomplete"])
def test_a_tick_flips_a_dependent_in_the_same_chunk_after_its_clock_driven_reference(
    make_runtime, queue
):
    """With a complete queue the reference's flip comes from a due chunk; with an incomplete
    one from the full passes: both cascade in their transaction."""
    rt = make_runtime(LAPSED_PRO, LAPSED)
    deployed(rt, LAPSED, LAPSED_PRO)
    if queue == "complete":
        with rt.engine.begin() as conn:
            due.mark_complete(conn, LAPSED)
    ingest_event("u1", "feature.used", contact_properties={"plan": "pro"}, now=T0, runtime=rt)
    ingest_event("u2", "feature.used", contact_properties={"plan": "free"}, now=T0, runtime=rt)
    assert active(rt, "lapsed") == set()
    if queue == "incomplete":  # as after an upgrade: no entries, the full passes do the work
        with rt.engine.begin() as conn:
            conn.execute(sa.delete(bucket_due))
    tick = reconcile(T0 + 8 * D, runtime=rt)
    assert not tick.failed
    assert [item.bucket_id for item in tick.buckets] == ["lapsed", "lapsed-pro"]
    assert active(rt, "lapsed") == {"u1", "u2"}
    assert active(rt, "lapsed-pro") == {"u1"}
    assert ledger(rt) == [
        ("lapsed", "entered", "u1"),
        ("lapsed", "entered", "u2"),
        ("lapsed-pro", "entered", "u1"),
    ]
    counts = {item.bucket_id: item for item in tick.buckets}
    assert counts["lapsed-pro"].joined == 1
    assert counts["lapsed"].due == (2 if queue == "complete" else 0)
    assert counts["lapsed"].passes_ran == ("no" if queue == "complete" else "incomplete queue")
    # activity again: the reference leaves through ingest, and the dependent with it
    back = ingest_event("u1", "feature.used", now=T0 + 9 * D, runtime=rt)
    assert kinds(back) == [("lapsed", "left"), ("lapsed-pro", "left")]


def test_the_full_sweep_reads_memberships_inside_a_statement_over_memberships(make_runtime):
    """The set-wide criteria-leaves pass of a bucket runs over bucket_memberships; its
    reference probes a membership row of another bucket (an alias, never the outer row)."""
    recent_pro = define_bucket(
        id="recent-pro",
        criteria=b.all(b.in_bucket(PRO), b.event("feature.used").within("7d").exists()),
    )
    rt = make_runtime(PRO, recent_pro)
    deployed(rt, PRO, recent_pro)
    for who in ("u1", "u2"):
        ingest_event(who, "feature.used", contact_properties={"plan": "pro"}, now=T0, runtime=rt)
    assert active(rt, "recent-pro") == {"u1", "u2"}
    with rt.engine.begin() as conn:  # around the engine: u1's pro row ends
        conn.execute(
            sa.update(bucket_memberships)
            .where(
                bucket_memberships.c.bucket_id == "pro",
                bucket_memberships.c.contact_id
                == sa.select(contacts.c.id).where(contacts.c.external_id == "u1").scalar_subquery(),
            )
            .values(status="left", left_at=T0 + H, leave_reason="admin")
        )
    tick = reconcile(T0 + 2 * H, runtime=rt, full=True)
    assert not tick.failed
    assert active(rt, "recent-pro") == {"u2"}


# --- backfills --------------------------------------------------------------------------------


def test_jobs_run_in_dependency_order_and_a_criteria_change_reevaluates_dependents(make_runtime):
    rt = make_runtime(PRO_FAN, PRO)
    rt.registry = Registry()  # contacts written before the buckets were deployed
    for who, plan in (("u1", "pro"), ("u2", "free"), ("u3", "pro")):
        ingest_event(who, "p", contact_properties={"plan": plan}, now=T0, runtime=rt)
    rt.registry = Registry([PRO_FAN, PRO])
    created = deploy(rt, T0 + H)
    assert [job.bucket_id for job in created] == ["pro", "pro-fan"]
    done = Runner(rt, chunk=2).run_pending()
    assert [job.bucket_id for job in done] == ["pro", "pro-fan"]
    assert active(rt, "pro") == active(rt, "pro-fan") == {"u1", "u3"}
    # pro's criteria change: its re-evaluation, then pro-fan's, follow
    free = define_bucket(id="pro", criteria=b.prop("plan").eq("free"))
    rt.registry = Registry([PRO_FAN, free])
    created = deploy(rt, T0 + 2 * H)
    assert [(job.bucket_id, job.mode) for job in created] == [("pro", "reevaluate")]
    done = Runner(rt, chunk=2).run_pending()
    assert [(job.bucket_id, job.mode, job.status) for job in done] == [
        ("pro", "reevaluate", "completed"),
        ("pro-fan", "reevaluate", "completed"),
    ]
    assert active(rt, "pro") == active(rt, "pro-fan") == {"u2"}
    # leaves were emitted (journeys exit); the silent joins were not
    with rt.engine.connect() as conn:
        rows = conn.execute(
            sa.select(bucket_transitions.c.kind, bucket_transitions.c.emitted).where(
                bucket_transitions.c.bucket_id == "pro-fan",
                bucket_transitions.c.occurred_at == T0 + 2 * H,
            )
        ).all()
    assert sorted(rows) == [("entered", False), ("left", True), ("left", True)]


def test_a_dependent_job_waits_for_its_reference(make_runtime):
    from workflows import jobs

    rt = make_runtime(PRO_FAN, PRO)
    ingest_event("u1", "p", contact_properties={"plan": "pro"}, now=T0, runtime=rt)
    with rt.engine.begin() as conn:
        fan_job, _ = jobs.enqueue(conn, PRO_FAN, "first_time", as_of=T0 + H)  # enqueued first
        pro_job, _ = jobs.enqueue(conn, PRO, "first_time", as_of=T0 + H)
    runner = Runner(rt, chunk=5)
    with rt.engine.begin() as conn:
        assert runner._waiting(conn) == ["pro-fan"]
    done = runner.run_pending()
    assert [job.id for job in done] == [pro_job.id, fan_job.id]
