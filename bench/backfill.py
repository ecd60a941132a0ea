"""First-time backfills against the raw ``INSERT … SELECT`` floor, in the same run.

    python -m bench.backfill [--contacts 100000] [--runs 3] [--database-url URL]

For a count bucket (``feature.used`` count >= 10 within 30d) and the lapsed-active pair, on
the generator's dataset: the engine's first-time job (enqueue, lease, chunks of 100k contact
ids each with its ledger rows, progress and heartbeat, hash stored) against the floor — one
statement inserting the same membership rows, rolled back — and against the floor that also
writes the ledger rows. Each side starts from an empty, vacuumed bucket; medians of ``--runs``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from bench.dataset import NOW, prepare
from buckets import b, define_bucket
from buckets.criteria import member_select
from buckets.definitions import Bucket
from buckets.models import contacts
from buckets.registry import Registry
from buckets.runtime import Runtime
from buckets.settings import load_settings
from workflows.backfill import Runner, start

BUCKETS = [
    define_bucket(id="bench-power", criteria=b.event("feature.used").within("30d").at_least(10)),
    define_bucket(
        id="bench-lapsed",
        criteria=b.all(
            b.event("feature.used").exists(), b.event("feature.used").within("7d").not_exists()
        ),
    ),
]
LEDGER = """
, x AS (SELECT * FROM m)
INSERT INTO bucket_transitions (bucket_id, contact_id, membership_id, kind, epoch, source,
                                emitted, suppressed_by, occurred_at, idempotency_key)
SELECT x.bucket_id, x.contact_id, x.id, 'entered', 1, 'backfill', false, 'backfill', :now,
       'bucket:' || x.bucket_id || ':' || c.external_id || ':entered:1'
FROM x JOIN contacts c ON c.id = x.contact_id
"""


def reset(engine: Engine, bucket: Bucket) -> None:
    with engine.begin() as conn:
        for table in (
            "bucket_transitions",
            "bucket_memberships",
            "backfill_jobs",
            "bucket_configs",
            "bucket_due",
        ):
            conn.execute(sa.text(f"DELETE FROM {table} WHERE bucket_id = :b"), {"b": bucket.id})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM (ANALYZE) bucket_memberships, bucket_transitions"))


def floor(engine: Engine, bucket: Bucket, ledger: bool) -> tuple[float, int]:
    members = member_select(bucket.criteria, NOW).with_only_columns(contacts.c.id)
    select_sql = str(members.compile(engine, compile_kwargs={"literal_binds": True}))
    sql = (
        "WITH m AS (INSERT INTO bucket_memberships (bucket_id, contact_id, status, entered_at,"
        " entry_count, source) SELECT :b, id, 'active', :now, 1, 'backfill' FROM ("
        + select_sql
        + ") s RETURNING id, bucket_id, contact_id)"
        + (LEDGER if ledger else " SELECT count(*) FROM m")
    )
    with engine.connect() as conn:
        transaction = conn.begin()
        started = time.perf_counter()
        conn.execute(sa.text(sql), {"b": bucket.id, "now": NOW})
        elapsed = time.perf_counter() - started
        rows = conn.execute(
            sa.text("SELECT count(*) FROM bucket_memberships WHERE bucket_id = :b"),
            {"b": bucket.id},
        ).scalar_one()
        transaction.rollback()
    return elapsed, rows


def engine_run(rt: Runtime, bucket: Bucket) -> tuple[float, int]:
    reports: list[Any] = []
    started = time.perf_counter()
    job, _ = start(rt, bucket.id, NOW)
    done = Runner(rt).run(job.id, progress=reports.append)  # progress: as the CLI's bar gets it
    elapsed = time.perf_counter() - started
    assert done.status == "completed", done
    assert reports, "no progress reported"
    return elapsed, done.joined


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--events-per-contact", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--database-url", help="[default: BUCKETS_DATABASE_URL or embedded]")
    args = parser.parse_args(argv)
    engine, url = prepare(args.database_url, args.contacts, args.events_per_contact)
    settings = load_settings(database_url=url.render_as_string(hide_password=False))
    rt = Runtime(engine=engine, registry=Registry(BUCKETS), settings=settings)
    rows: list[tuple[str, int, float, float, float]] = []
    try:
        for bucket in BUCKETS:
            times: dict[str, list[float]] = {"engine": [], "floor": [], "ledger": []}
            for _ in range(args.runs):
                reset(engine, bucket)
                seconds, expected = floor(engine, bucket, ledger=False)
                times["floor"].append(seconds)
                reset(engine, bucket)
                times["ledger"].append(floor(engine, bucket, ledger=True)[0])
                reset(engine, bucket)
                seconds, joined = engine_run(rt, bucket)
                assert joined == expected, f"{bucket.id}: engine joined {joined}, floor {expected}"
                times["engine"].append(seconds)
            medians = [statistics.median(times[k]) for k in ("engine", "floor", "ledger")]
            rows.append((bucket.id, expected, medians[0], medians[1], medians[2]))
            reset(engine, bucket)
    finally:
        engine.dispose()
    print(
        f"\n{'first-time backfill':<16} {'rows':>8} {'engine':>9} {'floor':>9} {'+ledger':>9}"
        f" {'ratio':>6} {'vs+ledger':>9}"
    )
    for name, count, engine_s, floor_s, ledger_s in rows:
        print(
            f"{name:<16} {count:>8,} {engine_s * 1000:>7.0f}ms {floor_s * 1000:>7.0f}ms"
            f" {ledger_s * 1000:>7.0f}ms {engine_s / floor_s:>6.2f} {engine_s / ledger_s:>9.2f}"
        )
    print(f"(medians of {args.runs}; engine = job enqueue, lease, chunks, progress, completion)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
