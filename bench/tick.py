"""Steady-state cron ticks against the raw-SQL floor for the same transitions, at two sizes.

    python -m bench.tick [--sizes 100000,1000000] [--database-url URL] [--runs 5]

For each size, on the generator's dataset (20 events per contact; a database of its own per
size, ``<name>_<size>``, loaded unless present), the 20 buckets of ``bench/ingest.py`` are
deployed the way a worker does it (first-time backfills as jobs, which also fill the due
queue) as of the dataset's ``NOW``; then ordinary ticks run at ``NOW`` + 5 min, 10 min, 1 h and
1 d (no new events in between), each timed around ``reconcile(now)``, with

* transitions: what the tick wrote (joins and leaves over every bucket);
* floor: the raw statements writing those membership rows and their ledger rows — one
  ``INSERT``/``UPDATE`` of the same membership rows feeding one ``INSERT`` of as many ledger
  rows: the cost of the writes alone, with nothing decided. Measured twice:

  - **cold** (the target's floor): on a twin database, a copy of the engine's taken after the
    deploy that receives exactly the tick's membership and ledger writes (its rows copied
    over untimed, then one timed statement, committed, so the twin follows the engine tick
    by tick): the writes a program that already knew the answer would pay;
  - **warm** (as before): in the engine's database, the tick's writes undone and redone in a
    transaction rolled back (median of ``--runs``); the undo has just read every page the redo
    writes, so this is the writes' cost with their pages cached, which no tick has;
* target: 1.5 x cold floor + 20 ms per cron bucket (issue 11).

Tick and cold floor start from the same cache. The twin is a file copy (``STRATEGY
FILE_COPY``: the same block numbers, which the floors' few rows hardly move); before each tick
the blocks of the engine's database then in PostgreSQL's shared buffers are listed
(``pg_buffercache``), before the floor the twin's same blocks are read into the buffers
(``pg_prewarm``), and after the floors the engine's blocks as its tick left them are read
back, so the next tick finds the cache the previous one left, as in a running worker. With
buffers sized for the data (6 GB here) the engine's pages stay cached from the deploy, and
without this the twin's were not: at 1M the cold floor of T+1d took 3.8 s against 2.1-2.6 s
with the same blocks cached. With PostgreSQL's default 128 MB the old floors' reads left the
engine a cache that suited its next tick better than its own: 100k T+1d 408-472 ms against
521-583 ms, same day. The engine keeps its connection from tick to tick, as a running worker
does, so the statements its backend prepared stay prepared (replacing its database by a
fresh copy before each tick, tried first, gave every tick a new backend).

The deploy's rows are vacuumed and analysed before the ticks (what autovacuum does within
minutes on a running server), and a checkpoint precedes each timed tick and each timed cold
floor, so both pay the WAL's full-page images for the pages they modify first alike. The
server's version, buffer and WAL settings are printed with each size (``buckets status``'s
line): the figures depend on them (see the README).

Before the queue existed (PERFORMANCE-NOTES.md) the same ticks took 3.5-4.6 s at 100k and
40-52 s at 1M. The same run prints how the tick time scales from the first size to the second,
for ticks that wrote similar numbers of transitions (within 1.5x of each other).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import timedelta
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine

from bench.dataset import NOW, prepare
from bench.ingest import BUCKETS
from buckets import health
from buckets.db import create_engine
from buckets.registry import Registry
from buckets.runtime import Runtime
from buckets.settings import load_settings
from workflows.backfill import Runner, deploy
from workflows.reconcile import on_cron, reconcile

OFFSETS = {
    "T+5m": timedelta(minutes=5),
    "T+10m": timedelta(minutes=10),
    "T+1h": timedelta(hours=1),
    "T+1d": timedelta(days=1),
}
CRON_BUCKETS = sum(1 for bucket in BUCKETS if on_cron(bucket))


def database_for(base: URL, size: int) -> str:
    """``<base database>_<size>``, created on the server when missing."""
    from buckets.db import ensure_database

    name = f"{base.database or 'buckets'}_{size}"
    ensure_database(base.set(database="postgres"), name)
    return base.set(database=name).render_as_string(hide_password=False)


def twin_of(engine: Engine, url: URL) -> Engine:
    """A copy of the engine's database as it stands (``<name>_twin``, replaced if present);
    both get the extensions :func:`residency` and :func:`prewarm` use (see the module)."""
    name = url.database
    with engine.begin() as conn:
        for extension in ("pg_buffercache", "pg_prewarm"):
            conn.execute(sa.text(f"CREATE EXTENSION IF NOT EXISTS {extension}"))
    engine.dispose()  # a template must have no other sessions
    with _server(url) as conn:
        strategy = " STRATEGY FILE_COPY" if conn.info.server_version >= 150000 else ""
        conn.execute(f'DROP DATABASE IF EXISTS "{name}_twin"')
        conn.execute(f'CREATE DATABASE "{name}_twin" TEMPLATE "{name}"{strategy}')
    return create_engine(url.set(database=f"{name}_twin"))


Blocks = list[tuple[int, int, int]]  # (relfilenode, first block, last block) in shared buffers

RESIDENT = """
    WITH held AS (
        SELECT relfilenode, relblocknumber AS block FROM pg_buffercache
        WHERE reldatabase = (SELECT oid FROM pg_database WHERE datname = :name)
          AND relforknumber = 0
    ), runs AS (
        SELECT relfilenode, block,
               block - row_number() OVER (PARTITION BY relfilenode ORDER BY block) AS run
        FROM held
    )
    SELECT relfilenode, min(block), max(block) FROM runs GROUP BY relfilenode, run
"""
PREWARM = """
    WITH wanted AS (
        SELECT c.oid, r.first,
               least(r.last, pg_relation_size(c.oid) / current_setting('block_size')::int - 1)
                   AS last
        FROM unnest(CAST(:nodes AS oid[]), CAST(:firsts AS bigint[]), CAST(:lasts AS bigint[]))
            AS r(node, first, last)
        JOIN pg_class c ON pg_relation_filenode(c.oid) = r.node
    )
    SELECT coalesce(sum(pg_prewarm(oid, 'buffer', 'main', first, last)), 0)
    FROM wanted WHERE first <= last
"""


def residency(engine: Engine) -> Blocks:
    """The blocks of the engine's database in PostgreSQL's shared buffers now."""
    with engine.connect() as conn:
        found = conn.execute(sa.text(RESIDENT), {"name": engine.url.database}).all()
    return [(int(node), int(first), int(last)) for node, first, last in found]


def prewarm(database: Engine, blocks: Blocks) -> int:
    """These blocks read into the shared buffers: the engine's own, or the twin's same ones
    (a file copy: the same relfilenodes; those it has, as the engine's tables grow a little
    more than the twin's). Returns how many."""
    params = {
        "nodes": [node for node, _, _ in blocks],
        "firsts": [first for _, first, _ in blocks],
        "lasts": [last for _, _, last in blocks],
    }
    with database.begin() as conn:
        return int(conn.execute(sa.text(PREWARM), params).scalar_one())


def drop_twin(twin: Engine) -> None:
    twin.dispose()
    with _server(twin.url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{twin.url.database}"')


def _server(url: URL) -> psycopg.Connection[Any]:
    server = url.set(drivername="postgresql", database="postgres")
    return psycopg.connect(server.render_as_string(hide_password=False), autocommit=True)


TICK_ROWS = {  # what a tick wrote, read from the engine's database by COPY
    "f_ledger": "SELECT * FROM bucket_transitions WHERE id > {since}",
    "f_joined": "SELECT m.* FROM bucket_memberships m JOIN bucket_transitions t"
    " ON t.membership_id = m.id AND t.kind = 'entered' AND t.id > {since}",
}
REDO = """
    WITH joined AS (
        INSERT INTO bucket_memberships SELECT * FROM f_joined RETURNING id
    ), flipped AS (
        UPDATE bucket_memberships m SET status = 'left', left_at = t.occurred_at,
            leave_reason = t.reason, last_evaluated_at = t.occurred_at, updated_at = now()
        FROM f_ledger t WHERE m.id = t.membership_id AND t.kind = 'left'
        RETURNING m.id
    )
    INSERT INTO bucket_transitions SELECT * FROM f_ledger
"""


def _conninfo(engine: Engine) -> str:
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


def checkpoint(engine: Engine) -> None:
    """A checkpoint before each timed tick and each timed floor: both then start with the
    same debt, a full-page image in the WAL for every page they modify first (else whichever
    ran after a checkpoint that the previous step's writes triggered pays more: at 1M, T+1d,
    row locks and index inserts write ~700 MB of page images)."""
    with psycopg.connect(_conninfo(engine), autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def cold_floor(engine: Engine, twin: Engine, since_id: int, blocks: Blocks) -> float:
    """The tick's writes, timed on the twin with ``blocks`` in the shared buffers, as the
    engine's were when its tick began (see the module)."""
    with psycopg.connect(_conninfo(engine)) as source, psycopg.connect(_conninfo(twin)) as target:
        for table, query in TICK_ROWS.items():
            like = "bucket_transitions" if table == "f_ledger" else "bucket_memberships"
            target.execute(f"CREATE TEMP TABLE {table} (LIKE {like})")
            selected = query.format(since=int(since_id))
            with (
                source.cursor().copy(f"COPY ({selected}) TO STDOUT") as reading,
                target.cursor().copy(f"COPY {table} FROM STDIN") as writing,
            ):
                for block in reading:
                    writing.write(block)
            target.execute(f"ANALYZE {table}")
        target.commit()
        prewarm(twin, blocks)
        checkpoint(twin)
        started = time.perf_counter()
        target.execute(REDO)
        seconds = time.perf_counter() - started
        target.commit()  # as the tick's were
    return seconds


def reset(engine: Engine) -> None:
    """Back to the generated dataset: no engine state."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "TRUNCATE journey_enrollments, bucket_transitions, bucket_memberships,"
                " bucket_configs, backfill_jobs, bucket_due"
            )
        )
        conn.execute(sa.text("UPDATE contacts SET decided_at = NULL WHERE decided_at IS NOT NULL"))
    vacuum(engine)


def vacuum(engine: Engine) -> None:
    """``VACUUM ANALYZE``: after the reset, and after the deploy's millions of rows, what
    autovacuum does within minutes of them on a running server (statistics, hint bits, the
    visibility map); the ticks are steady-state ticks, not the first reads of fresh rows."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE"))


def warm_floor(engine: Engine, since_id: int, runs: int) -> float:
    """The writes alone for the transitions with ids above ``since_id``: in a transaction
    rolled back, the tick's changes are undone (untimed), then one statement redoes exactly
    its writes — the joined membership rows inserted, the left ones flipped, every ledger row
    inserted — from tables holding them (nothing to decide)."""
    undo = [
        "CREATE TEMP TABLE f_ledger ON COMMIT DROP AS"
        " SELECT * FROM bucket_transitions WHERE id > :since",
        "CREATE TEMP TABLE f_joined ON COMMIT DROP AS SELECT m.* FROM bucket_memberships m"
        " JOIN f_ledger t ON t.membership_id = m.id AND t.kind = 'entered'",
        "DELETE FROM bucket_transitions WHERE id > :since",
        "DELETE FROM bucket_memberships m USING f_joined j WHERE m.id = j.id",
        "UPDATE bucket_memberships m SET status = 'active', left_at = NULL, leave_reason = NULL"
        " FROM f_ledger t WHERE m.id = t.membership_id AND t.kind = 'left'",
        "ANALYZE f_ledger",
        "ANALYZE f_joined",
    ]
    redo = sa.text(REDO)
    timings = []
    for _ in range(runs):
        with engine.connect() as conn:
            transaction = conn.begin()
            for statement in undo:
                conn.execute(sa.text(statement), {"since": since_id})
            started = time.perf_counter()
            conn.execute(redo)
            timings.append(time.perf_counter() - started)
            transaction.rollback()
    return statistics.median(timings)


def last_transition(engine: Engine) -> int:
    with engine.connect() as conn:
        found = conn.execute(sa.text("SELECT coalesce(max(id), 0) FROM bucket_transitions"))
        return int(found.scalar_one())


def written_since(engine: Engine, since_id: int) -> int:
    """Ledger rows committed after ``since_id`` (ids have gaps: rolled-back floors)."""
    with engine.connect() as conn:
        found = conn.execute(
            sa.text("SELECT count(*) FROM bucket_transitions WHERE id > :since"),
            {"since": since_id},
        )
        return int(found.scalar_one())


def warm_up(rt: Runtime) -> None:
    """An untimed tick as of the deploy's instant, ``NOW`` (nothing is due): it reopens the
    pool's connection after the copy, as a running worker's is open. The statements a tick
    with due entries builds are still built by the first timed tick (T+5m): ~50 ms once per
    process (SQLAlchemy compiling ten statements, ~40 ms, and the criteria's facts statement,
    ~10 ms), as in a worker's first tick; and that connection prepares them on the server."""
    tick = reconcile(NOW, runtime=rt)
    assert not tick.failed, tick.failed
    assert not tick.transitions, "nothing should be due at a warm-up"


def run_size(base: URL, size: int, runs: int) -> list[dict[str, Any]]:
    engine, url = prepare(database_for(base, size), size, 20)
    reset(engine)
    settings = load_settings(database_url=url.render_as_string(hide_password=False))
    rt = Runtime(engine=engine, registry=Registry(BUCKETS), settings=settings)
    started = time.perf_counter()
    deploy(rt, NOW)
    for job in Runner(rt, clock=lambda: NOW).run_pending():
        assert job.status == "completed", job
    deployed = time.perf_counter() - started
    print(f"{size:,} contacts: deployed 20 buckets (backfills + queue) in {deployed:.1f} s")
    with engine.connect() as conn:
        print(f"  server: {health.server(conn).describe()}")
    with engine.connect() as conn:
        entries = conn.execute(sa.text("SELECT count(*) FROM bucket_due")).scalar_one()
    print(f"  due-queue entries: {entries:,}")
    vacuum(engine)
    twin = twin_of(engine, url)
    warm_up(rt)
    rows = []
    for label, offset in OFFSETS.items():
        blocks = residency(engine)
        before = last_transition(engine)
        checkpoint(engine)
        began = time.perf_counter()
        tick = reconcile(NOW + offset, runtime=rt)
        seconds = time.perf_counter() - began
        assert not tick.failed, tick.failed
        swept = [b.bucket_id for b in tick.buckets if b.passes_ran not in ("no",)]
        assert not swept, f"buckets swept instead of queued: {swept}"
        transitions = written_since(engine, before)
        left = residency(engine)  # the cache this tick leaves the next one
        cold = cold_floor(engine, twin, before, blocks) if transitions else 0.0
        warm = warm_floor(engine, before, runs) if transitions else 0.0
        prewarm(engine, left)  # back after the floors' reads
        target = 1.5 * cold + 0.020 * CRON_BUCKETS
        rows.append(
            {
                "size": size,
                "tick": label,
                "seconds": seconds,
                "transitions": transitions,
                "due": sum(b.due for b in tick.buckets),
                "floor": cold,
                "warm": warm,
                "target": target,
            }
        )
        print(
            f"  {label:<6} tick {seconds * 1000:8.1f} ms  transitions {transitions:>7,}"
            f"  due {rows[-1]['due']:>7,}  floor {cold * 1000:7.1f} ms (warm {warm * 1000:.1f})"
            f"  target {target * 1000:7.1f} ms  {'met' if seconds <= target else 'NOT met'}"
        )
    engine.dispose()
    drop_twin(twin)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--runs", type=int, default=5, help="floor runs (median)")
    parser.add_argument(
        "--database-url", help="[default: BUCKETS_DATABASE_URL]; one database per size"
    )
    args = parser.parse_args(argv)
    from buckets.db import resolve_database_url

    base = resolve_database_url(load_settings(database_url=args.database_url))
    sizes = [int(size) for size in args.sizes.split(",")]
    results = [row for size in sizes for row in run_size(base, size, args.runs)]
    header = ("contacts", "tick", "time", "transitions", "floor", "warm", "target", "ratio")
    print("\n{:>10} {:<6} {:>10} {:>12} {:>10} {:>10} {:>10} {:>6}".format(*header))
    for row in results:
        ratio = row["seconds"] / row["floor"] if row["floor"] else float("nan")
        print(
            f"{row['size']:>10,} {row['tick']:<6} {row['seconds'] * 1000:>7.1f} ms"
            f" {row['transitions']:>12,} {row['floor'] * 1000:>7.1f} ms"
            f" {row['warm'] * 1000:>7.1f} ms {row['target'] * 1000:>7.1f} ms {ratio:>6.2f}"
        )
    if len(sizes) == 2:  # issue 11: ticks of similar transition counts (within 1.5x)
        small, large = sizes
        for z in (r for r in results if r["size"] == large):
            for a in (r for r in results if r["size"] == small):
                counts = sorted((a["transitions"], z["transitions"]))
                if counts[0] and counts[1] <= 1.5 * counts[0]:
                    print(
                        f"{large:,} {z['tick']} / {small:,} {a['tick']}"
                        f" = {z['seconds'] / a['seconds']:.2f}"
                        f" (transitions {z['transitions']:,} vs {a['transitions']:,})"
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
