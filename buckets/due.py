"""The due queue: when the clock alone will next change a (bucket, contact) pair (SPEC §6.7).

``bucket_due`` holds one row per (bucket, contact) whose answer or membership the clock alone
can change, with ``due_at``: the first instant it may change (a lower bound, from
:mod:`buckets.criteria.clock` and the membership row's ``max_dwell_at`` / ``pending_leave_at``).
A tick, and the worker's waker between ticks, process only the entries due (see
``workflows.reconcile``), so the cron's cost follows what the clock changes, not the
population. This module owns the table: every producer that decides a pair hands it the
pair's new entry in its own transaction (:func:`write`, one statement per batch; set-based
producers :func:`refresh` a chunk of contacts with one statement).

What an entry says, for a pair after the producer's decision (:func:`due_at`, and the same
rules in SQL in :func:`refresh`):

* a member: the first of the criteria's next change, ``max_dwell_at`` and a deferred leave's
  ``pending_leave_at`` (a member whose criteria fail without a deferred leave is due now);
* a non-member: the criteria's next change (they may start to match: a contact going quiet, a
  count decaying, a future-stamped event starting to count), unless ``reconcile_joins`` is
  false; a matching non-member the cron joins (``Bucket.cron_joins``) is due now (while the
  bucket's backfill has not completed, again after :data:`BLOCKED_RETRY`);
* a deleted contact: none.

The entries of a bucket are *complete* when ``bucket_configs.due_hash`` equals
:func:`queue_hash` (criteria fingerprint + clock rules version): set by a completed backfill or
``queue_fill`` job, cleared when the bucket is disabled. Until then the cron examines the
whole bucket every tick, as before the queue existed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from buckets.criteria.clock import State, earliest
from buckets.criteria.compile_clock import clock_select
from buckets.definitions import Bucket
from buckets.models import backfill_jobs, bucket_configs, bucket_due, bucket_memberships, contacts

CLOCK_RULES_VERSION = 1  # bump when the entries' meaning changes: every queue is refilled
BLOCKED_RETRY = timedelta(minutes=1)
TIMESTAMP = sa.DateTime(timezone=True)
IdRange = tuple[int, int]


def queue_hash(bucket: Bucket) -> str:
    """What a bucket's complete entries were computed for."""
    text = f"{bucket.fingerprint}:clock-v{CLOCK_RULES_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()


# --- one pair (per-contact producers) -------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """An active membership row, as it stands after the producer's decision."""

    max_dwell_at: datetime | None = None
    pending_leave_at: datetime | None = None


def due_at(
    bucket: Bucket,
    clock: State,
    member: Member | None,
    now: datetime,
    *,
    blocked: bool = False,
) -> datetime | None:
    """The entry of a live contact's pair after a decision as of ``now`` (see the module)."""
    if member is not None:
        if member.pending_leave_at is not None:
            return earliest(member.pending_leave_at, member.max_dwell_at)
        if not clock.value:
            return now
        return earliest(clock.next_at, member.max_dwell_at)
    if bucket.reconcile_joins is False:
        return None
    if not clock.value:
        return clock.next_at
    if not bucket.cron_joins:
        return None
    return now + BLOCKED_RETRY if blocked else now


Entry = tuple[int, str, datetime | None]  # contact id, bucket id, due_at (None: no entry)


def _array(values: Sequence[Any], item: sa.types.TypeEngine[Any]) -> ColumnElement[Any]:
    return sa.literal(list(values), ARRAY(item))


def write(conn: Connection, entries: Iterable[Entry]) -> None:
    """Set (or, for None, remove) these pairs' entries: one statement. Rows are written in
    (contact, bucket) order, the order every writer of the queue uses (no deadlocks)."""
    latest = {(c, b): d for c, b, d in entries}  # a pair given twice: its last entry
    if latest:
        pairs = sorted(latest)
        params = {
            "due_contact_id": [c for c, _ in pairs],
            "due_bucket_id": [b for _, b in pairs],
            "due_at": [latest[pair] for pair in pairs],
        }
        conn.execute(_write_statement(), params)


@lru_cache(maxsize=1)
def _write_statement() -> sa.Select[Any]:
    """:func:`write`'s statement, built once (bound parameters)."""
    given = (
        sa.func.unnest(
            sa.bindparam("due_contact_id", type_=ARRAY(sa.BigInteger())),
            sa.bindparam("due_bucket_id", type_=ARRAY(sa.Text())),
            sa.bindparam("due_at", type_=ARRAY(TIMESTAMP)),
        )
        .table_valued("contact_id", "bucket_id", "due_at")
        .render_derived("given")
    )
    upsert = (
        pg_insert(bucket_due)
        .from_select(
            ["contact_id", "bucket_id", "due_at"],
            sa.select(given.c.contact_id, given.c.bucket_id, given.c.due_at)
            .where(given.c.due_at.is_not(None))
            .order_by(given.c.contact_id, given.c.bucket_id),
        )
        .on_conflict_do_update(
            index_elements=[bucket_due.c.contact_id, bucket_due.c.bucket_id],
            set_={"due_at": sa.literal_column("excluded.due_at")},
        )
        .returning(bucket_due.c.contact_id)
        .cte("upserted")
    )
    removed = (
        sa.delete(bucket_due)
        .where(
            bucket_due.c.contact_id == given.c.contact_id,
            bucket_due.c.bucket_id == given.c.bucket_id,
            given.c.due_at.is_(None),
        )
        .returning(bucket_due.c.contact_id)
        .cte("removed")
    )
    return sa.select(
        sa.select(sa.func.count()).select_from(upsert).scalar_subquery(),
        sa.select(sa.func.count()).select_from(removed).scalar_subquery(),
    )


def clear_contacts(conn: Connection, contact_ids: Sequence[int]) -> int:
    """Remove every entry of these contacts (deleted or erased)."""
    if not contact_ids:
        return 0
    ids = _array(sorted(contact_ids), sa.BigInteger())
    return conn.execute(
        sa.delete(bucket_due).where(bucket_due.c.contact_id == sa.any_(ids))
    ).rowcount


# --- set-wide (backfills, fills, the full sweep, bulk passes) ----------------------------------


@dataclass
class Refreshed:
    """What :func:`refresh` changed: entries added, moved earlier (the queue was late: those
    are what a full sweep reports as healed), moved later, removed."""

    added: int = 0
    earlier: int = 0
    later: int = 0
    removed: int = 0

    @property
    def healed(self) -> int:
        return self.added + self.earlier

    def add(self, other: Refreshed) -> Refreshed:
        self.added += other.added
        self.earlier += other.earlier
        self.later += other.later
        self.removed += other.removed
        return self


def refresh(
    conn: Connection,
    bucket: Bucket,
    now: datetime,
    *,
    contact_ids: Sequence[int] | None = None,
    id_range: IdRange | None = None,
    blocked: bool = False,
) -> Refreshed:
    """Recompute the entries of ``bucket`` for the contacts in scope (``contact_ids`` and/or
    ``id_range``) as of ``now``, set-based: the clock of every live contact in scope (compiled
    criteria with clock columns), its active membership row, the rules of :func:`due_at`; one
    statement writes what differs and removes entries of contacts in scope that need none.
    Ordered by contact, like every writer of the queue. Runs last in its transaction (it may
    wait for a queue row another producer holds, and then holds many)."""
    if contact_ids is not None and not contact_ids:
        return Refreshed()
    at = sa.literal(now, TIMESTAMP)
    clock = clock_select(bucket.criteria, now, contact_ids=contact_ids, id_range=id_range).cte(
        "clock"
    )
    # The active membership row of each contact. For a list of contacts (a tick's chunk, an
    # ingest), a probe of the one-active index per contact, whatever the planner believes of the
    # bucket's row count (a bucket filled by this very backfill has no statistics yet, and a
    # join over "one row" rescanned all its members for every contact: quadratic). For a range
    # of ids (a backfill's chunk of 100k contacts, most of them no member), one range scan of
    # that index, hash-joined: a probe per contact cost ~10 µs each, half the refresh.
    rows = bucket_memberships
    member_of = [rows.c.bucket_id == bucket.id, rows.c.status == "active"]
    member: Any
    if contact_ids is None and id_range is not None:
        member = (
            sa.select(rows.c.contact_id, rows.c.id, rows.c.pending_leave_at, rows.c.max_dwell_at)
            .where(*member_of, rows.c.contact_id.between(*id_range))
            .cte("member")
            .prefix_with("MATERIALIZED")
        )
        joined = clock.outerjoin(member, member.c.contact_id == clock.c.id)
    else:
        member = (
            sa.select(rows.c.id, rows.c.pending_leave_at, rows.c.max_dwell_at)
            .where(*member_of, rows.c.contact_id == clock.c.id)
            .limit(1)
            .lateral("member")
        )
        joined = clock.outerjoin(member, sa.true())
    due = _due_sql(bucket, clock.c.matches, clock.c.next_at, member, at, blocked=blocked)
    computed = (
        sa.select(clock.c.id.label("contact_id"), due.label("due_at"))
        .select_from(joined)
        .cte("computed")
    )
    stored = bucket_due.alias("stored")
    changed = (
        sa.select(
            computed.c.contact_id,
            sa.literal(bucket.id).label("bucket_id"),
            computed.c.due_at,
            stored.c.due_at.label("was"),
        )
        .select_from(
            computed.outerjoin(
                stored,
                sa.and_(
                    stored.c.contact_id == computed.c.contact_id, stored.c.bucket_id == bucket.id
                ),
            )
        )
        .where(computed.c.due_at.is_not(None), computed.c.due_at.is_distinct_from(stored.c.due_at))
        .cte("changed")
    )
    upsert = (
        pg_insert(bucket_due)
        .from_select(
            ["contact_id", "bucket_id", "due_at"],
            sa.select(changed.c.contact_id, changed.c.bucket_id, changed.c.due_at).order_by(
                changed.c.contact_id
            ),
        )
        .on_conflict_do_update(
            index_elements=[bucket_due.c.contact_id, bucket_due.c.bucket_id],
            set_={"due_at": sa.literal_column("excluded.due_at")},
        )
        .returning(bucket_due.c.contact_id)
        .cte("upserted")
    )

    # Entries in scope that need none: every entry whose contact computed no instant, which
    # includes contacts that are not live any more (the clock reads live contacts only).
    scope = []
    if contact_ids is not None:
        scope.append(bucket_due.c.contact_id == sa.any_(_array(contact_ids, sa.BigInteger())))
    if id_range is not None:
        scope.append(bucket_due.c.contact_id.between(*id_range))
    needed = sa.exists().where(
        computed.c.contact_id == bucket_due.c.contact_id, computed.c.due_at.is_not(None)
    )
    removed = (
        sa.delete(bucket_due)
        .where(bucket_due.c.bucket_id == bucket.id, *scope, ~needed)
        .returning(bucket_due.c.contact_id)
        .cte("removed")
    )

    def counted(*where: ColumnElement[bool]) -> Any:
        return sa.select(sa.func.count()).select_from(changed).where(*where).scalar_subquery()

    # No nested loops for this statement: it joins CTEs (which carry no statistics) to the
    # queue, where the planner, believing a bucket has one entry (a new bucket, stale
    # statistics), rescanned a chunk's computed set for each of its entries — quadratic, minutes
    # a chunk at 1M. The per-contact membership probe above stays a nested loop (its only plan).
    conn.exec_driver_sql("SET LOCAL enable_nestloop = off")
    added, earlier, later, gone, _ = conn.execute(
        sa.select(
            counted(changed.c.was.is_(None)),
            counted(changed.c.due_at < changed.c.was),
            counted(changed.c.due_at > changed.c.was),
            sa.select(sa.func.count()).select_from(removed).scalar_subquery(),
            sa.select(sa.func.count()).select_from(upsert).scalar_subquery(),
        )
    ).one()
    conn.exec_driver_sql("RESET enable_nestloop")
    return Refreshed(added, earlier, later, gone)


def _due_sql(
    bucket: Bucket,
    matches: ColumnElement[Any],
    next_at: ColumnElement[Any],
    member: Any,
    at: ColumnElement[Any],
    *,
    blocked: bool,
) -> ColumnElement[Any]:
    """:func:`due_at` in SQL (NULL is never; ``least`` ignores NULLs, which is "earliest")."""
    is_member = member.c.id.is_not(None)
    as_member = sa.case(
        (
            member.c.pending_leave_at.is_not(None),
            sa.func.least(member.c.pending_leave_at, member.c.max_dwell_at),
        ),
        (~matches, at),
        else_=sa.func.least(next_at, member.c.max_dwell_at),
    )
    nothing = sa.null()
    if bucket.reconcile_joins is False:
        as_other: ColumnElement[Any] = sa.cast(nothing, TIMESTAMP)
    else:
        joins = (
            (at + sa.literal(BLOCKED_RETRY, sa.Interval) if blocked else at)
            if bucket.cron_joins
            else sa.cast(nothing, TIMESTAMP)
        )
        as_other = sa.case((matches, joins), else_=next_at)
    return sa.case((is_member, as_member), else_=as_other)


# --- reading: what is due --------------------------------------------------------------------


Part = tuple[int, int]  # (i, n): the contacts whose id is i modulo n
WHOLE: Part = (0, 1)


def claim(
    conn: Connection, bucket_id: str, now: datetime, limit: int, part: Part = WHOLE
) -> list[int]:
    """Claim up to ``limit`` of the bucket's entries due as of ``now`` (oldest first; only
    those of the contacts in ``part``) and lock their contacts, skipping entries another worker
    holds and contacts another producer is changing (they stay due for the next pass). Returns
    the locked contacts, in id order."""
    where = [bucket_due.c.bucket_id == bucket_id, bucket_due.c.due_at <= sa.literal(now, TIMESTAMP)]
    if part != WHOLE:
        where.append(bucket_due.c.contact_id % part[1] == part[0])
    claimed = (
        sa.select(bucket_due.c.contact_id)
        .where(*where)
        .order_by(bucket_due.c.due_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("claimed")
    )
    locked = (
        sa.select(contacts.c.id)
        .where(contacts.c.id.in_(sa.select(claimed.c.contact_id)))
        .order_by(contacts.c.id)
        .with_for_update(key_share=True, skip_locked=True)
    )
    return list(conn.execute(locked).scalars())


def _buckets(bucket_ids: Sequence[str]) -> Any:
    """``unnest(bucket_ids) AS wanted(bucket_id)``."""
    return (
        sa.func.unnest(_array(list(bucket_ids), sa.Text()))
        .table_valued("bucket_id")
        .render_derived("wanted")
    )


def next_due(conn: Connection, bucket_ids: Sequence[str]) -> datetime | None:
    """The earliest entry of these buckets (an index probe per bucket)."""
    if not bucket_ids:
        return None
    wanted = _buckets(bucket_ids)
    first = (
        sa.select(bucket_due.c.due_at)
        .where(bucket_due.c.bucket_id == wanted.c.bucket_id)
        .order_by(bucket_due.c.due_at)
        .limit(1)
        .lateral("first")
    )
    value = conn.execute(
        sa.select(sa.func.min(first.c.due_at)).select_from(wanted.join(first, sa.true()))
    ).scalar()
    return value


def due_count(conn: Connection, bucket_ids: Sequence[str], now: datetime, cap: int) -> int:
    """How many entries of these buckets are due as of ``now``, counted up to ``cap``."""
    if not bucket_ids:
        return 0
    found = (
        sa.select(sa.literal(1))
        .where(
            bucket_due.c.bucket_id == sa.any_(_array(list(bucket_ids), sa.Text())),
            bucket_due.c.due_at <= sa.literal(now, TIMESTAMP),
        )
        .limit(cap)
        .subquery()
    )
    return int(conn.execute(sa.select(sa.func.count()).select_from(found)).scalar_one())


def due_buckets(conn: Connection, bucket_ids: Sequence[str], now: datetime) -> list[str]:
    """Those of ``bucket_ids`` with an entry due as of ``now`` (an index probe each)."""
    if not bucket_ids:
        return []
    wanted = _buckets(bucket_ids)
    due_now = sa.exists().where(
        bucket_due.c.bucket_id == wanted.c.bucket_id,
        bucket_due.c.due_at <= sa.literal(now, TIMESTAMP),
    )
    return list(conn.execute(sa.select(wanted.c.bucket_id).where(due_now)).scalars())


@dataclass(frozen=True)
class Backlog:
    bucket_id: str
    entries: int  # every entry of the bucket
    due: int  # entries due as of now
    oldest_due_at: datetime | None  # the oldest entry (due or not)

    def lag(self, now: datetime) -> timedelta:
        """How long the oldest due entry has waited (zero when nothing is due)."""
        if self.oldest_due_at is None or self.oldest_due_at > now:
            return timedelta(0)
        return now - self.oldest_due_at


def backlog(conn: Connection, bucket_ids: Sequence[str], now: datetime) -> dict[str, Backlog]:
    """Per bucket: entries, how many are due, the oldest (index range scans per bucket)."""
    if not bucket_ids:
        return {}
    wanted = _buckets(bucket_ids)
    mine = bucket_due.c.bucket_id == wanted.c.bucket_id
    at = sa.literal(now, TIMESTAMP)
    rows = conn.execute(
        sa.select(
            wanted.c.bucket_id,
            sa.select(sa.func.count()).where(mine).scalar_subquery(),
            sa.select(sa.func.count()).where(mine, bucket_due.c.due_at <= at).scalar_subquery(),
            sa.select(sa.func.min(bucket_due.c.due_at)).where(mine).scalar_subquery(),
        )
    )
    return {row[0]: Backlog(row[0], row[1], row[2], row[3]) for row in rows}


def entry(conn: Connection, bucket_id: str, contact_id: int) -> datetime | None:
    return conn.execute(
        sa.select(bucket_due.c.due_at).where(
            bucket_due.c.bucket_id == bucket_id, bucket_due.c.contact_id == contact_id
        )
    ).scalar()


# --- completeness ----------------------------------------------------------------------------


def complete(conn: Connection, bucket: Bucket) -> bool:
    """The bucket's entries are complete for its current criteria (see the module)."""
    stored = conn.execute(
        sa.select(bucket_configs.c.due_hash).where(bucket_configs.c.bucket_id == bucket.id)
    ).scalar()
    return stored == queue_hash(bucket)


def mark_complete(conn: Connection, bucket: Bucket) -> None:
    conn.execute(
        pg_insert(bucket_configs)
        .values(bucket_id=bucket.id, due_hash=queue_hash(bucket))
        .on_conflict_do_update(
            index_elements=[bucket_configs.c.bucket_id],
            set_={"due_hash": queue_hash(bucket), "updated_at": sa.func.now()},
        )
    )


def mark_incomplete(conn: Connection, bucket_ids: Sequence[str]) -> int:
    """Forget that these buckets' entries are complete (disabled: ingest stops writing them)."""
    if not bucket_ids:
        return 0
    return conn.execute(
        sa.update(bucket_configs)
        .where(
            bucket_configs.c.bucket_id.in_(list(bucket_ids)), bucket_configs.c.due_hash.is_not(None)
        )
        .values(due_hash=None, updated_at=sa.func.now())
    ).rowcount


def joins_blocked(conn: Connection, bucket: Bucket) -> bool:
    """SPEC §6.4, §7: the cron does not join while the backfill that claims the cohort has not
    completed — no criteria hash stored yet (first-time), a stored hash that differs from the
    definition's (a re-evaluation is due), or a first-time / re-evaluation job not terminal.
    Otherwise its joins would emit the historical matches the backfill records silently."""
    configured = conn.execute(
        sa.select(bucket_configs.c.criteria_hash).where(bucket_configs.c.bucket_id == bucket.id)
    ).scalar()
    if configured != bucket.fingerprint:
        return True
    running = conn.execute(
        sa.select(sa.literal(1)).where(
            backfill_jobs.c.bucket_id == bucket.id,
            backfill_jobs.c.mode.in_(("first_time", "reevaluate")),
            backfill_jobs.c.status.in_(("pending", "running")),
        )
    ).first()
    return running is not None
