"""catalogue of seen event names and contact property keys

``catalog_entries``: per (kind, name), how many times ingest saw it and when first and last
(``buckets.catalog``), so deploying and listing definitions can warn about a bucket naming an
event or a key never seen (a typo otherwise found weeks later). Filled from the data already
there: every event name of ``user_events`` (count, first and last ``received_at``) and every
top-level key of live contacts' properties (how many contacts hold it, their first
``created_at`` and last ``updated_at``): one pass over each table.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 00:15:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "catalog_entries",
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("seen", sa.BigInteger(), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "kind IN ('event', 'property')", name=op.f("ck_catalog_entries_kind_allowed")
        ),
        sa.CheckConstraint("seen >= 0", name=op.f("ck_catalog_entries_seen_not_negative")),
        sa.PrimaryKeyConstraint("kind", "name", name=op.f("pk_catalog_entries")),
    )
    op.execute(
        "INSERT INTO catalog_entries (kind, name, seen, first_seen_at, last_seen_at)"
        " SELECT 'event', event, count(*), min(received_at), max(received_at)"
        " FROM user_events GROUP BY event"
    )
    op.execute(
        "INSERT INTO catalog_entries (kind, name, seen, first_seen_at, last_seen_at)"
        " SELECT 'property', key, count(*), min(c.created_at), max(c.updated_at)"
        " FROM contacts c, jsonb_object_keys(c.properties) AS key"
        " WHERE c.deleted_at IS NULL GROUP BY key"
    )


def downgrade() -> None:
    op.drop_table("catalog_entries")
