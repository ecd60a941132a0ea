"""Backfills: materialise a bucket's membership set-based, chunked and resumable (SPEC §7).

Modes (the job's ``mode``):

* ``first_time`` — the bucket never completed one: every contact matching as of the job's
  ``as_of`` joins **silently** (``emitted=false, suppressed_by='backfill'``), so shipping a
  bucket starts no journey for its historical cohort. On completion the criteria hash is stored
  in ``bucket_configs``, which opens the cron's join pass (SPEC §6.4).
* ``reevaluate`` — the stored hash differs from the definition (criteria changed): new matchers
  join silently, members who no longer match leave **with** an emitted ``left`` (their
  journeys exit).
* ``admin`` — started by an operator on a bucket that completed its first-time backfill:
  re-evaluation semantics, and with ``emit`` its joins are emitted through the entry limit.

* ``queue_fill`` — changes no membership: computes the bucket's due-queue entries (an upgraded
  database, a re-enabled bucket) so the cron can stop examining the whole bucket.

Every mode but ``queue_fill`` also leaves members who do not match (so a bucket is exact after
any backfill), and every mode rewrites the due-queue entries of each chunk's contacts as of the
job's ``as_of`` (:func:`buckets.due.refresh`), so on completion the bucket's queue is complete.
Chunks are ranges of contact ids, each one transaction holding the join statement, the leave
statement, the job's progress and cursor and its lease extension: a crash loses at most the
chunk in flight, and the job resumes after its cursor. Entry counts continue prior history and
``max_dwell_at`` is stamped (the shared primitives do both); deleted contacts never match.
Disabled buckets are not backfilled (the job fails with that reason).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from buckets import due, resilience
from buckets.candidates import join_matching, leave_failing
from buckets.definitions import Bucket
from buckets.membership import Changes, Source
from buckets.models import backfill_jobs, bucket_configs, contacts
from buckets.registry import read_overrides
from buckets.runtime import Runtime
from workflows import jobs
from workflows.jobs import Job

log = logging.getLogger("buckets.backfill")
CHUNK = 100_000  # contact ids per chunk (one transaction)
LEASE = timedelta(seconds=60)
ANALYZE_AFTER_ROWS = 10_000
Progress = Callable[[Job], None]


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def holder_gone(owner: str | None) -> bool:
    """The lease holder ``owner`` (a :func:`worker_id`) was a process of this host that no
    longer exists (killed, crashed): its lease protects nothing, the job can be taken over.
    Holders on other hosts cannot be checked from here (False)."""
    host, _, rest = (owner or "").partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def mode_for(conn: Connection, bucket: Bucket) -> str | None:
    """The job deployment needs for ``bucket``: first_time, reevaluate, queue_fill or None."""
    stored = conn.execute(
        sa.select(bucket_configs.c.criteria_hash).where(bucket_configs.c.bucket_id == bucket.id)
    ).scalar()
    if stored is None:
        return "first_time"
    if stored != bucket.fingerprint:
        return "reevaluate"
    return "queue_fill" if bucket.clocked and not due.complete(conn, bucket) else None


def first_time_incomplete(conn: Connection, bucket_id: str) -> bool:
    """No first-time backfill has completed for the bucket yet (SPEC §6.4)."""
    stored = conn.execute(
        sa.select(bucket_configs.c.criteria_hash).where(bucket_configs.c.bucket_id == bucket_id)
    ).scalar()
    return stored is None


def deploy(runtime: Runtime, now: datetime) -> list[Job]:
    """Enqueue the first-time / re-evaluation / queue-fill job each enabled bucket needs
    (exactly once: concurrent callers meet the one-non-terminal-job-per-bucket index); forget
    the queues of disabled buckets (ingest does not maintain them). Returns new jobs."""
    created = []
    with runtime.engine.begin() as conn:
        overrides = read_overrides(conn)
        disabled = [b.id for b in runtime.registry if not overrides.get(b.id, b.enabled)]
        due.mark_incomplete(conn, disabled)
        for bucket in runtime.registry.ordered(runtime.registry):  # dependency order
            if bucket.id in disabled:
                continue
            # The active job first: one that completes between the two reads has stored its
            # hash by the time mode_for reads it (the other order could see the hash missing,
            # then no job, and enqueue a second first-time job).
            if jobs.active_job(conn, bucket.id) is not None:
                continue
            mode = mode_for(conn, bucket)
            if mode is None:
                continue
            job, new = jobs.enqueue(conn, bucket, mode, as_of=now)
            if new:
                created.append(job)
    return created


def start(
    runtime: Runtime, bucket_id: str, now: datetime, *, emit: bool = False
) -> tuple[Job, bool]:
    """An operator's backfill: the first-time job if the bucket never completed one, else an
    ``admin`` job. Returns (job, created); an existing non-terminal job is returned as is."""
    bucket = runtime.registry.get(bucket_id)
    with runtime.engine.begin() as conn:
        # The active job first, as in deploy: a first-time job completing between the two
        # reads would otherwise be followed by a second one, whose silent joins would swallow
        # the entered transitions of contacts the cron or ingest was about to join.
        active = jobs.active_job(conn, bucket.id)
        if active is not None:
            return active, False
        mode = "first_time" if first_time_incomplete(conn, bucket.id) else "admin"
        return jobs.enqueue(conn, bucket, mode, as_of=now, emit=emit and mode == "admin")


@dataclass
class Runner:
    """Executes claimed jobs chunk by chunk.

    A lost database does not fail the job: the runner waits for it (:mod:`buckets.resilience`,
    at most ``max_outage``), makes sure the job is still its own (claiming it again if the
    reaper put it back to pending meanwhile) and resumes from the job's cursor, which commits
    with every chunk. Any other error fails the job. Giving up on the database, or a stop
    requested during the outage, leaves the job running under its lease: the reaper (or
    ``buckets backfill ID`` on the same host) resumes it from its cursor.
    """

    runtime: Runtime
    owner: str = ""
    chunk: int = CHUNK
    lease: timedelta = LEASE
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    max_outage: timedelta | float | None = None

    def __post_init__(self) -> None:
        self.owner = self.owner or worker_id()

    def run(
        self, job_id: int, progress: Progress | None = None, stop: threading.Event | None = None
    ) -> Job:
        """Claim job ``job_id`` and run it to its end (or until ``stop``: then it is released,
        pending again, to be resumed)."""

        def claim() -> Job:
            with self.runtime.engine.begin() as conn:
                job = jobs.claim(conn, job_id, self.owner, self.clock(), self.lease)
            if job is not None:
                return job
            with self.runtime.engine.connect() as conn:
                current = jobs.get(conn, job_id)
            if current.status == "running" and current.lease_owner == self.owner:
                return current  # claimed by an earlier try whose answer the outage lost
            raise jobs.JobError(
                f"backfill job {job_id} ({current.bucket_id}): {current.status}, not claimable"
            )

        job = resilience.retry_outages(
            f"backfill job {job_id}",
            claim,
            stop=stop,
            max_outage=self.max_outage,
            engine=self.runtime.engine,
        )
        return self._execute(job, progress, stop)

    def take_over(
        self,
        job: Job,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
    ) -> Job:
        """Run a ``running`` job whose lease holder is gone, from its cursor (the lease passes
        to this runner only if ``job.lease_owner`` still holds it)."""

        def take() -> Job | None:
            with self.runtime.engine.begin() as conn:
                taken = jobs.take_over(conn, job, self.owner, self.clock(), self.lease)
                current = jobs.get(conn, job.id)
            if taken is None and current.status == "running" and current.lease_owner == self.owner:
                return current  # taken by an earlier try whose answer the outage lost
            return taken

        taken = resilience.retry_outages(
            f"backfill job {job.id}",
            take,
            stop=stop,
            max_outage=self.max_outage,
            engine=self.runtime.engine,
        )
        if taken is None:
            raise jobs.JobError(
                f"backfill job {job.id} ({job.bucket_id}): changed hands meanwhile"
                " (see `buckets jobs`)"
            )
        return self._execute(taken, progress, stop)

    def run_pending(self, stop: threading.Event | None = None) -> list[Job]:
        """Claim and run pending jobs until there are none (or ``stop``)."""
        done = []
        while stop is None or not stop.is_set():
            with self.runtime.engine.begin() as conn:
                job = jobs.claim_next(
                    conn, self.owner, self.clock(), self.lease, waiting=self._waiting(conn)
                )
            if job is None:
                break
            done.append(self._execute(job, None, stop))
        return done

    def _waiting(self, conn: Connection) -> list[str]:
        """Buckets whose jobs wait: they refer (transitively) to a bucket with a job not
        finished yet (dependency order, SPEC §3.5)."""
        registry = self.runtime.registry
        if not registry.graph.has_references:
            return []
        active = jobs.active_buckets(conn)
        return sorted(
            {
                dependent.id
                for bucket_id in active
                if bucket_id in registry.buckets
                for dependent in registry.dependents(bucket_id)
            }
        )

    def _execute(self, job: Job, progress: Progress | None, stop: threading.Event | None) -> Job:
        name = f"backfill job {job.id} ({job.bucket_id})"
        try:
            bucket = self.runtime.registry.get(job.bucket_id)
            resilience.retry_outages(
                name,
                lambda: self._resume(job, bucket, progress, stop),
                stop=stop,
                max_outage=self.max_outage,
                engine=self.runtime.engine,
            )
        except Exception as exc:
            if resilience.is_outage(exc) or isinstance(exc, resilience.OutageTimeout):
                raise  # not the job's fault: it keeps its lease and cursor (see the class doc)
            log.exception("%s failed", name)
            with self.runtime.engine.begin() as conn:
                error = f"{type(exc).__name__}: {exc}"
                jobs.finish(conn, job, self.owner, self.clock(), status="failed", error=error)

        def current() -> Job:
            with self.runtime.engine.connect() as conn:
                return jobs.get(conn, job.id)

        return resilience.retry_outages(
            name, current, stop=stop, max_outage=self.max_outage, engine=self.runtime.engine
        )

    def _resume(
        self, job: Job, bucket: Bucket, progress: Progress | None, stop: threading.Event | None
    ) -> Job:
        """Run the job from its cursor, if it is still ours (after an outage it may have been
        reaped back to pending: claim it again; finished, cancelled or someone else's: stop)."""
        with self.runtime.engine.begin() as conn:
            current = jobs.get(conn, job.id)
            if current.status == "pending":
                current = jobs.claim(conn, job.id, self.owner, self.clock(), self.lease) or current
        if current.status != "running" or current.lease_owner != self.owner:
            return current
        return self._chunks(current, bucket, progress, stop)

    def _chunks(
        self, job: Job, bucket: Bucket, progress: Progress | None, stop: threading.Event | None
    ) -> Job:
        with self.runtime.engine.begin() as conn:
            if not read_overrides(conn).get(bucket.id, bucket.enabled):
                raise jobs.JobError(f"{bucket.id}: the bucket is disabled")
            if job.criteria_hash != bucket.fingerprint:
                raise jobs.JobError(f"{bucket.id}: the criteria changed since the job was created")
            low, high = conn.execute(
                sa.select(sa.func.min(contacts.c.id), sa.func.max(contacts.c.id))
            ).one()
            if job.total is None:
                total = conn.execute(
                    sa.select(sa.func.count()).where(contacts.c.deleted_at.is_(None))
                ).scalar_one()
                jobs.heartbeat(conn, job, self.owner, self.clock(), self.lease, total=total)
            job = jobs.get(conn, job.id)
        after = (job.cursor or {}).get("after", (low or 1) - 1)
        high = high or 0
        while after < high:
            if stop is not None and stop.is_set():
                with self.runtime.engine.begin() as conn:
                    jobs.release(conn, job, self.owner)
                return job
            upper = min(after + self.chunk, high)
            with self.runtime.engine.begin() as conn:
                changes = apply_chunk(conn, bucket, job, (after + 1, upper))
                examined = (
                    sa.select(sa.func.count())
                    .where(contacts.c.id.between(after + 1, upper), contacts.c.deleted_at.is_(None))
                    .scalar_subquery()
                )
                current = jobs.heartbeat(
                    conn,
                    job,
                    self.owner,
                    self.clock(),
                    self.lease,
                    processed=backfill_jobs.c.processed + examined,
                    joined=backfill_jobs.c.joined + changes.joined,
                    left=backfill_jobs.c.left + changes.left,
                    cursor={"after": upper},
                )
                if current is None:  # cancelled, or no longer ours: undo this chunk and stop
                    conn.rollback()
                    return job
                job = current
            after = upper
            if progress is not None:
                progress(job)
        with self.runtime.engine.begin() as conn:
            if job.mode != "queue_fill":
                store_hash(conn, bucket, job)
            due.mark_complete(conn, bucket)
            jobs.finish(conn, job, self.owner, self.clock(), status="completed")
            if job.mode != "queue_fill" and job.joined + job.left:
                follow_dependents(conn, self.runtime, bucket, job)
        # Fresh statistics for the plans of the next producers (cron, other backfills): a
        # large backfill may have just multiplied a table's size (the memberships it wrote;
        # the due entries of every contact it examined). With stale ones, a tick's claims
        # sorted every due entry of a bucket for each chunk instead of reading the index.
        stale = [
            table
            for table, rows in (
                ("bucket_memberships", job.joined + job.left),
                ("bucket_due", job.processed if bucket.clocked else 0),
            )
            if rows >= ANALYZE_AFTER_ROWS
        ]
        if stale:
            with self.runtime.engine.begin() as conn:
                conn.execute(sa.text(f"ANALYZE {', '.join(stale)}"))
        return job


def follow_dependents(conn: Connection, runtime: Runtime, bucket: Bucket, job: Job) -> list[Job]:
    """After a job changed ``bucket``'s memberships, the buckets that refer to it directly are
    re-evaluated as of the same instant: a ``reevaluate`` job each (new matchers join
    silently, members who no longer match leave with an emitted ``left``), whose completion
    does the same for their own dependents. Skipped: disabled dependents, and those whose
    first-time backfill has not completed (that job, run after this one, covers them). A
    dependent with a job not finished yet keeps it (the database allows one)."""
    registry = runtime.registry
    overrides = read_overrides(conn)
    created = []
    for bucket_id in registry.graph.referred_by.get(bucket.id, ()):
        dependent = registry.get(bucket_id)
        if not overrides.get(dependent.id, dependent.enabled):
            continue
        if first_time_incomplete(conn, dependent.id):
            continue
        found, new = jobs.enqueue(conn, dependent, "reevaluate", as_of=job.as_of)
        if new:
            log.info(
                "%s changed by job %d: reevaluate job %d enqueued for %s",
                bucket.id,
                job.id,
                found.id,
                dependent.id,
            )
            created.append(found)
    return created


def store_hash(conn: Connection, bucket: Bucket, job: Job) -> None:
    """The membership now reflects these criteria: the cron may join from here on."""
    conn.execute(
        pg_insert(bucket_configs)
        .values(bucket_id=bucket.id, criteria_hash=job.criteria_hash, definition=bucket.to_dict())
        .on_conflict_do_update(
            index_elements=[bucket_configs.c.bucket_id],
            set_={
                "criteria_hash": job.criteria_hash,
                "definition": bucket.to_dict(),
                "updated_at": sa.func.now(),
            },
        )
    )


def apply_chunk(
    conn: Connection,
    bucket: Bucket,
    job: Job,
    id_range: tuple[int, int],
    *,
    queue: bool = True,
) -> Changes:
    """One chunk of a job: leaves of members who fail, then joins of matchers, both re-deciding
    contacts an ingest changed meanwhile under their locks; then (``queue``) the chunk's
    due-queue entries."""
    changes = Changes()
    if bucket.manual:  # only explicit calls change a manual bucket's members (SPEC §3.5)
        return changes
    if job.mode != "queue_fill":
        source: Source = "admin" if job.mode == "admin" else "backfill"
        silent = not (job.mode == "admin" and job.emit_joins)
        changes = leave_failing(conn, bucket, job.as_of, id_range=id_range, source=source)
        changes.add(
            join_matching(conn, bucket, job.as_of, id_range=id_range, source=source, silent=silent)
        )
    if queue and bucket.clocked:
        blocked = job.mode in ("first_time", "reevaluate")
        due.refresh(conn, bucket, job.as_of, id_range=id_range, blocked=blocked)
    return changes


@dataclass(frozen=True)
class DryRun:
    bucket_id: str
    mode: str
    as_of: datetime
    would_join: int
    would_leave: int
    would_emit: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "bucket_id": self.bucket_id,
            "mode": self.mode,
            "as_of": self.as_of.isoformat(),
            "would_join": self.would_join,
            "would_leave": self.would_leave,
            "would_emit": self.would_emit,
        }


def dry_run(runtime: Runtime, bucket_id: str, now: datetime, *, emit: bool = False) -> DryRun:
    """What :func:`start` would do as of ``now``, writing nothing: the same statements in a
    transaction that is rolled back."""
    bucket = runtime.registry.get(bucket_id)
    with runtime.engine.connect() as conn:
        transaction = conn.begin()
        try:
            mode = "first_time" if first_time_incomplete(conn, bucket.id) else "admin"
            job = Job(
                0,
                bucket.id,
                mode,
                "running",
                now,
                emit and mode == "admin",
                bucket.fingerprint,
                None,
                0,
                0,
                0,
                None,
                None,
                None,
                0,
                None,
                now,
                None,
            )
            changes = apply_chunk(conn, bucket, job, (0, 2**63 - 1), queue=False)
        finally:
            transaction.rollback()
    return DryRun(bucket.id, mode, now, changes.joined, changes.left, changes.emitted)
