"""Reading memberships for targeting: latency of ``buckets.memberships``.

    python -m bench.lookup [--contacts 1000000] [--buckets 50] [--per-contact 10]
                           [--lookups 5000] [--database-url URL]

The dataset is written by SQL (contacts ``u<n>``; each in ``--per-contact`` of ``--buckets``
buckets, chosen by a hash, with a few left rows of history), then vacuumed. Measured, each
with the engine's call and the raw statement through psycopg (the floor) in the same run:

1. one random contact x every bucket named (the ad-server question), p50 / p99;
2. one random contact, no bucket named;
3. 100 random contacts x every bucket named.

The database is emptied of engine rows at the start; use a database of its own.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import sqlalchemy as sa

from buckets import b, define_bucket
from buckets.db import create_engine, resolve_database_url
from buckets.lookup import memberships
from buckets.migrations import upgrade
from buckets.registry import Registry
from buckets.runtime import Runtime
from buckets.settings import load_settings

ENGINE_TABLES = (
    "journey_enrollments, bucket_transitions, bucket_memberships, bucket_due, user_events, contacts"
)
FLOOR = """
SELECT c.external_id, m.bucket_id, m.entered_at, m.entry_count, m.source
FROM contacts c
LEFT JOIN bucket_memberships m
  ON m.contact_id = c.id AND m.status = 'active' AND m.bucket_id = ANY(%(buckets)s)
WHERE c.external_id = ANY(%(ids)s) AND c.deleted_at IS NULL
ORDER BY c.external_id, m.bucket_id
"""


def build(engine: sa.Engine, contacts: int, buckets: int, per_contact: int) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {ENGINE_TABLES} RESTART IDENTITY"))
        conn.execute(
            sa.text(
                "INSERT INTO contacts (external_id, properties)"
                " SELECT 'u' || n, '{}'::jsonb FROM generate_series(1, :n) AS n"
            ),
            {"n": contacts},
        )
        # bucket k of contact n: (hash(n) + k * stride) mod buckets, k < per_contact: distinct
        conn.execute(
            sa.text(
                "INSERT INTO bucket_memberships"
                " (bucket_id, contact_id, status, entered_at, entry_count, source)"
                " SELECT 'b' || lpad(((abs(hashint8(c.id)) + k * 7) % :buckets)::text, 2, '0'),"
                "        c.id, 'active', '2026-11-01T00:00:00Z', 1, 'backfill'"
                " FROM contacts c, generate_series(0, :per - 1) AS k"
            ),
            {"buckets": buckets, "per": per_contact},
        )
        conn.execute(  # history: every tenth contact left one bucket once before
            sa.text(
                "INSERT INTO bucket_memberships (bucket_id, contact_id, status, entered_at,"
                " left_at, leave_reason, entry_count, source)"
                " SELECT 'b' || lpad(((abs(hashint8(c.id)) + :per * 7) % :buckets)::text, 2,"
                " '0'), c.id, 'left', '2026-10-01T00:00:00Z', '2026-10-02T00:00:00Z',"
                " 'criteria', 1, 'reconcile' FROM contacts c WHERE c.id % 10 = 0"
            ),
            {"buckets": buckets, "per": per_contact},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE contacts, bucket_memberships"))


def timed(call: Callable[[], object], runs: int) -> list[float]:
    for _ in range(min(200, runs)):  # warm the pool, the caches, the plans
        call()
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return seconds


def report(name: str, engine_s: list[float], floor_s: list[float]) -> None:
    def q(values: list[float], p: float) -> float:
        return statistics.quantiles(values, n=100)[int(p) - 1] * 1000

    print(
        f"{name}: engine p50 {q(engine_s, 50):.2f} ms, p99 {q(engine_s, 99):.2f} ms;"
        f" floor p50 {q(floor_s, 50):.2f} ms, p99 {q(floor_s, 99):.2f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--contacts", type=int, default=1_000_000)
    parser.add_argument("--buckets", type=int, default=50)
    parser.add_argument("--per-contact", type=int, default=10)
    parser.add_argument("--lookups", type=int, default=5_000)
    parser.add_argument("--database-url", help="[default: BUCKETS_DATABASE_URL or embedded]")
    args = parser.parse_args(argv)
    settings = load_settings(database_url=args.database_url)
    engine = create_engine(resolve_database_url(settings))
    upgrade(engine)
    started = time.perf_counter()
    build(engine, args.contacts, args.buckets, args.per_contact)
    print(
        f"dataset: {args.contacts:,} contacts, {args.buckets} buckets,"
        f" {args.per_contact} memberships each ({time.perf_counter() - started:.1f} s)"
    )
    ids = [f"b{n:02d}" for n in range(args.buckets)]
    registry = Registry(define_bucket(id=i, criteria=b.prop(i).eq(1)) for i in ids)
    rt = Runtime(engine=engine, registry=registry, settings=settings)
    rng = random.Random(42)

    def one() -> str:
        return f"u{rng.randint(1, args.contacts)}"

    raw = engine.raw_connection()
    cursor = raw.cursor()

    def floor(contacts: list[str], buckets: list[str]) -> None:
        cursor.execute(FLOOR, {"ids": contacts, "buckets": buckets})
        cursor.fetchall()

    runs = args.lookups
    report(
        "1 contact x 50 buckets",
        timed(lambda: memberships([one()], ids, runtime=rt), runs),
        timed(lambda: floor([one()], ids), runs),
    )
    report(
        "1 contact, every bucket",
        timed(lambda: memberships([one()], runtime=rt), runs),
        timed(lambda: floor([one()], ids), runs),
    )
    hundred = max(runs // 10, 100)
    report(
        "100 contacts x 50 buckets",
        timed(lambda: memberships([one() for _ in range(100)], ids, runtime=rt), hundred),
        timed(lambda: floor([one() for _ in range(100)], ids), hundred),
    )
    raw.close()
    engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
