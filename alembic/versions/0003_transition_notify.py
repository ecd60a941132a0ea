"""notify dispatchers when emitted transitions are written

A statement-level trigger with a transition table: one ``NOTIFY buckets_transitions`` per
INSERT statement that wrote at least one emitted transition (a bulk reconcile statement
notifies once; suppressed-only statements not at all). Delivered at commit, so a dispatcher
woken by it finds the rows committed. Written by hand: autogenerate does not see triggers.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 14:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION buckets_notify_transitions() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF EXISTS (SELECT 1 FROM written WHERE emitted) THEN
                PERFORM pg_notify('buckets_transitions', '');
            END IF;
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER trg_bucket_transitions_notify
        AFTER INSERT ON bucket_transitions
        REFERENCING NEW TABLE AS written
        FOR EACH STATEMENT EXECUTE FUNCTION buckets_notify_transitions()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER trg_bucket_transitions_notify ON bucket_transitions")
    op.execute("DROP FUNCTION buckets_notify_transitions()")
