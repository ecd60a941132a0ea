"""Load small datasets into PostgreSQL and ask both executors who matches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from buckets.criteria import Event, Node, evaluate, in_memory_counter, member_select
from buckets.models import Contact, UserEvent

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@dataclass
class Person:
    properties: Mapping[str, Any] = field(default_factory=dict)
    events: Sequence[Event] = ()
    deleted: bool = False


def load(conn: Connection, people: Sequence[Person], prefix: str = "p") -> list[int]:
    """Insert ``people`` (contacts and their events); returns their contact ids in order."""
    if not people:
        return []
    rows = conn.execute(
        sa.insert(Contact).returning(Contact.external_id, Contact.id),
        [
            {
                "external_id": f"{prefix}{index}",
                "properties": dict(person.properties),
                "deleted_at": NOW if person.deleted else None,
            }
            for index, person in enumerate(people)
        ],
    ).all()
    by_external = {row.external_id: row.id for row in rows}
    ids = [by_external[f"{prefix}{index}"] for index in range(len(people))]
    events = [
        {
            "contact_id": contact_id,
            "event": event.name,
            "properties": dict(event.properties),
            "occurred_at": event.occurred_at,
            "received_at": event.occurred_at,
        }
        for contact_id, person in zip(ids, people, strict=True)
        for event in person.events
    ]
    if events:
        conn.execute(sa.insert(UserEvent), events)
    return ids


def sql_members(
    conn: Connection, node: Node, now: datetime, contact_ids: Sequence[int] | None = None
) -> set[int]:
    return set(conn.execute(member_select(node, now, contact_ids=contact_ids)).scalars())


def python_members(
    node: Node, people: Sequence[Person], ids: Sequence[int], now: datetime
) -> set[int]:
    return {
        contact_id
        for contact_id, person in zip(ids, people, strict=True)
        if not person.deleted
        and evaluate(node, person.properties, in_memory_counter(person.events, now))
    }
