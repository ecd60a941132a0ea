"""Read models for operators: bucket lists and details, members, the ledger (CLI and API).

Members and ledger pages use keyset pagination on the row id (``after``), newest first for the
ledger and in id order for members, so a page is an index range scan however deep it goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from buckets import due
from buckets.definitions import Bucket
from buckets.ledger import Transition, read
from buckets.models import bucket_configs, bucket_memberships, bucket_transitions, contacts
from buckets.registry import read_overrides
from buckets.runtime import Runtime

MAX_PAGE = 1000


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True)
class BucketState:
    bucket: Bucket
    enabled: bool  # effective
    override: bool | None
    active: int
    left: int
    criteria_hash: str | None
    reconciled_at: datetime | None
    queue_complete: bool
    backlog: due.Backlog
    now: datetime

    def to_dict(self, *, detail: bool = False) -> dict[str, Any]:
        bucket = self.bucket
        out: dict[str, Any] = {
            "id": bucket.id,
            "name": bucket.name,
            "enabled": self.enabled,
            "enabled_override": self.override,
            "members": self.active,
            "left_rows": self.left,
            "on_cron": bucket.on_cron,
            "deployed": self.criteria_hash == bucket.fingerprint,
            "first_time_backfill_done": self.criteria_hash is not None,
            "reconciled_at": _iso(self.reconciled_at),
            "queue": {
                "complete": self.queue_complete,
                "entries": self.backlog.entries,
                "due": self.backlog.due,
                "oldest_due_at": _iso(self.backlog.oldest_due_at),
                "lag_seconds": round(self.backlog.lag(self.now).total_seconds(), 3),
            },
        }
        if detail:
            out["definition"] = bucket.to_dict()
            out["fingerprint"] = bucket.fingerprint
            out["stored_criteria_hash"] = self.criteria_hash
        return out


def bucket_states(
    conn: Connection,
    runtime: Runtime,
    ids: list[str] | None = None,
    *,
    now: datetime | None = None,
) -> list[BucketState]:
    """Every loaded bucket (or ``ids``) with member counts, operator state and due-queue
    backlog as of ``now`` (default: the clock), one query each."""
    at = now or datetime.now(UTC)
    buckets = [runtime.registry.get(i) for i in ids] if ids is not None else list(runtime.registry)
    backlogs = due.backlog(conn, [b.id for b in buckets], at)
    counts: dict[tuple[str, str], int] = {
        (row.bucket_id, row.status): row.n
        for row in conn.execute(
            sa.select(
                bucket_memberships.c.bucket_id,
                bucket_memberships.c.status,
                sa.func.count().label("n"),
            )
            .where(bucket_memberships.c.bucket_id.in_([b.id for b in buckets]))
            .group_by(bucket_memberships.c.bucket_id, bucket_memberships.c.status)
        )
    }
    configs = {
        row.bucket_id: row
        for row in conn.execute(
            sa.select(bucket_configs).where(bucket_configs.c.bucket_id.in_([b.id for b in buckets]))
        )
    }
    overrides = read_overrides(conn)
    states = []
    for bucket in buckets:
        config = configs.get(bucket.id)
        states.append(
            BucketState(
                bucket=bucket,
                enabled=overrides.get(bucket.id, bucket.enabled),
                override=overrides.get(bucket.id),
                active=counts.get((bucket.id, "active"), 0),
                left=counts.get((bucket.id, "left"), 0),
                criteria_hash=config.criteria_hash if config else None,
                reconciled_at=config.reconciled_at if config else None,
                queue_complete=config is not None and config.due_hash == due.queue_hash(bucket),
                backlog=backlogs[bucket.id],
                now=at,
            )
        )
    return states


def members_page(
    conn: Connection,
    bucket_id: str,
    *,
    status: str | None = "active",
    after: int | None = None,
    limit: int = 100,
) -> tuple[list[dict[str, Any]], int | None]:
    """One page of membership rows (id order) and the cursor of the next page (or None)."""
    limit = max(1, min(limit, MAX_PAGE))
    query = (
        sa.select(bucket_memberships, contacts.c.external_id)
        .join(contacts, contacts.c.id == bucket_memberships.c.contact_id)
        .where(bucket_memberships.c.bucket_id == bucket_id)
        .order_by(bucket_memberships.c.id)
        .limit(limit + 1)
    )
    if status is not None:
        query = query.where(bucket_memberships.c.status == status)
    if after is not None:
        query = query.where(bucket_memberships.c.id > after)
    rows = conn.execute(query).all()
    page = [
        {
            "id": row.id,
            "external_id": row.external_id,
            "status": row.status,
            "epoch": row.entry_count,
            "entered_at": _iso(row.entered_at),
            "left_at": _iso(row.left_at),
            "leave_reason": row.leave_reason,
            "source": row.source,
            "max_dwell_at": _iso(row.max_dwell_at),
            "pending_leave_at": _iso(row.pending_leave_at),
        }
        for row in rows[:limit]
    ]
    return page, (rows[limit - 1].id if len(rows) > limit else None)


def ledger_page(
    conn: Connection,
    *,
    bucket_id: str | None = None,
    external_id: str | None = None,
    before: int | None = None,
    limit: int = 100,
) -> tuple[list[Transition], int | None]:
    """Transitions of a bucket and/or a contact, newest first, keyset on id (``before``)."""
    limit = max(1, min(limit, MAX_PAGE))
    where: list[Any] = []
    if bucket_id is not None:
        where.append(bucket_transitions.c.bucket_id == bucket_id)
    if external_id is not None:
        contact_id = sa.select(contacts.c.id).where(contacts.c.external_id == external_id)
        where.append(bucket_transitions.c.contact_id == contact_id.scalar_subquery())
    if before is not None:
        where.append(bucket_transitions.c.id < before)
    found = read(conn, where, newest_first=True, limit=limit + 1)
    return found[:limit], (found[limit - 1].id if len(found) > limit else None)


@dataclass(frozen=True)
class Preview:
    """What the criteria say as of ``now`` against the stored membership (nothing written)."""

    bucket_id: str
    now: datetime
    matching: int
    members: int
    would_join: int
    would_leave: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "bucket_id": self.bucket_id,
            "now": self.now.isoformat(),
            "matching": self.matching,
            "members": self.members,
            "would_join": self.would_join,
            "would_leave": self.would_leave,
        }


def preview(conn: Connection, bucket: Bucket, now: datetime) -> Preview:
    """Matching contacts vs active members, in one set-based statement."""
    from buckets.criteria import member_select

    if bucket.manual:  # its members are what matches: no producer would join or leave
        members = conn.execute(
            sa.select(sa.func.count()).where(
                bucket_memberships.c.bucket_id == bucket.id,
                bucket_memberships.c.status == "active",
            )
        ).scalar_one()
        return Preview(bucket.id, now, members, members, 0, 0)
    matching = member_select(bucket.criteria, now).cte("matching")
    active = (
        sa.select(bucket_memberships.c.contact_id)
        .where(bucket_memberships.c.bucket_id == bucket.id, bucket_memberships.c.status == "active")
        .cte("active")
    )
    both = sa.select(sa.func.count()).select_from(
        matching.join(active, active.c.contact_id == matching.c.id)
    )
    counts = conn.execute(
        sa.select(
            sa.select(sa.func.count()).select_from(matching).scalar_subquery(),
            sa.select(sa.func.count()).select_from(active).scalar_subquery(),
            both.scalar_subquery(),
        )
    ).one()
    matched, members, overlap = counts
    return Preview(bucket.id, now, matched, members, matched - overlap, members - overlap)
