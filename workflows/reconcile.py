"""The cron reconcile: the changes only the clock makes (SPEC §6), driven by the due queue.

``reconcile(now)`` runs one tick as of ``now`` (the tick's real start). Per enabled bucket,
each on its own, one failing bucket not stopping the others:

1. **due entries** (:mod:`buckets.due`): the pairs whose answer the clock may have changed by
   ``now`` are claimed in chunks (``FOR UPDATE SKIP LOCKED``: several workers split them),
   their contacts locked, each pair decided afresh as of ``now`` (:func:`buckets.decide.decide`
   with the cron's view: maximum dwell, entry limits, no joins while the bucket's backfill has
   not completed) and its next entry written — in one transaction per chunk. A tick with
   nothing due costs an index probe per bucket; its cost follows the flips, not the population.
   From five full chunks due, the chunks run on ``due_connections`` connections side by side,
   each on its own share of the contact ids.
2. **full passes** (:mod:`workflows.passes`), every member and candidate examined, only for a
   cron bucket whose queue is not complete yet (a ``queue_fill`` job is enqueued for it), for
   ``reconcile_joins=True`` (the self-healing sweep it asks for), and with ``full`` (the full
   sweep: the safety net; what it changes or re-queues earlier is reported as *healed*). These
   run under a per-bucket advisory lock, once per cron slot (``slot``, default ``now``) across
   workers.

:func:`process_due` alone (``due_only``) is what the worker's waker runs between ticks, as soon
as the next entry falls due: each flip is decided as of its due instant or later (SPEC §6.7).
Disabled buckets are skipped and their queues marked incomplete (ingest stops writing them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from buckets import due, metrics
from buckets.decide import Ask, Outcome, decide
from buckets.definitions import Bucket
from buckets.due import Refreshed, joins_blocked
from buckets.membership import Changes, Counts
from buckets.models import bucket_configs
from buckets.registry import read_overrides
from buckets.runtime import Runtime, get_runtime
from workflows import jobs
from workflows.passes import Cascading, Passes, join_mode, lapsed_pair

log = logging.getLogger("buckets.reconcile")

DEFAULT_CHUNK_SIZE = 250_000  # contact ids per transaction of the full passes
DUE_CHUNK = 2_000  # due entries claimed and decided per transaction
# From this many full chunks due, a tick decides on several connections. Below it, each
# connection's per-chunk statements (a claim and a criteria statement per bucket) cost more than
# running side by side saves: at 100k, T+1d (4,792 due), 426 ms on one connection, 476-550 ms on
# two; at 1M (47,552 due) 6.7 s on one, 4.3-4.8 s on two (bench/tick.py).
SIDE_BY_SIDE_FROM = 5

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "BucketTick",
    "Tick",
    "join_mode",
    "joins_blocked",
    "lapsed_pair",
    "on_cron",
    "process_due",
    "reconcile",
]


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
    due: int = 0  # due entries decided
    passes_ran: str = "no"  # the full passes: no | incomplete queue | reconcile_joins | full
    joins: str = "off"  # how the full passes joined: exact | confirmed | off (and why)
    queue: Refreshed = field(default_factory=Refreshed)  # the full sweep's refresh
    seconds: float = 0.0
    passes: dict[str, float] = field(default_factory=dict)  # seconds per pass

    def _add(self, counts: Changes | Counts | BucketTick, left: dict[str, int]) -> None:
        """Add ``counts``' joins, emissions, suppressions and deferrals, and ``left`` by reason."""
        self.joined += counts.joined
        self.emitted += counts.emitted
        self.suppressed += counts.suppressed
        self.deferred += counts.deferred
        for reason, count in left.items():
            self.left[reason] = self.left.get(reason, 0) + count

    def count(self, changes: Changes, reason: str | None = None) -> None:
        self._add(changes, {reason: changes.left} if reason and changes.left else {})

    def count_outcome(self, outcome: Outcome) -> None:
        """Add what ``outcome`` (of a decision over several buckets) did to this bucket."""
        counts = outcome.changes.per_bucket.get(self.bucket_id, Counts())
        self._add(counts, outcome.left.get(self.bucket_id, {}))
        self.cleared += outcome.cleared.get(self.bucket_id, 0)

    def absorb(self, other: BucketTick) -> None:
        """Add what ``other`` (the same bucket, decided on another connection) did."""
        self._add(other, other.left)
        self.cleared += other.cleared
        self.due += other.due
        self.seconds += other.seconds
        for name, seconds in other.passes.items():
            self.passes[name] = self.passes.get(name, 0.0) + seconds
        if other.status == "failed" and self.status != "failed":
            self.status, self.reason = other.status, other.reason

    @property
    def transitions(self) -> int:
        return self.joined + sum(self.left.values())

    @property
    def healed(self) -> int:
        """What a full sweep fixed: transitions it made plus entries missing or late."""
        return (self.transitions + self.queue.healed) if self.passes_ran == "full" else 0

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
            "due": self.due,
            "passes_ran": self.passes_ran,
            "joins": self.joins,
            "healed": self.healed,
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

    @property
    def transitions(self) -> int:
        return sum(bucket.transitions for bucket in self.buckets)

    @property
    def healed(self) -> int:
        return sum(bucket.healed for bucket in self.buckets)

    def to_dict(self) -> dict[str, Any]:
        return {
            "now": self.now.isoformat(),
            "buckets": [b.to_dict() for b in self.buckets],
            "transitions": self.transitions,
            "healed": self.healed,
        }


def on_cron(bucket: Bucket) -> bool:
    """Time-based, or with min/max dwell (SPEC §6), or asking for the self-healing sweep."""
    return bucket.on_cron or bucket.reconcile_joins is True


def reconcile(
    now: datetime | None = None,
    bucket_ids: Sequence[str] | None = None,
    *,
    runtime: Runtime | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    full: bool = False,
    due_only: bool = False,
    slot: datetime | None = None,
    due_chunk: int = DUE_CHUNK,
) -> Tick:
    """One tick as of ``now`` (default: the clock) over every bucket the clock concerns (or
    exactly ``bucket_ids``: unknown ids raise, disabled ones are skipped). ``full``: the full
    sweep; ``due_only``: only the due entries (the waker)."""
    rt = get_runtime(runtime)
    at = now or datetime.now(UTC)
    if at.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    started = time.perf_counter()
    if bucket_ids is None:
        chosen = [bucket for bucket in rt.registry if bucket.clocked or on_cron(bucket)]
        # and the buckets that refer to them: their flips follow through the cascade, in the
        # same chunk (SPEC §3.5), and are reported on their own lines
        for bucket in list(chosen):
            chosen += [found for found in rt.registry.dependents(bucket.id) if found not in chosen]
    else:
        chosen = [rt.registry.get(bucket_id) for bucket_id in bucket_ids]
    chosen = rt.registry.ordered(chosen)  # dependency order: referenced buckets first
    with rt.engine.connect() as conn:
        overrides = read_overrides(conn)  # fresh: a disable counts from the next tick
        disabled = [b.id for b in chosen if not overrides.get(b.id, b.enabled)]
        if disabled:
            due.mark_incomplete(conn, disabled)
        conn.commit()
        results = {bucket.id: BucketTick(bucket.id) for bucket in chosen}
        for bucket_id in disabled:
            results[bucket_id].status, results[bucket_id].reason = "skipped", "disabled"
        for bucket in chosen:  # asked for by id: only explicit calls change its members
            if bucket.manual and bucket.id not in disabled:
                results[bucket.id].status, results[bucket.id].reason = "skipped", "manual"
        live = [bucket for bucket in chosen if results[bucket.id].status == "done"]
        cascading = Cascading(rt.registry, overrides, results)
        _process_due_side_by_side(
            rt,
            conn,
            [b for b in live if b.clocked],
            at,
            results,
            limit=due_chunk,
            cascading=cascading,
        )
        for bucket in live:
            if not due_only and results[bucket.id].status == "done":
                _reconcile_bucket(
                    conn,
                    bucket,
                    at,
                    results[bucket.id],
                    chunk=chunk_size,
                    full=full,
                    slot=slot or at,
                    cascading=cascading,
                )
            _log(results[bucket.id], at)
    tick = Tick(at, [results[bucket.id] for bucket in chosen])
    _measure(tick, "full_sweep" if full else "waker" if due_only else "reconcile", started)
    return tick


def _measure(tick: Tick, job: str, started: float) -> None:
    metrics.TICK_SECONDS.labels(job).observe(time.perf_counter() - started)
    for result in tick.buckets:
        if result.due:
            metrics.DUE_DECIDED.labels(result.bucket_id).inc(result.due)
        if result.status == "failed":
            metrics.TICK_FAILURES.labels(result.bucket_id, job).inc()
        for name, seconds in result.passes.items():
            metrics.PASS_SECONDS.labels(result.bucket_id, name).observe(seconds)


def _lock_key(bucket_id: str) -> Any:
    return sa.func.hashtextextended(sa.literal(f"buckets:reconcile:{bucket_id}"), 0)


def _reconcile_bucket(
    conn: Connection,
    bucket: Bucket,
    now: datetime,
    result: BucketTick,
    *,
    chunk: int,
    full: bool,
    slot: datetime,
    cascading: Cascading | None = None,
) -> None:
    started = time.perf_counter()
    try:
        _full_passes(
            conn, bucket, now, result, chunk=chunk, full=full, slot=slot, cascading=cascading
        )
    except Exception as exc:  # one bucket failing does not stop the tick
        _failed(conn, result, exc)
    result.seconds += time.perf_counter() - started


def _failed(conn: Connection, result: BucketTick, exc: Exception) -> None:
    if conn.in_transaction():
        conn.rollback()
    log.exception("reconcile of bucket %s failed", result.bucket_id)
    result.status, result.reason = "failed", f"{type(exc).__name__}: {exc}"


def _log(result: BucketTick, now: datetime) -> None:
    if result.transitions or result.status == "failed" or result.passes_ran != "no":
        fields = {
            "bucket": result.bucket_id,
            "tick": now.isoformat(),
            "due": result.due,
            "joined": result.joined,
            "emitted": result.emitted,
            "suppressed": result.suppressed,
            "left": sum(result.left.values()),
            "deferred": result.deferred,
            "seconds": round(result.seconds, 4),
        }
        log.info(
            "reconciled %s: due %d, joined %d (emitted %d, suppressed %d), left %s, deferred %d,"
            " cleared %d, full passes %s in %.3fs",
            result.bucket_id,
            result.due,
            result.joined,
            result.emitted,
            result.suppressed,
            result.left or "0",
            result.deferred,
            result.cleared,
            result.passes_ran,
            result.seconds,
            extra=fields,
        )


def _process_due_side_by_side(
    rt: Runtime,
    conn: Connection,
    buckets: Sequence[Bucket],
    now: datetime,
    results: dict[str, BucketTick],
    *,
    limit: int,
    cascading: Cascading | None,
) -> None:
    """:func:`process_due`, on ``settings.due_connections`` connections side by side from
    :data:`SIDE_BY_SIDE_FROM` full chunks due: connection i of n decides the contacts whose id
    is i modulo n, so they never wait for each other's contact locks, and PostgreSQL runs the
    chunks on as many backends (a catch-up tick is bound by the server's work, not Python's)."""
    n = rt.settings.due_connections
    ids = [bucket.id for bucket in buckets]
    wanted = SIDE_BY_SIDE_FROM * limit
    side_by_side = n > 1 and due.due_count(conn, ids, now, wanted) == wanted
    conn.commit()
    if not side_by_side:
        process_due(conn, buckets, now, results, limit=limit, cascading=cascading)
        return
    theirs = [
        {key: BucketTick(key, status=r.status, reason=r.reason) for key, r in results.items()}
        for _ in range(n - 1)
    ]

    def run(part: due.Part, mine: dict[str, BucketTick]) -> None:
        with rt.engine.connect() as own:
            forked = cascading.fork(mine) if cascading is not None else None
            process_due(own, buckets, now, mine, limit=limit, cascading=forked, part=part)

    with ThreadPoolExecutor(n - 1, thread_name_prefix="buckets-due") as pool:
        helpers = [pool.submit(run, (i + 1, n), mine) for i, mine in enumerate(theirs)]
        process_due(conn, buckets, now, results, limit=limit, cascading=cascading, part=(0, n))
        for helper in helpers:
            helper.result()
    for mine in theirs:
        for key, result in mine.items():
            results[key].absorb(result)


def process_due(
    conn: Connection,
    buckets: Sequence[Bucket],
    now: datetime,
    results: dict[str, BucketTick],
    *,
    limit: int = DUE_CHUNK,
    cascading: Cascading | None = None,
    part: due.Part = due.WHOLE,
) -> None:
    """Decide every entry of ``buckets`` due as of ``now``: chunks of up to ``limit`` entries
    claimed across the buckets, each decided in one transaction (see the module); entries whose
    contact another producer holds stay due for the next pass. A chunk that fails is redone
    bucket by bucket, so one failing bucket does not stop the others (it is marked failed).
    With ``cascading``, the buckets that refer to a bucket whose membership a chunk changed are
    re-decided for those contacts in the chunk's transaction (``buckets.references.cascade``)."""
    pending = [bucket for bucket in buckets if results[bucket.id].status == "done"]
    blocked: dict[str, bool] = {}
    seen: dict[str, set[int]] = {bucket.id: set() for bucket in pending}
    while pending:
        started = time.perf_counter()
        claimed: dict[str, list[int]] = {}
        exhausted: set[str] = set()
        try:
            with conn.begin():
                asks: list[Ask] = []
                for bucket in pending:
                    room = limit - len(asks)
                    if room <= 0:
                        break
                    ids = due.claim(conn, bucket.id, now, room, part)
                    claimed[bucket.id] = ids
                    # less than asked for (the rest is held by others), or only entries this
                    # pass decided already: nothing more to claim from it right now
                    if len(ids) < room or seen[bucket.id].issuperset(ids):
                        exhausted.add(bucket.id)
                    if bucket.id not in blocked and ids:
                        blocked[bucket.id] = joins_blocked(conn, bucket)
                    asks += [Ask(bucket, i) for i in ids if i not in seen[bucket.id]]
                if not asks:
                    break
                stopped = frozenset(b for b, is_blocked in blocked.items() if is_blocked)
                outcome = _decide_due(conn, asks, now, stopped, cascading, buckets)
        except Exception as exc:
            if len(pending) == 1:
                _failed(conn, results[pending[0].id], exc)
                return
            for bucket in pending:  # isolate the failing bucket
                process_due(
                    conn, [bucket], now, results, limit=limit, cascading=cascading, part=part
                )
            return
        share = (time.perf_counter() - started) / max(len(claimed), 1)
        for bucket_id, ids in claimed.items():
            result = results[bucket_id]
            result.due += len(set(ids) - seen[bucket_id])
            result.count_outcome(outcome)
            result.seconds += share
            result.passes["due"] = result.passes.get("due", 0.0) + share
            seen[bucket_id].update(ids)
        pending = [bucket for bucket in pending if bucket.id not in exhausted]


def _decide_due(  # noqa: PLR0917 - the chunk's parts
    conn: Connection,
    asks: list[Ask],
    now: datetime,
    blocked: frozenset[str],
    cascading: Cascading | None,
    universe: Sequence[Bucket],
) -> Outcome:
    """A due chunk's decisions (and, with references, the cascade to dependents); the facts
    statement covers the tick's buckets (``universe``), so every chunk shares it."""
    if cascading is not None and cascading.registry.graph.has_references:
        return cascading.run(conn, asks, now, blocked, universe)
    return decide(
        conn,
        asks,
        now,
        source="reconcile",
        clock=True,
        blocked=blocked,
        rows=False,
        record=True,
        universe=universe,
    )


def _full_passes(
    conn: Connection,
    bucket: Bucket,
    now: datetime,
    result: BucketTick,
    *,
    chunk: int,
    full: bool,
    slot: datetime,
    cascading: Cascading | None = None,
) -> None:
    with conn.begin():
        complete = due.complete(conn, bucket)
        if not complete and bucket.clocked:
            _ensure_fill(conn, bucket, now)
    if full:
        why = "full"
    elif bucket.reconcile_joins is True:
        why = "reconcile_joins"
    elif on_cron(bucket) and not complete:
        why = "incomplete queue"
    else:
        return
    locked = conn.execute(sa.select(sa.func.pg_try_advisory_lock(_lock_key(bucket.id)))).scalar()
    conn.commit()
    if not locked:
        result.passes_ran = f"no ({why}: another worker is on it)"
        return
    try:
        done = conn.execute(
            sa.select(bucket_configs.c.reconciled_slot).where(
                bucket_configs.c.bucket_id == bucket.id
            )
        ).scalar()
        conn.commit()
        if done == slot and not full:  # a worker did this slot (a later slot always runs)
            result.passes_ran = f"no ({why}: already done for {slot.isoformat()})"
            return
        result.passes_ran = why
        Passes(
            conn, bucket, now, chunk, result, mode=join_mode(bucket), full=full, cascading=cascading
        ).run()
        with conn.begin():
            values = {"reconciled_at": now, "reconciled_slot": slot}
            conn.execute(
                pg_insert(bucket_configs)
                .values(bucket_id=bucket.id, **values)
                .on_conflict_do_update(
                    index_elements=[bucket_configs.c.bucket_id],
                    set_={**values, "updated_at": sa.func.now()},
                )
            )
    finally:
        if conn.in_transaction():
            conn.rollback()
        conn.execute(sa.select(sa.func.pg_advisory_unlock(_lock_key(bucket.id))))
        conn.commit()


def _ensure_fill(conn: Connection, bucket: Bucket, now: datetime) -> None:
    """A bucket whose backfill completed but whose queue is not complete gets a
    ``queue_fill`` job (once: the one-active-job-per-bucket index)."""
    if joins_blocked(conn, bucket) or jobs.active_job(conn, bucket.id) is not None:
        return
    job, created = jobs.enqueue(conn, bucket, "queue_fill", as_of=now)
    if created:
        log.info("queue of %s incomplete: queue_fill job %d enqueued", bucket.id, job.id)
