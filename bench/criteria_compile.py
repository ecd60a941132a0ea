"""Compiled criteria vs hand-written SQL for the same member set, in the same run.

    python -m bench.criteria_compile [--contacts 100000] [--events-per-contact 20] [--runs 5]
                                     [--database-url URL] [--explain] [--only sequence]
                                     [--serial]

Loads the generator's dataset (``bench/generate.py``, seed 42, fixed ``now``) unless the
database already holds exactly that many contacts, then for each criteria times the compiled
``member_select`` and a hand-written query (median of ``--runs``, interleaved, all rows
fetched) and checks that both return the same contacts. The ratio compiled/hand is the figure
to watch; absolute times vary +-20-50% between runs on these machines.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

from bench.generate import generate
from buckets.criteria import b, member_select, parse_criteria
from buckets.db import create_engine, resolve_database_url
from buckets.migrations import upgrade
from buckets.settings import load_settings

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Case:
    name: str
    criteria: dict[str, Any]
    hand_sql: str


CASES: tuple[Case, ...] = (
    Case(
        "count gte 10 within 30d",
        b.event("feature.used").within("30d").at_least(10),
        """
        SELECT c.id FROM contacts c
        JOIN (SELECT contact_id FROM user_events
              WHERE event = 'feature.used' AND occurred_at BETWEEN :start_30d AND :now
              GROUP BY contact_id HAVING count(*) >= 10) e ON e.contact_id = c.id
        WHERE c.deleted_at IS NULL
        """,
    ),
    Case(
        "lapsed pair (ever, not in 7d)",
        b.all(b.event("feature.used").exists(), b.event("feature.used").within("7d").not_exists()),
        """
        SELECT c.id FROM contacts c
        JOIN (SELECT contact_id FROM user_events
              WHERE event = 'feature.used' AND occurred_at <= :now
              GROUP BY contact_id HAVING max(occurred_at) < :start_7d) e ON e.contact_id = c.id
        WHERE c.deleted_at IS NULL
        """,
    ),
    Case(
        "plan=pro AND count>=5 in 14d AND (DE or FR)",
        b.all(
            b.prop("plan").eq("pro"),
            b.event("feature.used").within("14d").at_least(5),
            b.any(b.prop("country").eq("DE"), b.prop("country").eq("FR")),
        ),
        """
        SELECT c.id FROM contacts c
        JOIN (SELECT contact_id FROM user_events
              WHERE event = 'feature.used' AND occurred_at BETWEEN :start_14d AND :now
              GROUP BY contact_id HAVING count(*) >= 5) e ON e.contact_id = c.id
        WHERE c.deleted_at IS NULL AND c.properties->>'plan' = 'pro'
          AND c.properties->>'country' IN ('DE', 'FR')
        """,
    ),
)

# SPEC §3.4 families (language part 2), each against the query one would write by hand.
CASES += (
    Case(
        "country in (DE, FR, NL)",
        b.prop("country").in_(["DE", "FR", "NL"]),
        """
        SELECT c.id FROM contacts c
        WHERE c.deleted_at IS NULL
          AND c.properties->'country' = ANY (ARRAY['"DE"', '"FR"', '"NL"']::jsonb[])
        """,
    ),
    Case(
        "sum(amount) of purchases in 30d >= 500",
        b.event("purchase.completed").within("30d").sum("amount").gte(500),
        """
        SELECT c.id FROM contacts c
        JOIN (SELECT contact_id FROM user_events
              WHERE event = 'purchase.completed' AND occurred_at BETWEEN :start_30d AND :now
                AND jsonb_typeof(properties->'amount') = 'number'
              GROUP BY contact_id HAVING sum((properties->>'amount')::numeric) >= 500
             ) e ON e.contact_id = c.id
        WHERE c.deleted_at IS NULL
        """,
    ),
    Case(
        "trial_ends_at within the next 3d",
        b.prop("trial_ends_at").within_next("3d"),
        """
        SELECT c.id FROM contacts c
        WHERE c.deleted_at IS NULL AND jsonb_typeof(c.properties->'trial_ends_at') = 'string'
          AND (c.properties->>'trial_ends_at')::timestamptz BETWEEN :now AND :end_3d
        """,
    ),
    Case(
        "never purchased (all-negative)",
        b.event("purchase.completed").not_exists(),
        """
        SELECT c.id FROM contacts c
        WHERE c.deleted_at IS NULL AND NOT EXISTS (
            SELECT 1 FROM user_events e
            WHERE e.event = 'purchase.completed' AND e.contact_id = c.id
              AND e.occurred_at <= :now)
        """,
    ),
    Case(
        "sample 10% (salted)",
        b.sample(10, salt="bench"),
        """
        SELECT c.id FROM contacts c
        WHERE c.deleted_at IS NULL
          AND ('x' || substr(encode(sha256(convert_to('bench:' || c.external_id, 'UTF8')),
                                    'hex'), 1, 8))::bit(32)::bigint % 10000 < 1000
        """,
    ),
    Case(
        "max(amount) of purchases in 30d >= 450",
        b.event("purchase.completed").within("30d").max("amount").gte(450),
        """
        SELECT c.id FROM contacts c
        JOIN (SELECT contact_id FROM user_events
              WHERE event = 'purchase.completed' AND occurred_at BETWEEN :start_30d AND :now
                AND jsonb_typeof(properties->'amount') = 'number'
              GROUP BY contact_id HAVING max((properties->>'amount')::numeric) >= 450
             ) e ON e.contact_id = c.id
        WHERE c.deleted_at IS NULL
        """,
    ),
    Case(
        "first purchase in the last 7d (older_than)",
        b.all(
            b.event("purchase.completed").within("7d").exists(),
            b.event("purchase.completed").older_than("7d").not_exists(),
        ),
        """
        SELECT c.id FROM contacts c
        JOIN (SELECT contact_id FROM user_events
              WHERE event = 'purchase.completed' AND occurred_at <= :now
              GROUP BY contact_id HAVING min(occurred_at) >= :start_7d
             ) e ON e.contact_id = c.id
        WHERE c.deleted_at IS NULL
        """,
    ),
    Case(
        "last page viewed was /pricing",
        b.event("page.viewed").where(b.prop("path").eq("/pricing")).last(),
        """
        SELECT c.id FROM contacts c
        JOIN (SELECT DISTINCT ON (contact_id) contact_id, properties FROM user_events
              WHERE event = 'page.viewed' AND occurred_at <= :now
              ORDER BY contact_id, occurred_at DESC, id DESC
             ) l ON l.contact_id = c.id
        WHERE c.deleted_at IS NULL AND l.properties @> '{"path": "/pricing"}'
        """,
    ),
    Case(
        "plan = pro held for less than 14d",
        b.prop("plan").eq("pro").held_for(less_than="14d"),
        """
        SELECT c.id FROM contacts c
        WHERE c.deleted_at IS NULL AND c.properties @> '{"plan": "pro"}'
          AND coalesce((c.property_changed_at->>'plan')::timestamptz, c.created_at)
              > :start_14d
        """,
    ),
)

# Regular activity: a period index per event, counted once per contact and period.
REGULAR_CASES = (
    Case(
        "regularly: feature.used on 4 of the last 7 days",
        b.event("feature.used").regularly("1d", periods=7, min_periods=4),
        """
        SELECT c.id FROM contacts c
        JOIN (SELECT contact_id FROM user_events
              WHERE event = 'feature.used' AND occurred_at > :start_7d AND occurred_at <= :now
              GROUP BY contact_id
              HAVING count(DISTINCT greatest(
                  ceil(extract(epoch FROM :now - occurred_at) / 86400), 1)) >= 4
             ) e ON e.contact_id = c.id
        WHERE c.deleted_at IS NULL
        """,
    ),
)
CASES += REGULAR_CASES

# Sequences (SPEC §3.4): the hand-written form is the spec's existential as correlated
# EXISTS, which is what a person writes for "a session without a purchase within a day".
SEQUENCE_CASES = (
    Case(
        "sequence: session, no purchase in 1d (30d)",
        b.sequence(
            b.step("session.started"),
            b.step("purchase.completed", gap="1d", absent=True),
            within="30d",
        ),
        """
        SELECT c.id FROM contacts c
        WHERE c.deleted_at IS NULL AND EXISTS (
            SELECT 1 FROM user_events s
            WHERE s.contact_id = c.id AND s.event = 'session.started'
              AND s.occurred_at >= :start_30d AND s.occurred_at <= :now_1d
              AND NOT EXISTS (
                  SELECT 1 FROM user_events p
                  WHERE p.contact_id = s.contact_id AND p.event = 'purchase.completed'
                    AND p.occurred_at > s.occurred_at
                    AND p.occurred_at <= s.occurred_at + interval '1 day'))
        """,
    ),
    Case(
        "sequence: opened, clicked in 1h (30d)",
        b.sequence(b.step("email.opened"), b.step("email.clicked", gap="1h"), within="30d"),
        """
        SELECT c.id FROM contacts c
        WHERE c.deleted_at IS NULL AND EXISTS (
            SELECT 1 FROM user_events o
            WHERE o.contact_id = c.id AND o.event = 'email.opened'
              AND o.occurred_at BETWEEN :start_30d AND :now
              AND EXISTS (
                  SELECT 1 FROM user_events k
                  WHERE k.contact_id = o.contact_id AND k.event = 'email.clicked'
                    AND k.occurred_at > o.occurred_at AND k.occurred_at <= :now
                    AND k.occurred_at <= o.occurred_at + interval '1 hour'))
        """,
    ),
)
CASES += SEQUENCE_CASES

HAND_PARAMS = {
    "now_1d": NOW - timedelta(days=1),
    "now": NOW,
    "end_3d": NOW + timedelta(days=3),
    "start_30d": NOW - timedelta(days=30),
    "start_14d": NOW - timedelta(days=14),
    "start_7d": NOW - timedelta(days=7),
}


def _timed(run: Callable[[], set[int]]) -> tuple[float, set[int]]:
    started = time.perf_counter()
    result = run()
    return (time.perf_counter() - started) * 1000.0, result


def _explain(conn: Connection, statement: Any, params: dict[str, Any] | None = None) -> str:
    if isinstance(statement, str):
        rows = conn.execute(sa.text(f"EXPLAIN (ANALYZE, BUFFERS) {statement}"), params or {})
    else:
        compiled = statement.compile(dialect=postgresql.psycopg.dialect())
        rows = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {compiled}", compiled.params)
    return "\n".join(row[0] for row in rows)


def run(
    conn: Connection, runs: int, explain: bool, only: str | None = None
) -> list[dict[str, Any]]:
    results = []
    for case in CASES:
        if only is not None and only not in case.name:
            continue
        compiled = member_select(parse_criteria(case.criteria), NOW)
        hand = sa.text(case.hand_sql)
        compiled_ms, hand_ms = [], []
        compiled_ids: set[int] = set()
        hand_ids: set[int] = set()
        for _ in range(runs):  # interleaved, so drift hits both sides alike
            elapsed, compiled_ids = _timed(lambda: set(conn.execute(compiled).scalars()))  # noqa: B023
            compiled_ms.append(elapsed)
            elapsed, hand_ids = _timed(lambda: set(conn.execute(hand, HAND_PARAMS).scalars()))  # noqa: B023
            hand_ms.append(elapsed)
        if compiled_ids != hand_ids:
            raise SystemExit(
                f"{case.name}: member sets differ: compiled {len(compiled_ids)}, hand"
                f" {len(hand_ids)}, symmetric difference {len(compiled_ids ^ hand_ids)}"
            )
        row: dict[str, Any] = {
            "case": case.name,
            "members": len(compiled_ids),
            "compiled_ms": statistics.median(compiled_ms),
            "hand_ms": statistics.median(hand_ms),
        }
        row["ratio"] = row["compiled_ms"] / row["hand_ms"]
        results.append(row)
        if explain:
            print(f"\n--- {case.name}: compiled\n{_explain(conn, compiled)}")
            print(f"\n--- {case.name}: hand-written\n{_explain(conn, case.hand_sql, HAND_PARAMS)}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--events-per-contact", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--database-url", help="[default: BUCKETS_DATABASE_URL or embedded]")
    parser.add_argument("--explain", action="store_true", help="print EXPLAIN ANALYZE plans")
    parser.add_argument("--only", help="run the cases whose name contains this (e.g. sequence)")
    parser.add_argument(
        "--serial",
        action="store_true",
        help="both queries without parallel workers, as the engine runs its compiled queries"
        " (inside INSERT ... SELECT, which PostgreSQL 15 never runs in parallel)",
    )
    args = parser.parse_args(argv)

    url = resolve_database_url(load_settings(database_url=args.database_url))
    engine = create_engine(url)
    upgrade(engine)
    with engine.connect() as conn:
        present = conn.execute(sa.text("SELECT count(*) FROM contacts")).scalar_one()
    if present != args.contacts:
        loaded = generate(
            url,
            contacts=args.contacts,
            events_per_contact=args.events_per_contact,
            now=NOW,
            reset=True,
        )
        print(loaded.summary())
    with engine.connect() as conn:
        events = conn.execute(sa.text("SELECT count(*) FROM user_events")).scalar_one()
        print(f"dataset: {args.contacts:,} contacts, {events:,} events; now = {NOW.isoformat()}")
        if args.serial:
            conn.execute(sa.text("SET max_parallel_workers_per_gather = 0"))
        results = run(conn, args.runs, args.explain, args.only)
    engine.dispose()

    print(f"\n{'criteria':<46} {'members':>8} {'compiled':>10} {'hand SQL':>10} {'ratio':>6}")
    for row in results:
        print(
            f"{row['case']:<46} {row['members']:>8,} {row['compiled_ms']:>8.1f}ms"
            f" {row['hand_ms']:>8.1f}ms {row['ratio']:>6.2f}"
        )
    print(f"(median of {args.runs} interleaved runs each; member sets identical)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
