"""Contacts leaving the system (SPEC §11): soft delete and erasure.

* :func:`delete_contact` marks the contact deleted, bumps its revision and leaves every active
  membership with ``reason='contact_deleted'`` — recorded, not emitted (no journey reacts to a
  deletion; in-flight journeys of a deleted contact are the application's to stop). A deleted
  contact is excluded everywhere and ingest never revives it.
* :func:`erase_contact` removes the contact and everything the engine holds about it — events,
  memberships, transitions, enrollments — in one transaction (right to erasure).

Both take the contact's row lock first, like every writer of its memberships.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from buckets import due
from buckets.errors import BucketsError
from buckets.membership import Changes, Policy, leave
from buckets.models import (
    bucket_memberships,
    bucket_transitions,
    contacts,
    journey_enrollments,
    user_events,
)
from buckets.runtime import Runtime, get_runtime


class UnknownContactError(BucketsError):
    def __init__(self, external_id: str) -> None:
        super().__init__(f"external_id {external_id!r}: no such contact")
        self.external_id = external_id


def _locked_contact(conn: Connection, external_id: str) -> tuple[int, datetime | None]:
    row = conn.execute(
        sa.select(contacts.c.id, contacts.c.deleted_at)
        .where(contacts.c.external_id == external_id)
        .with_for_update(key_share=True)
    ).one_or_none()
    if row is None:
        raise UnknownContactError(external_id)
    return row.id, row.deleted_at


def delete_contact(
    external_id: str, *, now: datetime | None = None, runtime: Runtime | None = None
) -> Changes:
    """Soft-delete a contact; returns the (silent) leaves. Deleting twice changes nothing."""
    rt = get_runtime(runtime)
    at = now or datetime.now(UTC)
    with rt.engine.begin() as conn:
        contact_id, deleted_at = _locked_contact(conn, external_id)
        if deleted_at is not None:
            return Changes()
        conn.execute(
            sa.update(contacts)
            .where(contacts.c.id == contact_id)
            .values(deleted_at=at, revision=contacts.c.revision + 1, updated_at=sa.func.now())
        )
        due.clear_contacts(conn, [contact_id])
        active = sa.select(bucket_memberships.c.bucket_id, bucket_memberships.c.contact_id).where(
            bucket_memberships.c.contact_id == contact_id, bucket_memberships.c.status == "active"
        )
        bucket_ids = list(
            conn.execute(active.with_only_columns(bucket_memberships.c.bucket_id)).scalars()
        )
        if not bucket_ids:
            return Changes()
        return leave(
            conn,
            active,
            [Policy(bucket_id) for bucket_id in bucket_ids],
            now=at,
            reason="contact_deleted",
            source="admin",
            rows=True,
        )


@dataclass(frozen=True)
class Erased:
    events: int
    memberships: int
    transitions: int
    enrollments: int


def erase_contact(external_id: str, *, runtime: Runtime | None = None) -> Erased:
    """Remove a contact and all its rows in one transaction."""
    rt = get_runtime(runtime)
    with rt.engine.begin() as conn:
        contact_id, _ = _locked_contact(conn, external_id)

        def delete(table: sa.Table) -> int:
            return conn.execute(sa.delete(table).where(table.c.contact_id == contact_id)).rowcount

        due.clear_contacts(conn, [contact_id])
        enrollments = delete(journey_enrollments)
        transitions = delete(bucket_transitions)
        memberships = delete(bucket_memberships)
        events = delete(user_events)
        conn.execute(sa.delete(contacts).where(contacts.c.id == contact_id))
    return Erased(events, memberships, transitions, enrollments)
