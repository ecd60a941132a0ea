"""Join, leave, entry limit, min/max dwell: the primitives every producer shares (SPEC §5.1-5.5).

Each primitive is **one set-based statement** over a set of ``(bucket_id, contact_id)`` pairs
(one pair for an ingested event, a whole bucket for the cron or a backfill chunk) that changes
the membership rows and writes their ledger rows in the same statement, so a transition can
never exist without its change or the other way round.

Serialisation per contact. Every writer of a contact's memberships holds that contact's row lock
(``contacts`` row, ``FOR NO KEY UPDATE``) while it decides and writes:

* the real-time path takes it by upserting the contact, before it reads anything;
* set-based producers decide from a snapshot, so their candidate pairs carry the contact's
  ``revision`` as the snapshot saw it. The statement locks those contacts (in id order, so two
  producers cannot deadlock on each other) and keeps only the pairs whose revision is unchanged:
  PostgreSQL re-reads a row it had to wait for, so a contact changed by an ingest that committed
  after the snapshot is not acted on from stale data. Such pairs come back as ``stale``; the
  caller re-decides them from fresh data under the lock (see :func:`lock_contacts`).

Decisions are monotone in time per (bucket, contact): a decision made as of ``now`` is never
applied over one made as of a later instant. Per-contact producers (ingest, due-queue chunks)
record their instant in ``contacts.decided_at`` and decide as of at least every instant already
recorded for the contact (:func:`watermark`); every membership write records its instant in
the row's ``last_evaluated_at``. A set-based candidate whose contact was decided later is
``stale`` (re-decided under its lock as of that later instant, :func:`redecide_stale`); a leave
or join over a row evaluated later is dropped (that later decision stands).

Entry limit (SPEC §5.3) gates emission only; the row is always written. ``epoch`` is one more
than the number of prior rows, read from the latest prior row (epochs are gapless, enforced by
the unique ``(bucket_id, contact_id, entry_count)``), whose ``left_at`` is also the latest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from buckets import metrics
from buckets.criteria.durations import duration_seconds
from buckets.definitions import Bucket
from buckets.ledger import RETURNED, Transition, from_json, transition_key_sql
from buckets.models import bucket_memberships as memberships
from buckets.models import bucket_transitions as transitions
from buckets.models import contacts

Source = Literal["ingest", "reconcile", "backfill", "admin"]
LeaveReason = Literal["criteria", "max_dwell", "contact_deleted", "admin"]
TIMESTAMP = sa.DateTime(timezone=True)
ONE_SECOND: ColumnElement[Any] = sa.literal_column("interval '1 second'")


@dataclass(frozen=True)
class Policy:
    """What the primitives need to know about a bucket."""

    bucket_id: str
    entry_limit: str = "unlimited"
    entry_period: timedelta | None = None
    min_dwell: timedelta | None = None
    max_dwell: timedelta | None = None

    @classmethod
    def of(cls, bucket: Bucket) -> Policy:
        return cls(
            bucket.id, bucket.entry_limit, bucket.entry_period, bucket.min_dwell, bucket.max_dwell
        )


@dataclass
class Counts:
    """How many memberships a statement changed (of one bucket, or in total)."""

    joined: int = 0
    left: int = 0
    emitted: int = 0
    suppressed: int = 0
    deferred: int = 0

    def add(self, other: Counts) -> None:
        self.joined += other.joined
        self.left += other.left
        self.emitted += other.emitted
        self.suppressed += other.suppressed
        self.deferred += other.deferred


@dataclass
class Changes:
    """What a primitive did: counts in total and per bucket, and ``transitions`` when rows were
    asked for."""

    total: Counts = field(default_factory=Counts)
    per_bucket: dict[str, Counts] = field(default_factory=dict)
    transitions: list[Transition] = field(default_factory=list)
    # Candidate pairs whose contact changed (or was decided as of a later instant) since the
    # caller's snapshot: not acted on.
    stale: list[tuple[str, int]] = field(default_factory=list)
    # The contacts whose membership changed (filled when asked for: due-queue refreshes).
    changed: list[int] = field(default_factory=list)

    joined = property(lambda self: self.total.joined)
    left = property(lambda self: self.total.left)
    emitted = property(lambda self: self.total.emitted)
    suppressed = property(lambda self: self.total.suppressed)
    deferred = property(lambda self: self.total.deferred)

    def add_counts(self, bucket_id: str, counts: Counts) -> None:
        self.total.add(counts)
        self.per_bucket.setdefault(bucket_id, Counts()).add(counts)

    def add(self, other: Changes) -> Changes:
        for bucket_id, counts in other.per_bucket.items():
            self.add_counts(bucket_id, counts)
        self.transitions.extend(other.transitions)
        self.stale.extend(other.stale)
        self.changed.extend(other.changed)
        return self


def _array(values: Sequence[Any], item: sa.types.TypeEngine[Any]) -> ColumnElement[Any]:
    return sa.literal(list(values), ARRAY(item))


# Statements are built once per shape and executed with these parameters: building a statement
# of this size costs milliseconds in Python, more than the database needs to run it for a few
# pairs (the real-time path's case).
NOW: ColumnElement[Any] = sa.bindparam("now", type_=TIMESTAMP)
_POLICY: dict[str, ARRAY[Any]] = {
    "p_bucket_id": ARRAY(sa.Text()),
    "p_entry_limit": ARRAY(sa.Text()),
    "p_period_s": ARRAY(sa.BigInteger()),
    "p_min_dwell_s": ARRAY(sa.BigInteger()),
    "p_max_dwell_s": ARRAY(sa.BigInteger()),
}


@dataclass(frozen=True)
class Pairs:
    """Candidate pairs given from Python (already decided, contacts already locked): the same
    statement for every call of a shape, the pairs themselves as parameters."""

    select: sa.Select[Any]
    params: dict[str, Any]


@lru_cache(maxsize=2)
def _pairs_select(events: bool) -> sa.Select[Any]:
    names = ["bucket_id", "contact_id", *(["event_id"] if events else [])]
    types: list[sa.types.TypeEngine[Any]] = [sa.Text(), sa.BigInteger(), sa.BigInteger()]
    columns = [
        sa.bindparam(f"pair_{name}", type_=ARRAY(item))
        for name, item in zip(names, types, strict=False)
    ]
    table = sa.func.unnest(*columns).table_valued(*names).render_derived("pairs")
    return sa.select(*(table.c[name] for name in names))


def pairs(
    bucket_ids: Sequence[str],
    contact_ids: Sequence[int],
    event_ids: Sequence[int | None] | None = None,
) -> Pairs:
    """Candidate pairs given from Python (``event_ids``: the ingested event each is about)."""
    params: dict[str, Any] = {
        "pair_bucket_id": list(bucket_ids),
        "pair_contact_id": list(contact_ids),
    }
    if event_ids is not None:
        params["pair_event_id"] = list(event_ids)
    return Pairs(_pairs_select(event_ids is not None), params)


Candidates = sa.Select[Any] | Pairs


def _candidates(candidates: Candidates) -> tuple[sa.Select[Any], dict[str, Any]]:
    if isinstance(candidates, Pairs):
        return candidates.select, candidates.params
    return candidates, {}


def _policies() -> sa.CTE:
    table = (
        sa.func.unnest(*(sa.bindparam(name, type_=kind) for name, kind in _POLICY.items()))
        .table_valued("bucket_id", "entry_limit", "period_s", "min_dwell_s", "max_dwell_s")
        .render_derived("p")
    )
    return sa.select(
        table.c.bucket_id,
        table.c.entry_limit,
        (table.c.period_s * ONE_SECOND).label("entry_period"),
        (table.c.min_dwell_s * ONE_SECOND).label("min_dwell"),
        (table.c.max_dwell_s * ONE_SECOND).label("max_dwell"),
    ).cte("policy")


def _params(policies: Iterable[Policy], now: datetime, given: dict[str, Any]) -> dict[str, Any]:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    rows = list({policy.bucket_id: policy for policy in policies}.values())

    def seconds(value: timedelta | None) -> int | None:
        return None if value is None else duration_seconds(value)

    return {
        **given,
        "now": now,
        "p_bucket_id": [p.bucket_id for p in rows],
        "p_entry_limit": [p.entry_limit for p in rows],
        "p_period_s": [seconds(p.entry_period) for p in rows],
        "p_min_dwell_s": [seconds(p.min_dwell) for p in rows],
        "p_max_dwell_s": [seconds(p.max_dwell) for p in rows],
    }


@dataclass(frozen=True)
class _Decided:
    pairs: sa.CTE  # bucket_id, contact_id, event_id
    stale: sa.CTE | None  # bucket_id, contact_id skipped because their contact changed


def _decided(candidates: sa.Select[Any], at: ColumnElement[Any]) -> _Decided:
    """The candidate pairs to act on: when they carry a ``revision``, locked in contact order and
    filtered to contacts unchanged since the caller's snapshot and not decided as of an instant
    later than ``at``. Duplicate pairs are harmless:
    every write is a compare-and-swap or guarded by a unique index, and ledger rows are built
    from the changed rows, never from the pairs."""
    cand = candidates.cte("cand").prefix_with("MATERIALIZED")
    event_id = cand.c.event_id if "event_id" in cand.c else sa.cast(sa.null(), sa.BigInteger)
    if "revision" not in cand.c:
        plain = sa.select(cand.c.bucket_id, cand.c.contact_id, event_id.label("event_id"))
        return _Decided(plain.cte("decided"), None)
    # Each candidate's contact is locked by a primary-key probe of its own (a lateral subquery
    # with its locking clause cannot be turned into a join over all contacts), in contact id
    # order; PostgreSQL re-reads a row it had to wait for, so the revision test sees the latest.
    ordered = (
        sa.select(cand)
        .order_by(cand.c.contact_id)
        .offset(sa.literal_column("0"))
        .subquery("ordered")
    )
    lock = (
        sa.select(sa.literal(1).label("locked"))
        .where(
            contacts.c.id == ordered.c.contact_id,
            contacts.c.revision == ordered.c.revision,
            sa.or_(contacts.c.decided_at.is_(None), contacts.c.decided_at <= at),
        )
        .with_for_update(key_share=True)
        .lateral("lock")
    )
    event_id = ordered.c.event_id if "event_id" in ordered.c else event_id
    locked = (
        sa.select(ordered.c.bucket_id, ordered.c.contact_id, event_id.label("event_id"))
        .select_from(ordered.join(lock, sa.true()))
        .cte("locked")
    )
    stale = (
        sa.select(cand.c.bucket_id, cand.c.contact_id)
        .where(
            ~sa.exists().where(
                locked.c.bucket_id == cand.c.bucket_id,
                locked.c.contact_id == cand.c.contact_id,
            )
        )
        .cte("stale")
    )
    return _Decided(locked, stale)


@dataclass(frozen=True)
class _Statement:
    select: sa.Select[Any]
    bulk: bool  # a set-based producer's snapshot pass (see _run)


def _report(
    decided: _Decided,
    written: sa.CTE,
    *,
    deferred: sa.CTE | None = None,
    rows: bool = False,
    changed: bool = False,
) -> _Statement:
    """The statement ending in the transitions CTE ``written`` (data-modifying CTEs run
    whether or not they are read) that reports what it did, in one row (with ``changed``, the
    contacts whose membership changed, deferrals included)."""

    count = sa.func.count
    per_bucket = (
        sa.select(
            written.c.bucket_id,
            count().filter(written.c.kind == "entered").label("joined"),
            count().filter(written.c.kind == "left").label("left"),
            count().filter(written.c.emitted).label("emitted"),
            count().filter(~written.c.emitted).label("suppressed"),
        )
        .group_by(written.c.bucket_id)
        .subquery("per_bucket")
    )
    columns: list[Any] = [
        sa.select(
            sa.func.json_object_agg(
                per_bucket.c.bucket_id,
                sa.func.json_build_array(
                    per_bucket.c.joined,
                    per_bucket.c.left,
                    per_bucket.c.emitted,
                    per_bucket.c.suppressed,
                ),
            )
        ).scalar_subquery()
    ]
    if deferred is not None:
        held = (
            sa.select(deferred.c.bucket_id, count().label("n"))
            .group_by(deferred.c.bucket_id)
            .subquery("held")
        )
        columns.append(
            sa.select(sa.func.json_object_agg(held.c.bucket_id, held.c.n)).scalar_subquery()
        )
    else:
        columns.append(sa.literal(None))
    if decided.stale is not None:
        stale = decided.stale
        pair = sa.func.json_build_array(stale.c.bucket_id, stale.c.contact_id)
        columns.append(sa.select(sa.func.json_agg(pair)).select_from(stale).scalar_subquery())
    else:
        columns.append(sa.literal(None))
    if rows:  # the transitions themselves, in the same statement
        fields = [part for column in RETURNED for part in (column.name, written.c[column.name])]
        fields += ["external_id", contacts.c.external_id]
        columns.append(
            sa.select(sa.func.json_agg(sa.func.json_build_object(*fields)))
            .select_from(written.join(contacts, contacts.c.id == written.c.contact_id))
            .scalar_subquery()
        )
    else:
        columns.append(sa.literal(None))
    if changed:
        touched = sa.select(written.c.contact_id)
        if deferred is not None:
            touched = touched.union_all(sa.select(deferred.c.contact_id))  # type: ignore[assignment]
        ids = touched.subquery()
        columns.append(sa.select(sa.func.array_agg(ids.c.contact_id)).scalar_subquery())
    else:
        columns.append(sa.literal(None))
    return _Statement(sa.select(*columns), bulk=decided.stale is not None)


def _run(conn: Connection, statement: _Statement, params: dict[str, Any]) -> Changes:
    if statement.bulk:
        # Every table this statement reads has the index it needs; a sequential scan is only
        # ever chosen on statistics that lag a bulk write (e.g. right after another bucket's
        # backfill), and then runs once per candidate pair: quadratic. Rule it out.
        conn.execute(sa.text("SET LOCAL enable_seqscan = off"))
    counts, deferrals, stale_pairs, found, touched_ids = conn.execute(
        statement.select, params
    ).one()
    if statement.bulk:
        conn.execute(sa.text("RESET enable_seqscan"))
    changes = Changes(
        stale=[(bucket_id, contact_id) for bucket_id, contact_id in stale_pairs or ()],
        changed=sorted(set(touched_ids or ())),
    )
    for bucket_id in {*(counts or {}), *(deferrals or {})}:
        joined, left, emitted, suppressed = (counts or {}).get(bucket_id, (0, 0, 0, 0))
        deferred_count = (deferrals or {}).get(bucket_id, 0)
        changes.add_counts(bucket_id, Counts(joined, left, emitted, suppressed, deferred_count))
    changes.transitions = sorted((from_json(item) for item in found or ()), key=lambda t: t.id)
    return changes


def latest_row(pairs: Any, *columns: Any) -> Any:
    """``columns`` of the latest membership row of each of ``pairs`` (``bucket_id``,
    ``contact_id``), as a LATERAL subquery: one probe of the (bucket, contact, entry count)
    index per pair. Only the latest row can be active, and it records the pair's last
    decision (``last_evaluated_at``)."""
    return (
        sa.select(*columns)
        .where(
            memberships.c.bucket_id == pairs.c.bucket_id,
            memberships.c.contact_id == pairs.c.contact_id,
        )
        .order_by(memberships.c.entry_count.desc())
        .limit(1)
        .lateral("latest")
    )


def join(
    conn: Connection,
    candidates: Candidates,
    policies: Iterable[Policy],
    *,
    now: datetime,
    source: Source,
    silent: bool = False,
    rows: bool = False,
    changed: bool = False,
) -> Changes:
    """Make the candidate pairs members (SPEC §5.1); pairs already active are left alone, and
    so are pairs whose latest row was evaluated as of a later instant.

    ``candidates`` selects ``bucket_id, contact_id`` (plus ``revision`` to lock and check
    contacts, plus ``event_id`` to attribute transitions to an ingested event). Each join writes
    its ``entered`` transition: emitted through the entry-limit gate, or, with ``silent``
    (first-time and re-evaluation backfills), recorded with ``suppressed_by='backfill'``.
    """
    select, given = _candidates(candidates)
    statement = _join_statement(select, source, silent, rows, changed)
    changes = _run(conn, statement, _params(policies, now, given))
    metrics.transitions(conn, "entered", source, changes)
    return changes


@lru_cache(maxsize=64)
def _join_statement(
    candidates: sa.Select[Any], source: Source, silent: bool, rows: bool, changed: bool
) -> _Statement:
    at = NOW
    decided = _decided(candidates, at)
    pairs_ = decided.pairs
    policy = _policies()
    latest = latest_row(
        pairs_,
        memberships.c.entry_count,
        memberships.c.status,
        memberships.c.left_at,
        memberships.c.last_evaluated_at,
    )
    prior = (
        sa.select(
            pairs_.c.bucket_id,
            pairs_.c.contact_id,
            pairs_.c.event_id,
            latest.c.entry_count.label("prior_epoch"),
            latest.c.left_at.label("prior_left_at"),
        )
        .select_from(pairs_.outerjoin(latest, sa.true()))
        .where(
            sa.or_(latest.c.status.is_(None), latest.c.status != "active"),
            sa.or_(latest.c.last_evaluated_at.is_(None), latest.c.last_evaluated_at <= at),
        )
        .cte("prior")
    )
    inserted = (
        pg_insert(memberships)
        .from_select(
            [
                "bucket_id",
                "contact_id",
                "status",
                "entered_at",
                "entry_count",
                "source",
                "max_dwell_at",
                "last_evaluated_at",
            ],
            sa.select(
                prior.c.bucket_id,
                prior.c.contact_id,
                sa.literal("active"),
                at,
                sa.func.coalesce(prior.c.prior_epoch, 0) + 1,
                sa.literal(source),
                at + policy.c.max_dwell,
                at,
            ).join(policy, policy.c.bucket_id == prior.c.bucket_id),
        )
        .on_conflict_do_nothing()  # a concurrent writer won the race: it wrote the transition
        .returning(
            memberships.c.id,
            memberships.c.bucket_id,
            memberships.c.contact_id,
            memberships.c.entry_count,
        )
        .cte("inserted")
    )
    # The ledger rows are built from `inserted` alone, never by joining it back to another
    # CTE: CTE scans carry no statistics, and a misestimated nested loop over two of them is
    # quadratic. The previous epoch's row (for the entry limit) is an index probe on
    # (bucket_id, contact_id, entry_count); the event id (ingest only) a lookup of few rows.
    previous = memberships.alias("previous")
    before = (
        sa.select(previous.c.left_at)
        .where(
            previous.c.bucket_id == inserted.c.bucket_id,
            previous.c.contact_id == inserted.c.contact_id,
            previous.c.entry_count == inserted.c.entry_count - 1,
        )
        .scalar_subquery()
    )
    if silent:
        emitted: ColumnElement[bool] = sa.false()
        suppressed_by: ColumnElement[Any] = sa.literal("backfill")
    else:
        emitted = sa.case(
            (inserted.c.entry_count == 1, sa.true()),  # first membership ever
            (policy.c.entry_limit == "unlimited", sa.true()),
            (policy.c.entry_limit == "once", sa.false()),
            else_=(at - before) >= policy.c.entry_period,
        )
        suppressed_by = sa.case((emitted, sa.null()), else_=sa.literal("entry_limit"))
    event_id: ColumnElement[Any] = sa.cast(sa.null(), sa.BigInteger)
    if "event_id" in candidates.selected_columns:
        # One map of the pairs' event ids, built once (an InitPlan), looked up per row: a
        # correlated scan of the pairs per inserted row was quadratic in the batch.
        def key(bucket_id: Any, contact_id: Any) -> ColumnElement[Any]:
            return sa.func.concat(bucket_id, " ", contact_id)

        pair_key = key(pairs_.c.bucket_id, pairs_.c.contact_id)
        by_pair = sa.select(sa.func.jsonb_object_agg(pair_key, pairs_.c.event_id)).scalar_subquery()
        event_id = sa.cast(
            by_pair.op("->>")(key(inserted.c.bucket_id, inserted.c.contact_id)), sa.BigInteger
        )
    written = _ledger(
        sa.select(
            inserted.c.bucket_id,
            inserted.c.contact_id,
            inserted.c.id,
            sa.literal("entered"),
            inserted.c.entry_count,
            sa.null(),
            sa.literal(source),
            emitted,
            suppressed_by,
            at,
            transition_key_sql(
                inserted.c.bucket_id, contacts.c.external_id, "entered", inserted.c.entry_count
            ),
            event_id,
        )
        .join(policy, policy.c.bucket_id == inserted.c.bucket_id)
        .join(contacts, contacts.c.id == inserted.c.contact_id)
    )
    return _report(decided, written, rows=rows, changed=changed)


def _ledger(rows: sa.Select[Any]) -> sa.CTE:
    """The INSERT of transition rows (columns in :data:`LEDGER_COLUMNS` order) as a CTE."""
    return (
        sa.insert(transitions).from_select(LEDGER_COLUMNS, rows).returning(*RETURNED).cte("written")
    )


LEDGER_COLUMNS = [
    "bucket_id",
    "contact_id",
    "membership_id",
    "kind",
    "epoch",
    "reason",
    "source",
    "emitted",
    "suppressed_by",
    "occurred_at",
    "idempotency_key",
    "event_id",
]


def leave(
    conn: Connection,
    candidates: Candidates,
    policies: Iterable[Policy],
    *,
    now: datetime,
    reason: LeaveReason,
    source: Source,
    rows: bool = False,
    changed: bool = False,
) -> Changes:
    """Compare-and-swap the candidates' active rows to ``left`` (SPEC §5.2), with their ``left``
    transitions. Leaves are emitted, except ``contact_deleted`` (SPEC §11). A row evaluated as
    of a later instant is left alone (re-checked on the row's latest version).

    A ``criteria`` leave decided before the bucket's ``min_dwell`` has passed is deferred
    (SPEC §5.5): the row keeps ``status='active'`` and gets ``pending_leave_at = entered_at +
    min_dwell`` (kept if already set); the cron completes it when due.
    """
    select, given = _candidates(candidates)
    statement = _leave_statement(select, reason, source, rows, changed)
    changes = _run(conn, statement, _params(policies, now, given))
    metrics.transitions(conn, "left", source, changes)
    return changes


@lru_cache(maxsize=64)
def _leave_statement(
    candidates: sa.Select[Any], reason: LeaveReason, source: Source, rows: bool, changed: bool
) -> _Statement:
    at = NOW
    decided = _decided(candidates, at)
    pairs_ = decided.pairs
    policy = _policies()
    targets = [
        memberships.c.bucket_id == pairs_.c.bucket_id,
        memberships.c.contact_id == pairs_.c.contact_id,
        memberships.c.status == "active",
        policy.c.bucket_id == memberships.c.bucket_id,
        _not_later(at),
    ]
    deferred = None
    if reason == "criteria":
        too_early = sa.and_(
            policy.c.min_dwell.is_not(None), memberships.c.entered_at > at - policy.c.min_dwell
        )
        deferred = (
            sa.update(memberships)
            .where(*targets, too_early)
            .values(
                pending_leave_at=sa.func.coalesce(
                    memberships.c.pending_leave_at, memberships.c.entered_at + policy.c.min_dwell
                ),
                last_evaluated_at=at,
            )
            .returning(memberships.c.id, memberships.c.bucket_id, memberships.c.contact_id)
            .cte("deferred")
        )
        targets.append(~too_early)
    flipped = (
        sa.update(memberships)
        .where(*targets)
        .values(
            status="left",
            left_at=at,
            leave_reason=reason,
            pending_leave_at=None,
            last_evaluated_at=at,
            updated_at=sa.func.now(),
        )
        .returning(
            memberships.c.id,
            memberships.c.bucket_id,
            memberships.c.contact_id,
            memberships.c.entry_count,
            pairs_.c.event_id,
        )
        .cte("flipped")
    )
    silent = reason == "contact_deleted"
    written = _ledger(
        sa.select(
            flipped.c.bucket_id,
            flipped.c.contact_id,
            flipped.c.id,
            sa.literal("left"),
            flipped.c.entry_count,
            sa.literal(reason),
            sa.literal(source),
            sa.literal(not silent),
            sa.literal("contact_deleted") if silent else sa.null(),
            at,
            transition_key_sql(
                flipped.c.bucket_id, contacts.c.external_id, "left", flipped.c.entry_count
            ),
            flipped.c.event_id,
        ).join(contacts, contacts.c.id == flipped.c.contact_id)
    )
    return _report(decided, written, deferred=deferred, rows=rows, changed=changed)


def _not_later(at: ColumnElement[Any]) -> ColumnElement[bool]:
    """The membership row was not evaluated as of an instant later than ``at``."""
    return sa.or_(memberships.c.last_evaluated_at.is_(None), memberships.c.last_evaluated_at <= at)


def settle(
    conn: Connection,
    candidates: Candidates,
    *,
    now: datetime,
    clear_pending: bool,
) -> list[int]:
    """Members re-evaluated with no change: stamp ``last_evaluated_at``; with
    ``clear_pending``, also drop a deferred leave (the contact qualifies again, SPEC §5.5).
    Returns the contacts whose rows it stamped."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    select, given = _candidates(candidates)
    statement = _settle_statement(select, clear_pending)
    return list(conn.execute(statement, {**given, "now": now}).scalars())


@lru_cache(maxsize=32)
def _settle_statement(candidates: sa.Select[Any], clear_pending: bool) -> Any:
    decided = _decided(candidates, NOW)
    values: dict[str, Any] = {"last_evaluated_at": NOW}
    if clear_pending:
        values["pending_leave_at"] = None
    return (
        sa.update(memberships)
        .where(
            memberships.c.bucket_id == decided.pairs.c.bucket_id,
            memberships.c.contact_id == decided.pairs.c.contact_id,
            memberships.c.status == "active",
            _not_later(NOW),
        )
        .values(**values)
        .returning(memberships.c.contact_id)
    )


@dataclass(frozen=True)
class Locked:
    """Contacts whose row locks this transaction now holds."""

    ids: list[int]  # those still present, in id order
    decided_at: datetime | None  # the latest instant any of them was decided as of (watermark)

    def as_of(self, now: datetime) -> datetime:
        """The instant to decide them as of: ``now``, or later if one was decided later."""
        return max(now, self.decided_at) if self.decided_at is not None else now


def watermark() -> ColumnElement[Any]:
    """Per ``contacts`` row: the latest instant the engine decided anything for the contact as
    of — its ``decided_at`` or its membership rows' ``last_evaluated_at`` (NULL: never)."""
    evaluated = (
        sa.select(sa.func.max(memberships.c.last_evaluated_at))
        .where(memberships.c.contact_id == contacts.c.id)
        .scalar_subquery()
    )
    return sa.func.greatest(contacts.c.decided_at, evaluated)


def lock_contacts(conn: Connection, contact_ids: Sequence[int]) -> Locked:
    """Take the row locks of ``contact_ids`` (in id order)."""
    if not contact_ids:
        return Locked([], None)
    query = (
        sa.select(contacts.c.id, watermark().label("watermark"))
        .where(contacts.c.id == sa.any_(_array(sorted(set(contact_ids)), sa.BigInteger())))
        .order_by(contacts.c.id)
        .with_for_update(of=contacts, key_share=True)
    )
    rows = conn.execute(query).all()
    return Locked([row.id for row in rows], latest_of(row.watermark for row in rows))


def latest_of(instants: Iterable[datetime | None]) -> datetime | None:
    found = [instant for instant in instants if instant is not None]
    return max(found) if found else None


def record_decided(conn: Connection, contact_ids: Sequence[int], now: datetime) -> None:
    """Record that these (locked) contacts were decided as of ``now``."""
    if contact_ids:
        conn.execute(
            sa.update(contacts)
            .where(contacts.c.id == sa.any_(_array(sorted(contact_ids), sa.BigInteger())))
            .values(decided_at=sa.func.greatest(contacts.c.decided_at, sa.literal(now, TIMESTAMP)))
        )


def redecide_stale(
    conn: Connection,
    changes: Changes,
    now: datetime,
    candidates_for: Callable[[list[int], datetime], sa.Select[Any]],
    apply: Callable[[sa.Select[Any], datetime], Changes],
) -> Changes:
    """Finish a snapshot-based pass: lock the contacts ``changes.stale`` names (changed after
    the snapshot, or decided as of an instant later than ``now``) and apply the same operation
    to them again, deciding from data read after the locks were taken, as of ``now`` or the
    latest instant they were decided as of. ``candidates_for(ids, as_of)`` must select the
    pass's candidates among ``ids`` *without* a ``revision`` column (the locks already
    serialise them)."""
    if not changes.stale:
        return changes
    locked = lock_contacts(conn, [contact_id for _, contact_id in changes.stale])
    changes.stale = []
    if locked.ids:
        as_of = locked.as_of(now)
        changes.add(apply(candidates_for(locked.ids, as_of), as_of))
    return changes
