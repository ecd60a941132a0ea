"""The real-time path: ingest events and re-evaluate the buckets they affect (SPEC §5).

Per event, in one transaction with its membership changes:

1. validate (nothing of a bad event is written; :class:`IngestError` names the field and, in a
   batch, the index);
2. create the contact if unknown and take its row lock (every writer of a contact's memberships
   holds it: see :mod:`buckets.membership`); a soft-deleted contact is not revived and nothing
   further happens;
3. insert the event; a repeated ``idempotency_key`` writes nothing and returns the result of the
   first ingest (its transitions are found through ``bucket_transitions.event_id``);
4. merge ``contact_properties`` and bump the contact's ``revision``; the same UPDATE records,
   per key the merge gives a different value, the event's ``occurred_at`` in
   ``property_changed_at`` (SPEC §3.4 "held for");
5. evaluate only the *affected* enabled buckets — criteria mentioning the event's name or a
   property key the call sets — with the Python evaluator, fed by one query that fetches the
   contact's properties, the decisive count of every event leaf involved and its active
   memberships;
6. join / leave (min dwell may defer it) / settle, through the shared primitives; return the
   transitions performed.

Batches (:func:`ingest_events`) validate every event before the first write (so a bad event late
in a batch can never leave its earlier chunks committed and the batch half-applied), then run
chunks of events in one transaction each and keep per-event semantics: within a chunk, events
are applied in *waves* (the k-th event of every contact in wave k), so each event is evaluated
right after it is stored, exactly as if ingested alone, while each wave costs a fixed number of
statements whatever its size. Contacts are locked once per chunk, in id order (the order
set-based producers lock in). A chunk that hits a database error is retried event by event, so
one bad event never rolls back its neighbours. With ``atomic=True`` (the HTTP API's batch
contract) a batch is all-or-nothing: one bad event rejects it (:class:`BatchRejected`), and the
good ones are written in a single transaction.

Decisions where the spec is silent: every key in ``contact_properties`` counts as changed
(buckets on it are re-evaluated even if the value is the same); ``received_at`` is the ingest's
``now``; a repeated key returns the first result even if the payload differs; a payload's size is
the JSON size of ``properties`` plus ``contact_properties``, plus the e-mail.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.sql.elements import ColumnElement

from buckets import catalog, metrics
from buckets.decide import Ask
from buckets.errors import DatabaseUnavailableError, IngestInterruptedError
from buckets.ledger import Transition, caused_by
from buckets.membership import latest_of, record_decided
from buckets.models import contacts, user_events
from buckets.references import cascade
from buckets.resilience import first_line, is_outage
from buckets.runtime import Runtime, get_runtime
from buckets.settings import Settings
from buckets.validation import BatchRejected, EventIn, IngestError, check_now, validate_event

Status = Literal["accepted", "duplicate", "contact_deleted"]
DEADLOCK_RETRIES = 3


@dataclass
class IngestResult:
    status: Status
    external_id: str
    event_id: int | None = None
    contact_id: int | None = None
    transitions: list[Transition] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "external_id": self.external_id,
            "event_id": self.event_id,
            "contact_id": self.contact_id,
            "transitions": [transition.to_dict() for transition in self.transitions],
        }


@dataclass
class BatchResult:
    """One entry per input event: its result, or the error that rejected it."""

    results: list[IngestResult | IngestError]

    def _count(self, status: Status) -> int:
        return sum(1 for r in self.results if isinstance(r, IngestResult) and r.status == status)

    @property
    def accepted(self) -> int:
        return self._count("accepted")

    @property
    def duplicates(self) -> int:
        return self._count("duplicate")

    @property
    def ignored(self) -> int:
        """Events for soft-deleted contacts (not stored)."""
        return self._count("contact_deleted")

    @property
    def errors(self) -> list[IngestError]:
        return [r for r in self.results if isinstance(r, IngestError)]

    @property
    def transitions(self) -> list[Transition]:
        """Transitions this batch performed (replayed duplicates' results are not counted)."""
        return [
            t
            for r in self.results
            if isinstance(r, IngestResult) and r.status == "accepted"
            for t in r.transitions
        ]


def _now(now: datetime | None, settings: Settings) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return check_now(now, settings)


# --- the public entry points ---------------------------------------------------------------


def ingest_event(  # noqa: PLR0917 - SPEC §5 gives these fields positionally
    external_id: str,
    event: str,
    properties: Mapping[str, Any] | None = None,
    occurred_at: datetime | str | None = None,
    contact_properties: Mapping[str, Any] | None = None,
    email: str | None = None,
    idempotency_key: str | None = None,
    *,
    now: datetime | None = None,
    runtime: Runtime | None = None,
) -> IngestResult:
    """Ingest one event in one transaction; raises :class:`IngestError` for bad input."""
    started = time.perf_counter()
    try:
        result = _ingest_one(
            external_id,
            event,
            properties,
            occurred_at,
            contact_properties,
            email,
            idempotency_key,
            now=now,
            runtime=runtime,
        )
    except IngestError:
        metrics.INGEST_EVENTS.labels("rejected").inc()
        raise
    metrics.INGEST_EVENTS.labels(result.status).inc()
    metrics.INGEST_SECONDS.labels("event").observe(time.perf_counter() - started)
    return result


def _ingest_one(  # noqa: PLR0917 - the fields of ingest_event
    external_id: str,
    event: str,
    properties: Mapping[str, Any] | None,
    occurred_at: datetime | str | None,
    contact_properties: Mapping[str, Any] | None,
    email: str | None,
    idempotency_key: str | None,
    *,
    now: datetime | None,
    runtime: Runtime | None,
) -> IngestResult:
    rt = get_runtime(runtime)
    at = _now(now, rt.settings)
    data = {
        "external_id": external_id,
        "event": event,
        "properties": properties,
        "occurred_at": occurred_at,
        "contact_properties": contact_properties,
        "email": email,
        "idempotency_key": idempotency_key,
    }
    checked = validate_event(data, now=at, settings=rt.settings)
    try:
        [result] = _ingest_chunk(rt, [checked], at)
    except DBAPIError as exc:
        if is_outage(exc):
            raise DatabaseUnavailableError(
                f"event not ingested, the database is unavailable: {first_line(exc)}"
            ) from exc
        raise
    return result


def ingest_events(
    events: Iterable[Mapping[str, Any]],
    *,
    now: datetime | None = None,
    runtime: Runtime | None = None,
    chunk_size: int | None = None,
    atomic: bool = False,
) -> BatchResult:
    """Ingest many events, one transaction per chunk, with per-event semantics and results.

    Each entry of ``events`` has the fields of :func:`ingest_event`. Every event is validated
    before anything is written. Bad events are reported in the result (an
    :class:`IngestError` carrying their index) and do not stop the others. A database that
    becomes unavailable is not bad input: the batch stops at once with
    :class:`~buckets.errors.IngestInterruptedError`, naming the first event not ingested and
    carrying the results of those before it.

    With ``atomic``, one bad event raises :class:`BatchRejected` (every error, nothing written)
    and the batch is written in one transaction (``chunk_size`` does not apply): all of it or,
    if the database fails, none of it (an outage raises
    :class:`~buckets.errors.DatabaseUnavailableError`).
    """
    started = time.perf_counter()
    try:
        result = _ingest_many(
            events, now=now, runtime=runtime, chunk_size=chunk_size, atomic=atomic
        )
    except BatchRejected as rejected:
        metrics.INGEST_EVENTS.labels("rejected").inc(len(rejected.errors))
        raise
    except IngestInterruptedError as stopped:
        if isinstance(stopped.results, BatchResult):
            _count(stopped.results)
        raise
    _count(result)
    metrics.INGEST_SECONDS.labels("batch").observe(time.perf_counter() - started)
    return result


def _count(result: BatchResult) -> None:
    for outcome, count in (
        ("accepted", result.accepted),
        ("duplicate", result.duplicates),
        ("contact_deleted", result.ignored),
        ("rejected", len(result.errors)),
    ):
        if count:
            metrics.INGEST_EVENTS.labels(outcome).inc(count)


def _ingest_many(
    events: Iterable[Mapping[str, Any]],
    *,
    now: datetime | None,
    runtime: Runtime | None,
    chunk_size: int | None,
    atomic: bool,
) -> BatchResult:
    rt = get_runtime(runtime)
    at = _now(now, rt.settings)
    size = chunk_size or rt.settings.ingest_chunk_size
    results: list[IngestResult | IngestError | None] = []
    valid: list[tuple[int, EventIn]] = []
    errors: list[IngestError] = []
    for index, data in enumerate(events):  # all of them before the first write
        try:
            valid.append((index, validate_event(data, now=at, settings=rt.settings, index=index)))
            results.append(None)
        except IngestError as error:
            errors.append(error)
            results.append(error)
    if atomic:
        if errors:
            raise BatchRejected(errors)
        if valid:
            try:
                written = _ingest_chunk(rt, [event for _, event in valid], at)
            except DBAPIError as exc:
                if is_outage(exc):
                    raise DatabaseUnavailableError(
                        f"batch not ingested, the database is unavailable: {first_line(exc)}"
                    ) from exc
                raise
            for (index, _), done in zip(valid, written, strict=True):
                results[index] = done
        return _complete(results)
    for start in range(0, len(valid), size):
        chunk = valid[start : start + size]
        try:
            outcomes = _ingest_chunk_safely(rt, chunk, at)
        except IngestInterruptedError as stopped:  # the database, not the input: stop here
            partial = stopped.results if isinstance(stopped.results, list) else []
            for (index, _), result in zip(chunk, partial, strict=False):
                results[index] = result
            stopped.results = _complete(results[: stopped.index])
            raise
        for (index, _), result in zip(chunk, outcomes, strict=True):
            results[index] = result
    return _complete(results)


def _complete(results: Sequence[IngestResult | IngestError | None]) -> BatchResult:
    """The batch's results, every one of them known."""
    assert all(result is not None for result in results)
    return BatchResult([result for result in results if result is not None])


def _ingest_chunk_safely(
    rt: Runtime, chunk: Sequence[tuple[int, EventIn]], now: datetime
) -> list[IngestResult | IngestError]:
    """A chunk in one transaction; on a database error, each event on its own. An outage (the
    connection lost, the server unreachable: :func:`buckets.resilience.is_outage`) is no
    event's fault: it raises :class:`IngestInterruptedError` naming the first event not
    ingested, with the results of the chunk's events before it."""
    try:
        return list(_ingest_chunk(rt, [event for _, event in chunk], now))
    except DBAPIError as exc:
        if is_outage(exc):
            raise IngestInterruptedError(chunk[0][0], first_line(exc), []) from exc
        if len(chunk) == 1:
            raise
    out: list[IngestResult | IngestError] = []
    for index, event in chunk:
        try:
            out.extend(_ingest_chunk(rt, [event], now))
        except DBAPIError as exc:
            if is_outage(exc):
                raise IngestInterruptedError(index, first_line(exc), out) from exc
            message = f"database rejected the event: {first_line(exc)}"
            out.append(IngestError("event", message, index=index, external_id=event.external_id))
    return out


def _ingest_chunk(rt: Runtime, events: Sequence[EventIn], now: datetime) -> list[IngestResult]:
    for attempt in range(DEADLOCK_RETRIES):
        try:
            with rt.engine.begin() as conn:
                results = _Chunk(rt, conn, events, now).run()
            accepted = [e for e, r in zip(events, results, strict=True) if r.status == "accepted"]
            catalog.record(rt.engine, accepted, now)  # once per chunk, after its commit
            return results
        except OperationalError as exc:  # deadlock with another producer: both sides retry
            code = getattr(exc.orig, "sqlstate", None)
            if code not in ("40P01", "40001") or attempt == DEADLOCK_RETRIES - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


# --- one chunk ------------------------------------------------------------------------------


def _array(values: Sequence[Any], item: sa.types.TypeEngine[Any]) -> Any:
    return sa.literal(list(values), ARRAY(item))


def _changed_at(event: EventIn) -> str:
    """What a key this event changes records (SPEC §3.4): its ``occurred_at`` (the call's
    ``now`` when it had none: validation put it there), as ISO-8601 text in UTC."""
    return event.occurred_at.astimezone(UTC).isoformat()


def _changes(given: ColumnElement[Any], at: ColumnElement[Any]) -> ColumnElement[Any]:
    """``{key: at}`` for every key of the patch ``given`` whose value differs from the
    contact's (the old row's: SET reads it). A key's first value differs from its absence
    (SQL NULL); jsonb equality is JSON's (``1`` = ``1.0``, key order ignored). The merge
    (``||``) never removes a key, so a patch can only set: every removal path would have to
    record it too (none exists: a ``null`` value is a value)."""
    entry = sa.func.jsonb_each(given).table_valued("key", "value").render_derived("entry")
    return (
        sa.select(
            sa.func.coalesce(
                sa.func.jsonb_object_agg(entry.c.key, sa.func.to_jsonb(at)),
                sa.cast(sa.literal("{}"), JSONB),
            )
        )
        .select_from(entry)
        .where(contacts.c.properties.op("->")(entry.c.key).is_distinct_from(entry.c.value))
        .scalar_subquery()
    )


@dataclass
class _Contact:
    id: int
    deleted: bool
    created: bool = False  # by this chunk: its first event also decides on_creation buckets


class _Chunk:
    """The events of one transaction, applied wave by wave."""

    def __init__(
        self, rt: Runtime, conn: Connection, events: Sequence[EventIn], now: datetime
    ) -> None:
        self.rt, self.conn, self.events, self.now = rt, conn, events, now
        self.as_of = now  # the instant decisions are made as of (see _lock_contacts)
        self.results: list[IngestResult | None] = [None] * len(events)

    def run(self) -> list[IngestResult]:
        first_by_key: dict[str, int] = {}
        repeats: list[tuple[int, int]] = []  # (position, position of the first with its key)
        waves: list[list[int]] = []
        depth: dict[str, int] = {}
        for position, event in enumerate(self.events):
            key = event.idempotency_key
            if key is not None and key in first_by_key:
                repeats.append((position, first_by_key[key]))
                continue
            if key is not None:
                first_by_key[key] = position
            level = depth.get(event.external_id, 0)
            depth[event.external_id] = level + 1
            if level == len(waves):
                waves.append([])
            waves[level].append(position)
        contacts_by_external = self._lock_contacts(
            sorted({self.events[p].external_id for wave in waves for p in wave})
        )
        duplicates: list[int] = []
        for wave in waves:
            duplicates.extend(self._apply_wave(wave, contacts_by_external))
        self._resolve_duplicates(duplicates)
        for position, first in repeats:
            original = self.results[first]
            assert original is not None
            self.results[position] = IngestResult(
                "duplicate",
                self.events[position].external_id,
                original.event_id,
                original.contact_id,
                list(original.transitions),
            )
        assert all(result is not None for result in self.results)
        return [result for result in self.results if result is not None]

    def _lock_contacts(self, external_ids: list[str]) -> dict[str, _Contact]:
        """Create unknown contacts (in external id order), then lock all (in id order)."""
        created = set(
            self.conn.execute(
                pg_insert(contacts)
                .from_select(
                    ["external_id", "created_at"],
                    sa.select(
                        sa.func.unnest(_array(external_ids, sa.Text())).label("external_id"),
                        # the call's now, not the server's clock: a key never given a value
                        # was "held" since then (SPEC §3.4), decided as of an explicit now
                        sa.literal(self.now, sa.DateTime(timezone=True)).label("created_at"),
                    ),
                )
                .on_conflict_do_nothing(index_elements=[contacts.c.external_id])
                .returning(contacts.c.external_id)
            ).scalars()
        )
        rows = self.conn.execute(
            sa.select(
                contacts.c.id,
                contacts.c.external_id,
                contacts.c.deleted_at,
                contacts.c.decided_at,
            )
            .where(contacts.c.external_id == sa.any_(_array(external_ids, sa.Text())))
            .order_by(contacts.c.id)
            .with_for_update(of=contacts, key_share=True)
        ).all()
        # Decisions are monotone in time: decide as of the latest instant any of these
        # contacts was already decided as of, if that is later than ours.
        latest = latest_of(row.decided_at for row in rows)
        if latest is not None and latest > self.as_of:
            self.as_of = latest
        return {
            row.external_id: _Contact(
                row.id, row.deleted_at is not None, created=row.external_id in created
            )
            for row in rows
        }

    def _apply_wave(self, wave: list[int], known: dict[str, _Contact]) -> list[int]:
        """Store one event per contact, then evaluate; returns positions that are duplicates."""
        live: list[int] = []
        for position in wave:
            event = self.events[position]
            contact = known[event.external_id]
            if contact.deleted:
                self.results[position] = IngestResult(
                    "contact_deleted", event.external_id, contact_id=contact.id
                )
            else:
                live.append(position)
        if not live:
            return []
        stored = self._insert_events(live, known)
        duplicates = [position for position in live if position not in stored]
        fresh = [position for position in live if position in stored]
        if fresh:
            self._update_contacts(fresh, known)
            self._evaluate(fresh, stored, known)
        return duplicates

    def _insert_events(self, live: list[int], known: dict[str, _Contact]) -> dict[int, int]:
        """Insert the wave's events; returns position -> event id for those not duplicates."""
        events = [self.events[p] for p in live]
        ids = [known[e.external_id].id for e in events]
        rows = (
            sa.func.unnest(
                _array(ids, sa.BigInteger()),
                _array([e.event for e in events], sa.Text()),
                _array([json.dumps(e.properties) for e in events], sa.Text()),
                _array([e.occurred_at for e in events], sa.DateTime(timezone=True)),
                _array([e.idempotency_key for e in events], sa.Text()),
            )
            .table_valued("contact_id", "event", "properties", "occurred_at", "key")
            .render_derived()
        )
        inserted = self.conn.execute(
            pg_insert(user_events)
            .from_select(
                [
                    "contact_id",
                    "event",
                    "properties",
                    "occurred_at",
                    "idempotency_key",
                    "received_at",
                ],
                sa.select(
                    rows.c.contact_id,
                    rows.c.event,
                    sa.cast(rows.c.properties, JSONB),
                    rows.c.occurred_at,
                    rows.c.key,
                    sa.literal(self.now, sa.DateTime(timezone=True)),
                ),
            )
            .on_conflict_do_nothing(index_elements=[user_events.c.idempotency_key])
            .returning(user_events.c.id, user_events.c.contact_id)
        )
        by_contact = {row.contact_id: row.id for row in inserted}  # one event per contact/wave
        return {
            position: by_contact[contact_id]
            for position, contact_id in zip(live, ids, strict=True)
            if contact_id in by_contact
        }

    def _update_contacts(self, fresh: list[int], known: dict[str, _Contact]) -> None:
        """Merge contact properties and e-mail; bump the revision (criteria inputs changed)."""
        events = [self.events[p] for p in fresh]
        patch = (
            sa.func.unnest(
                _array([known[e.external_id].id for e in events], sa.BigInteger()),
                _array([json.dumps(e.contact_properties or {}) for e in events], sa.Text()),
                _array([e.email for e in events], sa.Text()),
                _array([_changed_at(e) for e in events], sa.Text()),
            )
            .table_valued("id", "patch", "email", "at")
            .render_derived()
        )
        given = sa.cast(patch.c.patch, JSONB)
        self.conn.execute(
            sa.update(contacts)
            .where(contacts.c.id == patch.c.id)
            .values(
                properties=contacts.c.properties.op("||")(given),
                property_changed_at=contacts.c.property_changed_at.op("||")(
                    _changes(given, patch.c.at)
                ),
                email=sa.func.coalesce(patch.c.email, contacts.c.email),
                revision=contacts.c.revision + 1,
                decided_at=sa.func.greatest(
                    contacts.c.decided_at, sa.literal(self.as_of, sa.DateTime(timezone=True))
                ),
                updated_at=sa.func.now(),
            )
        )

    def _evaluate(
        self, fresh: list[int], stored: dict[int, int], known: dict[str, _Contact]
    ) -> None:
        """Decide the affected enabled buckets of every fresh event (buckets.decide)."""
        enabled = self.rt.enabled
        asks: list[Ask] = []
        for position in fresh:
            event = self.events[position]
            contact_id = known[event.external_id].id
            self.results[position] = IngestResult(
                "accepted", event.external_id, stored[position], contact_id
            )
            contact = known[event.external_id]
            candidates = self.rt.registry.affected(
                event.event, event.contact_properties or {}, created=contact.created
            )
            contact.created = False  # once per contact
            if candidates:
                for bucket in enabled.enabled(self.conn, candidates):
                    asks.append(Ask(bucket, contact_id, stored[position]))
        if not asks:
            return
        # In dependency order: a bucket after the buckets it refers to, and the buckets that
        # refer to a bucket whose membership changed re-decided for that contact (SPEC §3.5).
        outcome = cascade(
            self.conn,
            self.rt.registry,
            {},
            self.as_of,
            source="ingest",
            asks=asks,
            enabled=lambda buckets: enabled.enabled(self.conn, buckets),
            universe=tuple(self.rt.registry.buckets.values()),
        )
        if outcome.as_of is not None and outcome.as_of > self.as_of:  # a row was decided later
            record_decided(self.conn, sorted({ask.contact_id for ask in asks}), outcome.as_of)
        by_event: dict[int, list[Transition]] = {}
        for transition in outcome.changes.transitions:
            assert transition.event_id is not None
            by_event.setdefault(transition.event_id, []).append(transition)
        for position in fresh:
            result = self.results[position]
            assert result is not None
            assert result.event_id is not None
            result.transitions = by_event.get(result.event_id, [])

    def _resolve_duplicates(self, positions: list[int]) -> None:
        """Results of events whose key an earlier ingest stored: that ingest's result."""
        if not positions:
            return
        keys = [self.events[p].idempotency_key for p in positions]
        rows = self.conn.execute(
            sa.select(
                user_events.c.idempotency_key, user_events.c.id, user_events.c.contact_id
            ).where(user_events.c.idempotency_key == sa.any_(_array(keys, sa.Text())))
        ).all()
        originals = {row.idempotency_key: row for row in rows}
        found = caused_by(self.conn, [row.id for row in rows])
        for position in positions:
            event = self.events[position]
            original = originals.get(event.idempotency_key)
            if original is None:  # stored by a concurrent ingest not yet visible: report as dup
                self.results[position] = IngestResult("duplicate", event.external_id)
                continue
            self.results[position] = IngestResult(
                "duplicate",
                event.external_id,
                original.id,
                original.contact_id,
                found.get(original.id, []),
            )
