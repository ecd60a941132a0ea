"""The dispatcher: transitions dispatched per second, and latency from ingest to handler.

    python -m bench.dispatch [--transitions 20000] [--latency-events 1000] [--database-url URL]

1. Throughput: ``--transitions`` emitted transitions are written first (contacts entering and
   leaving a property bucket through batch ingest), then drained with no-op handlers by one
   dispatcher, and again (reset) by two dispatcher threads side by side. Two journeys are
   bound: one to the bucket's ``entered`` (exited on ``left``), one generic ``bucket:entered``.
2. Latency: a dispatcher runs its LISTEN loop while single events are ingested one by one (at
   about 200/s); for each transition, the time from ``ingest_event`` returning (its commit) to
   the handler starting. p50 / p99.

The database is emptied of engine rows at the start; use a database of its own.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from buckets import b, define_bucket, ingest_event, ingest_events, journey
from buckets.db import create_engine, resolve_database_url
from buckets.dispatcher import Dispatcher, Enrollment, run_dispatcher
from buckets.migrations import upgrade
from buckets.registry import Registry
from buckets.runtime import Runtime
from buckets.settings import load_settings

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
PRO = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"))
started_at: dict[str, float] = {}


def record(enrollment: Enrollment) -> None:
    started_at.setdefault(enrollment.idempotency_key, time.perf_counter())


JOURNEYS = [
    journey(id="welcome", trigger=PRO.entered, exit_on=[PRO.left])(record),
    journey(id="audit", trigger="bucket:entered", concurrent=True)(record),
]
ENGINE_TABLES = "journey_enrollments, bucket_transitions, bucket_memberships, user_events, contacts"


def produce(rt: Runtime, transitions: int) -> int:
    """Contacts flip plan pro/free: each flip is one emitted transition."""
    contacts = max(transitions // 10, 1)
    events = [
        {
            "external_id": f"c{i % contacts}",
            "event": "x",
            "contact_properties": {"plan": "pro" if (i // contacts) % 2 == 0 else "free"},
        }
        for i in range(transitions)
    ]
    for start in range(0, len(events), 1000):
        ingest_events(events[start : start + 1000], now=NOW, runtime=rt)
    with rt.engine.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT count(*) FROM bucket_transitions WHERE emitted")
            ).scalar_one()
        )


def reset_dispatch(rt: Runtime) -> None:
    with rt.engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE journey_enrollments"))
        conn.execute(sa.text("UPDATE bucket_transitions SET dispatched_at = NULL"))
    with rt.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM (ANALYZE) bucket_transitions, journey_enrollments"))


def throughput(rt: Runtime, dispatchers: int, total: int) -> float:
    reset_dispatch(rt)
    started = time.perf_counter()
    threads = [
        threading.Thread(target=lambda: Dispatcher(rt).drain(NOW)) for _ in range(dispatchers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    with rt.engine.connect() as conn:
        left = conn.execute(
            sa.text(
                "SELECT count(*) FROM bucket_transitions WHERE emitted AND dispatched_at IS NULL"
            )
        ).scalar_one()
    assert left == 0, f"{left} transitions not dispatched"
    return total / elapsed


def latency(rt: Runtime, events: int) -> tuple[float, float, int]:
    stop = threading.Event()
    loop = threading.Thread(target=run_dispatcher, args=(rt, stop), kwargs={"poll_seconds": 1.0})
    loop.start()
    time.sleep(1.0)  # listening
    committed: dict[str, float] = {}
    for i in range(events):
        plan = "pro" if i % 2 == 0 else "free"
        result = ingest_event(
            f"lat{i // 2}", "x", {}, contact_properties={"plan": plan}, runtime=rt
        )
        done = time.perf_counter()
        for transition in result.transitions:
            if transition.kind == "entered":
                committed[transition.idempotency_key] = done
        time.sleep(0.005)
    deadline = time.perf_counter() + 10
    while time.perf_counter() < deadline and not all(k in started_at for k in committed):
        time.sleep(0.05)
    stop.set()
    loop.join()
    delays = sorted(
        (started_at[key] - at) * 1000 for key, at in committed.items() if key in started_at
    )
    assert len(delays) == len(committed), "some transitions never reached their handler"
    return statistics.median(delays), delays[int(len(delays) * 0.99) - 1], len(delays)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--transitions", type=int, default=20_000)
    parser.add_argument("--latency-events", type=int, default=1_000)
    parser.add_argument("--database-url", help="[default: BUCKETS_DATABASE_URL or embedded]")
    args = parser.parse_args(argv)
    settings = load_settings(database_url=args.database_url)
    engine = create_engine(resolve_database_url(settings), pool_size=10)
    upgrade(engine)
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {ENGINE_TABLES} RESTART IDENTITY"))
    rt = Runtime(engine=engine, registry=Registry([PRO], JOURNEYS), settings=settings)
    figures: dict[str, Any] = {}
    try:
        total = produce(rt, args.transitions)
        figures["one"] = throughput(rt, 1, total)
        figures["two"] = throughput(rt, 2, total)
        started_at.clear()
        figures["latency"] = latency(rt, args.latency_events)
    finally:
        engine.dispose()
    p50, p99, measured = figures["latency"]
    print(f"emitted transitions: {total:,} (2 journeys bound: one enrollment each per entry)")
    print(f"1 dispatcher : {figures['one']:>8,.0f} transitions/s")
    print(f"2 dispatchers: {figures['two']:>8,.0f} transitions/s")
    print(
        f"ingest commit -> handler start: p50 {p50:.1f} ms, p99 {p99:.1f} ms ({measured} entries)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
