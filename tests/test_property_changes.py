"""``contacts.property_changed_at`` (SPEC §3.4 "held for"): what ingest's merge records, on a
real PostgreSQL. Every rule of the spec has a test here; time moves through ``now``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from buckets import delete_contact, erase_contact, ingest_event, ingest_events
from buckets.models import contacts

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
H = timedelta(hours=1)


def row(rt: Any, external_id: str = "alice") -> Any:
    with rt.engine.connect() as conn:
        return conn.execute(
            sa.select(contacts).where(contacts.c.external_id == external_id)
        ).one_or_none()


def changed(rt: Any, external_id: str = "alice") -> dict[str, datetime]:
    found = row(rt, external_id)
    return {key: datetime.fromisoformat(at) for key, at in found.property_changed_at.items()}


def put(rt: Any, now: datetime, occurred_at: datetime | None = None, **properties: Any) -> None:
    ingest_event("alice", "x", {}, occurred_at, contact_properties=properties, now=now, runtime=rt)


def test_a_first_value_is_a_change_at_the_events_occurred_at(make_runtime):
    rt = make_runtime()
    put(rt, T0, T0 - H, plan="trial", seats=3)
    assert changed(rt) == {"plan": T0 - H, "seats": T0 - H}


def test_without_occurred_at_the_calls_now_is_recorded(make_runtime):
    rt = make_runtime()
    put(rt, T0, plan="trial")
    assert changed(rt) == {"plan": T0}


def test_the_same_value_again_is_no_change(make_runtime):
    rt = make_runtime()
    put(rt, T0, plan="trial")
    put(rt, T0 + H, plan="trial")
    assert changed(rt) == {"plan": T0}


def test_a_different_value_is_a_change_and_other_keys_keep_theirs(make_runtime):
    rt = make_runtime()
    put(rt, T0, plan="trial", seats=3)
    put(rt, T0 + H, plan="pro", seats=3)
    assert changed(rt) == {"plan": T0 + H, "seats": T0}


def test_values_compare_as_json_numbers_and_key_order(make_runtime):
    rt = make_runtime()
    put(rt, T0, seats=1, address={"city": "Lyon", "zip": "69001"})
    put(rt, T0 + H, seats=1.0, address={"zip": "69001", "city": "Lyon"})
    assert changed(rt) == {"seats": T0, "address": T0}
    put(rt, T0 + 2 * H, seats=True, address={"zip": "69001"})  # true is not 1
    assert changed(rt) == {"seats": T0 + 2 * H, "address": T0 + 2 * H}


def test_null_is_a_value_distinct_from_a_missing_key(make_runtime):
    rt = make_runtime()
    put(rt, T0, plan=None)  # the key's first value: null
    assert changed(rt) == {"plan": T0}
    put(rt, T0 + H, plan=None)
    assert changed(rt) == {"plan": T0}
    put(rt, T0 + 2 * H, plan="trial")
    assert changed(rt) == {"plan": T0 + 2 * H}


def test_last_is_ingestion_order_not_occurred_at(make_runtime):
    rt = make_runtime()
    put(rt, T0, T0, plan="trial")
    put(rt, T0 + H, T0 - 5 * H, plan="pro")  # a late event, stamped earlier, changes it
    assert changed(rt) == {"plan": T0 - 5 * H}
    put(rt, T0 + 2 * H, T0 + H, plan="pro")
    assert changed(rt) == {"plan": T0 - 5 * H}


def test_a_batch_records_per_event_in_ingestion_order(make_runtime):
    rt = make_runtime()
    ingest_events(
        [
            {
                "external_id": "alice",
                "event": "x",
                "contact_properties": {"plan": "trial"},
                "occurred_at": T0 - 3 * H,
            },
            {"external_id": "bob", "event": "x", "contact_properties": {"plan": "trial"}},
            {
                "external_id": "alice",
                "event": "x",
                "contact_properties": {"plan": "pro"},
                "occurred_at": T0 - 2 * H,
            },
            {
                "external_id": "alice",
                "event": "x",
                "contact_properties": {"plan": "pro"},
                "occurred_at": T0 - H,
            },
            {"external_id": "bob", "event": "x", "contact_properties": {"seats": 2}},
        ],
        now=T0,
        runtime=rt,
    )
    assert changed(rt, "alice") == {"plan": T0 - 2 * H}
    assert changed(rt, "bob") == {"plan": T0, "seats": T0}


def test_an_event_without_contact_properties_records_nothing(make_runtime):
    rt = make_runtime()
    ingest_event("alice", "x", {}, now=T0, runtime=rt)
    assert changed(rt) == {}
    assert row(rt).created_at == T0  # the key with no recorded change takes this


def test_a_duplicate_event_records_nothing(make_runtime):
    rt = make_runtime()
    ingest_event(
        "alice", "x", {}, contact_properties={"plan": "a"}, idempotency_key="k", now=T0, runtime=rt
    )
    ingest_event(
        "alice",
        "x",
        {},
        contact_properties={"plan": "b"},
        idempotency_key="k",
        now=T0 + H,
        runtime=rt,
    )
    assert changed(rt) == {"plan": T0}
    assert row(rt).properties == {"plan": "a"}


def test_a_deleted_contact_records_nothing_and_erase_removes_the_record(make_runtime):
    rt = make_runtime()
    put(rt, T0, plan="trial")
    delete_contact("alice", now=T0 + H, runtime=rt)
    put(rt, T0 + 2 * H, plan="pro")
    assert changed(rt) == {"plan": T0}
    erase_contact("alice", runtime=rt)
    assert row(rt) is None
    put(rt, T0 + 3 * H, seats=1)  # a new contact of the same id: no history of the old one
    assert changed(rt) == {"seats": T0 + 3 * H}
    assert row(rt).created_at == T0 + 3 * H


def test_recording_happens_in_the_merge_statement(make_runtime):
    """One UPDATE of contacts per wave writes both the merge and the record: a rolled-back
    merge cannot leave a record behind, nor the reverse (a database error rolls back both)."""
    rt = make_runtime()
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE CONTACTS"):
            statements.append(statement)

    sa.event.listen(rt.engine, "before_cursor_execute", seen)
    try:
        put(rt, T0, plan="trial")
    finally:
        sa.event.remove(rt.engine, "before_cursor_execute", seen)
    [update] = statements
    assert "property_changed_at" in update
    assert "properties" in update
