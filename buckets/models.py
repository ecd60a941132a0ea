"""SQLAlchemy 2 declarative models for every table of SPEC §2.

Design notes (decisions the spec leaves open):

* Enumerations (``status``, ``kind``, ``source``, …) are ``text`` columns with named CHECK
  constraints rather than PostgreSQL ENUM types: adding a value is then a one-line migration
  and no type has to be dropped on downgrade.
* Invariants that can be stated per row are CHECK constraints, so no producer (ingest, cron,
  backfill, an operator with psql) can write an inconsistent row: an active membership has no
  ``left_at``; a left one has both ``left_at`` and ``leave_reason``; an ``entered`` transition has
  no reason and a ``left`` one has; a transition is either emitted or names what suppressed it.
* ``bucket_id`` is not a foreign key: buckets are defined in code and identified by their slug;
  ``bucket_configs`` holds operator state about them, not their existence.
* Foreign keys to ``contacts`` do not cascade: nothing but the explicit erase operation (SPEC
  §11) removes a contact's rows, and it does so deliberately, table by table.
* Index choices follow PERFORMANCE-NOTES.md; each index says which query it serves.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# Allowed values, shared with the code that writes them.
MEMBERSHIP_STATUSES = ("active", "left")
MEMBERSHIP_SOURCES = ("ingest", "reconcile", "backfill", "admin")
LEAVE_REASONS = ("criteria", "max_dwell", "contact_deleted", "admin")
TRANSITION_KINDS = ("entered", "left")
# `queue_fill`: computes a bucket's due-queue entries (upgrades, re-enables); changes no membership.
BACKFILL_MODES = ("first_time", "reevaluate", "admin", "queue_fill")
BACKFILL_STATUSES = ("pending", "running", "completed", "failed", "cancelled")
BACKFILL_ACTIVE_STATUSES = ("pending", "running")
# `skipped`: the journey already had an active enrollment for the contact and does not allow a
# second concurrent one; the row records that the transition was seen (exactly once).
ENROLLMENT_STATUSES = ("active", "completed", "exited", "failed", "skipped")


def _one_of(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"


def _timestamp(*, nullable: bool = True) -> Mapped[Any]:
    return mapped_column(DateTime(timezone=True), nullable=nullable)


def _created_at() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


def _updated_at() -> Mapped[datetime]:
    return mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now(), onupdate=func.now()
    )


def _json_object() -> Mapped[dict[str, Any]]:
    return mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))


class Base(DeclarativeBase):
    metadata = metadata


class Contact(Base):
    """A person, keyed by the caller's ``external_id``."""

    __tablename__ = "contacts"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    external_id: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    email: Mapped[str | None] = mapped_column(Text)  # trimmed and lower-cased by the writer
    properties: Mapped[dict[str, Any]] = _json_object()
    deleted_at: Mapped[datetime | None] = _timestamp()
    # Bumped by every write that can change what criteria see (an event, a property change, a
    # soft delete). Set-based membership writers lock the contact row and compare it with the
    # revision their snapshot saw: a contact changed since is re-decided from fresh data
    # (see buckets.membership).
    revision: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    # The latest `now` as of which a per-contact producer (ingest, a due-queue chunk) decided
    # this contact's memberships. Decisions are monotone in time: nobody applies a decision
    # made as of an earlier instant (see buckets.membership).
    decided_at: Mapped[datetime | None] = _timestamp()
    # Per top-level property key, the instant (ISO-8601 text with offset) of the ingest call
    # that last gave it a different value (SPEC §3.4 "held for"), written by ingest's merge in
    # the same statement; a key absent here takes ``created_at``.
    property_changed_at: Mapped[dict[str, Any]] = _json_object()
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()

    __table_args__ = (
        CheckConstraint("jsonb_typeof(properties) = 'object'", name="properties_is_object"),
        CheckConstraint(
            "jsonb_typeof(property_changed_at) = 'object'", name="property_changed_at_is_object"
        ),
        CheckConstraint("external_id <> ''", name="external_id_not_empty"),
    )


class UserEvent(Base):
    """Something a contact did, at ``occurred_at``."""

    __tablename__ = "user_events"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    contact_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("contacts.id"), nullable=False)
    event: Mapped[str] = mapped_column(Text, nullable=False)
    properties: Mapped[dict[str, Any]] = _json_object()
    occurred_at: Mapped[datetime] = _timestamp(nullable=False)
    idempotency_key: Mapped[str | None] = mapped_column(Text, unique=True)
    received_at: Mapped[datetime] = _timestamp(nullable=False)

    __table_args__ = (
        CheckConstraint("jsonb_typeof(properties) = 'object'", name="properties_is_object"),
        CheckConstraint(
            "event <> '' AND NOT starts_with(event, 'bucket:')", name="event_name_allowed"
        ),
        # Every set-based criteria query: index-only GroupAggregate over one event in contact
        # order, and per-contact probes (PERFORMANCE-NOTES.md: best or tied-best everywhere).
        Index("ix_user_events_event_contact_id_occurred_at", "event", "contact_id", "occurred_at"),
        # A contact's whole timeline (explain, erase) and the FK from contacts.
        Index("ix_user_events_contact_id_occurred_at", "contact_id", "occurred_at"),
    )


class BucketConfig(Base):
    """Operator state about a code-defined bucket."""

    __tablename__ = "bucket_configs"

    bucket_id: Mapped[str] = mapped_column(Text, primary_key=True)
    # The operator's override; NULL follows the definition's `enabled` (SPEC §8).
    enabled: Mapped[bool | None] = mapped_column(Boolean)
    # Fingerprint of the criteria the membership was last materialised for; NULL until the
    # first-time backfill completed (SPEC §6.4).
    criteria_hash: Mapped[str | None] = mapped_column(Text)
    definition: Mapped[dict[str, Any] | None] = mapped_column(JSONB)  # last deployed definition
    # The `now` of the last full reconcile (every member and candidate examined) completed for
    # this bucket, and the cron slot it ran for: a second worker firing the same slot finds it
    # done and skips the bucket.
    reconciled_at: Mapped[datetime | None] = _timestamp()
    reconciled_slot: Mapped[datetime | None] = _timestamp()
    # The due-queue fingerprint (criteria + clock rules) the bucket's entries in `bucket_due`
    # are complete for; NULL while they are not (new database, disabled, criteria changed):
    # the cron then examines the whole bucket until a job has filled them (buckets.due).
    due_hash: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class BucketMembership(Base):
    """One epoch of one contact in one bucket. Re-entry inserts a new row."""

    __tablename__ = "bucket_memberships"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    bucket_id: Mapped[str] = mapped_column(Text, nullable=False)
    contact_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("contacts.id"), nullable=False)
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'active'"))
    entered_at: Mapped[datetime] = _timestamp(nullable=False)
    left_at: Mapped[datetime | None] = _timestamp()
    entry_count: Mapped[int] = mapped_column(Integer, nullable=False)  # the epoch, 1-based
    source: Mapped[str] = mapped_column(Text, nullable=False)
    max_dwell_at: Mapped[datetime | None] = _timestamp()
    pending_leave_at: Mapped[datetime | None] = _timestamp()
    last_evaluated_at: Mapped[datetime | None] = _timestamp()
    leave_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()

    __table_args__ = (
        CheckConstraint(_one_of("status", MEMBERSHIP_STATUSES), name="status_allowed"),
        CheckConstraint(_one_of("source", MEMBERSHIP_SOURCES), name="source_allowed"),
        CheckConstraint(_one_of("leave_reason", LEAVE_REASONS), name="leave_reason_allowed"),
        CheckConstraint("entry_count >= 1", name="entry_count_positive"),
        CheckConstraint(
            "(status = 'active' AND left_at IS NULL AND leave_reason IS NULL)"
            " OR (status = 'left' AND left_at IS NOT NULL AND leave_reason IS NOT NULL)",
            name="left_fields_match_status",
        ),
        # One row per epoch: two racing joins can never both write epoch n. Also serves
        # "1 + number of prior rows" and a contact's history in one bucket.
        UniqueConstraint("bucket_id", "contact_id", "entry_count"),
        # Exactly one active membership per (bucket, contact) — SPEC §2.
        Index(
            "uq_bucket_memberships_one_active",
            "bucket_id",
            "contact_id",
            unique=True,
            postgresql_where=text("status = 'active'"),
        ),
        # Max-dwell TTL leaves: bitmap heap scan over due rows (PERFORMANCE-NOTES.md).
        Index(
            "ix_bucket_memberships_max_dwell_due",
            "bucket_id",
            "max_dwell_at",
            postgresql_where=text("status = 'active' AND max_dwell_at IS NOT NULL"),
        ),
        # Due min-dwell (pending) leaves.
        Index(
            "ix_bucket_memberships_pending_leave_due",
            "bucket_id",
            "pending_leave_at",
            postgresql_where=text("status = 'active' AND pending_leave_at IS NOT NULL"),
        ),
        # A contact's memberships across buckets (soft delete, erase, explain).
        Index("ix_bucket_memberships_contact_id", "contact_id"),
    )


class BucketDue(Base):
    """The due queue: for a (bucket, contact) whose answer the clock alone can change, the
    first instant it may change (a lower bound). Owned by :mod:`buckets.due`."""

    __tablename__ = "bucket_due"

    # No foreign key (written in bulk next to the ledger; erase deletes by contact_id).
    contact_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    bucket_id: Mapped[str] = mapped_column(Text, primary_key=True)
    due_at: Mapped[datetime] = _timestamp(nullable=False)

    __table_args__ = (
        # What is due per bucket, oldest first; the next due instant; backlog and lag.
        Index("ix_bucket_due_bucket_id_due_at", "bucket_id", "due_at"),
    )


class WorkerHeartbeat(Base):
    """One row per worker process (``buckets run``): alive since, last heartbeat, last tick.
    Written by :mod:`workflows.worker`, read by ``buckets status`` and the readiness checks
    (:mod:`buckets.health`)."""

    __tablename__ = "worker_heartbeats"

    worker_id: Mapped[str] = mapped_column(Text, primary_key=True)  # host:pid:random
    hostname: Mapped[str] = mapped_column(Text, nullable=False)
    pid: Mapped[int] = mapped_column(Integer, nullable=False)
    reconcile_cron: Mapped[str] = mapped_column(Text, nullable=False)
    started_at: Mapped[datetime] = _timestamp(nullable=False)
    beat_at: Mapped[datetime] = _timestamp(nullable=False)  # the worker's clock at its last beat
    last_tick_at: Mapped[datetime | None] = _timestamp()  # the `now` of its last reconcile tick
    stopped_at: Mapped[datetime | None] = _timestamp()  # a graceful shutdown


CATALOG_KINDS = ("event", "property")


class CatalogEntry(Base):
    """What ingest has seen: event names and contact property keys, with how many times and
    when first and last (``buckets.catalog``; advisory, maintained once per ingest chunk)."""

    __tablename__ = "catalog_entries"

    kind: Mapped[str] = mapped_column(Text, primary_key=True)  # event | property
    name: Mapped[str] = mapped_column(Text, primary_key=True)
    seen: Mapped[int] = mapped_column(BigInteger, nullable=False)
    first_seen_at: Mapped[datetime] = _timestamp(nullable=False)
    last_seen_at: Mapped[datetime] = _timestamp(nullable=False)

    __table_args__ = (
        CheckConstraint(_one_of("kind", CATALOG_KINDS), name="kind_allowed"),
        CheckConstraint("seen >= 0", name="seen_not_negative"),
    )


class BucketTransition(Base):
    """The ledger and outbox: one row per membership change, written with the change."""

    __tablename__ = "bucket_transitions"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    bucket_id: Mapped[str] = mapped_column(Text, nullable=False)
    # No foreign keys here: a ledger row is only ever written in the same statement as the
    # membership row it records (buckets.membership), and the checks cost about a quarter of a
    # bulk join's time (bench/reconcile.py). Erasure deletes by contact_id explicitly.
    contact_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    membership_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    epoch: Mapped[int] = mapped_column(Integer, nullable=False)
    reason: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str] = mapped_column(Text, nullable=False)
    emitted: Mapped[bool] = mapped_column(Boolean, nullable=False)
    suppressed_by: Mapped[str | None] = mapped_column(Text)
    occurred_at: Mapped[datetime] = _timestamp(nullable=False)  # the decision's `now`
    # bucket:<bucket_id>:<contact external_id>:<kind>:<epoch>
    idempotency_key: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    dispatched_at: Mapped[datetime | None] = _timestamp()
    # The ingested event whose evaluation caused it (NULL for the cron, backfills, admin): a
    # replayed idempotency key returns the transitions its first ingest performed.
    event_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = _created_at()

    __table_args__ = (
        CheckConstraint(_one_of("kind", TRANSITION_KINDS), name="kind_allowed"),
        CheckConstraint(_one_of("reason", LEAVE_REASONS), name="reason_allowed"),
        CheckConstraint(_one_of("source", MEMBERSHIP_SOURCES), name="source_allowed"),
        CheckConstraint("epoch >= 1", name="epoch_positive"),
        CheckConstraint(
            "(kind = 'entered' AND reason IS NULL) OR (kind = 'left' AND reason IS NOT NULL)",
            name="reason_matches_kind",
        ),
        CheckConstraint(
            "(emitted AND suppressed_by IS NULL) OR (NOT emitted AND suppressed_by IS NOT NULL)",
            name="suppression_explained",
        ),
        # The dispatcher's queue: emitted and not yet dispatched, in ledger order.
        Index(
            "ix_bucket_transitions_undispatched",
            "id",
            postgresql_where=text("emitted AND dispatched_at IS NULL"),
        ),
        # The ledger of one bucket / one contact, newest first (keyset pagination on id).
        Index("ix_bucket_transitions_bucket_id_id", "bucket_id", "id"),
        Index("ix_bucket_transitions_contact_id_id", "contact_id", "id"),
        Index(
            "ix_bucket_transitions_event_id",
            "event_id",
            postgresql_where=text("event_id IS NOT NULL"),
        ),
    )


class BackfillJob(Base):
    """A resumable materialisation of one bucket (SPEC §7)."""

    __tablename__ = "backfill_jobs"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    bucket_id: Mapped[str] = mapped_column(Text, nullable=False)
    mode: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'pending'"))
    total: Mapped[int | None] = mapped_column(BigInteger)  # NULL until counted
    processed: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    joined: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    left: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    cursor: Mapped[dict[str, Any] | None] = mapped_column(JSONB)  # resume point
    # The job decides as of this instant from its first chunk to its last (SPEC §1).
    as_of: Mapped[datetime] = _timestamp(nullable=False)
    # Admin jobs only: emit `entered` for joins (through the entry-limit gate).
    emit_joins: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))
    # The criteria fingerprint the job materialises; stored on bucket_configs on completion.
    criteria_hash: Mapped[str | None] = mapped_column(Text)
    lease_owner: Mapped[str | None] = mapped_column(Text)
    lease_expires_at: Mapped[datetime | None] = _timestamp()
    heartbeat_at: Mapped[datetime | None] = _timestamp()
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None] = _timestamp()
    finished_at: Mapped[datetime | None] = _timestamp()
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()

    __table_args__ = (
        CheckConstraint(_one_of("mode", BACKFILL_MODES), name="mode_allowed"),
        CheckConstraint(_one_of("status", BACKFILL_STATUSES), name="status_allowed"),
        CheckConstraint(
            'processed >= 0 AND joined >= 0 AND "left" >= 0 AND (total IS NULL OR total >= 0)',
            name="counters_not_negative",
        ),
        # At most one non-terminal job per bucket — SPEC §2.
        Index(
            "uq_backfill_jobs_one_active",
            "bucket_id",
            unique=True,
            postgresql_where=text(_one_of("status", BACKFILL_ACTIVE_STATUSES)),
        ),
        Index("ix_backfill_jobs_bucket_id_id", "bucket_id", "id"),
    )


class JourneyEnrollment(Base):
    """One journey run for one transition; unique per (journey, transition)."""

    __tablename__ = "journey_enrollments"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    journey_id: Mapped[str] = mapped_column(Text, nullable=False)
    contact_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("contacts.id"), nullable=False)
    transition_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("bucket_transitions.id"), nullable=False
    )
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'active'"))
    # Handler delivery (at-least-once): attempts so far, when to try next, when it succeeded.
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    next_attempt_at: Mapped[datetime | None] = _timestamp()
    delivered_at: Mapped[datetime | None] = _timestamp()
    last_error: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[datetime | None] = _timestamp()  # completed, exited or failed
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()

    __table_args__ = (
        CheckConstraint(_one_of("status", ENROLLMENT_STATUSES), name="status_allowed"),
        # Handler deliveries still owed (new, or waiting for a retry), in due order.
        Index(
            "ix_journey_enrollments_delivery_due",
            "next_attempt_at",
            postgresql_where=text("delivered_at IS NULL AND status = 'active'"),
        ),
        UniqueConstraint("journey_id", "transition_id"),
        # A contact's active enrollments (exit on `left`, no second concurrent run).
        Index(
            "ix_journey_enrollments_active_contact",
            "contact_id",
            "journey_id",
            postgresql_where=text("status = 'active'"),
        ),
        Index("ix_journey_enrollments_transition_id", "transition_id"),
    )


def _table(model: type[Base]) -> Table:
    return cast(Table, model.__table__)


# Core tables, typed as Table, for the set-based statements (insert/update need a Table).
contacts = _table(Contact)
user_events = _table(UserEvent)
bucket_configs = _table(BucketConfig)
bucket_memberships = _table(BucketMembership)
bucket_transitions = _table(BucketTransition)
backfill_jobs = _table(BackfillJob)
journey_enrollments = _table(JourneyEnrollment)
bucket_due = _table(BucketDue)
worker_heartbeats = _table(WorkerHeartbeat)
catalog_entries = _table(CatalogEntry)
