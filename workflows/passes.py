"""The full reconcile of one bucket: every member and every candidate examined (SPEC §6.1-6.5).

Since the due queue (:mod:`buckets.due`) the cron runs these passes only where the queue cannot
be trusted yet (a cron bucket whose entries are not complete: an upgraded database, a
re-enabled bucket, until its ``queue_fill`` job completes), for ``reconcile_joins=True`` (the
self-healing sweep it asks for), and in the **full sweep** (``buckets reconcile --full``, and
daily in the worker): the safety net that heals whatever the queue missed and reports it.

1. **criteria leaves** — members whose criteria fail as of ``now`` (correlated index probes
   over the members only, the fastest form: PERFORMANCE-NOTES.md). Single-leaf criteria leave
   in one set-based statement; composite criteria have each candidate decided afresh under its
   contact lock (:func:`buckets.decide.decide`). ``min_dwell`` defers a leave.
2. **joins** (SPEC §6.2, §6.3), unless ``reconcile_joins`` is false or the backfill that claims
   the cohort has not completed (SPEC §6.4): a single clock-joinable leaf and the lapsed-active
   pair join by an exact ``INSERT … SELECT``; other shapes take the compiled SQL's exact
   candidate set and decide each under its lock. Joins pass the entry-limit gate.
3. **TTL leaves** — ``max_dwell_at <= now``, ``reason='max_dwell'``, whatever the criteria.
4. **pending leaves** — deferred (min-dwell) leaves whose contact qualifies again are cleared
   (a due one whose criteria still fail completes in pass 1).
5. with ``full``: **queue refresh** — every contact's due-queue entry recomputed; entries that
   were missing or late are counted as healed.

Every pass walks contact ids in chunks (one transaction each) and rewrites the queue entries
of the contacts it changed in the same transaction; in that transaction too, the buckets that
refer to the bucket are re-decided for the contacts whose membership changed (:class:`Cascading`,
SPEC §3.5). Set-based passes decide from a snapshot
and act only on contacts unchanged since (see :mod:`buckets.membership`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from buckets import due
from buckets.candidates import (
    active_members,
    failing_members,
    holding,
    join_matching,
    leave_failing,
    matching_non_members,
    ttl_expired,
)
from buckets.criteria.model import Composite, EventCondition
from buckets.decide import Ask, Outcome, decide
from buckets.definitions import Bucket, clock_joinable
from buckets.membership import Changes, lock_contacts, settle
from buckets.models import bucket_memberships as memberships
from buckets.models import contacts
from buckets.references import cascade

CONFIRM_BATCH = 2_000  # candidates locked and decided per transaction


class Cascading:
    """The cron's cascade (SPEC §3.5): after the clock changed a bucket's memberships, the
    buckets that refer to it are re-decided for those contacts in the same transaction, with
    the cron's view (no joins for a bucket whose backfill has not completed; disabled
    dependents left alone)."""

    def __init__(
        self, registry: Any, overrides: dict[str, bool], results: dict[str, Any] | None = None
    ) -> None:
        self.registry = registry
        self.overrides = overrides
        self.results = results if results is not None else {}  # bucket id -> its BucketTick
        self._blocked: dict[str, bool] = {}

    def fork(self, results: dict[str, Any]) -> Cascading:
        """The same cascade counting on ``results`` (another connection's tick)."""
        return Cascading(self.registry, self.overrides, results)

    def counted(self, outcome: Outcome, deciders: set[str]) -> Outcome:
        """Count what the cascade did to each dependent on the dependent's own line (the
        ``deciders``' own changes are counted by whoever decided them)."""
        for bucket_id in outcome.changes.per_bucket.keys() - deciders:
            if bucket_id in self.results:
                self.results[bucket_id].count_outcome(outcome)
        return outcome

    def enabled(self, buckets: Any) -> list[Bucket]:
        return [b for b in buckets if self.overrides.get(b.id, b.enabled)]

    def blocked(self, conn: Connection, bucket_ids: Any) -> frozenset[str]:
        """The dependents of ``bucket_ids`` whose joins are blocked (asked once a tick)."""
        for bucket_id in bucket_ids:
            for found in self.registry.dependents(bucket_id):
                if found.id not in self._blocked:
                    self._blocked[found.id] = due.joins_blocked(conn, found)
        return frozenset(b for b, is_blocked in self._blocked.items() if is_blocked)

    def run(
        self,
        conn: Connection,
        asks: list[Ask],
        now: datetime,
        blocked: frozenset[str],
        universe: Sequence[Bucket] = (),
    ) -> Outcome:
        """Decide ``asks`` and cascade what they change (``universe``: see ``decide``)."""
        deciders = {ask.bucket.id for ask in asks}
        stopped = blocked | self.blocked(conn, deciders)
        found = cascade(
            conn,
            self.registry,
            {},
            now,
            source="reconcile",
            asks=asks,
            enabled=self.enabled,
            clock=True,
            blocked=stopped,
            rows=False,
            record=True,
            universe=universe,
        )
        return self.counted(found, deciders)

    def after(
        self, conn: Connection, bucket: Bucket, contact_ids: list[int], now: datetime
    ) -> Outcome:
        """Cascade the changes a set-based statement made to ``bucket`` for ``contact_ids``."""
        if not contact_ids or not self.registry.graph.referred_by.get(bucket.id):
            return Outcome()
        locked = lock_contacts(conn, contact_ids)
        found = cascade(
            conn,
            self.registry,
            {bucket.id: locked.ids},
            now,
            source="reconcile",
            enabled=self.enabled,
            clock=True,
            blocked=self.blocked(conn, [bucket.id]),
            rows=False,
            record=True,
        )
        return self.counted(found, {bucket.id})


def lapsed_pair(node: Any) -> bool:
    """``and(X exists, X within W not_exists)`` with the same ``where`` (in either order)."""
    if not isinstance(node, Composite) or node.operator != "and" or len(node.conditions) != 2:
        return False
    events = [child for child in node.conditions if isinstance(child, EventCondition)]
    ever = [c for c in events if c.check == "exists" and c.within is c.older_than is None]
    recent = [c for c in events if c.check == "not_exists" and c.within is not None]
    return (
        len(ever) == 1
        and len(recent) == 1
        and ever[0].event == recent[0].event
        and ever[0].where == recent[0].where
    )


def join_mode(bucket: Bucket) -> str:
    """``exact`` (set-based), ``confirmed`` (candidates decided one by one) or ``off``."""
    if not bucket.cron_joins:
        return "off"
    criteria = bucket.criteria
    single = isinstance(criteria, EventCondition) and clock_joinable(criteria)
    return "exact" if single or lapsed_pair(criteria) else "confirmed"


class Passes:
    """The passes over one bucket as of ``now``; counts go to ``result`` (a BucketTick)."""

    def __init__(
        self,
        conn: Connection,
        bucket: Bucket,
        now: datetime,
        chunk: int,
        result: Any,
        *,
        mode: str,
        full: bool = False,
        cascading: Cascading | None = None,
    ) -> None:
        self.conn, self.bucket, self.now, self.chunk, self.result = conn, bucket, now, chunk, result
        self.mode, self.full = mode, full
        self.cascading = cascading
        self.blocked = False

    def run(self) -> None:
        with self.conn.begin():
            self.blocked = due.joins_blocked(self.conn, self.bucket)
        self.timed("criteria_leaves", self.criteria_leaves)
        mode = self.mode
        if mode != "off":
            if self.blocked:
                mode = "off (the bucket's backfill has not completed)"
            else:
                self.timed("joins", self.exact_joins if mode == "exact" else self.confirmed_joins)
        self.result.joins = mode
        if self.bucket.max_dwell is not None:
            self.timed("ttl_leaves", self.ttl_leaves)
        if self.bucket.min_dwell is not None:
            self.timed("pending", self.clear_pending)
        if self.full and self.bucket.clocked:
            self.timed("queue", self.refresh_queue)

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

    def refreshed(
        self, changes: Changes, reason: str | None = None, *, memberships: bool = True
    ) -> None:
        """Count ``changes``, rewrite the queue entries of the contacts they changed and (when
        ``memberships`` changed) cascade to the buckets that refer to this one, in the chunk's
        transaction."""
        self.result.count(changes, reason)
        if self.bucket.clocked and changes.changed:
            due.refresh(
                self.conn, self.bucket, self.now, contact_ids=changes.changed, blocked=self.blocked
            )
        if self.cascading is not None and memberships and changes.changed:
            self.cascading.after(self.conn, self.bucket, changes.changed, self.now)

    # -- passes ---------------------------------------------------------------------------

    def criteria_leaves(self) -> None:
        composite = isinstance(self.bucket.criteria, Composite)
        for id_range in self.ranges():
            if composite:  # each candidate decided afresh under its lock
                found = failing_members(self.bucket, self.now, id_range=id_range)
                ids = list(
                    self.conn.execute(found.with_only_columns(memberships.c.contact_id)).scalars()
                )
                self.conn.commit()
                self.decided(ids)
                continue
            with self.conn.begin():
                changes = leave_failing(
                    self.conn,
                    self.bucket,
                    self.now,
                    id_range=id_range,
                    source="reconcile",
                    changed=True,
                )
                self.refreshed(changes, "criteria")

    def exact_joins(self) -> None:
        for id_range in self.ranges():
            with self.conn.begin():
                changes = join_matching(
                    self.conn,
                    self.bucket,
                    self.now,
                    id_range=id_range,
                    source="reconcile",
                    changed=True,
                )
                self.refreshed(changes)

    def confirmed_joins(self) -> None:
        for id_range in self.ranges():
            found = matching_non_members(self.bucket, self.now, id_range=id_range)
            ids = list(self.conn.execute(found.with_only_columns(contacts.c.id)).scalars())
            self.conn.commit()
            self.decided(ids)

    def decided(self, candidates: list[int]) -> None:
        """Lock each candidate and decide it afresh (buckets.decide): a batch a transaction."""
        blocked = frozenset({self.bucket.id}) if self.blocked else frozenset()
        for start in range(0, len(candidates), CONFIRM_BATCH):
            with self.conn.begin():
                locked = lock_contacts(self.conn, candidates[start : start + CONFIRM_BATCH])
                if not locked.ids:
                    continue
                asks = [Ask(self.bucket, contact_id) for contact_id in locked.ids]
                if self.cascading is not None and self.cascading.registry.graph.has_references:
                    outcome = self.cascading.run(self.conn, asks, self.now, blocked)
                else:
                    outcome = decide(
                        self.conn,
                        asks,
                        self.now,
                        source="reconcile",
                        clock=True,
                        blocked=blocked,
                        rows=False,
                        record=True,
                    )
                self.result.count_outcome(outcome)

    def ttl_leaves(self) -> None:
        for id_range in self.ranges():
            with self.conn.begin():
                changes = ttl_expired(
                    self.conn, self.bucket, self.now, id_range=id_range, source="reconcile"
                )
                self.refreshed(changes, "max_dwell")

    def clear_pending(self) -> None:
        holds = holding(self.bucket, self.now)
        pending = memberships.c.pending_leave_at.is_not(None)
        for id_range in self.ranges():
            with self.conn.begin():
                # with the contact's revision: a contact changed since the snapshot was
                # re-decided by whoever changed it, and is left alone here
                candidates = active_members(self.bucket, pending, holds, id_range=id_range)
                cleared = settle(self.conn, candidates, now=self.now, clear_pending=True)
                self.result.cleared += len(cleared)
                # a cleared deferral changes no membership: nothing to cascade
                self.refreshed(Changes(changed=cleared), memberships=False)

    def refresh_queue(self) -> None:
        for id_range in self.ranges():
            with self.conn.begin():
                found = due.refresh(
                    self.conn, self.bucket, self.now, id_range=id_range, blocked=self.blocked
                )
            self.result.queue.add(found)
