"""The real-time path (SPEC §5, §8, §11) on a real PostgreSQL; time moves through ``now``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from buckets import (
    IngestError,
    b,
    define_bucket,
    delete_contact,
    erase_contact,
    ingest_event,
    ingest_events,
    set_enabled,
)
from buckets.models import (
    bucket_memberships,
    bucket_transitions,
    contacts,
    user_events,
)

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
H = timedelta(hours=1)
D = timedelta(days=1)

PRO = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"))
ACTIVE = define_bucket(id="active", criteria=b.event("feature.used").within("7d").at_least(2))


def memberships(rt: Any, bucket_id: str | None = None) -> list[Any]:
    query = (
        sa.select(bucket_memberships, contacts.c.external_id)
        .join(contacts, contacts.c.id == bucket_memberships.c.contact_id)
        .order_by(bucket_memberships.c.id)
    )
    if bucket_id:
        query = query.where(bucket_memberships.c.bucket_id == bucket_id)
    with rt.engine.connect() as conn:
        return conn.execute(query).all()


def ledger(rt: Any) -> list[Any]:
    with rt.engine.connect() as conn:
        return conn.execute(sa.select(bucket_transitions).order_by(bucket_transitions.c.id)).all()


def count(rt: Any, table: sa.Table) -> int:
    with rt.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


def kinds(result: Any) -> list[tuple[str, str, bool]]:
    return [(t.bucket_id, t.kind, t.emitted) for t in result.transitions]


# --- join / leave / stable -----------------------------------------------------------------


def test_property_change_joins_then_leaves_then_stays_out(make_runtime):
    rt = make_runtime(PRO)
    joined = ingest_event(
        "alice", "signup", {}, contact_properties={"plan": "pro"}, now=T0, runtime=rt
    )
    assert joined.status == "accepted"
    assert kinds(joined) == [("pro", "entered", True)]
    [t] = joined.transitions
    assert t.idempotency_key == "bucket:pro:alice:entered:1"
    assert t.event_id == joined.event_id
    assert t.occurred_at == T0
    left = ingest_event(
        "alice", "plan.changed", {}, contact_properties={"plan": "free"}, now=T0 + H, runtime=rt
    )
    assert kinds(left) == [("pro", "left", True)]
    assert left.transitions[0].reason == "criteria"
    still_out = ingest_event(
        "alice", "x", {}, contact_properties={"plan": "free"}, now=T0 + 2 * H, runtime=rt
    )
    assert still_out.transitions == []
    [row] = memberships(rt)
    assert (row.status, row.entry_count, row.left_at, row.source) == ("left", 1, T0 + H, "ingest")


def test_member_who_still_matches_is_stable_and_touched(make_runtime):
    rt = make_runtime(PRO)
    ingest_event("alice", "a", {}, contact_properties={"plan": "pro"}, now=T0, runtime=rt)
    again = ingest_event(
        "alice", "b", {}, contact_properties={"plan": "pro", "seats": 3}, now=T0 + H, runtime=rt
    )
    assert again.transitions == []
    [row] = memberships(rt)
    assert (row.status, row.entered_at, row.last_evaluated_at) == ("active", T0, T0 + H)


def test_event_count_bucket_joins_on_the_second_event(make_runtime):
    rt = make_runtime(ACTIVE)
    first = ingest_event("bob", "feature.used", {}, occurred_at=T0 - H, now=T0, runtime=rt)
    assert first.transitions == []
    second = ingest_event("bob", "feature.used", {}, now=T0 + H, runtime=rt)
    assert kinds(second) == [("active", "entered", True)]


def test_events_outside_the_window_or_after_now_do_not_count(make_runtime):
    rt = make_runtime(ACTIVE)
    ingest_event("bob", "feature.used", {}, occurred_at=T0 - 8 * D, now=T0, runtime=rt)
    future = T0 + timedelta(minutes=4)  # allowed by the clock skew, but after now
    assert ingest_event("bob", "feature.used", {}, occurred_at=future, now=T0, runtime=rt)
    assert memberships(rt) == []
    counted = ingest_event("bob", "feature.used", {}, occurred_at=future, now=future, runtime=rt)
    assert kinds(counted) == [("active", "entered", True)]


def test_unaffected_buckets_are_never_touched(make_runtime):
    rt = make_runtime(PRO, ACTIVE)
    ingest_event(
        "alice", "feature.used", {}, contact_properties={"plan": "pro"}, now=T0, runtime=rt
    )
    before = {row.bucket_id: row.last_evaluated_at for row in memberships(rt)}
    assert before == {"pro": T0}
    ingest_event("alice", "page.viewed", {}, contact_properties={"x": 1}, now=T0 + H, runtime=rt)
    assert {row.bucket_id: row.last_evaluated_at for row in memberships(rt)} == before


def test_where_on_event_properties(make_runtime):
    big = define_bucket(
        id="big-spender",
        criteria=b.event("purchase").where(b.prop("amount").gte(100)).exists(),
    )
    rt = make_runtime(big)
    assert ingest_event("c", "purchase", {"amount": 50}, now=T0, runtime=rt).transitions == []
    assert ingest_event("c", "purchase", {"amount": "500"}, now=T0, runtime=rt).transitions == []
    joined = ingest_event("c", "purchase", {"amount": 100}, now=T0, runtime=rt)
    assert kinds(joined) == [("big-spender", "entered", True)]


# --- entry limits, dwell ---------------------------------------------------------------------


def flip(rt: Any, plan: str, at: datetime) -> list[tuple[str, int, bool, str | None]]:
    result = ingest_event("alice", "x", {}, contact_properties={"plan": plan}, now=at, runtime=rt)
    return [(t.kind, t.epoch, t.emitted, t.suppressed_by) for t in result.transitions]


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        ("unlimited", [True, True, True]),
        ("once", [True, False, False]),
        ("once_per_period", [True, False, True]),  # re-joins 1 day, then 3 days after leaving
    ],
)
def test_entry_limit_policies_across_cycles(make_runtime, limit, expected):
    period: dict[str, Any] = {"entry_period": "2d"} if limit == "once_per_period" else {}
    bucket = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"), entry_limit=limit, **period)
    rt = make_runtime(bucket)
    joins = [T0, T0 + D + H, T0 + 4 * D + 2 * H]  # each leave is 1 hour after its join
    flags = []
    for epoch, at in enumerate(joins, start=1):
        [(kind, got_epoch, emitted, suppressed)] = flip(rt, "pro", at)
        assert (kind, got_epoch) == ("entered", epoch)
        assert suppressed == (None if emitted else "entry_limit")
        flags.append(emitted)
        assert flip(rt, "free", at + H) == [("left", epoch, True, None)]  # leaves always emitted
    assert flags == expected
    suppressed_rows = [t for t in ledger(rt) if not t.emitted]
    assert len(suppressed_rows) == expected.count(False)


def test_min_dwell_defers_the_leave_and_requalifying_clears_it(make_runtime):
    bucket = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"), min_dwell="1d")
    rt = make_runtime(bucket)
    flip(rt, "pro", T0)
    assert flip(rt, "free", T0 + H) == []  # deferred, not dropped
    [row] = memberships(rt)
    assert (row.status, row.pending_leave_at) == ("active", T0 + D)
    assert flip(rt, "pro", T0 + 2 * H) == []  # qualifies again: the pending leave is cleared
    [row] = memberships(rt)
    assert row.pending_leave_at is None
    assert flip(rt, "free", T0 + 3 * H) == []
    assert memberships(rt)[0].pending_leave_at == T0 + D
    # after min dwell, a leave decided by ingest happens at once
    assert flip(rt, "free", T0 + D + H) == [("left", 1, True, None)]


def test_max_dwell_is_stamped_at_join(make_runtime):
    bucket = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"), max_dwell="30d")
    rt = make_runtime(bucket)
    flip(rt, "pro", T0)
    assert memberships(rt)[0].max_dwell_at == T0 + 30 * D
    flip(rt, "pro", T0 + D)  # stable: never moved
    assert memberships(rt)[0].max_dwell_at == T0 + 30 * D


# --- enable / delete / erase ---------------------------------------------------------------


def test_disabled_bucket_is_skipped_and_its_members_untouched(make_runtime):
    rt = make_runtime(PRO)
    flip(rt, "pro", T0)
    with rt.engine.begin() as conn:
        set_enabled(conn, "pro", False)
    assert flip(rt, "free", T0 + H) == []
    [row] = memberships(rt)
    assert (row.status, row.last_evaluated_at) == ("active", T0)
    with rt.engine.begin() as conn:
        set_enabled(conn, "pro", None)  # back to the definition (enabled)
    assert flip(rt, "free", T0 + 2 * H) == [("left", 1, True, None)]


def test_definition_disabled_bucket_is_skipped_unless_overridden(make_runtime):
    off = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"), enabled=False)
    rt = make_runtime(off)
    assert flip(rt, "pro", T0) == []
    with rt.engine.begin() as conn:
        set_enabled(conn, "pro", True)
    assert flip(rt, "pro", T0 + H) == [("entered", 1, True, None)]


def test_deleted_contact_leaves_silently_and_is_not_revived(make_runtime):
    rt = make_runtime(PRO)
    flip(rt, "pro", T0)
    changes = delete_contact("alice", now=T0 + H, runtime=rt)
    [t] = changes.transitions
    assert (t.kind, t.reason, t.emitted, t.suppressed_by) == (
        "left",
        "contact_deleted",
        False,
        "contact_deleted",
    )
    events_before = count(rt, user_events)
    after = ingest_event(
        "alice", "x", {}, contact_properties={"plan": "pro"}, now=T0 + 2 * H, runtime=rt
    )
    assert after.status == "contact_deleted"
    assert after.transitions == []
    assert count(rt, user_events) == events_before
    assert [row.status for row in memberships(rt)] == ["left"]
    assert delete_contact("alice", now=T0 + 3 * H, runtime=rt).transitions == []


def test_erase_removes_everything_of_the_contact(make_runtime):
    rt = make_runtime(PRO)
    flip(rt, "pro", T0)
    flip(rt, "free", T0 + H)
    ingest_event("bob", "x", {}, contact_properties={"plan": "pro"}, now=T0, runtime=rt)
    erased = erase_contact("alice", runtime=rt)
    assert (erased.events, erased.memberships, erased.transitions) == (2, 1, 2)
    assert [row.external_id for row in memberships(rt)] == ["bob"]
    assert count(rt, contacts) == 1


# --- idempotency -----------------------------------------------------------------------------


def test_replayed_idempotency_key_returns_the_first_result_and_writes_nothing(make_runtime):
    rt = make_runtime(PRO)
    args: dict[str, Any] = {"contact_properties": {"plan": "pro"}, "idempotency_key": "evt-1"}
    first = ingest_event("alice", "signup", {"n": 1}, now=T0, runtime=rt, **args)
    rows_before = (count(rt, user_events), count(rt, bucket_transitions))
    again = ingest_event("alice", "signup", {"n": 2}, now=T0 + H, runtime=rt, **args)
    assert again.status == "duplicate"
    assert again.event_id == first.event_id
    assert again.transitions == first.transitions
    assert (count(rt, user_events), count(rt, bucket_transitions)) == rows_before
    assert memberships(rt)[0].last_evaluated_at == T0  # nothing re-evaluated


# --- bad input: a clear error and nothing written ---------------------------------------------


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("empty event", {"event": ""}, "event: must not be empty"),
    ("reserved event", {"event": "bucket:entered:pro"}, "event: names starting with 'bucket:'"),
    ("event not a string", {"event": 7}, "event: must be a string"),
    ("external id not a string", {"external_id": 42}, "external_id: must be a string"),
    ("external id empty", {"external_id": " "}, "external_id: must not be empty"),
    ("properties a list", {"properties": [1]}, "properties: must be a JSON object"),
    ("properties a string", {"properties": "{}"}, "properties: must be a JSON object"),
    ("contact properties", {"contact_properties": 3}, "contact_properties: must be a JSON"),
    ("non-string key", {"properties": {1: "a"}}, "properties: keys must be strings"),
    ("NaN value", {"properties": {"x": float("nan")}}, "properties.x: not a finite number"),
    ("set value", {"properties": {"x": {1}}}, "properties: not JSON-serialisable"),
    ("naive occurred_at", {"occurred_at": datetime(2026, 11, 1)}, "occurred_at: must be"),
    ("naive ISO string", {"occurred_at": "2026-11-01T10:00:00"}, "occurred_at: must be"),
    ("garbage time", {"occurred_at": "yesterday"}, "occurred_at: not an ISO-8601"),
    ("too far ahead", {"occurred_at": T0 + timedelta(minutes=6)}, "occurred_at: "),
    ("oversized", {"properties": {"x": "y" * 70_000}}, "properties: payload larger than"),
    ("key not a string", {"idempotency_key": 5}, "idempotency_key: must be a string"),
    ("email not a string", {"email": ["a@b"]}, "email: must be a string"),
    ("NUL in a name", {"event": "a\x00b"}, "event: contains a NUL character"),
    ("NUL in a value", {"properties": {"k": "a\x00"}}, "properties.k: contains a NUL"),
    ("NUL in a key", {"contact_properties": {"k\x00": 1}}, "contact_properties: key 'k\\x00'"),
]


@pytest.mark.parametrize(("name", "change", "message"), BAD, ids=[case[0] for case in BAD])
def test_bad_input_is_rejected_and_nothing_is_written(make_runtime, name, change, message):
    rt = make_runtime(PRO)
    args: dict[str, Any] = {
        "external_id": "alice",
        "event": "x",
        "properties": {},
        "contact_properties": {"plan": "pro"},
    }
    args.update(change)
    with pytest.raises(IngestError) as raised:
        ingest_event(**args, now=T0, runtime=rt)
    assert message in str(raised.value)
    assert (count(rt, contacts), count(rt, user_events), count(rt, bucket_memberships)) == (0, 0, 0)


def test_naive_now_is_rejected(make_runtime):
    rt = make_runtime(PRO)
    with pytest.raises(IngestError, match="now: must be timezone-aware"):
        ingest_event("alice", "x", {}, now=datetime(2026, 11, 1), runtime=rt)


# --- batches ---------------------------------------------------------------------------------


def test_batch_keeps_per_event_semantics_and_reports_bad_events(make_runtime):
    rt = make_runtime(PRO, ACTIVE)
    batch: list[Any] = [
        {"external_id": "a", "event": "feature.used", "contact_properties": {"plan": "pro"}},
        {"external_id": "a", "event": "feature.used"},  # 2nd event: joins `active`
        {"external_id": "b", "event": "bucket:left:x"},  # rejected, neighbours unaffected
        {"external_id": "a", "event": "x", "contact_properties": {"plan": "free"}},  # leaves pro
        {
            "external_id": "b",
            "event": "x",
            "contact_properties": {"plan": "pro"},
            "idempotency_key": "k",
        },
        {"external_id": "b", "event": "x", "idempotency_key": "k"},  # duplicate within the batch
        "not an object",
    ]
    result = ingest_events(batch, now=T0, runtime=rt, chunk_size=100)
    outcome = [
        r.status if not isinstance(r, IngestError) else f"error:{r.field}" for r in result.results
    ]
    assert outcome == [
        "accepted",
        "accepted",
        "error:event",
        "accepted",
        "accepted",
        "duplicate",
        "error:event",
    ]
    per_event = [kinds(r) if not isinstance(r, IngestError) else None for r in result.results]
    assert per_event[0] == [("pro", "entered", True)]
    assert per_event[1] == [("active", "entered", True)]
    assert per_event[3] == [("pro", "left", True)]
    assert per_event[4] == [("pro", "entered", True)]
    assert per_event[5] == per_event[4]
    assert result.errors[0].index == 2
    assert "events[2].event" in str(result.errors[0])
    assert (result.accepted, result.duplicates, len(result.errors)) == (4, 1, 2)
    assert count(rt, user_events) == 4


def test_batch_replays_keys_of_earlier_ingests(make_runtime):
    rt = make_runtime(PRO)
    first = ingest_event(
        "a", "x", {}, contact_properties={"plan": "pro"}, idempotency_key="k1", now=T0, runtime=rt
    )
    result = ingest_events(
        [{"external_id": "a", "event": "x", "idempotency_key": "k1"}], now=T0, runtime=rt
    )
    [replayed] = result.results
    assert not isinstance(replayed, IngestError)
    assert replayed.status == "duplicate"
    assert replayed.transitions == first.transitions


def test_batch_matches_single_ingests(make_runtime):
    """The same events, batched in small chunks or ingested one by one, end the same."""
    events: list[dict[str, Any]] = [
        {
            "external_id": f"c{i % 7}",
            "event": "feature.used",
            "contact_properties": {"plan": "pro" if i % 3 else "free"},
        }
        for i in range(60)
    ]
    rt = make_runtime(PRO, ACTIVE)

    def outcome() -> list[tuple[str, bool]]:
        found = sorted((t.idempotency_key, t.emitted) for t in ledger(rt))
        with rt.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "TRUNCATE contacts, user_events, bucket_memberships, bucket_transitions CASCADE"
                )
            )
        return found

    ingest_events(events, now=T0, runtime=rt, chunk_size=9)
    batched = outcome()
    for event in events:
        ingest_event(**event, now=T0, runtime=rt)
    assert outcome() == batched
    assert len(batched) > 10


def test_an_event_affecting_more_leaves_than_one_statement_holds_is_decided_in_groups(
    make_runtime,
):
    """Eight buckets of 60 distinct event leaves each, all on one event name: 480 leaves, past
    what one facts query's select list holds (2 columns a leaf, 1,664 at most)."""
    from buckets.decide import MAX_FACT_LEAVES

    wide = [
        define_bucket(
            id=f"wide-{n}",
            criteria=b.any(
                *(b.event("x").where(b.prop("k").eq(n * 100 + i)).exists() for i in range(60))
            ),
        )
        for n in range(8)
    ]
    assert MAX_FACT_LEAVES < 8 * 60
    rt = make_runtime(*wide)
    result = ingest_event("u", "x", {"k": 703}, now=T0, runtime=rt)
    assert [t.bucket_id for t in result.transitions] == ["wide-7"]
    result = ingest_event("u", "x", {"k": 5}, now=T0, runtime=rt)
    assert [t.bucket_id for t in result.transitions] == ["wide-0"]
