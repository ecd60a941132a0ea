"""The dispatcher: from the transition ledger to journey enrollments and handler calls (SPEC §9).

One batch is one transaction that

1. claims emitted, undispatched transitions (``FOR UPDATE SKIP LOCKED``: dispatchers running
   side by side never claim the same row). Only the oldest undispatched transition of each
   contact is claimable, so a contact's transitions are applied in ledger order even across
   dispatchers (an ``entered`` and the ``left`` after it can never be applied the wrong way
   round);
2. exits the contact's active enrollments of journeys whose ``exit_on`` names the transition;
3. creates one enrollment per (journey, transition) whose trigger matches — ``skipped`` when the
   journey already runs for the contact and is not ``concurrent`` — unique in the database, so a
   batch replayed after a crash can never enroll twice;
4. marks the transitions dispatched.

Handlers are called after the commit (at-least-once: a delivery is reserved for ``lease`` and,
if the dispatcher dies before recording the outcome, delivered again by whoever finds it due).
A failing handler is retried with the journey's backoff and, after ``max_attempts``, the
enrollment is ``failed``; other enrollments are not held up. Suppressed transitions
(``emitted = false``: entry limit, backfill, deletion) are never claimed.

Latency: a statement-level trigger ``NOTIFY``s ``buckets_transitions`` whenever emitted
transitions are inserted; :func:`run_dispatcher` listens and also polls as a fallback, and
reconnects (re-listening, draining what it missed) when the database goes away.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from buckets import metrics
from buckets.db import CONNECT_TIMEOUT_SECONDS
from buckets.journeys import Journey
from buckets.models import bucket_transitions as transitions
from buckets.models import contacts, journey_enrollments
from buckets.resilience import forever
from buckets.runtime import Runtime, get_runtime

log = logging.getLogger("buckets.dispatcher")
CHANNEL = "buckets_transitions"
LEASE = timedelta(minutes=5)
BATCH = 500
TIMESTAMP = sa.DateTime(timezone=True)


@dataclass(frozen=True)
class Enrollment:
    """What a handler receives. ``idempotency_key`` is the transition's: stable across retries."""

    id: int
    journey_id: str
    contact_id: int
    external_id: str
    bucket_id: str
    kind: str
    epoch: int
    transition_id: int
    idempotency_key: str
    attempt: int


@dataclass
class Dispatched:
    transitions: int = 0
    enrolled: int = 0
    skipped: int = 0
    exited: int = 0
    delivered: int = 0
    retried: int = 0
    failed: int = 0

    def add(self, other: Dispatched) -> Dispatched:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def to_dict(self) -> dict[str, int]:
        return dict(vars(self))


def _transitions() -> sa.Select[Any]:
    """What an :class:`Enrollment` needs of its transition (and contact)."""
    return sa.select(
        transitions.c.id,
        transitions.c.bucket_id,
        transitions.c.contact_id,
        transitions.c.kind,
        transitions.c.epoch,
        transitions.c.idempotency_key,
        contacts.c.external_id,
    ).join(contacts, contacts.c.id == transitions.c.contact_id)


def _enrollment(enrollment_id: int, journey_id: str, t: Any, attempt: int) -> Enrollment:
    return Enrollment(
        id=enrollment_id,
        journey_id=journey_id,
        contact_id=t.contact_id,
        external_id=t.external_id,
        bucket_id=t.bucket_id,
        kind=t.kind,
        epoch=t.epoch,
        transition_id=t.id,
        idempotency_key=t.idempotency_key,
        attempt=attempt,
    )


def _array(values: Sequence[Any], item: sa.types.TypeEngine[Any]) -> Any:
    return sa.literal(list(values), ARRAY(item))


@dataclass
class Dispatcher:
    runtime: Runtime
    batch_size: int = BATCH
    lease: timedelta = LEASE
    journeys: dict[str, Journey] = field(init=False)

    def __post_init__(self) -> None:
        self.journeys = {j.id: j for j in self.runtime.registry.journeys}

    # -- enrolling ----------------------------------------------------------------------------

    def dispatch_batch(self, now: datetime) -> tuple[Dispatched, list[Enrollment]]:
        """Claim and apply one batch of transitions; returns what to deliver (after commit)."""
        result = Dispatched()
        with self.runtime.engine.begin() as conn:
            claimed = self._claim(conn)
            if not claimed:
                return result, []
            result.transitions = len(claimed)
            active = self._active(conn, claimed)
            rows, exits = self._plan(claimed, active, now)
            created = self._enroll(conn, rows) if rows else []
            if exits:
                result.exited = conn.execute(
                    sa.update(journey_enrollments)
                    .where(
                        journey_enrollments.c.id == sa.any_(_array(exits, sa.BigInteger())),
                        journey_enrollments.c.status == "active",
                    )
                    .values(status="exited", finished_at=now, updated_at=sa.func.now())
                ).rowcount
            conn.execute(
                sa.update(transitions)
                .where(
                    transitions.c.id == sa.any_(_array([t.id for t in claimed], sa.BigInteger()))
                )
                .values(dispatched_at=now)
            )
        by_id = {t.id: t for t in claimed}
        deliveries = []
        for row in created:
            if row.status == "skipped":
                result.skipped += 1
                continue
            result.enrolled += 1
            deliveries.append(_enrollment(row.id, row.journey_id, by_id[row.transition_id], 1))
        return result, deliveries

    def _claim(self, conn: Connection) -> Sequence[Any]:
        earlier = transitions.alias("earlier")
        head_of_contact = ~sa.exists().where(
            earlier.c.contact_id == transitions.c.contact_id,
            earlier.c.id < transitions.c.id,
            earlier.c.emitted,
            earlier.c.dispatched_at.is_(None),
        )
        return conn.execute(
            _transitions()
            .where(transitions.c.emitted, transitions.c.dispatched_at.is_(None), head_of_contact)
            .order_by(transitions.c.id)
            .limit(self.batch_size)
            .with_for_update(of=transitions, skip_locked=True)
        ).all()

    def _active(self, conn: Connection, claimed: Sequence[Any]) -> dict[tuple[str, int], list[int]]:
        """Active enrollments of the batch's contacts: (journey, contact) -> enrollment ids."""
        if not self.journeys:
            return {}
        rows = conn.execute(
            sa.select(
                journey_enrollments.c.id,
                journey_enrollments.c.journey_id,
                journey_enrollments.c.contact_id,
            ).where(
                journey_enrollments.c.status == "active",
                journey_enrollments.c.contact_id
                == sa.any_(_array(sorted({t.contact_id for t in claimed}), sa.BigInteger())),
            )
        )
        active: dict[tuple[str, int], list[int]] = {}
        for row in rows:
            active.setdefault((row.journey_id, row.contact_id), []).append(row.id)
        return active

    def _plan(
        self, claimed: Sequence[Any], active: dict[tuple[str, int], list[int]], now: datetime
    ) -> tuple[list[dict[str, Any]], list[int]]:
        rows: list[dict[str, Any]] = []
        exits: list[int] = []
        for t in claimed:
            name = f"bucket:{t.kind}:{t.bucket_id}"
            for journey in self.journeys.values():
                key = (journey.id, t.contact_id)
                if journey.exited_by(name):
                    exits.extend(active.pop(key, []))
                if journey.triggered_by(name):
                    running = bool(active.get(key)) and not journey.concurrent
                    rows.append(
                        {
                            "journey_id": journey.id,
                            "contact_id": t.contact_id,
                            "transition_id": t.id,
                            "status": "skipped" if running else "active",
                            "next_attempt_at": None if running else now + self.lease,
                            "finished_at": now if running else None,
                        }
                    )
        return rows, exits

    def _enroll(self, conn: Connection, rows: list[dict[str, Any]]) -> Sequence[Any]:
        statement = (
            pg_insert(journey_enrollments)
            .values(rows)
            .on_conflict_do_nothing(
                index_elements=[
                    journey_enrollments.c.journey_id,
                    journey_enrollments.c.transition_id,
                ]
            )
            .returning(
                journey_enrollments.c.id,
                journey_enrollments.c.journey_id,
                journey_enrollments.c.transition_id,
                journey_enrollments.c.status,
            )
        )
        return conn.execute(statement).all()

    # -- delivering ---------------------------------------------------------------------------

    def due(self, now: datetime) -> list[Enrollment]:
        """Reserve deliveries that are due (retries, and those a dead dispatcher left)."""
        if not self.journeys:
            return []
        due = (
            sa.select(journey_enrollments.c.id)
            .where(
                journey_enrollments.c.status == "active",
                journey_enrollments.c.delivered_at.is_(None),
                journey_enrollments.c.next_attempt_at <= sa.literal(now, TIMESTAMP),
                journey_enrollments.c.journey_id.in_(list(self.journeys)),
            )
            .order_by(journey_enrollments.c.next_attempt_at)
            .limit(self.batch_size)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        with self.runtime.engine.begin() as conn:
            reserved = conn.execute(
                sa.update(journey_enrollments)
                .where(journey_enrollments.c.id.in_(due))
                .values(next_attempt_at=now + self.lease)
                .returning(
                    journey_enrollments.c.id,
                    journey_enrollments.c.journey_id,
                    journey_enrollments.c.transition_id,
                    journey_enrollments.c.attempts,
                )
            ).all()
            if not reserved:
                return []
            info = {
                row.id: row
                for row in conn.execute(
                    _transitions().where(
                        transitions.c.id
                        == sa.any_(_array([r.transition_id for r in reserved], sa.BigInteger()))
                    )
                )
            }
        return [
            _enrollment(r.id, r.journey_id, t, r.attempts + 1)
            for r in reserved
            if (t := info.get(r.transition_id)) is not None
        ]

    def deliver(self, enrollments: Sequence[Enrollment], now: datetime) -> Dispatched:
        """Call the handlers; record successes and failures (a statement each)."""
        result = Dispatched()
        succeeded: list[int] = []
        failures: list[tuple[Enrollment, str]] = []
        for enrollment in enrollments:
            journey = self.journeys[enrollment.journey_id]
            try:
                journey.handler(enrollment)
            except Exception as exc:
                log.warning(
                    "journey %s, enrollment %d: handler failed: %r", journey.id, enrollment.id, exc
                )
                failures.append((enrollment, f"{type(exc).__name__}: {exc}"[:2000]))
                metrics.HANDLER_CALLS.labels(journey.id, "failed").inc()
            else:
                succeeded.append(enrollment.id)
                metrics.HANDLER_CALLS.labels(journey.id, "delivered").inc()
        with self.runtime.engine.begin() as conn:
            if succeeded:
                result.delivered = conn.execute(
                    sa.update(journey_enrollments)
                    .where(journey_enrollments.c.id == sa.any_(_array(succeeded, sa.BigInteger())))
                    .values(
                        delivered_at=now,
                        attempts=journey_enrollments.c.attempts + 1,
                        next_attempt_at=None,
                        updated_at=sa.func.now(),
                    )
                ).rowcount
            for enrollment, error in failures:
                journey = self.journeys[enrollment.journey_id]
                final = enrollment.attempt >= journey.max_attempts
                values: dict[str, Any] = {
                    "attempts": enrollment.attempt,
                    "last_error": error,
                    "updated_at": sa.func.now(),
                }
                if final:
                    values.update(status="failed", finished_at=now, next_attempt_at=None)
                    result.failed += 1
                    metrics.ENROLLMENTS_FAILED.labels(journey.id).inc()
                else:
                    values["next_attempt_at"] = now + journey.retry_delay(enrollment.attempt)
                    result.retried += 1
                    metrics.HANDLER_RETRIES.labels(journey.id).inc()
                conn.execute(
                    sa.update(journey_enrollments)
                    .where(journey_enrollments.c.id == enrollment.id)
                    .values(**values)
                )
        return result

    # -- driving ------------------------------------------------------------------------------

    def drain(self, now: datetime | None = None, stop: threading.Event | None = None) -> Dispatched:
        """Everything pending as of ``now`` (default: the clock at each step), or until
        ``stop`` is set (checked between batches)."""
        total = Dispatched()
        while stop is None or not stop.is_set():
            at = now or datetime.now(UTC)
            result, deliveries = self.dispatch_batch(at)
            retries = self.due(at)
            delivered = self.deliver([*deliveries, *retries], at)
            total.add(result).add(delivered)
            if result.transitions == 0 and not retries:
                break
        return total


def dispatch_once(runtime: Runtime | None = None, *, now: datetime | None = None) -> Dispatched:
    """Drain what is pending (``buckets dispatch --once``)."""
    return Dispatcher(get_runtime(runtime)).drain(now)


def complete_enrollment(
    enrollment_id: int, *, now: datetime | None = None, runtime: Runtime | None = None
) -> bool:
    """Mark an active enrollment completed (the journey finished); False if it was not active."""
    rt = get_runtime(runtime)
    with rt.engine.begin() as conn:
        return bool(
            conn.execute(
                sa.update(journey_enrollments)
                .where(
                    journey_enrollments.c.id == enrollment_id,
                    journey_enrollments.c.status == "active",
                )
                .values(status="completed", finished_at=now or datetime.now(UTC))
            ).rowcount
        )


def run_dispatcher(
    runtime: Runtime,
    stop: threading.Event,
    *,
    poll_seconds: float = 1.0,
    max_outage: timedelta | float | None = None,
) -> Dispatched:
    """Dispatch continuously until ``stop`` is set: drain, then wait for a NOTIFY on
    ``buckets_transitions`` (or ``poll_seconds``, a fallback for missed notifications).

    A lost database is ridden out (:mod:`buckets.resilience`): the listening connection is
    opened again, ``LISTEN`` re-issued and the ledger drained (whatever was emitted meanwhile is
    found there; a batch whose transaction was lost was not applied, and deliveries whose outcome
    was not recorded are redelivered once their reservation lapses). After ``max_outage`` of
    continuous outage it raises :class:`~buckets.resilience.OutageTimeout`; any other error
    propagates (the caller's supervisor decides)."""
    dispatcher = Dispatcher(runtime)
    total = Dispatched()
    url = runtime.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    listener: list[psycopg.Connection[Any]] = []  # the open LISTEN connection, if any

    def step() -> None:
        if listener and (listener[0].closed or listener[0].broken):
            listener.pop().close()
        if not listener:
            connection = psycopg.connect(
                url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS
            )
            listener.append(connection)
            connection.execute(f"LISTEN {CHANNEL}")
        total.add(dispatcher.drain(stop=stop))
        for _ in listener[0].notifies(timeout=poll_seconds, stop_after=1):
            pass  # woken by a notification (or the poll timeout): drain again

    try:
        forever("dispatcher", step, stop, max_outage=max_outage, engine=runtime.engine)()
    finally:
        for connection in listener:
            connection.close()
    return total
