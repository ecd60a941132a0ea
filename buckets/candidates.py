"""The candidate sets of set-based producers (the cron reconcile and backfills).

Each is a ``SELECT bucket_id, contact_id, revision`` the membership primitives take as it is
(``revision`` makes them lock and check the contacts, see :mod:`buckets.membership`), or with
``without_revision`` for the second, locked pass over contacts that changed meanwhile.

Plan robustness. Bulk writes move these tables faster than statistics follow; right after a
bucket's first chunk the planner may still believe the bucket is empty. The "is an active
member" check is therefore kept a per-row index probe on ``(bucket_id, contact_id)`` (an
``OFFSET 0`` stops PostgreSQL from turning it into a join it would plan on stale estimates:
measured quadratic at 1M contacts).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from buckets.criteria import compile_criteria, probe_predicate
from buckets.criteria.held import History
from buckets.definitions import Bucket
from buckets.membership import Changes, Policy, Source, join, leave, redecide_stale
from buckets.models import bucket_memberships as memberships
from buckets.models import contacts

IdRange = tuple[int, int]


def is_active_member(bucket_id: str, contact_id: ColumnElement[Any]) -> ColumnElement[bool]:
    """An index probe per row (see the module docstring for the ``OFFSET 0``)."""
    probe = (
        sa.select(sa.literal(1))
        .where(
            memberships.c.bucket_id == bucket_id,
            memberships.c.contact_id == contact_id,
            memberships.c.status == "active",
        )
        .offset(sa.literal_column("0"))
    )
    return sa.exists(probe)


def matching_non_members(
    bucket: Bucket,
    now: datetime,
    *,
    id_range: IdRange | None = None,
    contact_ids: Sequence[int] | None = None,
) -> sa.Select[Any]:
    """Contacts matching the criteria as of ``now`` (compiled, set-based) that are not active
    members: the joiners."""
    members = compile_criteria(
        bucket.criteria, now, id_range=id_range, contact_ids=contact_ids
    ).members()
    return members.with_only_columns(
        sa.literal(bucket.id).label("bucket_id"),
        contacts.c.id.label("contact_id"),
        contacts.c.revision,
    ).where(~is_active_member(bucket.id, contacts.c.id))


# The member's contact, fetched per membership row by primary key (OFFSET 0: never turned into
# a join over every contact, which is what stale estimates pick and what costs a full scan of
# contacts per chunk for a handful of leavers).
member_contact = (
    sa.select(
        contacts.c.revision,
        contacts.c.deleted_at,
        contacts.c.properties,
        contacts.c.external_id,
        contacts.c.property_changed_at,  # held_for reads these two
        contacts.c.created_at,
    )
    .where(contacts.c.id == memberships.c.contact_id)
    .offset(sa.literal_column("0"))
    .lateral("member_contact")
)


def active_members(bucket: Bucket, *where: Any, id_range: IdRange | None = None) -> sa.Select[Any]:
    """The bucket's active members satisfying ``where`` (which may use :data:`member_contact`),
    with their contact's revision."""
    if id_range is not None:
        where = (memberships.c.contact_id.between(*id_range), *where)
    return (
        sa.select(memberships.c.bucket_id, memberships.c.contact_id, member_contact.c.revision)
        .select_from(memberships.join(member_contact, sa.true()))
        .where(memberships.c.bucket_id == bucket.id, memberships.c.status == "active", *where)
    )


def failing(bucket: Bucket, now: datetime) -> ColumnElement[bool]:
    """A member's criteria fail as of ``now`` (per-member probes), or its contact is deleted."""
    return sa.or_(member_contact.c.deleted_at.is_not(None), ~holding(bucket, now))


def holding(bucket: Bucket, now: datetime) -> ColumnElement[bool]:
    """A member's criteria hold as of ``now`` (per-member probes)."""
    return probe_predicate(
        bucket.criteria,
        now,
        memberships.c.contact_id,
        properties=member_contact.c.properties,
        external_id=member_contact.c.external_id,
        history=History(member_contact.c.property_changed_at, member_contact.c.created_at),
    )


def failing_members(
    bucket: Bucket, now: datetime, *where: Any, id_range: IdRange | None = None
) -> sa.Select[Any]:
    """Members whose criteria no longer hold: the leavers."""
    return active_members(bucket, failing(bucket, now), *where, id_range=id_range)


def without_revision(candidates: sa.Select[Any]) -> sa.Select[Any]:
    """The same candidates for a pass over contacts already locked: no revision check."""
    return candidates.with_only_columns(
        *(column for column in candidates.selected_columns if column.name != "revision")
    )


def join_matching(
    conn: Connection,
    bucket: Bucket,
    now: datetime,
    *,
    id_range: IdRange | None,
    source: Source,
    silent: bool = False,
    changed: bool = False,
) -> Changes:
    """Set-based joins of every matching non-member in ``id_range`` (the exact join of the
    cron, the materialisation of backfills), finishing contacts changed since the snapshot
    under their locks."""
    policy = [Policy.of(bucket)]

    def apply(candidates: sa.Select[Any], as_of: datetime) -> Changes:
        return join(
            conn, candidates, policy, now=as_of, source=source, silent=silent, changed=changed
        )

    changes = apply(matching_non_members(bucket, now, id_range=id_range), now)
    return redecide_stale(
        conn,
        changes,
        now,
        lambda ids, as_of: without_revision(matching_non_members(bucket, as_of, contact_ids=ids)),
        apply,
    )


def leave_failing(
    conn: Connection,
    bucket: Bucket,
    now: datetime,
    *,
    id_range: IdRange | None,
    source: Source,
    changed: bool = False,
) -> Changes:
    """Set-based ``criteria`` leaves of every failing member in ``id_range`` (min dwell
    defers some), finishing contacts changed since the snapshot under their locks."""
    policy = [Policy.of(bucket)]

    def apply(candidates: sa.Select[Any], as_of: datetime) -> Changes:
        return leave(
            conn,
            candidates,
            policy,
            now=as_of,
            reason="criteria",
            source=source,
            changed=changed,
        )

    changes = apply(failing_members(bucket, now, id_range=id_range), now)
    return redecide_stale(
        conn,
        changes,
        now,
        lambda ids, as_of: without_revision(
            failing_members(bucket, as_of, memberships.c.contact_id.in_(ids))
        ),
        apply,
    )


def ttl_expired(
    conn: Connection, bucket: Bucket, now: datetime, *, id_range: IdRange | None, source: Source
) -> Changes:
    """``max_dwell`` leaves of every member in ``id_range`` whose ``max_dwell_at`` has passed,
    whatever the criteria. Locked like the other passes (every writer of a contact's
    memberships holds its lock, so none can deadlock on another's rows)."""
    policy = [Policy.of(bucket)]

    def expired(as_of: datetime) -> ColumnElement[bool]:
        return memberships.c.max_dwell_at <= sa.literal(as_of, sa.DateTime(timezone=True))

    def apply(candidates: sa.Select[Any], as_of: datetime) -> Changes:
        return leave(
            conn,
            candidates,
            policy,
            now=as_of,
            reason="max_dwell",
            source=source,
            changed=True,
        )

    changes = apply(active_members(bucket, expired(now), id_range=id_range), now)
    return redecide_stale(
        conn,
        changes,
        now,
        lambda ids, as_of: without_revision(
            active_members(bucket, expired(as_of), memberships.c.contact_id.in_(ids))
        ),
        apply,
    )
