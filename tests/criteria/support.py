"""Load small datasets into PostgreSQL and ask both executors who matches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from buckets.criteria import (
    Event,
    EventCondition,
    Facts,
    Node,
    State,
    clock_select,
    evaluate,
    in_memory_counter,
    in_memory_state,
    leaf_facts,
    member_select,
    probe_predicate,
)
from buckets.criteria.held import ContactProperties
from buckets.criteria.model import EventSequence, leaves
from buckets.models import BucketMembership, Contact, UserEvent

contacts = Contact.__table__

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


CREATED = NOW - timedelta(days=3)  # a contact's created_at unless given


@dataclass
class Person:
    properties: Mapping[str, Any] = field(default_factory=dict)
    events: Sequence[Event] = ()
    deleted: bool = False
    changed: Mapping[str, datetime] = field(default_factory=dict)  # property_changed_at
    created_at: datetime = CREATED
    # bucket id -> its membership rows: "active", "left", or "left+active" (a left epoch, then
    # an active one): what bucket references read (only an active row counts)
    memberships: Mapping[str, str] = field(default_factory=dict)

    @property
    def active(self) -> frozenset[str]:
        """The buckets the person is an active member of."""
        return frozenset(b for b, rows in self.memberships.items() if rows.endswith("active"))

    @property
    def history(self) -> ContactProperties:
        """The properties with when each key changed, as the executors read them."""
        return ContactProperties(self.properties, self.changed, self.created_at)


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
                "property_changed_at": {key: at.isoformat() for key, at in person.changed.items()},
                "created_at": person.created_at,
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
    rows_ = [
        row
        for contact_id, person in zip(ids, people, strict=True)
        for bucket_id, kinds in person.memberships.items()
        for row in _membership_rows(contact_id, bucket_id, kinds)
    ]
    if rows_:
        conn.execute(sa.insert(BucketMembership), rows_)
    return ids


def _membership_rows(contact_id: int, bucket_id: str, kinds: str) -> list[dict[str, Any]]:
    rows = []
    for epoch, kind in enumerate(kinds.split("+"), start=1):
        row: dict[str, Any] = {
            "bucket_id": bucket_id,
            "contact_id": contact_id,
            "status": kind,
            "entered_at": NOW - timedelta(days=10 - epoch),
            "entry_count": epoch,
            "source": "ingest",
            "left_at": None,  # every row the same keys: one executemany
            "leave_reason": None,
        }
        if kind == "left":
            row.update(left_at=NOW - timedelta(days=9 - epoch), leave_reason="criteria")
        rows.append(row)
    return rows


def sql_members(
    conn: Connection,
    node: Node,
    now: datetime,
    contact_ids: Sequence[int] | None = None,
    id_range: tuple[int, int] | None = None,
) -> set[int]:
    query = member_select(node, now, contact_ids=contact_ids, id_range=id_range)
    return set(conn.execute(query).scalars())


def python_members(
    node: Node, people: Sequence[Person], ids: Sequence[int], now: datetime, prefix: str = "p"
) -> set[int]:
    return {
        contact_id
        for index, (contact_id, person) in enumerate(zip(ids, people, strict=True))
        if not person.deleted
        and evaluate(
            node,
            person.history,
            in_memory_counter(person.events, now, person.active),
            external_id=f"{prefix}{index}",
            now=now,
        )
    }


def probe_members(
    conn: Connection, node: Node, now: datetime, contact_ids: Sequence[int]
) -> set[int]:
    """The correlated (per-contact probe) form, restricted to ``contact_ids``."""
    query = sa.select(contacts.c.id).where(
        contacts.c.id == sa.any_(sa.literal(list(contact_ids), sa.ARRAY(sa.BigInteger))),
        contacts.c.deleted_at.is_(None),
        probe_predicate(node, now),
    )
    return set(conn.execute(query).scalars())


def conditions_of(node: Node) -> list[EventCondition | EventSequence]:
    return list(
        dict.fromkeys(
            leaf for leaf in leaves(node) if isinstance(leaf, EventCondition | EventSequence)
        )
    )


def counted_members(
    conn: Connection, node: Node, now: datetime, contact_ids: Sequence[int]
) -> set[int]:
    """The evaluator fed with the capped counts of :func:`leaf_facts` (the path of the real
    time, due-queue chunks and confirms)."""
    conditions = conditions_of(node)
    members = set()
    for row in conn.execute(leaf_facts(conditions, now, contact_ids, memberships=True)):
        facts = Facts.of(row, conditions, now=now)
        if row.deleted_at is None and evaluate(
            node, facts.properties, facts.counter, external_id=row.external_id, now=now
        ):
            members.add(row.id)
    return members


def decided_members(
    conn: Connection, node: Node, now: datetime, contact_ids: Sequence[int]
) -> set[int]:
    """The real-time decider's own facts statement (leaf facts plus the contact's membership
    rows, which bucket references read), evaluated as :func:`buckets.decide.decide` does."""
    from buckets.criteria.compile_clock import fact_offsets, facts_params
    from buckets.decide import _facts, _Layout

    conditions = tuple(conditions_of(node))
    needs = ["1" * (len(conditions) + 1)] * len(contact_ids)
    statement = _facts(_Layout(conditions, {}, {}, fact_offsets(conditions)), True)
    return {
        row.id
        for row in conn.execute(statement, facts_params(now, list(contact_ids), needs))
        if row.deleted_at is None and Facts.of(row, conditions, now=now).state(node).value
    }


def python_states(
    node: Node, people: Sequence[Person], ids: Sequence[int], now: datetime, prefix: str = "p"
) -> dict[int, State]:
    """The clock of every live contact, from its data in memory."""
    return {
        contact_id: in_memory_state(
            node,
            person.history,
            person.events,
            now,
            external_id=f"{prefix}{index}",
            memberships=person.active,
        )
        for index, (contact_id, person) in enumerate(zip(ids, people, strict=True))
        if not person.deleted
    }


def facts_states(
    conn: Connection, node: Node, now: datetime, contact_ids: Sequence[int]
) -> dict[int, State]:
    """The clock from :func:`leaf_facts` (per-contact probes), combined in Python."""
    conditions = conditions_of(node)
    return {
        row.id: Facts.of(row, conditions, now=now).state(node)
        for row in conn.execute(leaf_facts(conditions, now, contact_ids, memberships=True))
        if row.deleted_at is None
    }


def sql_states(
    conn: Connection,
    node: Node,
    now: datetime,
    contact_ids: Sequence[int] | None = None,
    id_range: tuple[int, int] | None = None,
) -> dict[int, State]:
    """The clock computed set-wide in SQL."""
    query = clock_select(node, now, contact_ids=contact_ids, id_range=id_range)
    return {row.id: State(row.matches, row.next_at) for row in conn.execute(query)}
