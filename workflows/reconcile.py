"""The cron reconcile: the changes only the clock makes (SPEC §6).

``reconcile(now)`` runs one tick. Each enabled bucket on the cron's list (time-based criteria,
``min_dwell`` or ``max_dwell``, or ``reconcile_joins=True``) is processed on its own, under a
per-bucket advisory lock held in PostgreSQL, in this order:

1. **criteria leaves** — members whose criteria fail as of ``now`` (correlated index probes over
   the members only, the fastest form: PERFORMANCE-NOTES.md). Single-leaf criteria leave in one
   set-based statement; composite criteria have each candidate confirmed by the Python
   evaluator under its contact lock first (SPEC §6.1). ``min_dwell`` defers a leave.
2. **joins** (SPEC §6.2, §6.3), unless ``reconcile_joins`` is false or the first-time backfill
   has not completed (SPEC §6.4): a single clock-joinable leaf and the lapsed-active pair join
   by an exact ``INSERT … SELECT`` from the compiled criteria; other shapes (with a
   clock-joinable leaf, or any shape with ``reconcile_joins=True``) take the compiled SQL's exact
   candidate set and confirm each under its contact lock. Joins pass the entry-limit gate.
3. **TTL leaves** — ``max_dwell_at <= now``, ``reason='max_dwell'``, whatever the criteria.
4. **pending leaves** — a deferred (min-dwell) leave that is due completes in pass 1 when the
   criteria still fail; here the ones whose contact qualifies again are cleared.

Set-based passes decide from a snapshot and act only on contacts unchanged since (their
``revision``), re-deciding the rest under their locks (see :mod:`buckets.membership`): an ingest
racing the tick is never overruled by stale data. Every pass walks the contact ids in chunks
(``chunk_size`` ids per transaction), so transactions stay bounded while a bucket of any size
converges in one tick. A bucket already reconciled as of ``now`` (``bucket_configs.
reconciled_at``), or being reconciled by another worker, is skipped; one bucket failing is
logged and reported, and the others go on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from buckets.candidates import (
    active_members,
    failing_members,
    holding,
    join_matching,
    leave_failing,
    matching_non_members,
    without_revision,
)
from buckets.criteria import (
    EventCondition,
    counts_counter,
    evaluate,
    leaf_counts,
)
from buckets.criteria.model import Composite, leaves
from buckets.definitions import Bucket, clock_joinable
from buckets.membership import (
    Changes,
    LeaveReason,
    Policy,
    join,
    leave,
    lock_contacts,
    pairs,
    settle,
)
from buckets.models import backfill_jobs, bucket_configs, contacts
from buckets.models import bucket_memberships as memberships
from buckets.registry import read_overrides
from buckets.runtime import Runtime, get_runtime

log = logging.getLogger("buckets.reconcile")

DEFAULT_CHUNK_SIZE = 250_000  # contact ids per transaction
CONFIRM_BATCH = 2_000  # candidates locked and confirmed per transaction


@dataclass
class BucketTick:
    """What one tick did to one bucket."""

    bucket_id: str
    status: str = "done"  # done | skipped | failed
    reason: str | None = None  # why skipped / the error
    joined: int = 0
    emitted: int = 0
    suppressed: int = 0
    left: dict[str, int] = field(default_factory=dict)  # by reason
    deferred: int = 0
    cleared: int = 0
    joins: str = "off"  # how joins ran: exact | confirmed | off (and why)
    seconds: float = 0.0
    passes: dict[str, float] = field(default_factory=dict)  # seconds per pass

    def count(self, changes: Changes, reason: str | None = None) -> None:
        self.joined += changes.joined
        self.emitted += changes.emitted
        self.suppressed += changes.suppressed
        self.deferred += changes.deferred
        if reason and changes.left:
            self.left[reason] = self.left.get(reason, 0) + changes.left

    def to_dict(self) -> dict[str, Any]:
        return {
            "bucket_id": self.bucket_id,
            "status": self.status,
            "reason": self.reason,
            "joined": self.joined,
            "emitted": self.emitted,
            "suppressed": self.suppressed,
            "left": dict(self.left),
            "deferred": self.deferred,
            "cleared": self.cleared,
            "joins": self.joins,
            "seconds": round(self.seconds, 4),
            "passes": {name: round(seconds, 4) for name, seconds in self.passes.items()},
        }


@dataclass
class Tick:
    now: datetime
    buckets: list[BucketTick]

    @property
    def failed(self) -> list[BucketTick]:
        return [bucket for bucket in self.buckets if bucket.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        return {"now": self.now.isoformat(), "buckets": [b.to_dict() for b in self.buckets]}


def reconcile(
    now: datetime | None = None,
    bucket_ids: Sequence[str] | None = None,
    *,
    runtime: Runtime | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tick:
    """One tick as of ``now`` over every bucket on the cron's list (or exactly
    ``bucket_ids``: unknown ids raise, disabled ones are skipped)."""
    rt = get_runtime(runtime)
    at = now or datetime.now(UTC)
    if at.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if bucket_ids is None:
        chosen = [bucket for bucket in rt.registry if on_cron(bucket)]
    else:
        chosen = [rt.registry.get(bucket_id) for bucket_id in bucket_ids]
    with rt.engine.connect() as conn:
        overrides = read_overrides(conn)  # fresh: a disable counts from the next tick
        conn.rollback()
        results = []
        for bucket in chosen:
            if not overrides.get(bucket.id, bucket.enabled):
                results.append(BucketTick(bucket.id, "skipped", "disabled"))
                continue
            results.append(_reconcile_bucket(conn, bucket, at, chunk_size))
    return Tick(at, results)


def on_cron(bucket: Bucket) -> bool:
    """Time-based, or with min/max dwell (SPEC §6), or asking for the self-healing sweep."""
    return bucket.on_cron or bucket.reconcile_joins is True


def _lock_key(bucket_id: str) -> Any:
    return sa.func.hashtextextended(sa.literal(f"buckets:reconcile:{bucket_id}"), 0)


def _reconcile_bucket(conn: Connection, bucket: Bucket, now: datetime, chunk: int) -> BucketTick:
    result = BucketTick(bucket.id)
    started = time.perf_counter()
    locked = conn.execute(sa.select(sa.func.pg_try_advisory_lock(_lock_key(bucket.id)))).scalar()
    conn.commit()
    if not locked:
        result.status, result.reason = "skipped", "being reconciled by another worker"
        return result
    try:
        done = conn.execute(
            sa.select(bucket_configs.c.reconciled_at).where(bucket_configs.c.bucket_id == bucket.id)
        ).scalar()
        conn.commit()
        if done is not None and done >= now:
            result.status, result.reason = "skipped", f"already reconciled as of {done.isoformat()}"
            return result
        _Passes(conn, bucket, now, chunk, result).run()
        with conn.begin():
            conn.execute(
                pg_insert(bucket_configs)
                .values(bucket_id=bucket.id, reconciled_at=now)
                .on_conflict_do_update(
                    index_elements=[bucket_configs.c.bucket_id],
                    set_={"reconciled_at": now, "updated_at": sa.func.now()},
                )
            )
    except Exception as exc:  # one bucket failing does not stop the tick
        if conn.in_transaction():
            conn.rollback()
        log.exception("reconcile of bucket %s failed", bucket.id)
        result.status, result.reason = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        conn.execute(sa.select(sa.func.pg_advisory_unlock(_lock_key(bucket.id))))
        conn.commit()
        result.seconds = time.perf_counter() - started
    log.info(
        "reconciled %s: joined %d (emitted %d, suppressed %d), left %s, deferred %d, cleared %d"
        " in %.3fs",
        bucket.id,
        result.joined,
        result.emitted,
        result.suppressed,
        result.left or "0",
        result.deferred,
        result.cleared,
        result.seconds,
    )
    return result


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


def lapsed_pair(node: Any) -> bool:
    """``and(X exists, X within W not_exists)`` with the same ``where`` (in either order)."""
    if not isinstance(node, Composite) or node.operator != "and" or len(node.conditions) != 2:
        return False
    events = [child for child in node.conditions if isinstance(child, EventCondition)]
    ever = [c for c in events if c.check == "exists" and c.within is None]
    recent = [c for c in events if c.check == "not_exists" and c.within is not None]
    return (
        len(ever) == 1
        and len(recent) == 1
        and ever[0].event == recent[0].event
        and ever[0].where == recent[0].where
    )


def join_mode(bucket: Bucket) -> str:
    """``exact`` (set-based), ``confirmed`` (candidates + per-member confirm) or ``off``."""
    criteria = bucket.criteria
    joinable = any(clock_joinable(leaf) for leaf in leaves(criteria))
    if bucket.reconcile_joins is False or (bucket.reconcile_joins is None and not joinable):
        return "off"
    single = isinstance(criteria, EventCondition) and clock_joinable(criteria)
    return "exact" if single or lapsed_pair(criteria) else "confirmed"


class _Passes:
    def __init__(
        self, conn: Connection, bucket: Bucket, now: datetime, chunk: int, result: BucketTick
    ) -> None:
        self.conn, self.bucket, self.now, self.chunk, self.result = conn, bucket, now, chunk, result
        self.policy = [Policy.of(bucket)]
        self.conditions = list(
            dict.fromkeys(
                leaf for leaf in leaves(bucket.criteria) if isinstance(leaf, EventCondition)
            )
        )

    def run(self) -> None:
        self.timed("criteria_leaves", self.criteria_leaves)
        mode = join_mode(self.bucket)
        if mode != "off":
            with self.conn.begin():
                blocked = joins_blocked(self.conn, self.bucket)
            if blocked:
                mode = "off (the bucket's backfill has not completed)"
            else:
                self.timed("joins", self.exact_joins if mode == "exact" else self.confirmed_joins)
        self.result.joins = mode
        if self.bucket.max_dwell is not None:
            self.timed("ttl_leaves", self.ttl_leaves)
        if self.bucket.min_dwell is not None:
            self.timed("pending", self.clear_pending)

    def timed(self, name: str, run: Callable[[], None]) -> None:
        started = time.perf_counter()
        run()
        self.result.passes[name] = time.perf_counter() - started

    # -- chunking -------------------------------------------------------------------------

    def ranges(self) -> Iterator[tuple[int, int]]:
        low, high = self.conn.execute(
            sa.select(sa.func.min(contacts.c.id), sa.func.max(contacts.c.id))
        ).one()
        self.conn.commit()
        if low is None:
            return
        for start in range(low, high + 1, self.chunk):
            yield start, min(start + self.chunk - 1, high)

    # -- passes ---------------------------------------------------------------------------

    def criteria_leaves(self) -> None:
        composite = isinstance(self.bucket.criteria, Composite)
        for id_range in self.ranges():
            if composite:  # each candidate confirmed by the evaluator under its lock
                found = failing_members(self.bucket, self.now, id_range=id_range)
                ids = list(
                    self.conn.execute(found.with_only_columns(memberships.c.contact_id)).scalars()
                )
                self.conn.commit()
                self.confirmed(ids, want=False)
                continue
            with self.conn.begin():
                changes = leave_failing(
                    self.conn, self.bucket, self.now, id_range=id_range, source="reconcile"
                )
                self.result.count(changes, "criteria")

    def leave(self, candidates: sa.Select[Any], reason: LeaveReason) -> Changes:
        return leave(
            self.conn, candidates, self.policy, now=self.now, reason=reason, source="reconcile"
        )

    def join(self, candidates: sa.Select[Any]) -> Changes:
        return join(self.conn, candidates, self.policy, now=self.now, source="reconcile")

    def exact_joins(self) -> None:
        for id_range in self.ranges():
            with self.conn.begin():
                changes = join_matching(
                    self.conn, self.bucket, self.now, id_range=id_range, source="reconcile"
                )
                self.result.count(changes)

    def confirmed_joins(self) -> None:
        for id_range in self.ranges():
            found = matching_non_members(self.bucket, self.now, id_range=id_range)
            ids = list(self.conn.execute(found.with_only_columns(contacts.c.id)).scalars())
            self.conn.commit()
            self.confirmed(ids, want=True)

    def confirmed(self, candidates: list[int], *, want: bool) -> None:
        """Lock each candidate, evaluate it afresh in Python, and join (``want``) or leave the
        ones whose answer is still ``want``; a batch per transaction."""
        for start in range(0, len(candidates), CONFIRM_BATCH):
            with self.conn.begin():
                ids = lock_contacts(self.conn, candidates[start : start + CONFIRM_BATCH])
                if not ids:
                    continue
                rows = self.conn.execute(leaf_counts(self.conditions, self.now, ids))
                confirmed = []
                for row in rows:
                    counts = {c: row[3 + i] for i, c in enumerate(self.conditions)}
                    matches = row.deleted_at is None and evaluate(
                        self.bucket.criteria, row.properties, counts_counter(counts)
                    )
                    if matches == want:
                        confirmed.append(row.id)
                if not confirmed:
                    continue
                chosen = pairs([self.bucket.id] * len(confirmed), confirmed)
                if want:
                    self.result.count(self.join(chosen))
                else:
                    self.result.count(self.leave(chosen, "criteria"), "criteria")

    def ttl_leaves(self) -> None:
        """Unconditional on the criteria, so no contact data to go stale: the compare-and-swap
        on the membership row is what serialises it with other writers."""
        due = memberships.c.max_dwell_at <= sa.literal(self.now, sa.DateTime(timezone=True))
        for id_range in self.ranges():
            with self.conn.begin():
                candidates = without_revision(active_members(self.bucket, due, id_range=id_range))
                self.result.count(self.leave(candidates, "max_dwell"), "max_dwell")

    def clear_pending(self) -> None:
        holds = holding(self.bucket, self.now)
        pending = memberships.c.pending_leave_at.is_not(None)
        for id_range in self.ranges():
            with self.conn.begin():
                # with the contact's revision: a contact changed since the snapshot was
                # re-decided by whoever changed it, and is left alone here
                candidates = active_members(self.bucket, pending, holds, id_range=id_range)
                self.result.cleared += settle(
                    self.conn, candidates, now=self.now, clear_pending=True
                )
