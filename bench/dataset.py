"""The benchmarks' dataset: the generator's contacts and events, loaded once per database."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine

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
