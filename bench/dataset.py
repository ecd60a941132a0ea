"""The benchmarks' dataset: the generator's contacts and events, loaded once per database."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine

from bench.generate import generate
from buckets.db import create_engine, resolve_database_url
from buckets.migrations import upgrade
from buckets.settings import load_settings

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def prepare(database_url: str | None, contacts: int, events_per_contact: int) -> tuple[Engine, URL]:
    """Migrate the database and load ``contacts`` generated contacts (seed 42, as of
    :data:`NOW`) unless it already holds exactly that many."""
    url = resolve_database_url(load_settings(database_url=database_url))
    engine = create_engine(url)
    upgrade(engine)
    with engine.connect() as conn:
        present = conn.execute(sa.text("SELECT count(*) FROM contacts")).scalar_one()
    if present != contacts:
        loaded = generate(
            url, contacts=contacts, events_per_contact=events_per_contact, now=NOW, reset=True
        )
        print(loaded.summary())
    with engine.connect() as conn:
        events = conn.execute(sa.text("SELECT count(*) FROM user_events")).scalar_one()
    print(f"dataset: {contacts:,} contacts, {events:,} events; now = {NOW.isoformat()}")
    return engine, url


Marks = tuple[int, int]  # the highest contact id and event id of the dataset as loaded


def marks(engine: Engine) -> Marks:
    """Where the dataset ends: rows above these ids are a run's own (see :func:`clean`)."""
    with engine.connect() as conn:
        found = conn.execute(
            sa.text("SELECT (SELECT max(id) FROM contacts), (SELECT max(id) FROM user_events)")
        ).one()
    return int(found[0]), int(found[1])


def clean(conn: Connection, until: Marks) -> None:
    """Undo a run's engine state in ``conn``'s transaction: memberships, ledger, enrollments,
    configs and queue, the contacts' decision marks, and the contacts and events it added."""
    conn.execute(
        sa.text(
            "TRUNCATE journey_enrollments, bucket_transitions, bucket_memberships,"
            " bucket_configs, bucket_due"
        )
    )
    conn.execute(sa.text("UPDATE contacts SET decided_at = NULL WHERE decided_at IS NOT NULL"))
    conn.execute(sa.text("DELETE FROM user_events WHERE id > :id"), {"id": until[1]})
    conn.execute(sa.text("DELETE FROM contacts WHERE id > :id"), {"id": until[0]})
