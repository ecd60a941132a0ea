"""8 threads ingest interleaved events for 50 shared contacts across 10 buckets.

Real threads, real connections, one fixed ``now`` (so every evaluation answers the same
question). Afterwards the membership must be exactly what the evaluator says for every contact,
with at most one active row per (bucket, contact), gapless epochs and a ledger row per change.
"""

from __future__ import annotations

import random
import threading
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from buckets import b, define_bucket, ingest_event, ingest_events
from buckets.criteria import Event, evaluate, in_memory_counter
from buckets.models import bucket_memberships, bucket_transitions, contacts, user_events

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
THREADS = 8
EVENTS_PER_THREAD = 400
CONTACTS = [f"c{i:02d}" for i in range(50)]
NAMES = ["feature.used", "page.viewed", "purchase", "email.opened"]

BUCKETS = [
    define_bucket(id="pro", criteria=b.prop("plan").eq("pro")),
    define_bucket(id="heavy", criteria=b.event("feature.used").within("3d").at_least(3)),
    define_bucket(id="light", criteria=b.event("feature.used").within("3d").less_than(2)),
    define_bucket(id="buyer", criteria=b.event("purchase").exists(), entry_limit="once"),
    define_bucket(
        id="big-buyer",
        criteria=b.event("purchase").where(b.prop("amount").gte(50)).at_least(2),
    ),
    define_bucket(
        id="lapsed",
        criteria=b.all(
            b.event("page.viewed").exists(), b.event("page.viewed").within("1d").not_exists()
        ),
    ),
    define_bucket(
        id="pro-active",
        criteria=b.all(b.prop("plan").eq("pro"), b.event("feature.used").within("2d").exists()),
        entry_limit="once_per_period",
        entry_period="1d",
    ),
    define_bucket(
        id="eu-or-opener",
        criteria=b.any(b.prop("country").eq("DE"), b.event("email.opened").at_least(2)),
    ),
    define_bucket(id="seats", criteria=b.prop("seats").gte(5), max_dwell="30d"),
    define_bucket(
        id="mixed",
        criteria=b.all(
            b.any(b.prop("plan").neq("free"), b.prop("seats").exists()),
            b.event("email.opened").within("5d").exactly(1),
        ),
    ),
]


def random_event(rng: random.Random) -> dict[str, Any]:
    event: dict[str, Any] = {
        "external_id": rng.choice(CONTACTS),
        "event": rng.choice(NAMES),
        "properties": {"amount": rng.choice([10, 50, 80, "90"])},
        "occurred_at": NOW - timedelta(hours=rng.randint(0, 24 * 6)),
    }
    patch: dict[str, Any] = {}
    if rng.random() < 0.3:
        patch["plan"] = rng.choice(["free", "pro", "trial"])
    if rng.random() < 0.2:
        patch["country"] = rng.choice(["DE", "FR", "US"])
    if rng.random() < 0.15:
        patch["seats"] = rng.choice([1, 5, 10, None])
    if patch:
        event["contact_properties"] = patch
    return event


def test_concurrent_ingest_ends_exactly_where_the_evaluator_says(make_runtime):
    rt = make_runtime(*BUCKETS)
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            start.wait()
            done = 0
            while done < EVENTS_PER_THREAD:
                if seed % 2:  # half the threads ingest one by one, half in small batches
                    ingest_event(**random_event(rng), now=NOW, runtime=rt)
                    done += 1
                else:
                    batch = [random_event(rng) for _ in range(rng.randint(1, 25))]
                    result = ingest_events(batch, now=NOW, runtime=rt)
                    assert not result.errors
                    done += len(batch)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []

    with rt.engine.connect() as conn:
        people = {row.id: row for row in conn.execute(sa.select(contacts))}
        history: dict[int, list[Event]] = defaultdict(list)
        for row in conn.execute(sa.select(user_events)):
            history[row.contact_id].append(Event(row.event, row.occurred_at, row.properties))
        rows = conn.execute(sa.select(bucket_memberships)).all()
        ledger = conn.execute(sa.select(bucket_transitions)).all()

    assert sum(len(events) for events in history.values()) >= THREADS * EVENTS_PER_THREAD
    active = {(row.bucket_id, row.contact_id) for row in rows if row.status == "active"}
    expected = {
        (bucket.id, contact_id)
        for contact_id, person in people.items()
        for bucket in BUCKETS
        if evaluate(bucket.criteria, person.properties, in_memory_counter(history[contact_id], NOW))
    }
    assert active == expected
    assert len(expected) > 50  # the buckets are not trivially empty

    epochs: dict[tuple[str, int], list[int]] = defaultdict(list)
    active_count: dict[tuple[str, int], int] = defaultdict(int)
    for row in rows:
        epochs[(row.bucket_id, row.contact_id)].append(row.entry_count)
        active_count[(row.bucket_id, row.contact_id)] += row.status == "active"
    assert all(sorted(found) == list(range(1, len(found) + 1)) for found in epochs.values())
    assert max(active_count.values()) == 1

    keys = [row.idempotency_key for row in ledger]
    assert len(keys) == len(set(keys))
    entered = {row.membership_id for row in ledger if row.kind == "entered"}
    left = {row.membership_id for row in ledger if row.kind == "left"}
    assert entered == {row.id for row in rows}
    assert left == {row.id for row in rows if row.status == "left"}
