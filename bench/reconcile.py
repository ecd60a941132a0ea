"""The cron reconcile's passes against the raw-SQL floor for the same change, in the same run.

    python -m bench.reconcile [--contacts 100000] [--runs 3] [--database-url URL]

On the generator's dataset (loaded unless present; 20 events per contact), each case prepares
the bucket's membership as the previous day's tick left it, then times

* the engine: the pass inside ``reconcile(now, [bucket])`` (its per-pass timing), which writes
  the membership change, its ledger rows and takes the contact locks; and
* the floor: the best single statement for the same membership change alone
  (PERFORMANCE-NOTES.md), in a transaction rolled back;
* the floor with ledger: the same statement also inserting the ledger rows (what the engine
  must write at minimum), rolled back.

Cases: absence join on a fresh bucket (the lapsed-active pair), window-expiry leaves of a
count bucket (``count gte 10 in 30d``; yesterday's members), TTL leaves of a bucket holding
every contact with 10% past ``max_dwell``, composite leaves (``plan = pro AND count >= 5 in
14d``; yesterday's members, confirmed per member by the evaluator). Medians of ``--runs``,
engine and floor interleaved; the engine's membership must equal the floor's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from bench.dataset import NOW, prepare
from buckets import b, define_bucket
from buckets.definitions import Bucket
from buckets.registry import Registry
from buckets.runtime import Runtime
from buckets.settings import load_settings
from workflows.reconcile import reconcile

DAY = timedelta(days=1)
TRIAL_TTL = define_bucket(id="bench-ttl", criteria=b.prop("plan").exists(), max_dwell="30d")
CASES_BUCKETS = {
    "absence join (fresh bucket)": define_bucket(
        id="bench-dormant",
        criteria=b.all(
            b.event("feature.used").exists(), b.event("feature.used").within("7d").not_exists()
        ),
    ),
    "window-expiry leaves": define_bucket(
        id="bench-power", criteria=b.event("feature.used").within("30d").at_least(10)
    ),
    "TTL leaves (10% expired)": TRIAL_TTL,
    "composite leaves": define_bucket(
        id="bench-pro-active",
        criteria=b.all(b.prop("plan").eq("pro"), b.event("feature.used").within("14d").at_least(5)),
    ),
}
PASS = {
    "absence join (fresh bucket)": "joins",
    "window-expiry leaves": "criteria_leaves",
    "TTL leaves (10% expired)": "ttl_leaves",
    "composite leaves": "criteria_leaves",
}

LEDGER = """
INSERT INTO bucket_transitions (bucket_id, contact_id, membership_id, kind, epoch, reason,
                                source, emitted, occurred_at, idempotency_key)
SELECT x.bucket_id, x.contact_id, x.id, '{kind}', x.entry_count, {reason}, 'reconcile', true,
       :now, 'bucket:' || x.bucket_id || ':' || c.external_id || ':{kind}:' || x.entry_count
FROM x JOIN contacts c ON c.id = x.contact_id
"""
FLOORS = {
    # one pass GROUP BY ... HAVING max(occurred_at) < now - 7d (PERFORMANCE-NOTES.md)
    "absence join (fresh bucket)": """
        {with} x AS (
        INSERT INTO bucket_memberships (bucket_id, contact_id, status, entered_at, entry_count,
                                        source, last_evaluated_at)
        SELECT 'bench-dormant', c.id, 'active', :now, 1, 'reconcile', :now
        FROM contacts c
        JOIN (SELECT contact_id FROM user_events
              WHERE event = 'feature.used' AND occurred_at <= :now
              GROUP BY contact_id HAVING max(occurred_at) < :now - interval '7 days') e
          ON e.contact_id = c.id
        WHERE c.deleted_at IS NULL
        RETURNING id, bucket_id, contact_id, entry_count) {ledger}
    """,
    # "an n-th event exists" probe per member (PERFORMANCE-NOTES.md)
    "window-expiry leaves": """
        {with} x AS (
        UPDATE bucket_memberships m SET status = 'left', left_at = :now, leave_reason = 'criteria'
        WHERE m.bucket_id = 'bench-power' AND m.status = 'active'
          AND NOT EXISTS (SELECT 1 FROM user_events e
                          WHERE e.contact_id = m.contact_id AND e.event = 'feature.used'
                            AND e.occurred_at BETWEEN :now - interval '30 days' AND :now
                          OFFSET 9 LIMIT 1)
        RETURNING id, bucket_id, contact_id, entry_count) {ledger}
    """,
    "TTL leaves (10% expired)": """
        {with} x AS (
        UPDATE bucket_memberships m SET status = 'left', left_at = :now, leave_reason = 'max_dwell'
        WHERE m.bucket_id = 'bench-ttl' AND m.status = 'active' AND m.max_dwell_at <= :now
        RETURNING id, bucket_id, contact_id, entry_count) {ledger}
    """,
    "composite leaves": """
        {with} x AS (
        UPDATE bucket_memberships m SET status = 'left', left_at = :now, leave_reason = 'criteria'
        FROM contacts c
        WHERE m.bucket_id = 'bench-pro-active' AND m.status = 'active' AND c.id = m.contact_id
          AND NOT (c.properties @> '{{"plan": "pro"}}' AND EXISTS (
                SELECT 1 FROM user_events e
                WHERE e.contact_id = m.contact_id AND e.event = 'feature.used'
                  AND e.occurred_at BETWEEN :now - interval '14 days' AND :now
                OFFSET 4 LIMIT 1))
        RETURNING m.id, m.bucket_id, m.contact_id, m.entry_count) {ledger}
    """,
}


def setup(conn: Connection, case: str, bucket: Bucket) -> None:
    """The membership as yesterday's tick left it (committed by the caller)."""
    conn.execute(sa.text("DELETE FROM bucket_transitions WHERE bucket_id = :b"), {"b": bucket.id})
    conn.execute(sa.text("DELETE FROM bucket_memberships WHERE bucket_id = :b"), {"b": bucket.id})
    conn.execute(sa.text("DELETE FROM bucket_due WHERE bucket_id = :b"), {"b": bucket.id})
    conn.execute(
        sa.text(
            "INSERT INTO bucket_configs (bucket_id, criteria_hash) VALUES (:b, :h)"
            " ON CONFLICT (bucket_id) DO UPDATE SET criteria_hash = :h, reconciled_at = NULL,"
            " reconciled_slot = NULL, due_hash = NULL"  # the queue incomplete: full passes run
        ),
        {"b": bucket.id, "h": bucket.fingerprint},
    )
    if case == "TTL leaves (10% expired)":
        conn.execute(
            sa.text(
                "INSERT INTO bucket_memberships (bucket_id, contact_id, status, entered_at,"
                " entry_count, source, max_dwell_at)"
                " SELECT :b, id, 'active', :now - interval '20 days', 1, 'backfill',"
                "  CASE WHEN id % 10 = 0 THEN :now - interval '1 hour'"
                "       ELSE :now + interval '10 days' END"
                " FROM contacts"
            ),
            {"b": bucket.id, "now": NOW},
        )
    elif case != "absence join (fresh bucket)":
        from buckets.criteria import member_select

        members = member_select(bucket.criteria, NOW - DAY)
        conn.execute(
            sa.text(
                "INSERT INTO bucket_memberships (bucket_id, contact_id, status, entered_at,"
                " entry_count, source) SELECT :b, id, 'active', :then, 1, 'backfill'"
                " FROM (" + str(members.compile(compile_kwargs={"literal_binds": True})) + ") m"
            ),
            {"b": bucket.id, "then": NOW - DAY},
        )


def vacuum(engine: Engine) -> None:
    """What autovacuum would have done by the next tick: the setup deletes and re-inserts a
    bucket's rows, and dead index entries would otherwise skew both the plans and the times."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM (ANALYZE) bucket_memberships, bucket_transitions, contacts"))


def active(conn: Connection, bucket_id: str) -> set[int]:
    query = "SELECT contact_id FROM bucket_memberships WHERE bucket_id = :b AND status = 'active'"
    return set(conn.execute(sa.text(query), {"b": bucket_id}).scalars())


def floor(engine: Engine, case: str, bucket: Bucket, ledger: bool) -> tuple[float, set[int]]:
    kind, reason = ("entered", "NULL") if "join" in case else ("left", "'criteria'")
    sql = FLOORS[case].format(
        **{
            "with": "WITH",
            "ledger": LEDGER.format(kind=kind, reason=reason) if ledger else "SELECT 1",
        }
    )
    with engine.connect() as conn:
        transaction = conn.begin()
        started = time.perf_counter()
        conn.execute(sa.text(sql), {"now": NOW})
        elapsed = time.perf_counter() - started
        after = active(conn, bucket.id)
        transaction.rollback()
    return elapsed, after


@dataclass
class Row:
    case: str
    rows: int
    engine: float
    floor: float
    floor_ledger: float


def run_case(engine: Engine, rt: Runtime, case: str, bucket: Bucket, runs: int) -> Row:
    """Each measurement starts from the same state, freshly set up and vacuumed."""
    timings: dict[str, list[float]] = {"engine": [], "floor": [], "floor_ledger": []}
    changed = 0

    def fresh() -> set[int]:
        with engine.begin() as conn:
            setup(conn, case, bucket)
        vacuum(engine)
        with engine.connect() as conn:
            return active(conn, bucket.id)

    for _ in range(runs):
        fresh()
        seconds, expected = floor(engine, case, bucket, ledger=False)
        timings["floor"].append(seconds)
        fresh()
        timings["floor_ledger"].append(floor(engine, case, bucket, ledger=True)[0])
        before = fresh()
        [result] = reconcile(NOW, [bucket.id], runtime=rt).buckets
        assert result.status == "done", result
        timings["engine"].append(result.passes[PASS[case]])
        with engine.connect() as conn:
            after = active(conn, bucket.id)
        assert after == expected, f"{case}: engine and floor disagree"
        changed = len(after ^ before)
    return Row(
        case,
        changed,
        statistics.median(timings["engine"]),
        statistics.median(timings["floor"]),
        statistics.median(timings["floor_ledger"]),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--events-per-contact", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--database-url", help="[default: BUCKETS_DATABASE_URL or embedded]")
    parser.add_argument("--only", help="run only the case whose name contains this text")
    args = parser.parse_args(argv)

    engine, url = prepare(args.database_url, args.contacts, args.events_per_contact)
    settings = load_settings(database_url=url.render_as_string(hide_password=False))
    rt = Runtime(engine=engine, registry=Registry(CASES_BUCKETS.values()), settings=settings)
    results = []
    try:
        for case, bucket in CASES_BUCKETS.items():
            if args.only and args.only not in case:
                continue
            results.append(run_case(engine, rt, case, bucket, args.runs))
    finally:
        with engine.begin() as conn:
            for bucket in CASES_BUCKETS.values():
                conn.execute(
                    sa.text("DELETE FROM bucket_transitions WHERE bucket_id = :b"), {"b": bucket.id}
                )
                for table in ("bucket_memberships", "bucket_due"):
                    conn.execute(
                        sa.text(f"DELETE FROM {table} WHERE bucket_id = :b"), {"b": bucket.id}
                    )
        engine.dispose()

    print(
        f"\n{'pass':<30} {'rows':>8} {'engine':>10} {'floor':>10} {'+ledger':>10}"
        f" {'ratio':>6} {'vs+ledger':>9} {'rows/s':>10}"
    )
    for row in results:
        print(
            f"{row.case:<30} {row.rows:>8,} {row.engine * 1000:>8.0f}ms {row.floor * 1000:>8.0f}ms"
            f" {row.floor_ledger * 1000:>8.0f}ms {row.engine / row.floor:>6.2f}"
            f" {row.engine / row.floor_ledger:>9.2f} {row.rows / row.engine:>10,.0f}"
        )
    print(f"(medians of {args.runs} runs; each engine run converged the bucket in one tick)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
