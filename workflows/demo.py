"""``buckets demo``: the whole engine on a realistic dataset, in well under a minute.

1. migrate the database (the embedded PostgreSQL unless one is configured) and load ~10k
   synthetic contacts with their last 90 days of events (:mod:`workflows.synthetic`);
2. deploy :mod:`workflows.demo_buckets` — a power-users count bucket, the went-dormant
   lapsed pair with an entry limit and a max dwell, a trial property bucket with a max dwell,
   trial-ending (an instant within the next 3 days) and abandoned-cart (a sequence with an
   absent step) — and run their first-time backfills: every historical match joins **silently**;
3. simulate a few days in steps of ``now``: each day some contacts come back, some keep
   working, some fill a cart (most order within the hour), a few start trials or upgrade; the
   events are ingested (real-time joins and leaves), the cron reconcile runs (dormancy joins,
   window and TTL leaves, abandoned carts), and the dispatcher enrolls journeys. Each day
   prints its transitions, the emissions the entry limits suppressed, and the journey
   enrollments;
4. explain one contact.

The database is left as it ends, to explore with the other commands (``--definitions
workflows.demo_buckets``).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import groupby
from typing import Any

import sqlalchemy as sa

from buckets.dispatcher import dispatch_once
from buckets.errors import BucketsError
from buckets.explain import explain
from buckets.ingest import ingest_events
from buckets.migrations import upgrade
from buckets.models import bucket_memberships, bucket_transitions, contacts
from buckets.runtime import Runtime
from workflows import demo_buckets
from workflows.backfill import Runner, deploy
from workflows.reconcile import reconcile
from workflows.synthetic import ENGINE_TABLES, generate

DEFINITIONS = "workflows.demo_buckets"
DAY = timedelta(days=1)
TRIAL = 14 * DAY


@dataclass
class Step:
    day: datetime
    events: int
    transitions: Counter[tuple[str, str]] = field(default_factory=Counter)
    suppressed: Counter[str] = field(default_factory=Counter)
    enrolled: Counter[str] = field(default_factory=Counter)
    exited: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "now": self.day.isoformat(),
            "events": self.events,
            "transitions": {f"{b}:{k}": n for (b, k), n in sorted(self.transitions.items())},
            "suppressed": dict(self.suppressed),
            "enrolled": dict(self.enrolled),
            "exited": self.exited,
        }

    def lines(self) -> list[str]:
        out = [f"{self.day:%Y-%m-%d %H:%M} — {self.events:,} events ingested"]
        for bucket in sorted({b for b, _ in self.transitions}):
            entered = self.transitions[(bucket, "entered")]
            left = self.transitions[(bucket, "left")]
            muted = self.suppressed[bucket]
            note = f" ({muted} of them suppressed by the entry limit)" if muted else ""
            out.append(f"    {bucket:<14} +{entered:<5} -{left:<5}{note}")
        if self.enrolled or self.exited:
            joined = ", ".join(f"{j} {n}" for j, n in sorted(self.enrolled.items()))
            out.append(f"    journeys: enrolled {joined or 'none'}; exited {self.exited}")
        return out


def _reset_or_refuse(rt: Runtime, reset: bool) -> None:
    with rt.engine.begin() as conn:
        present = conn.execute(sa.select(sa.func.count()).select_from(contacts)).scalar_one()
        if present and not reset:
            raise BucketsError(
                f"the database already holds {present:,} contacts: `buckets demo --reset`"
                " empties the engine's tables first"
            )
        conn.execute(sa.text(f"TRUNCATE {', '.join(ENGINE_TABLES)} RESTART IDENTITY"))


def _day_of_events(rng: random.Random, now: datetime, contacts_count: int, day: int) -> list[Any]:
    """One simulated day: returning and regular users, new trials, upgrades."""
    events: list[dict[str, Any]] = []

    def at() -> str:
        return (now - timedelta(seconds=rng.randint(60, 86_000))).isoformat()

    for contact in rng.sample(range(1, contacts_count + 1), contacts_count // 12):
        who = f"u{contact:08d}"
        for _ in range(rng.choice([1, 1, 2, 3, 5])):
            events.append({"external_id": who, "event": "feature.used", "occurred_at": at()})
        if rng.random() < 0.1:
            events.append({"external_id": who, "event": "page.viewed", "occurred_at": at()})
    for contact in rng.sample(range(1, contacts_count + 1), contacts_count // 50):
        who, added = f"u{contact:08d}", now - timedelta(seconds=rng.randint(60, 86_000))
        events.append({"external_id": who, "event": "cart.added", "occurred_at": added.isoformat()})
        if rng.random() < 0.6:  # most carts are ordered within the hour; the rest are abandoned
            ordered = added + timedelta(seconds=rng.randint(30, 3_000))
            if ordered <= now:
                events.append(
                    {
                        "external_id": who,
                        "event": "order.completed",
                        "occurred_at": ordered.isoformat(),
                    }
                )
    for signup in range(contacts_count // 100):
        signed_up = now - timedelta(seconds=rng.randint(60, 86_000))
        events.append(
            {
                "external_id": f"demo-{day}-{signup}",
                "event": "signup",
                "occurred_at": signed_up.isoformat(),
                "contact_properties": {
                    "plan": "trial",
                    "trial_ends_at": (signed_up + TRIAL).isoformat(),
                },
            }
        )
    for contact in rng.sample(range(1, contacts_count + 1), contacts_count // 200):
        events.append(
            {
                "external_id": f"u{contact:08d}",
                "event": "plan.upgraded",
                "occurred_at": at(),
                "contact_properties": {"plan": "pro"},
            }
        )
    return events


def _ingest_as_they_happen(rt: Runtime, events: list[dict[str, Any]]) -> None:
    """Ingest a day's events hour by hour in time order, each hour as of its last event, as a
    live stream would arrive (an order placed 20 minutes after its cart is seen before the
    cart's hour is up, so the cart is never abandoned)."""
    events = sorted(events, key=lambda event: str(event["occurred_at"]))
    for _, hour in groupby(events, key=lambda event: str(event["occurred_at"])[:13]):
        batch = list(hour)
        ingest_events(batch, now=datetime.fromisoformat(batch[-1]["occurred_at"]), runtime=rt)


def run_demo(
    rt: Runtime,
    *,
    now: datetime,
    contacts_count: int = 10_000,
    days: int = 4,
    reset: bool = False,
    say: Callable[[str], None] = print,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> dict[str, Any]:
    """Run the demo; ``progress(done, total)`` after each of its stages (the load, each
    first-time backfill, each simulated day)."""
    start = now - days * DAY
    upgrade(rt.engine)
    _reset_or_refuse(rt, reset)
    stages = 1 + len(rt.registry) + days  # a reset database: a first-time job per bucket
    done_stages = 0

    def advanced() -> None:
        nonlocal done_stages
        done_stages += 1
        progress(done_stages, stages)

    progress(0, stages)
    loaded = generate(rt.engine.url, contacts=contacts_count, events_per_contact=20, now=start)
    advanced()
    say(
        f"loaded {loaded.contacts:,} contacts and {loaded.events:,} events"
        f" (90 days up to {start:%Y-%m-%d})"
    )

    runner = Runner(rt, clock=lambda: start)
    backfilled = {}
    for job in deploy(rt, start):
        done = runner.run(job.id)
        backfilled[done.bucket_id] = done.joined
        say(f"first-time backfill of {done.bucket_id}: {done.joined:,} members, joined silently")
        advanced()
    with rt.engine.connect() as conn:
        emitted = conn.execute(
            sa.select(sa.func.count()).where(bucket_transitions.c.emitted)
        ).scalar_one()
    say(f"emitted transitions so far: {emitted} (no historical blast)\n")

    rng = random.Random(7)
    steps = []
    demo_buckets.DELIVERED.clear()
    for day in range(1, days + 1):
        at = start + day * DAY
        events = _day_of_events(rng, at, contacts_count, day)
        with rt.engine.connect() as conn:
            mark = conn.execute(
                sa.select(sa.func.coalesce(sa.func.max(bucket_transitions.c.id), 0))
            ).scalar_one()
        _ingest_as_they_happen(rt, events)
        reconcile(at, runtime=rt)
        dispatched = dispatch_once(rt, now=at)
        step = Step(at, len(events), exited=dispatched.exited)
        with rt.engine.connect() as conn:
            for row in conn.execute(
                sa.select(
                    bucket_transitions.c.bucket_id,
                    bucket_transitions.c.kind,
                    bucket_transitions.c.emitted,
                ).where(bucket_transitions.c.id > mark)
            ):
                step.transitions[(row.bucket_id, row.kind)] += 1
                if not row.emitted:
                    step.suppressed[row.bucket_id] += 1
        step.enrolled.update(enrollment.journey_id for enrollment in demo_buckets.DELIVERED)
        demo_buckets.DELIVERED.clear()
        steps.append(step)
        for line in step.lines():
            say(line)
        advanced()

    with rt.engine.connect() as conn:
        someone = conn.execute(
            sa.select(contacts.c.external_id)
            .join(bucket_memberships, bucket_memberships.c.contact_id == contacts.c.id)
            .where(
                bucket_memberships.c.bucket_id == "went-dormant",
                bucket_memberships.c.status == "active",
            )
            .order_by(bucket_memberships.c.id.desc())
            .limit(1)
        ).scalar()
    explained = explain("went-dormant", someone, now=now, runtime=rt) if someone else None
    return {
        "contacts": loaded.contacts,
        "events": loaded.events,
        "backfilled": backfilled,
        "steps": [step.to_dict() for step in steps],
        "explain": explained,
    }
