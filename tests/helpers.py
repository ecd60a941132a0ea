"""Small helpers the engine-level tests share (reading memberships, marking buckets deployed)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from buckets.models import bucket_configs, bucket_memberships, contacts


def deployed(rt: Any, *buckets: Any) -> None:
    """As if each bucket's first-time backfill had completed (the cron may join)."""
    with rt.engine.begin() as conn:
        for bucket in buckets:
            conn.execute(
                pg_insert(bucket_configs)
                .values(bucket_id=bucket.id, criteria_hash=bucket.fingerprint)
                .on_conflict_do_update(
                    index_elements=[bucket_configs.c.bucket_id],
                    set_={"criteria_hash": bucket.fingerprint},
                )
            )


def active(rt: Any, bucket_id: str) -> set[str]:
    """The external ids of the bucket's active members."""
    with rt.engine.connect() as conn:
        return set(
            conn.execute(
                sa.select(contacts.c.external_id)
                .join(bucket_memberships, bucket_memberships.c.contact_id == contacts.c.id)
                .where(
                    bucket_memberships.c.bucket_id == bucket_id,
                    bucket_memberships.c.status == "active",
                )
            ).scalars()
        )
