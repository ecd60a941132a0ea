"""The transition ledger (and outbox): one row per membership change, written with the change.

A transition's ``idempotency_key`` is deterministic — ``bucket:<bucket_id>:<external_id>:<kind>:
<epoch>`` — so every producer (ingest, cron, backfill, an operator) that performs the same change
derives the same key, and the unique index turns a duplicate into a no-op rather than a second
journey run. Rows are inserted by :mod:`buckets.membership` in the same statement as the
membership change; this module owns their shape and how they are read back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row
from sqlalchemy.sql.elements import ColumnElement

from buckets.models import bucket_transitions as transitions
from buckets.models import contacts


def transition_key(bucket_id: str, external_id: str, kind: str, epoch: int) -> str:
    """``bucket:<bucket_id>:<external_id>:<kind>:<epoch>`` (SPEC §2)."""
    return f"bucket:{bucket_id}:{external_id}:{kind}:{epoch}"


def transition_key_sql(
    bucket_id: ColumnElement[Any],
    external_id: ColumnElement[Any],
    kind: str,
    epoch: ColumnElement[Any],
) -> ColumnElement[str]:
    """The same key, computed in SQL for set-based writes."""
    return sa.func.concat(
        "bucket:", bucket_id, ":", external_id, f":{kind}:", sa.cast(epoch, sa.Text)
    )


@dataclass(frozen=True)
class Transition:
    """One row of the ledger, as producers report it."""

    id: int
    bucket_id: str
    contact_id: int
    external_id: str
    membership_id: int
    kind: str  # entered | left
    epoch: int
    reason: str | None
    source: str
    emitted: bool
    suppressed_by: str | None
    occurred_at: datetime
    idempotency_key: str
    event_id: int | None = None

    @property
    def name(self) -> str:
        """``bucket:<kind>:<bucket_id>``: what journeys subscribe to."""
        return f"bucket:{self.kind}:{self.bucket_id}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "bucket_id": self.bucket_id,
            "contact_id": self.contact_id,
            "external_id": self.external_id,
            "membership_id": self.membership_id,
            "kind": self.kind,
            "epoch": self.epoch,
            "reason": self.reason,
            "source": self.source,
            "emitted": self.emitted,
            "suppressed_by": self.suppressed_by,
            "occurred_at": self.occurred_at.isoformat(),
            "idempotency_key": self.idempotency_key,
            "event_id": self.event_id,
        }


# The columns a RETURNING (or a read) must yield to build a Transition, except external_id.
RETURNED = (
    transitions.c.id,
    transitions.c.bucket_id,
    transitions.c.contact_id,
    transitions.c.membership_id,
    transitions.c.kind,
    transitions.c.epoch,
    transitions.c.reason,
    transitions.c.source,
    transitions.c.emitted,
    transitions.c.suppressed_by,
    transitions.c.occurred_at,
    transitions.c.idempotency_key,
    transitions.c.event_id,
)


def from_row(row: Row[Any] | Any, external_id: str) -> Transition:
    return Transition(
        id=row.id,
        bucket_id=row.bucket_id,
        contact_id=row.contact_id,
        external_id=external_id,
        membership_id=row.membership_id,
        kind=row.kind,
        epoch=row.epoch,
        reason=row.reason,
        source=row.source,
        emitted=row.emitted,
        suppressed_by=row.suppressed_by,
        occurred_at=row.occurred_at,
        idempotency_key=row.idempotency_key,
        event_id=row.event_id,
    )


def from_json(item: dict[str, Any]) -> Transition:
    """A transition from its JSON form (``json_build_object`` of :data:`RETURNED` plus
    ``external_id``), as set-based writes return them."""
    fields = dict(item)
    fields["occurred_at"] = datetime.fromisoformat(fields["occurred_at"])
    return Transition(**fields)


def read(
    conn: Connection,
    where: Sequence[ColumnElement[bool]],
    *,
    newest_first: bool = False,
    limit: int | None = None,
) -> list[Transition]:
    """Transitions matching ``where`` (oldest first unless ``newest_first``), with their
    contact's external id."""
    query = (
        sa.select(*RETURNED, contacts.c.external_id)
        .join(contacts, contacts.c.id == transitions.c.contact_id)
        .where(*where)
        .order_by(transitions.c.id.desc() if newest_first else transitions.c.id)
        .limit(limit)
    )
    return [from_row(row, row.external_id) for row in conn.execute(query)]


def caused_by(conn: Connection, event_ids: Sequence[int]) -> dict[int, list[Transition]]:
    """The transitions each ingested event caused (a replayed idempotency key's result)."""
    found: dict[int, list[Transition]] = {event_id: [] for event_id in event_ids}
    if event_ids:
        ids = sa.literal(list(event_ids), sa.ARRAY(sa.BigInteger))
        for transition in read(conn, [transitions.c.event_id == sa.any_(ids)]):
            assert transition.event_id is not None
            found[transition.event_id].append(transition)
    return found
