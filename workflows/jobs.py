"""Backfill job control in ``backfill_jobs``: enqueue, lease, heartbeat, cancel, reap (SPEC §7).

State lives in PostgreSQL only. A job is ``pending`` until a worker *claims* it (``running``,
``lease_owner``, ``lease_expires_at``); the worker extends its lease in the same transaction as
every chunk it writes, so a chunk is either written with its progress and cursor or not at all.
A worker that dies stops extending: once the lease has expired the reaper puts the job back to
``pending`` (it resumes from its cursor, on any worker) or, after ``MAX_ATTEMPTS`` claims, fails
it. At most one non-terminal job per bucket is enforced by the partial unique index
``uq_backfill_jobs_one_active``; enqueueing while one exists returns that job instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from buckets.definitions import Bucket
from buckets.errors import BucketsError
from buckets.models import BACKFILL_ACTIVE_STATUSES, backfill_jobs

MAX_ATTEMPTS = 5
ACTIVE = sa.text("status IN ('pending', 'running')")


class JobError(BucketsError):
    """A backfill job cannot do what was asked (names the job and the bucket)."""


@dataclass(frozen=True)
class Job:
    id: int
    bucket_id: str
    mode: str
    status: str
    as_of: datetime
    emit_joins: bool
    criteria_hash: str | None
    total: int | None
    processed: int
    joined: int
    left: int
    cursor: dict[str, Any] | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    attempts: int
    error: str | None
    created_at: datetime
    finished_at: datetime | None

    @classmethod
    def of(cls, row: Any) -> Job:
        return cls(**{name: getattr(row, name) for name in cls.__dataclass_fields__})

    @property
    def terminal(self) -> bool:
        return self.status not in BACKFILL_ACTIVE_STATUSES

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for name in ("as_of", "lease_expires_at", "created_at", "finished_at"):
            out[name] = out[name].isoformat() if out[name] is not None else None
        return out


def get(conn: Connection, job_id: int) -> Job:
    row = conn.execute(sa.select(backfill_jobs).where(backfill_jobs.c.id == job_id)).one_or_none()
    if row is None:
        raise JobError(f"backfill job {job_id}: no such job")
    return Job.of(row)


def active_job(conn: Connection, bucket_id: str) -> Job | None:
    row = conn.execute(
        sa.select(backfill_jobs).where(backfill_jobs.c.bucket_id == bucket_id, ACTIVE)
    ).one_or_none()
    return Job.of(row) if row is not None else None


def jobs(conn: Connection, bucket_id: str | None = None, limit: int = 100) -> list[Job]:
    query = sa.select(backfill_jobs).order_by(backfill_jobs.c.id.desc()).limit(limit)
    if bucket_id is not None:
        query = query.where(backfill_jobs.c.bucket_id == bucket_id)
    return [Job.of(row) for row in conn.execute(query)]


def enqueue(
    conn: Connection, bucket: Bucket, mode: str, *, as_of: datetime, emit: bool = False
) -> tuple[Job, bool]:
    """A pending job for ``bucket`` (``created`` False: the bucket's non-terminal job, which
    the database allows only one of, already existed and is returned instead)."""
    inserted = conn.execute(
        pg_insert(backfill_jobs)
        .values(
            bucket_id=bucket.id,
            mode=mode,
            as_of=as_of,
            emit_joins=emit,
            criteria_hash=bucket.fingerprint,
        )
        .on_conflict_do_nothing(index_elements=[backfill_jobs.c.bucket_id], index_where=ACTIVE)
        .returning(*backfill_jobs.c)
    ).one_or_none()
    if inserted is not None:
        return Job.of(inserted), True
    existing = active_job(conn, bucket.id)
    if existing is None:  # it finished between the two statements: try once more
        return enqueue(conn, bucket, mode, as_of=as_of, emit=emit)
    return existing, False


def claim(conn: Connection, job_id: int, owner: str, now: datetime, lease: timedelta) -> Job | None:
    """Take the lease of a pending job (or of a running one whose lease expired)."""
    row = conn.execute(
        sa.update(backfill_jobs)
        .where(
            backfill_jobs.c.id == job_id,
            sa.or_(
                backfill_jobs.c.status == "pending",
                sa.and_(
                    backfill_jobs.c.status == "running", backfill_jobs.c.lease_expires_at < now
                ),
            ),
        )
        .values(
            status="running",
            lease_owner=owner,
            lease_expires_at=now + lease,
            heartbeat_at=now,
            started_at=sa.func.coalesce(backfill_jobs.c.started_at, now),
            attempts=backfill_jobs.c.attempts + 1,
            updated_at=sa.func.now(),
        )
        .returning(*backfill_jobs.c)
    ).one_or_none()
    return Job.of(row) if row is not None else None


def take_over(
    conn: Connection, job: Job, owner: str, now: datetime, lease: timedelta
) -> Job | None:
    """Take the lease of a running job from ``job.lease_owner`` (a holder known to be gone),
    only if that holder still has it (compare-and-swap); counts as an attempt."""
    row = conn.execute(
        sa.update(backfill_jobs)
        .where(
            backfill_jobs.c.id == job.id,
            backfill_jobs.c.status == "running",
            backfill_jobs.c.lease_owner == job.lease_owner,
        )
        .values(
            lease_owner=owner,
            lease_expires_at=now + lease,
            heartbeat_at=now,
            attempts=backfill_jobs.c.attempts + 1,
            updated_at=sa.func.now(),
        )
        .returning(*backfill_jobs.c)
    ).one_or_none()
    return Job.of(row) if row is not None else None


def claim_next(
    conn: Connection,
    owner: str,
    now: datetime,
    lease: timedelta,
    *,
    waiting: Sequence[str] = (),
) -> Job | None:
    """The oldest pending job nobody else is claiming right now, except the jobs of the
    buckets in ``waiting`` (buckets that refer to a bucket whose job has not finished yet:
    jobs run in dependency order, SPEC §3.5)."""
    pending = sa.select(backfill_jobs.c.id).where(backfill_jobs.c.status == "pending")
    if waiting:
        pending = pending.where(backfill_jobs.c.bucket_id.not_in(sorted(waiting)))
    pending = pending.order_by(backfill_jobs.c.id).limit(1).with_for_update(skip_locked=True)
    job_id = conn.execute(pending).scalar()
    return claim(conn, job_id, owner, now, lease) if job_id is not None else None


def active_buckets(conn: Connection) -> set[str]:
    """The buckets with a non-terminal (pending or running) job."""
    return set(
        conn.execute(
            sa.select(backfill_jobs.c.bucket_id).where(
                backfill_jobs.c.status.in_(BACKFILL_ACTIVE_STATUSES)
            )
        ).scalars()
    )


def heartbeat(
    conn: Connection, job: Job, owner: str, now: datetime, lease: timedelta, **progress: Any
) -> Job | None:
    """Extend the lease and record progress (values or SQL expressions), in the caller's
    (chunk's) transaction; returns the updated job. None when the job is no longer ours
    (cancelled, or reaped and claimed elsewhere): stop."""
    values = {key: value for key, value in progress.items() if value is not None}
    row = conn.execute(
        sa.update(backfill_jobs)
        .where(
            backfill_jobs.c.id == job.id,
            backfill_jobs.c.status == "running",
            backfill_jobs.c.lease_owner == owner,
        )
        .values(lease_expires_at=now + lease, heartbeat_at=now, updated_at=sa.func.now(), **values)
        .returning(*backfill_jobs.c)
    ).one_or_none()
    return Job.of(row) if row is not None else None


def finish(
    conn: Connection, job: Job, owner: str, now: datetime, *, status: str, error: str | None = None
) -> bool:
    return bool(
        conn.execute(
            sa.update(backfill_jobs)
            .where(
                backfill_jobs.c.id == job.id,
                backfill_jobs.c.status == "running",
                backfill_jobs.c.lease_owner == owner,
            )
            .values(
                status=status,
                error=error,
                finished_at=now,
                lease_owner=None,
                lease_expires_at=None,
                updated_at=sa.func.now(),
            )
        ).rowcount
    )


def release(conn: Connection, job: Job, owner: str) -> None:
    """Give the job back (graceful shutdown): pending again, resumable by anyone."""
    conn.execute(
        sa.update(backfill_jobs)
        .where(backfill_jobs.c.id == job.id, backfill_jobs.c.lease_owner == owner)
        .values(status="pending", lease_owner=None, lease_expires_at=None, updated_at=sa.func.now())
    )


def cancel(conn: Connection, job_id: int, now: datetime) -> Job:
    """Cancel a non-terminal job; its worker stops at its next chunk."""
    job = get(conn, job_id)
    if job.terminal:
        raise JobError(f"backfill job {job_id} ({job.bucket_id}): already {job.status}")
    conn.execute(
        sa.update(backfill_jobs)
        .where(backfill_jobs.c.id == job_id, ACTIVE)
        .values(status="cancelled", finished_at=now, lease_owner=None, lease_expires_at=None)
    )
    return get(conn, job_id)


def reap(conn: Connection, now: datetime, max_attempts: int = MAX_ATTEMPTS) -> tuple[int, int]:
    """Jobs whose lease expired: back to pending to resume, or failed after ``max_attempts``
    claims. Returns (resumable, failed)."""
    expired = [
        backfill_jobs.c.status == "running",
        backfill_jobs.c.lease_expires_at < now,
    ]
    failed = conn.execute(
        sa.update(backfill_jobs)
        .where(*expired, backfill_jobs.c.attempts >= max_attempts)
        .values(
            status="failed",
            finished_at=now,
            error=f"lease expired {max_attempts} times: the job keeps dying",
            lease_owner=None,
            lease_expires_at=None,
        )
    ).rowcount
    resumed = conn.execute(
        sa.update(backfill_jobs)
        .where(*expired)
        .values(status="pending", lease_owner=None, lease_expires_at=None)
    ).rowcount
    return resumed, failed
