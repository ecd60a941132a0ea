"""Manual buckets (SPEC §3.5): the definition, add/remove, and that no other producer touches
them. The CLI and HTTP surfaces are in tests/test_manual_surfaces.py."""

from __future__ import annotations

import hashlib
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import buckets
from buckets import (
    ManualBucketError,
    MemberIdError,
    add_members,
    b,
    define_bucket,
    delete_contact,
    erase_contact,
    ingest_event,
    journey,
    remove_members,
)
from buckets.definitions import DefinitionError, load_definitions
from buckets.dispatcher import Enrollment, dispatch_once
from buckets.explain import explain
from buckets.models import (
    bucket_due,
    bucket_memberships,
    bucket_transitions,
    contacts,
    journey_enrollments,
    metadata,
)
from buckets.registry import UnknownBucketError, set_enabled
from tests.helpers import active
from workflows import backfill
from workflows.backfill import Runner
from workflows.reconcile import reconcile

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
D = timedelta(days=1)
STAFF = define_bucket(id="staff", criteria=b.manual())
SEEDS = define_bucket(
    id="seeds", criteria={"type": "manual"}, entry_limit="once_per_period", entry_period="7d"
)
EVERYONE = define_bucket(id="all-contacts", criteria=b.everyone())
PRO = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"))


def ledger(rt: Any, bucket_id: str) -> list[Any]:
    with rt.engine.connect() as conn:
        return conn.execute(
            sa.select(bucket_transitions, contacts.c.external_id)
            .join(contacts, contacts.c.id == bucket_transitions.c.contact_id)
            .where(bucket_transitions.c.bucket_id == bucket_id)
            .order_by(bucket_transitions.c.id)
        ).all()


def row_counts(rt: Any) -> dict[str, int]:
    with rt.engine.connect() as conn:
        return {
            table.name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for table in metadata.sorted_tables
        }


# --- the definition ----------------------------------------------------------------------------


def test_literal_builder_and_file_forms_are_one_manual_bucket(tmp_path: Path):
    assert b.manual() == {"type": "manual"}
    assert STAFF.manual
    assert not PRO.manual
    assert STAFF.fingerprint == hashlib.sha256(b'{"type":"manual"}').hexdigest()
    assert STAFF.to_dict()["criteria"] == {"type": "manual"}
    # no clock, no index, not decided for new contacts: no producer ever asks
    assert not STAFF.clocked
    assert not STAFF.on_cron
    assert not STAFF.cron_joins
    assert not STAFF.matches_new_contacts
    assert not STAFF.event_names
    assert not STAFF.property_keys
    (tmp_path / "buckets.yaml").write_text(
        "buckets:\n  - id: staff\n    criteria: {type: manual}\n    entry_limit: once\n"
    )
    (tmp_path / "more.json").write_text(
        '{"buckets": [{"id": "seeds", "criteria": {"type": "manual"}}]}'
    )
    loaded = {bucket.id: bucket for bucket in load_definitions(tmp_path)}
    assert loaded["staff"].fingerprint == loaded["seeds"].fingerprint == STAFF.fingerprint
    assert loaded["staff"].entry_limit == "once"


def test_existing_definitions_keep_their_fingerprint():
    # the canonical JSON of a part-1 tree is unchanged by the new node type
    assert (
        PRO.fingerprint
        == hashlib.sha256(
            b'{"operator":"eq","property":"plan","type":"property","value":"pro"}'
        ).hexdigest()
    )


@pytest.mark.parametrize(
    ("criteria", "path"),
    [
        (b.all(b.manual(), b.prop("plan").eq("pro")), "criteria.conditions[0].type"),
        (b.not_(b.manual()), "criteria.conditions[0].type"),
        (
            b.any(b.prop("a").exists(), b.all(b.manual())),
            "criteria.conditions[1].conditions[0].type",
        ),
    ],
)
def test_manual_is_only_allowed_at_the_root(criteria: Any, path: str):
    with pytest.raises(DefinitionError) as caught:
        define_bucket(id="mixed", criteria=criteria)
    assert caught.value.path == path
    assert str(caught.value).startswith(f"mixed: {path}: 'manual' is only allowed")


def test_a_parsed_manual_node_nested_by_hand_is_refused_too():
    from buckets.criteria.model import Composite, Manual

    with pytest.raises(DefinitionError, match=r"conditions\[0\]\.type: 'manual' is only"):
        define_bucket(id="mixed", criteria=Composite(operator="and", conditions=(Manual(),)))


@pytest.mark.parametrize(
    ("field", "value"), [("max_dwell", "30d"), ("min_dwell", "1d"), ("reconcile_joins", True)]
)
def test_clock_fields_are_refused_on_a_manual_bucket(field: str, value: Any):
    with pytest.raises(DefinitionError, match=f"staff: {field}: not allowed on a manual bucket"):
        define_bucket(id="staff", criteria=b.manual(), **{field: value})


def test_manual_takes_no_other_keys():
    with pytest.raises(DefinitionError, match=r"criteria\.bucket: unknown key"):
        define_bucket(id="staff", criteria={"type": "manual", "bucket": "x"})


# --- add / remove ------------------------------------------------------------------------------


def test_add_then_remove_with_counts_ledger_and_journeys(make_runtime):
    calls: list[Enrollment] = []
    welcome = journey(id="welcome", trigger=SEEDS.entered, exit_on=[SEEDS.left])(calls.append)
    rt = make_runtime(SEEDS, journeys=[welcome])
    ingest_event("known", "signup", now=T0, runtime=rt)

    added = add_members("seeds", ["known", "new-1", "new-2", "new-1"], T0, runtime=rt)
    assert added.to_dict() | {"now": None} == {
        "bucket_id": "seeds",
        "action": "add",
        "now": None,
        "dry_run": False,
        "given": 3,
        "duplicates": 1,
        "added": 3,
        "already_members": 0,
        "created_contacts": 2,
        "deleted_contacts": 0,
        "unchanged": 0,
        "emitted": 3,
        "suppressed": 0,
    }
    assert active(rt, "seeds") == {"known", "new-1", "new-2"}
    rows = ledger(rt, "seeds")
    assert {(r.kind, r.source, r.emitted, r.epoch, r.occurred_at) for r in rows} == {
        ("entered", "admin", True, 1, T0)
    }
    with rt.engine.connect() as conn:
        sources = conn.execute(
            sa.select(bucket_memberships.c.source).where(bucket_memberships.c.bucket_id == "seeds")
        ).scalars()
        assert set(sources) == {"admin"}
    assert set(added.changed) == {"seeds"}
    assert len(added.changed["seeds"]) == 3
    assert dispatch_once(rt, now=T0).enrolled == 3
    assert sorted(call.external_id for call in calls) == ["known", "new-1", "new-2"]

    removed = remove_members("seeds", ["new-1", "stranger", "known"], T0 + D, runtime=rt)
    assert (removed.removed, removed.not_members, removed.given) == (2, 1, 3)
    assert removed.emitted == 2
    assert active(rt, "seeds") == {"new-2"}
    lefts = [r for r in ledger(rt, "seeds") if r.kind == "left"]
    assert {(r.external_id, r.reason, r.source, r.emitted) for r in lefts} == {
        ("new-1", "admin", "admin", True),
        ("known", "admin", "admin", True),
    }
    assert dispatch_once(rt, now=T0 + D).exited == 2
    with rt.engine.connect() as conn:
        statuses = conn.execute(
            sa.select(contacts.c.external_id, journey_enrollments.c.status).join(
                contacts, contacts.c.id == journey_enrollments.c.contact_id
            )
        ).all()
    assert dict(statuses) == {"known": "exited", "new-1": "exited", "new-2": "active"}
    with rt.engine.connect() as conn:  # removing does not create contacts
        assert (
            conn.execute(
                sa.select(sa.func.count()).where(contacts.c.external_id == "stranger")
            ).scalar_one()
            == 0
        )


def test_re_entry_follows_the_entry_limit(make_runtime):
    rt = make_runtime(SEEDS)
    add_members("seeds", ["ann"], T0, runtime=rt)
    remove_members("seeds", ["ann"], T0 + D, runtime=rt)
    again = add_members("seeds", ["ann"], T0 + 2 * D, runtime=rt)  # within 7d of leaving
    assert (again.added, again.emitted, again.suppressed) == (1, 0, 1)
    remove_members("seeds", ["ann"], T0 + 3 * D, runtime=rt)
    later = add_members("seeds", ["ann"], T0 + 11 * D, runtime=rt)  # 8d after leaving
    assert (later.added, later.emitted, later.suppressed) == (1, 1, 0)
    entered = [r for r in ledger(rt, "seeds") if r.kind == "entered"]
    assert [(r.epoch, r.emitted, r.suppressed_by) for r in entered] == [
        (1, True, None),
        (2, False, "entry_limit"),
        (3, True, None),
    ]


def test_running_the_same_list_twice_changes_nothing_the_second_time(make_runtime):
    rt = make_runtime(STAFF)
    ids = [f"user-{n}" for n in range(40)]
    first = add_members("staff", ids, T0, runtime=rt, chunk_size=7)
    assert (first.added, first.created_contacts) == (40, 40)
    before = row_counts(rt)
    second = add_members("staff", ids, T0 + D, runtime=rt, chunk_size=7)
    assert (second.added, second.already_members, second.created_contacts) == (0, 40, 0)
    assert second.changed == {}
    assert row_counts(rt) == before
    gone = remove_members("staff", ids[:10], T0 + D, runtime=rt, chunk_size=3)
    assert gone.removed == 10
    after_remove = row_counts(rt)
    again = remove_members("staff", ids[:10], T0 + 2 * D, runtime=rt, chunk_size=3)
    assert (again.removed, again.not_members) == (0, 10)
    assert row_counts(rt) == after_remove


def test_created_contacts_are_new_contacts_for_the_buckets_new_contacts_match(make_runtime):
    never = define_bucket(id="never-bought", criteria=b.event("purchase").not_exists())
    sample = define_bucket(id="half", criteria=b.sample(50, salt="s"))
    rt = make_runtime(STAFF, EVERYONE, never, sample, PRO)
    ingest_event("old", "purchase", now=T0, runtime=rt)  # joins all-contacts on creation
    result = add_members("staff", ["old", "fresh-1", "fresh-2"], T0 + D, runtime=rt)
    assert result.created_contacts == 2
    assert active(rt, "all-contacts") == {"old", "fresh-1", "fresh-2"}
    assert active(rt, "never-bought") == {"fresh-1", "fresh-2"}  # old bought: not decided again
    hits = sample.criteria.hits  # type: ignore[union-attr]
    assert active(rt, "half") == {who for who in ("old", "fresh-1", "fresh-2") if hits(who)}
    assert active(rt, "pro") == set()
    entered = [r for r in ledger(rt, "all-contacts") if r.external_id.startswith("fresh")]
    assert {(r.source, r.emitted) for r in entered} == {("admin", True)}
    assert set(result.changed["all-contacts"]) == {r.contact_id for r in entered}


def test_deleted_contacts_are_not_added_and_deleting_a_member_leaves(make_runtime):
    rt = make_runtime(STAFF)
    add_members("staff", ["a", "b", "gone"], T0, runtime=rt)
    delete_contact("gone", now=T0 + D, runtime=rt)
    assert active(rt, "staff") == {"a", "b"}
    [left] = [r for r in ledger(rt, "staff") if r.kind == "left"]
    assert (left.reason, left.emitted) == ("contact_deleted", False)
    again = add_members("staff", ["gone", "c"], T0 + 2 * D, runtime=rt)
    assert (again.added, again.deleted_contacts, again.created_contacts) == (1, 1, 1)
    assert active(rt, "staff") == {"a", "b", "c"}
    erase_contact("a", runtime=rt)
    assert active(rt, "staff") == {"b", "c"}


def test_only_explicit_calls_change_a_manual_bucket(make_runtime):
    rt = make_runtime(STAFF, EVERYONE)
    add_members("staff", ["a", "b"], T0, runtime=rt)
    ingest_event("c", "login", now=T0 + D, runtime=rt)  # a new contact: not for staff
    ingest_event("a", "login", contact_properties={"plan": "pro"}, now=T0 + D, runtime=rt)
    before = ledger(rt, "staff")
    assert len(before) == 2
    # the cron, for every bucket and for this one by id; a full sweep too
    tick = reconcile(T0 + 2 * D, runtime=rt, full=True)
    assert "staff" not in {bucket.bucket_id for bucket in tick.buckets}
    [asked] = reconcile(T0 + 2 * D, ["staff"], runtime=rt, full=True).buckets
    assert (asked.status, asked.reason) == ("skipped", "manual")
    # backfills: deployment's first-time job, then an admin one (with emitted joins)
    for job in backfill.deploy(rt, T0 + 3 * D):
        Runner(rt, chunk=1).run(job.id)
    job, created = backfill.start(rt, "staff", T0 + 4 * D, emit=True)
    assert created
    assert job.mode == "admin"
    done = Runner(rt, chunk=1).run(job.id)
    assert (done.status, done.joined, done.left) == ("completed", 0, 0)
    dry = backfill.dry_run(rt, "staff", T0 + 5 * D)
    assert (dry.would_join, dry.would_leave) == (0, 0)
    assert active(rt, "staff") == {"a", "b"}
    assert ledger(rt, "staff") == before
    with rt.engine.connect() as conn:  # no clock: nothing queued
        assert (
            conn.execute(
                sa.select(sa.func.count()).where(bucket_due.c.bucket_id == "staff")
            ).scalar_one()
            == 0
        )


def test_preview_and_explain_read_the_membership(make_runtime):
    from buckets.admin import preview

    rt = make_runtime(STAFF)
    add_members("staff", ["a"], T0, runtime=rt)
    ingest_event("b", "x", now=T0, runtime=rt)
    with rt.engine.connect() as conn:
        shown = preview(conn, STAFF, T0 + D)
    assert (shown.matching, shown.members, shown.would_join, shown.would_leave) == (1, 1, 0, 0)
    member = explain("staff", "a", now=T0 + D, runtime=rt).to_dict()
    assert (member["member"], member["matches"], member["next_change"]) == (True, True, None)
    assert member["membership"]["source"] == "admin"
    assert member["leaves"][0]["condition"].startswith("manual")
    outsider = explain("staff", "b", now=T0 + D, runtime=rt)
    assert (outsider.member, outsider.matches) == (False, False)


def test_not_a_manual_bucket_unknown_or_disabled_write_nothing(make_runtime):
    rt = make_runtime(STAFF, PRO)
    before = row_counts(rt)
    with pytest.raises(ManualBucketError, match="pro: not a manual bucket"):
        add_members("pro", ["a"], T0, runtime=rt)
    with pytest.raises(ManualBucketError, match="pro: not a manual bucket"):
        remove_members("pro", ["a"], T0, runtime=rt)
    with pytest.raises(UnknownBucketError):
        add_members("nope", ["a"], T0, runtime=rt)
    assert row_counts(rt) == before
    with rt.engine.begin() as conn:
        set_enabled(conn, "staff", False)
    before = row_counts(rt)
    with pytest.raises(ManualBucketError, match="staff: the bucket is disabled"):
        add_members("staff", ["a"], T0, runtime=rt)
    assert row_counts(rt) == before


@pytest.mark.parametrize(
    ("ids", "where", "says"),
    [
        (["ok", ""], "external_ids[1]", "must not be empty"),
        (["ok", 7], "external_ids[1]", "must be a string"),
        (["x" * 256], "external_ids[0]", "longer than 255"),
        (["a\x00b"], "external_ids[0]", "NUL"),
        (["a\tb"], "external_ids[0]", "control character"),
        (["a\nb"], "external_ids[0]", "control character"),
        (["\ud800"], "external_ids[0]", "surrogate"),
        ([" padded"], "external_ids[0]", "whitespace"),
        ("just-a-string", "external_ids", "not a single string"),
    ],
)
def test_bad_ids_are_refused_by_index_and_nothing_is_written(
    make_runtime, ids: Any, where: str, says: str
):
    rt = make_runtime(STAFF)
    before = row_counts(rt)
    with pytest.raises(MemberIdError) as caught:
        add_members("staff", ids, T0, runtime=rt)
    assert caught.value.where == where
    assert says in str(caught.value)
    assert "nothing was written" in str(caught.value)
    assert row_counts(rt) == before


def test_a_naive_now_is_refused(make_runtime):
    rt = make_runtime(STAFF)
    with pytest.raises(MemberIdError, match="now: must be timezone-aware"):
        add_members("staff", ["a"], datetime(2026, 11, 1), runtime=rt)


def test_dry_run_counts_and_writes_nothing(make_runtime):
    rt = make_runtime(STAFF)
    add_members("staff", ["a", "b"], T0, runtime=rt)
    delete_contact("b", now=T0, runtime=rt)
    before = row_counts(rt)
    dry = add_members("staff", ["a", "b", "c", "c"], T0 + D, runtime=rt, dry_run=True)
    assert dry.dry_run
    assert (dry.added, dry.already_members, dry.created_contacts, dry.deleted_contacts) == (
        1,
        1,
        1,
        1,
    )
    assert dry.duplicates == 1
    gone = remove_members("staff", ["a", "zed"], T0 + D, runtime=rt, dry_run=True)
    assert (gone.removed, gone.not_members) == (1, 1)
    assert row_counts(rt) == before


def test_exported_from_the_package():
    assert buckets.add_members is add_members
    assert buckets.remove_members is remove_members
    assert "add_members" in buckets.__all__
    assert "remove_members" in buckets.__all__


def test_a_manual_add_and_an_ingest_of_the_same_contacts_serialise(make_runtime):
    """Both lock the contacts (id order): run side by side, each ends with its own effect."""
    rt = make_runtime(STAFF, PRO)
    ids = [f"c{n:03d}" for n in range(200)]
    for who in ids:
        ingest_event(who, "x", now=T0, runtime=rt)
    errors: list[BaseException] = []

    def manual() -> None:
        try:
            add_members("staff", ids, T0 + D, runtime=rt, chunk_size=20)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=manual)
    worker.start()
    for who in reversed(ids[::5]):
        ingest_event(who, "x", contact_properties={"plan": "pro"}, now=T0 + D, runtime=rt)
    worker.join()
    assert not errors
    assert active(rt, "staff") == set(ids)
    assert active(rt, "pro") == set(ids[::5])


def test_an_empty_list_is_a_no_op(make_runtime):
    rt = make_runtime(STAFF)
    before = row_counts(rt)
    seen: list[int] = []
    result = add_members("staff", [], T0, runtime=rt, progress=seen.append)
    assert (result.given, result.added, result.created_contacts) == (0, 0, 0)
    assert remove_members("staff", [], T0, runtime=rt).removed == 0
    assert seen == []
    assert row_counts(rt) == before


def test_progress_reports_every_chunk_up_to_the_total(make_runtime):
    rt = make_runtime(STAFF)
    seen: list[int] = []
    add_members(
        "staff", [f"p{n}" for n in range(10)], T0, runtime=rt, chunk_size=4, progress=seen.append
    )
    assert seen == [4, 8, 10]
    seen.clear()
    remove_members(
        "staff", ["p1", "p2", "ghost"], T0, runtime=rt, chunk_size=4, progress=seen.append
    )
    assert seen == [3]


def test_an_add_waits_for_the_lock_of_a_contact_another_writer_holds(make_runtime):
    """The chunk takes the contacts' row locks (as ingest and the cron do): a writer holding one
    makes the add wait until it commits."""
    rt = make_runtime(STAFF)
    for who in ("a", "b", "c"):
        ingest_event(who, "x", now=T0, runtime=rt)
    done = threading.Event()

    def add() -> None:
        add_members("staff", ["a", "b", "c"], T0, runtime=rt)
        done.set()

    worker = threading.Thread(target=add)
    with rt.engine.connect() as holder:
        holder.execute(
            sa.select(contacts.c.id)
            .where(contacts.c.external_id == "b")
            .with_for_update(key_share=True)  # the producers' lock (the FK checks' does not wait)
        )
        worker.start()
        waiting = 0
        for _ in range(500):  # until the add's backend waits on a lock (bounded polling)
            with rt.engine.connect() as watcher:  # its own snapshot of the activity
                waiting = watcher.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND datname = current_database()"
                    )
                ).scalar_one()
            if waiting:
                break
            threading.Event().wait(0.01)
        assert waiting == 1
        assert not done.is_set()
        assert active(rt, "staff") == set()
        holder.commit()
    worker.join()
    assert done.is_set()
    assert active(rt, "staff") == {"a", "b", "c"}


# --- buckets that refer to a manual bucket (SPEC §3.5) ------------------------------------------


def test_a_suppression_list_cascades_in_the_call_that_changes_it(make_runtime):
    """`all(pro, not_member(staff))` with staff a manual bucket: adding staff makes them leave
    the target, removing them lets them back in, each in the add/remove call's transaction; a
    contact the add creates is decided for the all-negative dependent too."""
    target = define_bucket(id="target", criteria=b.all(b.in_bucket(PRO), b.not_in_bucket(STAFF)))
    outsiders = define_bucket(id="outsiders", criteria=b.not_in_bucket(STAFF))
    rt = make_runtime(PRO, STAFF, target, outsiders)
    for who in ("alice", "bob"):
        ingest_event(who, "signup", contact_properties={"plan": "pro"}, now=T0, runtime=rt)
    assert active(rt, "target") == {"alice", "bob"}
    assert active(rt, "outsiders") == {"alice", "bob"}

    added = add_members("staff", ["bob", "carol"], now=T0 + D, runtime=rt)
    assert (added.added, added.created_contacts) == (2, 1)
    assert active(rt, "staff") == {"bob", "carol"}
    assert active(rt, "target") == {"alice"}
    assert active(rt, "outsiders") == {"alice"}  # carol was created a member of staff
    assert sorted(added.changed) == ["outsiders", "staff", "target"]
    with rt.engine.connect() as conn:
        sources = set(
            conn.execute(
                sa.select(bucket_transitions.c.source).where(
                    bucket_transitions.c.bucket_id.in_(["target", "outsiders"]),
                    bucket_transitions.c.kind == "left",
                )
            ).scalars()
        )
    assert sources == {"admin"}

    remove_members("staff", ["bob"], now=T0 + 2 * D, runtime=rt)
    assert active(rt, "target") == {"alice", "bob"}
    assert active(rt, "outsiders") == {"alice", "bob"}
