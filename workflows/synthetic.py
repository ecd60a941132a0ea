"""Realistic synthetic contacts and events, loaded with COPY (deterministic for a seed).

Used by ``buckets demo``, the tests and the benchmarks; ``python -m bench.generate`` is its
command line.

The shape (what later tests and benchmarks rely on):

* contacts: ``plan`` free/pro/trial, ``country`` (skewed), ``signup_at`` (ISO string),
  ``seats`` (int, pro only: a key that is often missing), ``marketing_opt_in`` (bool, sometimes
  JSON null), ``trial_ends_at`` (trial only); email ``user<id>@example.com``;
* events over the 90 days before ``now``, never after it: ~10 names with skewed popularity;
  events per contact log-normally distributed around ``--events-per-contact`` (a few heavy
  users, many light ones), timestamps skewed towards each contact's last activity;
* by construction ~60% of contacts ever fired ``feature.used`` and ~25% fired it in the last
  7 days (active users have one inside the window; lapsed users' activity ends before it).

Contacts get ids after the current maximum, so runs append; ``--reset`` empties the engine's
tables first. The schema is migrated to head if needed.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL
from sqlalchemy.schema import AddConstraint, CreateIndex, DropConstraint, DropIndex

from buckets.models import UserEvent, metadata

DAY = 86_400.0
HISTORY_DAYS = 90
EVER_FEATURE_SHARE = 0.60
RECENT_FEATURE_SHARE = 0.25  # of all contacts: feature.used within the last 7 days
RECENT_WINDOW = 7 * DAY
ACTIVITY_SIGMA = 1.0  # log-normal spread of events per contact

PLANS = (("free", 0.55), ("pro", 0.25), ("trial", 0.20))
COUNTRIES = (
    ("US", 0.30),
    ("DE", 0.15),
    ("FR", 0.10),
    ("GB", 0.10),
    ("IN", 0.10),
    ("BR", 0.08),
    ("JP", 0.07),
    ("CA", 0.05),
    ("ES", 0.05),
)
# Event names and their share of a contact's events (feature.used only for feature users).
EVENT_WEIGHTS = (
    ("page.viewed", 0.30),
    ("feature.used", 0.25),
    ("session.started", 0.15),
    ("email.opened", 0.08),
    ("search.performed", 0.06),
    ("email.clicked", 0.05),
    ("purchase.completed", 0.04),
    ("invite.sent", 0.03),
    ("support.ticket.created", 0.02),
    ("plan.upgraded", 0.02),
)
FEATURES = ("export", "dashboard", "api", "alerts", "reports")
PATHS = ("/", "/pricing", "/docs", "/settings", "/blog", "/integrations")
ENGINE_TABLES = (
    "journey_enrollments",
    "bucket_transitions",
    "bucket_memberships",
    "backfill_jobs",
    "bucket_configs",
    "user_events",
    "contacts",
)


@dataclass(frozen=True)
class GenerateResult:
    contacts: int
    events: int
    ever_feature_used: int
    recent_feature_used: int
    first_contact_id: int
    seconds: float

    def summary(self) -> str:
        ever = 100.0 * self.ever_feature_used / max(self.contacts, 1)
        recent = 100.0 * self.recent_feature_used / max(self.contacts, 1)
        return (
            f"loaded {self.contacts:,} contacts and {self.events:,} events in "
            f"{self.seconds:.1f} s ({self.events / max(self.seconds, 1e-9):,.0f} events/s); "
            f"feature.used ever: {ever:.1f}%, in the last 7 days: {recent:.1f}%"
        )


def _cumulative(weights: tuple[tuple[str, float], ...]) -> tuple[list[str], list[float]]:
    names = [name for name, _ in weights]
    cumulative, total = [], 0.0
    for _, weight in weights:
        total += weight
        cumulative.append(total)
    return names, cumulative


def _timestamp(epoch: float) -> str:
    # COPY text accepts ISO 8601; microsecond precision like the engine's own writes.
    return datetime.fromtimestamp(epoch, UTC).isoformat()


class _Generator:
    """Draws contacts and their events from one seeded random stream."""

    def __init__(self, seed: int, now: datetime, events_per_contact: int) -> None:
        self.rng = random.Random(seed)
        self.now = now.timestamp()
        self.mean_events = events_per_contact
        self.plans = _cumulative(PLANS)
        self.countries = _cumulative(COUNTRIES)
        self.all_events = _cumulative(EVENT_WEIGHTS)
        self.other_events = _cumulative(
            tuple((name, weight) for name, weight in EVENT_WEIGHTS if name != "feature.used")
        )
        self.ever_feature = 0
        self.recent_feature = 0

    def contact_row(self, contact_id: int) -> str:
        rng = self.rng
        plan = rng.choices(self.plans[0], cum_weights=self.plans[1])[0]
        country = rng.choices(self.countries[0], cum_weights=self.countries[1])[0]
        if plan == "trial":
            signup = self.now - rng.uniform(0, 14) * DAY
            extra = f', "trial_ends_at": "{_timestamp(signup + 14 * DAY)}"'
        else:
            signup = self.now - rng.uniform(14, 730) * DAY
            extra = f', "seats": {rng.randint(1, 50)}' if plan == "pro" else ""
        roll = rng.random()
        opt_in = "null" if roll < 0.05 else ("true" if roll < 0.70 else "false")
        properties = (
            f'{{"plan": "{plan}", "country": "{country}", "signup_at": "{_timestamp(signup)}", '
            f'"marketing_opt_in": {opt_in}{extra}}}'
        )
        return f"{contact_id}\tu{contact_id:08d}\tuser{contact_id}@example.com\t{properties}\n"

    def event_rows(self, contact_id: int) -> Iterator[str]:
        rng = self.rng
        weight = rng.lognormvariate(-(ACTIVITY_SIGMA**2) / 2, ACTIVITY_SIGMA)  # mean 1
        count = max(1, round(self.mean_events * weight))
        feature_user = rng.random() < EVER_FEATURE_SHARE
        # Among feature users, "active" ones used a feature in the last 7 days; everybody's
        # activity stops at `last_seen`, so lapsed users have nothing inside the window.
        active = rng.random() < (RECENT_FEATURE_SHARE / EVER_FEATURE_SHARE)
        start = self.now - HISTORY_DAYS * DAY
        if active:
            last_seen = self.now - rng.uniform(0, 2) * DAY
        else:
            last_seen = self.now - rng.uniform(RECENT_WINDOW + 3600, (HISTORY_DAYS - 1) * DAY)
        names, cumulative = self.all_events if feature_user else self.other_events
        chosen = rng.choices(names, cum_weights=cumulative, k=count)
        if feature_user:
            chosen[0] = "feature.used"
            self.ever_feature += 1
            if active:
                self.recent_feature += 1
        span = last_seen - start
        for index, name in enumerate(chosen):
            if index == 0 and feature_user and active:
                occurred = self.now - rng.uniform(0, RECENT_WINDOW - 60)
                occurred = min(occurred, last_seen)
            else:
                occurred = last_seen - span * rng.random() ** 2  # skewed towards last_seen
            stamp = _timestamp(occurred)
            yield f"{contact_id}\t{name}\t{self._properties(name)}\t{stamp}\t{stamp}\n"

    def _properties(self, name: str) -> str:
        rng = self.rng
        if name == "feature.used":
            return f'{{"feature": "{rng.choice(FEATURES)}"}}'
        if name == "page.viewed":
            return f'{{"path": "{rng.choice(PATHS)}"}}'
        if name == "purchase.completed":
            currency = "EUR" if rng.random() < 0.6 else "USD"
            return f'{{"amount": {rng.uniform(5, 500):.2f}, "currency": "{currency}"}}'
        if name in ("email.opened", "email.clicked"):
            return f'{{"campaign": "c{rng.randrange(20)}"}}'
        return "{}"


@contextmanager
def _indexes_built_after_load(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """Bulk-load fast path for an empty ``user_events``: drop its secondary indexes and FK,
    and rebuild them (from the models' metadata, so names and definitions cannot drift) after
    the COPY, in the same transaction. Sorting once beats 2M index insertions ~2.5x."""
    table = metadata.tables[UserEvent.__tablename__]
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    indexes = sorted(table.indexes, key=lambda index: str(index.name))
    foreign_keys = list(table.foreign_key_constraints)
    for fk in foreign_keys:
        conn.execute(str(DropConstraint(fk).compile(dialect=dialect)))
    for index in indexes:
        conn.execute(str(DropIndex(index).compile(dialect=dialect)))
    yield
    for index in indexes:
        conn.execute(str(CreateIndex(index).compile(dialect=dialect)))
    for fk in foreign_keys:
        conn.execute(str(AddConstraint(fk).compile(dialect=dialect)))


def _conninfo(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def generate(
    url: URL,
    *,
    contacts: int,
    events_per_contact: int,
    seed: int = 42,
    now: datetime,
    reset: bool = False,
    chunk_contacts: int = 2_000,
) -> GenerateResult:
    """Load ``contacts`` contacts and about ``contacts * events_per_contact`` events."""
    if contacts < 1 or events_per_contact < 1:
        raise ValueError("--contacts and --events-per-contact must be at least 1")
    if now.tzinfo is None:
        raise ValueError("--now must carry a timezone (e.g. 2026-11-22T12:00:00+00:00)")
    started = time.perf_counter()
    generator = _Generator(seed, now, events_per_contact)
    with psycopg.connect(_conninfo(url)) as conn:
        if reset:
            conn.execute(f"TRUNCATE {', '.join(ENGINE_TABLES)} RESTART IDENTITY")
        next_id = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM contacts").fetchone()
        first_id = int(next_id[0]) if next_id else 1
        last_id = first_id + contacts - 1
        events = 0
        contact_copy = "COPY contacts (id, external_id, email, properties) FROM STDIN"
        with conn.cursor().copy(contact_copy) as copy:
            for start in range(first_id, last_id + 1, chunk_contacts):
                stop = min(start + chunk_contacts, last_id + 1)
                copy.write("".join(generator.contact_row(cid) for cid in range(start, stop)))
        conn.execute("SELECT setval(pg_get_serial_sequence('contacts', 'id'), %s)", (last_id,))
        event_copy = (
            "COPY user_events (contact_id, event, properties, occurred_at, received_at) FROM STDIN"
        )
        empty = conn.execute("SELECT NOT EXISTS (SELECT 1 FROM user_events)").fetchone()
        bulk = _indexes_built_after_load(conn) if empty and empty[0] else nullcontext()
        with bulk, conn.cursor().copy(event_copy) as copy:
            for start in range(first_id, last_id + 1, chunk_contacts):
                stop = min(start + chunk_contacts, last_id + 1)
                rows = [row for cid in range(start, stop) for row in generator.event_rows(cid)]
                events += len(rows)
                copy.write("".join(rows))
        conn.commit()
        # Like a database autovacuum has caught up with: planner statistics, and a visibility
        # map so index-only scans need no heap visits (PERFORMANCE-NOTES.md measured so).
        conn.autocommit = True
        conn.execute("VACUUM (ANALYZE) contacts")
        conn.execute("VACUUM (ANALYZE) user_events")
    return GenerateResult(
        contacts=contacts,
        events=events,
        ever_feature_used=generator.ever_feature,
        recent_feature_used=generator.recent_feature,
        first_contact_id=first_id,
        seconds=time.perf_counter() - started,
    )


def measured_shares(url: URL, now: datetime, first_contact_id: int = 1) -> tuple[int, int, int]:
    """(contacts, ever fired feature.used, fired it in the 7 days up to ``now``), from the DB."""
    with psycopg.connect(_conninfo(url)) as conn:
        row = conn.execute(
            """
            SELECT (SELECT count(*) FROM contacts WHERE id >= %(first)s),
                   count(*),
                   count(*) FILTER (WHERE last_at >= %(now)s - interval '7 days')
            FROM (SELECT contact_id, max(occurred_at) AS last_at
                  FROM user_events
                  WHERE event = 'feature.used' AND contact_id >= %(first)s
                    AND occurred_at <= %(now)s
                  GROUP BY contact_id) AS feature_users
            """,
            {"first": first_contact_id, "now": now},
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])
