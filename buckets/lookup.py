"""Reading memberships for targeting: "which of these buckets is this person in?"

An ad server or a feature-flag service asks it on every request, so the answer is one
statement whatever the number of contacts and buckets asked about: the contacts by their
unique ``external_id``, left-joined to their active membership rows (through the contact
index, or the one-active-row index when buckets are named). Unknown and deleted contacts are
absent from the answer (callers tell "unknown" from "in no bucket"). Memberships are read as
they stand, a disabled bucket's included (SPEC §8).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY

from buckets.errors import BucketsError
from buckets.inputs import text_problem
from buckets.models import bucket_memberships, contacts
from buckets.runtime import Runtime, get_runtime

MAX_CONTACTS = 1000
MAX_BUCKETS = 1000


class LookupInputError(BucketsError, ValueError):
    """A bad lookup argument; ``field`` names it (``contacts[3]``, ``buckets``)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class ActiveMembership:
    bucket_id: str
    since: datetime  # entered_at of the active row
    epoch: int  # the row's entry_count
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "bucket_id": self.bucket_id,
            "since": self.since.isoformat(),
            "epoch": self.epoch,
            "source": self.source,
        }


def _ids(values: Iterable[str], field: str, limit: int) -> list[str]:
    if isinstance(values, str | bytes):
        raise LookupInputError(field, "expected a list of strings, got one string")
    found: list[str] = []
    for index, value in enumerate(values):
        if index >= limit:
            raise LookupInputError(field, f"more than {limit:,} items")
        if not isinstance(value, str) or not value:
            raise LookupInputError(f"{field}[{index}]", "expected a non-empty string")
        problem = text_problem(value)
        if problem is not None:
            raise LookupInputError(f"{field}[{index}]", problem)
        found.append(value)
    return found


def _statement(with_buckets: bool) -> sa.Select[Any]:
    m = bucket_memberships
    joined = (m.c.contact_id == contacts.c.id) & (m.c.status == "active")
    if with_buckets:
        joined &= m.c.bucket_id == sa.any_(sa.bindparam("buckets", type_=ARRAY(sa.Text())))
    return (
        sa.select(
            contacts.c.external_id, m.c.bucket_id, m.c.entered_at, m.c.entry_count, m.c.source
        )
        .select_from(contacts.outerjoin(m, joined))
        .where(
            contacts.c.external_id == sa.any_(sa.bindparam("ids", type_=ARRAY(sa.Text()))),
            contacts.c.deleted_at.is_(None),
        )
        .order_by(contacts.c.external_id, m.c.bucket_id)
    )


_STATEMENTS = {flag: _statement(flag) for flag in (False, True)}


def memberships(
    external_ids: Iterable[str],
    buckets: Iterable[str] | None = None,
    *,
    runtime: Runtime | None = None,
) -> dict[str, list[ActiveMembership]]:
    """The active memberships of each known contact of ``external_ids`` (at most 1,000), in
    ``buckets`` only when given (ids of loaded buckets, at most 1,000; an unknown one raises
    :class:`~buckets.registry.UnknownBucketError`). Unknown and deleted contacts are absent;
    a known contact in no bucket maps to ``[]``. One statement."""
    rt = get_runtime(runtime)
    ids = _ids(external_ids, "contacts", MAX_CONTACTS)
    wanted = None if buckets is None else _ids(buckets, "buckets", MAX_BUCKETS)
    for bucket_id in wanted or ():
        rt.registry.get(bucket_id)
    if not ids or wanted == []:
        return {} if not ids else _known_only(rt, ids)
    params: dict[str, Any] = {"ids": sorted(set(ids))}
    if wanted is not None:
        params["buckets"] = sorted(set(wanted))
    with rt.engine.connect() as conn:
        rows = conn.execute(_STATEMENTS[wanted is not None], params).all()
    found: dict[str, list[ActiveMembership]] = {}
    for external_id, bucket_id, since, epoch, source in rows:
        held = found.setdefault(external_id, [])
        if bucket_id is not None:
            held.append(ActiveMembership(bucket_id, since, epoch, source))
    return found


def _known_only(rt: Runtime, ids: list[str]) -> dict[str, list[ActiveMembership]]:
    """``buckets=[]``: no bucket asked about; still tell known contacts from unknown ones."""
    with rt.engine.connect() as conn:
        known = conn.execute(
            sa.select(contacts.c.external_id).where(
                contacts.c.external_id == sa.any_(sa.literal(sorted(set(ids)), ARRAY(sa.Text()))),
                contacts.c.deleted_at.is_(None),
            )
        ).scalars()
        return {external_id: [] for external_id in known}
