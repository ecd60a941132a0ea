"""Adding 1,000,000 ids from a CSV to a manual bucket, against the raw SQL floor, same run.

    python -m bench.manual [--ids 1000000] [--existing 0.5] [--runs 3] [--database-url URL]

The database (default ``postgresql://postgres@127.0.0.1:5432/bench_manual``, created if
missing) holds ``ids * existing`` contacts (``c0000000`` …); the CSV (header ``external_id``,
shuffled) lists them and as many new ids (``n0000000`` …): half the adds create their contact,
as when a list mixes known customers and new sign-ups.

* **engine**: ``buckets members add bench-manual FILE`` through the CLI (click's runner, in
  process): reading and validating the file, ``COPY`` into a temporary table, creating the new
  contacts, then chunks of 50k locking the contacts and joining through the shared primitive
  (entry limit, ledger), one transaction; the only bucket is the manual one (no other bucket
  to decide for the created contacts).
* **floor**: the same rows written by hand in one transaction: ``COPY`` of the ids into a
  temporary table, ``INSERT … SELECT`` of the missing contacts, of the membership rows and of
  their ledger rows (idempotency keys included), with no validation, locking or counting.

Each side starts from the same state (the new contacts, memberships and ledger rows of the
bucket deleted, tables vacuumed); medians of ``--runs``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.engine import URL, Engine, make_url

from buckets.db import create_engine
from buckets.migrations import upgrade
from workflows.cli import main as cli

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/bench_manual"
BUCKET = "bench-manual"
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
DEFINITIONS = f"buckets:\n  - id: {BUCKET}\n    criteria: {{type: manual}}\n"
FLOOR = (
    "CREATE TEMPORARY TABLE floor_ids (external_id text) ON COMMIT DROP",
    "INSERT INTO contacts (external_id, created_at) SELECT f.external_id, :now FROM floor_ids f"
    " WHERE NOT EXISTS (SELECT FROM contacts c WHERE c.external_id = f.external_id)",
    "WITH m AS (INSERT INTO bucket_memberships (bucket_id, contact_id, status, entered_at,"
    " entry_count, source, last_evaluated_at)"
    " SELECT :b, c.id, 'active', :now, 1, 'admin', :now FROM floor_ids f"
    " JOIN contacts c ON c.external_id = f.external_id RETURNING id, contact_id)"
    " INSERT INTO bucket_transitions (bucket_id, contact_id, membership_id, kind, epoch, source,"
    " emitted, occurred_at, idempotency_key)"
    " SELECT :b, m.contact_id, m.id, 'entered', 1, 'admin', true, :now,"
    " 'bucket:' || :b || ':' || c.external_id || ':entered:1'"
    " FROM m JOIN contacts c ON c.id = m.contact_id",
)


def database(url: URL) -> Engine:
    """The benchmark's database, created and migrated if needed."""
    admin = create_engine(url.set(database="postgres"))
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        found = conn.execute(
            sa.text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": url.database}
        ).scalar()
        if not found:
            conn.execute(sa.text(f'CREATE DATABASE "{url.database}"'))
    admin.dispose()
    engine = create_engine(url)
    upgrade(engine)
    return engine


def seed(engine: Engine, existing: int) -> None:
    """Exactly ``existing`` contacts ``c0000000`` …, and nothing of the bucket."""
    with engine.begin() as conn:
        for table in ("bucket_transitions", "bucket_memberships"):
            conn.execute(sa.text(f"DELETE FROM {table} WHERE bucket_id = :b"), {"b": BUCKET})
        conn.execute(sa.text("DELETE FROM contacts WHERE external_id NOT LIKE 'c%'"))
        present = conn.execute(sa.text("SELECT count(*) FROM contacts")).scalar_one()
        if present != existing:
            conn.execute(sa.text("TRUNCATE contacts CASCADE"))
            conn.execute(
                sa.text(
                    "INSERT INTO contacts (external_id, created_at)"
                    " SELECT 'c' || lpad(n::text, 7, '0'), :now FROM generate_series(0, :k - 1) n"
                ),
                {"now": NOW, "k": existing},
            )
    vacuum(engine)


def vacuum(engine: Engine) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM (ANALYZE) contacts, bucket_memberships, bucket_transitions"))


def reset(engine: Engine) -> None:
    """Back to the seeded state: the bucket's rows and the created contacts gone."""
    with engine.begin() as conn:
        for table in ("bucket_transitions", "bucket_memberships"):
            conn.execute(sa.text(f"DELETE FROM {table} WHERE bucket_id = :b"), {"b": BUCKET})
        conn.execute(sa.text("DELETE FROM contacts WHERE external_id LIKE 'n%'"))
    vacuum(engine)


def write_csv(path: Path, ids: int, existing: int) -> list[str]:
    known = [f"c{n:07d}" for n in range(existing)]
    new = [f"n{n:07d}" for n in range(ids - existing)]
    every = known + new
    random.Random(42).shuffle(every)
    with path.open("w") as out:
        out.write("external_id\n")
        out.writelines(f"{external_id}\n" for external_id in every)
    return every


def engine_run(url: URL, csv: Path, definitions: Path) -> tuple[float, int]:
    args = ["members", "add", BUCKET, str(csv), "--database-url", url.render_as_string(False)]
    args += ["--definitions", str(definitions), "--now", NOW.isoformat(), "--json"]
    started = time.perf_counter()
    result = CliRunner().invoke(cli, args)
    elapsed = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    return elapsed, int(json.loads(result.stdout)["added"])


def floor_run(engine: Engine, ids: list[str]) -> tuple[float, int]:
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(sa.text(FLOOR[0]))
        raw = conn.connection.driver_connection
        assert raw is not None
        with raw.cursor() as cursor, cursor.copy("COPY floor_ids (external_id) FROM STDIN") as copy:
            copy.write("".join(f"{external_id}\n" for external_id in ids))
        for statement in FLOOR[1:]:
            conn.execute(sa.text(statement), {"now": NOW, "b": BUCKET})
    elapsed = time.perf_counter() - started
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT count(*) FROM bucket_memberships WHERE bucket_id = :b"), {"b": BUCKET}
        ).scalar_one()
    return elapsed, int(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--ids", type=int, default=1_000_000)
    parser.add_argument("--existing", type=float, default=0.5, help="share of known contacts")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--database-url", default=DEFAULT_URL)
    args = parser.parse_args(argv)
    url = make_url(args.database_url)
    existing = int(args.ids * args.existing)
    engine = database(url)
    times: dict[str, list[float]] = {"engine": [], "floor": []}
    with tempfile.TemporaryDirectory() as folder:
        csv, definitions = Path(folder) / "ids.csv", Path(folder) / "buckets.yaml"
        definitions.write_text(DEFINITIONS)
        ids = write_csv(csv, args.ids, existing)
        print(f"{args.ids:,} ids ({existing:,} existing contacts, {args.ids - existing:,} new)")
        seed(engine, existing)
        try:
            for run in range(args.runs):
                reset(engine)
                seconds, rows = floor_run(engine, ids)
                assert rows == args.ids, rows
                times["floor"].append(seconds)
                reset(engine)
                seconds, added = engine_run(url, csv, definitions)
                assert added == args.ids, added
                times["engine"].append(seconds)
                engine_s, floor_s = times["engine"][-1], times["floor"][-1]
                print(f"run {run + 1}: engine {engine_s:.1f}s, floor {floor_s:.1f}s")
            reset(engine)
        finally:
            engine.dispose()
    engine_s, floor_s = (statistics.median(times[k]) for k in ("engine", "floor"))
    print(f"\n{'manual add':<12} {'ids':>10} {'engine':>8} {'floor':>8} {'ratio':>6}")
    print(
        f"{'CSV via CLI':<12} {args.ids:>10,} {engine_s:>7.1f}s {floor_s:>7.1f}s"
        f" {engine_s / floor_s:>6.2f}"
    )
    print(f"(medians of {args.runs}; target: engine < 30 s and ratio <= 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
