"""Manual buckets (SPEC §3.5): members added and removed by explicit calls.

A manual bucket has ``criteria: {type: manual}``. No producer that decides from criteria touches
its memberships (ingest never finds it affected, it has no clock and no due-queue entries, the
cron skips it, backfills complete without a change); only :func:`add_members` /
:func:`remove_members` (and the CLI and HTTP API built on them) do, and contact deletion and
erasure, which leave every bucket.

Each call is **one transaction**, set-based whatever the number of ids:

1. the ids are validated in Python (every one, before anything is written), de-duplicated
   (a repeated id counts once, and is counted in ``duplicates``) and loaded into a temporary
   table with ``COPY``;
2. ``add`` creates the unknown contacts (one ``INSERT … SELECT``, in external-id order like
   ingest), then numbers the targets in contact-id order;
3. per chunk of :data:`CHUNK_SIZE` targets: one statement locks the chunk's contacts (in id order,
   as every producer locks: :mod:`buckets.membership`) and counts who is already a member /
   deleted; one :func:`~buckets.membership.join` (entry limit, ledger ``source='admin'``) or
   :func:`~buckets.membership.leave` (``reason='admin'``) statement changes the memberships;
   then, in the same transaction, the buckets that refer to this one are re-decided for the
   contacts whose membership changed, transitively and in dependency order
   (:func:`buckets.references.cascade`), and contacts the call created are decided for the
   buckets a new contact may match (:attr:`Registry.on_creation`: all-negative, ``everyone``,
   ``sample``) exactly as ingest decides a new contact.

Transitions are emitted like any other (journeys start on ``entered`` and are exited on ``left``)
and the entry limit gates the emission of re-entries.

Decisions where the spec is silent:

* an id given twice in one call is counted once (``duplicates`` says how many repeats);
* a soft-deleted contact is not revived and not added (``deleted_contacts``), as on ingest;
* removing an id no contact has is a no-op counted in ``not_members`` (no contact is created);
* a disabled bucket (SPEC §8) is refused with an error, nothing written: a disabled bucket's
  members are left untouched and nothing is emitted for it;
* decisions are monotone in time (:mod:`buckets.membership`): a pair whose membership row was
  decided as of an instant later than the call's ``now`` is left alone (``unchanged``);
* ``dry_run`` counts with read-only queries (what would be added, created, removed) and writes
  nothing; it does not predict the entry limit's emissions.
"""

from __future__ import annotations

import io
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from buckets.decide import Ask
from buckets.definitions import Bucket
from buckets.errors import BucketsError
from buckets.inputs import instant_problem, shorten, text_problem
from buckets.membership import Changes, Pairs, Policy, join, leave
from buckets.models import bucket_memberships as memberships
from buckets.models import contacts
from buckets.references import cascade
from buckets.runtime import Runtime, get_runtime

Action = Literal["add", "remove"]
CHUNK_SIZE = 50_000  # targets per join/leave statement
MAX_ID_LENGTH = 255  # as ingest (buckets.validation)
_COPY_BLOCK = 1 << 20  # characters written to COPY at a time


class ManualBucketError(BucketsError):
    """The bucket cannot take explicit members: not a manual bucket, or disabled."""

    def __init__(self, bucket_id: str, message: str) -> None:
        super().__init__(f"{bucket_id}: {message}")
        self.bucket_id = bucket_id
        self.message = message


class MemberIdError(BucketsError):
    """An external id of the input is not acceptable; ``where`` names it (``external_ids[3]``,
    or ``line 4`` for a file)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}; nothing was written")
        self.where = where
        self.message = message


def id_problem(value: object) -> str | None:
    """Why ``value`` is not an acceptable external id (None: it is): a non-empty string of at
    most 255 characters, without control characters (tabs and line breaks included) or
    surrounding whitespace, storable by PostgreSQL."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not value:
        return "must not be empty"
    if len(value) > MAX_ID_LENGTH:
        return f"longer than {MAX_ID_LENGTH} characters"
    problem = text_problem(value)
    if problem is not None:
        return problem
    if not value.isprintable():
        for index, char in enumerate(value):
            if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"):
                return f"contains a control character ({ascii(char)[1:-1]} at index {index})"
    if value != value.strip():
        return f"has leading or trailing whitespace: {shorten(value)}"
    return None


@dataclass
class Ids:
    """Validated external ids, each once, in first-seen order."""

    ids: list[str]
    duplicates: int = 0


def unique_ids(external_ids: Iterable[object] | Ids) -> Ids:
    """Validate every id (raising :class:`MemberIdError` for the first bad one) and drop
    repeats (``Ids`` already validated, e.g. by :mod:`buckets.member_files`, pass as they are)."""
    if isinstance(external_ids, Ids):
        return external_ids
    if isinstance(external_ids, str | bytes):
        raise MemberIdError("external_ids", "must be a list of ids, not a single string")
    seen: dict[str, None] = {}
    given = 0
    for index, value in enumerate(external_ids):
        problem = id_problem(value)
        if problem is not None:
            raise MemberIdError(f"external_ids[{index}]", problem)
        assert isinstance(value, str)
        seen[value] = None
        given += 1
    return Ids(list(seen), given - len(seen))


@dataclass
class MembersResult:
    """What one add/remove call did (or, with ``dry_run``, would do)."""

    bucket_id: str
    action: Action
    now: datetime
    dry_run: bool = False
    given: int = 0  # distinct ids
    duplicates: int = 0  # repeats of an id already given in this call
    added: int = 0
    already_members: int = 0
    created_contacts: int = 0
    deleted_contacts: int = 0  # soft-deleted: never added (not revived)
    removed: int = 0
    not_members: int = 0
    unchanged: int = 0  # rows decided as of a later instant than now: left alone
    emitted: int = 0  # transitions of this bucket delivered to journeys
    suppressed: int = 0  # joins the entry limit kept from journeys
    # The memberships this call changed, every bucket (the manual one, and those created
    # contacts joined): bucket id -> contact ids. What a cascade to dependent buckets reads.
    changed: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "bucket_id": self.bucket_id,
            "action": self.action,
            "now": self.now.isoformat(),
            "dry_run": self.dry_run,
            "given": self.given,
            "duplicates": self.duplicates,
        }
        if self.action == "add":
            out |= {
                "added": self.added,
                "already_members": self.already_members,
                "created_contacts": self.created_contacts,
                "deleted_contacts": self.deleted_contacts,
            }
        else:
            out |= {"removed": self.removed, "not_members": self.not_members}
        out |= {"unchanged": self.unchanged, "emitted": self.emitted, "suppressed": self.suppressed}
        return out

    def record(self, changes: Changes) -> None:
        """Add the membership changes of one statement."""
        counts = changes.per_bucket.get(self.bucket_id)
        if counts is not None:
            self.emitted += counts.emitted
            self.suppressed += counts.suppressed


Progress = Callable[[int], None]  # called with how many ids were processed so far


def add_members(
    bucket_id: str,
    external_ids: Iterable[str] | Ids,
    now: datetime | None = None,
    *,
    runtime: Runtime | None = None,
    dry_run: bool = False,
    chunk_size: int = CHUNK_SIZE,
    progress: Progress | None = None,
) -> MembersResult:
    """Make the contacts ``external_ids`` members of the manual bucket ``bucket_id`` as of
    ``now`` (default: the clock), in one transaction; unknown contacts are created."""
    return _run("add", bucket_id, external_ids, now, runtime, dry_run, chunk_size, progress)


def remove_members(
    bucket_id: str,
    external_ids: Iterable[str] | Ids,
    now: datetime | None = None,
    *,
    runtime: Runtime | None = None,
    dry_run: bool = False,
    chunk_size: int = CHUNK_SIZE,
    progress: Progress | None = None,
) -> MembersResult:
    """End the memberships of ``external_ids`` in the manual bucket ``bucket_id`` as of ``now``
    (``reason='admin'``), in one transaction; ids that are not members are a no-op."""
    return _run("remove", bucket_id, external_ids, now, runtime, dry_run, chunk_size, progress)


def manual_bucket(rt: Runtime, conn: Connection, bucket_id: str) -> Bucket:
    """The bucket, if it is manual and enabled (else :class:`ManualBucketError`; an unknown id
    raises :class:`~buckets.registry.UnknownBucketError`)."""
    bucket = rt.registry.get(bucket_id)
    if not bucket.manual:
        kind = getattr(bucket.criteria, "type", "?")
        raise ManualBucketError(
            bucket.id,
            f"not a manual bucket (its criteria are of type {kind!r}): only buckets with"
            " criteria {type: manual} take explicit members; nothing was written",
        )
    if not rt.enabled.is_enabled(conn, bucket):
        raise ManualBucketError(bucket.id, "the bucket is disabled; nothing was written")
    return bucket


def _run(  # noqa: PLR0917 - the two public functions' arguments
    action: Action,
    bucket_id: str,
    external_ids: Iterable[str] | Ids,
    now: datetime | None,
    runtime: Runtime | None,
    dry_run: bool,
    chunk_size: int,
    progress: Progress | None,
) -> MembersResult:
    rt = get_runtime(runtime)
    at = now if now is not None else datetime.now(UTC)
    if not isinstance(at, datetime):
        raise MemberIdError("now", f"must be a datetime, got {type(at).__name__}")
    problem = instant_problem(at, rt.settings.min_instant, rt.settings.max_instant)
    if problem is not None:
        raise MemberIdError("now", problem)
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    with rt.engine.connect() as conn:  # a bad bucket is refused before the ids are read
        manual_bucket(rt, conn, bucket_id)
    ids = unique_ids(external_ids)
    result = MembersResult(
        bucket_id, action, at, dry_run=dry_run, given=len(ids.ids), duplicates=ids.duplicates
    )
    with rt.engine.connect() as conn, conn.begin() as transaction:
        bucket = manual_bucket(rt, conn, bucket_id)
        _load(conn, ids.ids)
        if dry_run:  # read-only counts; the temporary table goes with the rollback
            _dry_run(conn, bucket, result)
            transaction.rollback()
            return result
        if action == "add":
            result.created_contacts = conn.execute(_CREATE, {"now": at}).scalar_one()
        total = _targets_count(conn)
        # As the primitives do for their bulk passes (buckets.membership._run): statistics lag
        # the rows this call writes (a bucket's first add starts from none), and a sequential
        # scan of the memberships chosen on them runs once per pair: quadratic. Rule it out.
        conn.execute(sa.text("SET LOCAL enable_seqscan = off"))
        missing = len(ids.ids) - total  # remove: ids no contact has
        result.not_members = missing
        done = 0
        for low in range(0, total, chunk_size):
            span = {"chunk_lo": low, "chunk_hi": low + chunk_size, "manual_bucket": bucket.id}
            _chunk(rt, conn, bucket, action, at, span, result)
            done = min(low + chunk_size, total)
            if progress is not None:
                progress(done + missing)
        if progress is not None and done + missing < len(ids.ids):
            progress(len(ids.ids))
    return result


def _chunk(  # noqa: PLR0917 - one chunk's context
    rt: Runtime,
    conn: Connection,
    bucket: Bucket,
    action: Action,
    now: datetime,
    span: dict[str, Any],
    result: MembersResult,
) -> None:
    """One chunk of targets: lock their contacts (in id order), count, join or leave, then
    cascade to the buckets that refer to this one and decide the created contacts' other
    buckets."""
    live, deleted, members = conn.execute(_lock_statement(), span).one()
    policies = [Policy.of(bucket)]
    candidates = Pairs(_candidates(), span)
    if action == "add":
        changes = join(conn, candidates, policies, now=now, source="admin", changed=True)
        result.added += changes.joined
        result.already_members += members
        result.deleted_contacts += deleted
        result.unchanged += live - members - changes.joined
    else:
        changes = leave(
            conn, candidates, policies, now=now, reason="admin", source="admin", changed=True
        )
        result.removed += changes.left
        result.not_members += live + deleted - members
        result.unchanged += members - changes.left
    result.record(changes)
    if changes.changed:
        result.changed.setdefault(bucket.id, []).extend(changes.changed)
    created = _created_asks(rt, conn, span) if action == "add" else []
    if not changes.changed and not created:
        return
    # In the chunk's transaction, under its locks: the buckets that refer to this one, for
    # the contacts whose membership changed, and the created contacts' on-creation buckets,
    # each at its level of the reference graph, transitively (SPEC §3.5).
    outcome = cascade(
        conn,
        rt.registry,
        {bucket.id: changes.changed} if changes.changed else {},
        now,
        source="admin",
        asks=created,
        enabled=lambda buckets: rt.enabled.enabled(conn, buckets),
        universe=tuple(rt.registry.buckets.values()),
    )
    for transition in outcome.changes.transitions:
        result.changed.setdefault(transition.bucket_id, []).append(transition.contact_id)


def _created_asks(rt: Runtime, conn: Connection, span: dict[str, Any]) -> list[Ask]:
    """The chunk's contacts this call created, asked of every bucket a new contact may match,
    as ingest decides a contact's first event (their locks are held)."""
    if not rt.registry.on_creation:
        return []
    created = list(conn.execute(_created_statement(), span).scalars())
    if not created:
        return []
    buckets = rt.enabled.enabled(conn, rt.registry.on_creation)
    return [Ask(bucket, contact_id) for contact_id in created for bucket in buckets]


# --- the temporary tables and statements ------------------------------------------------------

_ids = sa.table("manual_ids", sa.column("external_id", sa.Text()))
_created = sa.table("manual_created", sa.column("id", sa.BigInteger()))
_targets = sa.table(
    "manual_targets",
    sa.column("n", sa.BigInteger()),
    sa.column("contact_id", sa.BigInteger()),
    sa.column("created", sa.Boolean()),
)
_LOW = sa.bindparam("chunk_lo", type_=sa.BigInteger())
_HIGH = sa.bindparam("chunk_hi", type_=sa.BigInteger())
_BUCKET = sa.bindparam("manual_bucket", type_=sa.Text())


def _load(conn: Connection, ids: list[str]) -> None:
    """The ids into ``manual_ids`` (dropped at commit) with ``COPY``: text format, where only
    the backslash needs escaping (ids have no control characters)."""
    conn.execute(
        sa.text("CREATE TEMPORARY TABLE manual_ids (external_id text NOT NULL) ON COMMIT DROP")
    )
    conn.execute(
        sa.text("CREATE TEMPORARY TABLE manual_created (id bigint PRIMARY KEY) ON COMMIT DROP")
    )
    raw: Any = conn.connection.driver_connection
    with raw.cursor() as cursor, cursor.copy("COPY manual_ids (external_id) FROM STDIN") as copy:
        buffer = io.StringIO()
        for external_id in ids:
            buffer.write(external_id.replace("\\", "\\\\") if "\\" in external_id else external_id)
            buffer.write("\n")
            if buffer.tell() >= _COPY_BLOCK:
                copy.write(buffer.getvalue())
                buffer = io.StringIO()
        if buffer.tell():
            copy.write(buffer.getvalue())
    conn.execute(sa.text("ANALYZE manual_ids"))


# Unknown contacts, created in external-id order (as ingest creates them), remembered in
# manual_created; the statement returns how many.
_CREATE = sa.text(
    """
    WITH inserted AS (
        INSERT INTO contacts (external_id, created_at)
        SELECT m.external_id, :now FROM manual_ids m
        WHERE NOT EXISTS (SELECT FROM contacts c WHERE c.external_id = m.external_id)
        ORDER BY m.external_id
        ON CONFLICT (external_id) DO NOTHING
        RETURNING id
    ), kept AS (
        INSERT INTO manual_created (id) SELECT id FROM inserted RETURNING id
    )
    SELECT count(*) FROM kept
    """
).bindparams(sa.bindparam("now", type_=sa.DateTime(timezone=True)))

# The ids' contacts, numbered in contact-id order (chunks lock in that order).
_TARGETS = (
    "CREATE TEMPORARY TABLE manual_targets ON COMMIT DROP AS"
    " SELECT row_number() OVER (ORDER BY c.id) AS n, c.id AS contact_id,"
    " EXISTS (SELECT FROM manual_created k WHERE k.id = c.id) AS created"
    " FROM manual_ids m JOIN contacts c ON c.external_id = m.external_id",
    "CREATE UNIQUE INDEX ON manual_targets (n)",
    "ANALYZE manual_targets",
)


def _targets_count(conn: Connection) -> int:
    for statement in _TARGETS:
        conn.execute(sa.text(statement))
    return int(conn.execute(sa.select(sa.func.count()).select_from(_targets)).scalar_one())


def _in_chunk() -> sa.ColumnElement[bool]:
    return sa.and_(_targets.c.n > _LOW, _targets.c.n <= _HIGH)


@lru_cache(maxsize=1)
def _lock_statement() -> sa.Select[int, int, int]:
    """Lock the chunk's contacts (id order, ``FOR NO KEY UPDATE`` like every producer) and count
    them: live, deleted, and live ones already active members of the bucket. Each contact is
    locked by a primary-key probe of its own (a lateral subquery with its locking clause is
    never turned into a join that scans every contact up to the chunk's last id)."""
    is_member = (
        sa.exists()
        .where(
            memberships.c.bucket_id == _BUCKET,
            memberships.c.contact_id == contacts.c.id,
            memberships.c.status == "active",
        )
        .label("member")
    )
    ordered = (  # targets are numbered in contact-id order
        sa.select(_targets.c.contact_id)
        .where(_in_chunk())
        .order_by(_targets.c.n)
        .offset(sa.literal_column("0"))
        .subquery("ordered")
    )
    lock = (
        sa.select(contacts.c.deleted_at, is_member)
        .where(contacts.c.id == ordered.c.contact_id)
        .with_for_update(of=contacts, key_share=True)
        .lateral("lock")
    )
    locked = (
        sa.select(lock.c.deleted_at, lock.c.member)
        .select_from(ordered.join(lock, sa.true()))
        .subquery("locked")
    )
    live = locked.c.deleted_at.is_(None)
    count = sa.func.count
    return sa.select(
        count().filter(live),
        count().filter(~live),
        count().filter(live & locked.c.member),
    )


@lru_cache(maxsize=1)
def _candidates() -> sa.Select[Any]:
    """The chunk's live contacts as (bucket, contact) pairs (their locks are held); whether a
    contact is deleted is a primary-key probe per target, not a join over every contact."""
    deleted_at = (
        sa.select(contacts.c.deleted_at)
        .where(contacts.c.id == _targets.c.contact_id)
        .scalar_subquery()
    )
    return sa.select(_BUCKET.label("bucket_id"), _targets.c.contact_id).where(
        _in_chunk(), deleted_at.is_(None)
    )


@lru_cache(maxsize=1)
def _created_statement() -> sa.Select[Any]:
    return (
        sa.select(_targets.c.contact_id)
        .where(_in_chunk(), _targets.c.created)
        .order_by(_targets.c.contact_id)
    )


def _dry_run(conn: Connection, bucket: Bucket, result: MembersResult) -> None:
    """The counts, read-only: contacts that exist (live / deleted), members among them."""
    is_member = sa.exists().where(
        memberships.c.bucket_id == bucket.id,
        memberships.c.contact_id == contacts.c.id,
        memberships.c.status == "active",
    )
    live = contacts.c.deleted_at.is_(None)
    count = sa.func.count
    known, deleted, members = conn.execute(
        sa.select(count(), count().filter(~live), count().filter(live & is_member)).join_from(
            _ids, contacts, contacts.c.external_id == _ids.c.external_id
        )
    ).one()
    if result.action == "add":
        result.created_contacts = result.given - known
        result.deleted_contacts = deleted
        result.already_members = members
        result.added = result.given - deleted - members
    else:
        result.removed = members
        result.not_members = result.given - members
