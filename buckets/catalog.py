"""The catalogue of what ingest has seen: event names and contact property keys, with counts
and first / last instants (``catalog_entries``; ``buckets catalog``, ``GET /catalog``).

It is maintained set-based, one statement per ingest chunk (not a write per event): after the
chunk's transaction commits, its accepted events' names and the top-level keys of their
``contact_properties`` are added up and upserted in their own short transaction (sorted, so
concurrent chunks lock rows in one order; ``synchronous_commit`` off: no fsync waited for).
Being outside the chunk's transaction keeps ingest from queueing behind the row of a busy
event name for the length of a commit; the price is that the catalogue is advisory: a crash
between the two loses that chunk's counts (never an event). Duplicates (a repeated
idempotency key) and events of deleted contacts are not counted. Instants are the ingest
``now`` (when the engine received them).

What it is for: a bucket naming an event or a key that was never seen is usually a typo that
would otherwise surface weeks later as an empty bucket. :func:`never_seen` lists them; the
worker logs one warning per bucket and name when it deploys, and ``buckets list`` prints them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from buckets.models import catalog_entries

if TYPE_CHECKING:
    from buckets.definitions import Bucket
    from buckets.validation import EventIn

log = logging.getLogger("buckets.catalog")


@dataclass(frozen=True)
class Entry:
    kind: str  # event | property
    name: str
    seen: int
    first_seen_at: datetime
    last_seen_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "seen": self.seen,
            "first_seen_at": self.first_seen_at.isoformat(),
            "last_seen_at": self.last_seen_at.isoformat(),
        }


def counts(events: Iterable[EventIn]) -> Counter[tuple[str, str]]:
    """(kind, name) → how many of ``events`` carry it."""
    found: Counter[tuple[str, str]] = Counter()
    for event in events:
        found["event", event.event] += 1
        for key in event.contact_properties or ():
            found["property", key] += 1
    return found


def _upsert() -> Any:
    rows = sa.select(
        sa.func.unnest(sa.bindparam("kinds", type_=ARRAY(sa.Text()))).label("kind"),
        sa.func.unnest(sa.bindparam("names", type_=ARRAY(sa.Text()))).label("name"),
        sa.func.unnest(sa.bindparam("seen", type_=ARRAY(sa.BigInteger()))).label("seen"),
        sa.bindparam("now", type_=sa.DateTime(timezone=True)).label("first_seen_at"),
        sa.bindparam("now", type_=sa.DateTime(timezone=True)).label("last_seen_at"),
    )
    statement = insert(catalog_entries).from_select(
        ["kind", "name", "seen", "first_seen_at", "last_seen_at"], rows
    )
    return statement.on_conflict_do_update(
        index_elements=[catalog_entries.c.kind, catalog_entries.c.name],
        set_={
            "seen": catalog_entries.c.seen + statement.excluded.seen,
            "first_seen_at": sa.func.least(
                catalog_entries.c.first_seen_at, statement.excluded.first_seen_at
            ),
            "last_seen_at": sa.func.greatest(
                catalog_entries.c.last_seen_at, statement.excluded.last_seen_at
            ),
        },
    )


_UPSERT = _upsert()


def record(engine: Engine, events: Sequence[EventIn], now: datetime) -> None:
    """Add ``events`` (accepted, committed) to the catalogue: one statement. A database error
    is logged, not raised: the events are stored; only the advisory counts are lost."""
    found = sorted(counts(events).items())
    if not found:
        return
    params = {
        "kinds": [kind for (kind, _), _ in found],
        "names": [name for (_, name), _ in found],
        "seen": [count for _, count in found],
        "now": now,
    }
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("SET LOCAL synchronous_commit = off"))
            conn.execute(_UPSERT, params)
    except DBAPIError as exc:
        from buckets.db import first_line

        log.warning("catalogue not updated for %d names: %s", len(found), first_line(exc.orig))


def entries(conn: Connection, kind: str | None = None) -> list[Entry]:
    """The catalogue, by kind then name."""
    query = sa.select(
        catalog_entries.c.kind,
        catalog_entries.c.name,
        catalog_entries.c.seen,
        catalog_entries.c.first_seen_at,
        catalog_entries.c.last_seen_at,
    ).order_by(catalog_entries.c.kind, catalog_entries.c.name)
    if kind is not None:
        query = query.where(catalog_entries.c.kind == kind)
    return [Entry(*row) for row in conn.execute(query)]


@dataclass(frozen=True)
class NeverSeen:
    bucket_id: str
    kind: str  # event | property
    name: str

    def __str__(self) -> str:
        what = "event" if self.kind == "event" else "contact property key"
        return f"{self.bucket_id}: {what} {self.name!r} was never seen by ingest"

    def to_dict(self) -> dict[str, str]:
        return {"bucket_id": self.bucket_id, "kind": self.kind, "name": self.name}


def never_seen(conn: Connection, buckets: Iterable[Bucket]) -> list[NeverSeen]:
    """Per bucket and name: the event names and contact property keys its criteria use that
    the catalogue has never seen (one query)."""
    wanted = [
        (bucket.id, kind, name)
        for bucket in buckets
        for kind, names in (("event", bucket.event_names), ("property", bucket.property_keys))
        for name in sorted(names)
    ]
    if not wanted:
        return []
    known = {
        (kind, name)
        for kind, name in conn.execute(
            sa.select(catalog_entries.c.kind, catalog_entries.c.name).where(
                sa.tuple_(catalog_entries.c.kind, catalog_entries.c.name).in_(
                    sorted({(kind, name) for _, kind, name in wanted})
                )
            )
        )
    }
    return [NeverSeen(*item) for item in wanted if item[1:] not in known]
