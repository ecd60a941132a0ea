"""Flip latency: from the instant the clock changes a membership to the committed transition,
with ``buckets run`` going (the waker), on a clock-driven bucket.

    python -m bench.flip_latency [--contacts 300] [--spread 60] [--database-url URL]

A fresh database (``<name>_flips``) gets the bucket ``count gte 3 within 10m`` and contacts
whose third-newest event ages out of the window one after another, one every ``spread /
contacts`` seconds from 20 s after the start: each is a member until its instant ``F``, then
must leave. ``buckets run`` runs as a real subprocess (its waker applies flips as they fall
due; the 5-minute cron tick does not fire in between). The benchmark listens on the ledger's
NOTIFY channel and stamps each ``left`` transition when its notification arrives, i.e. after
its commit: latency = arrival - F. Prints p50, p99 and max (target: p99 < 2 s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine

from buckets.db import create_engine, ensure_database, resolve_database_url
from buckets.dispatcher import CHANNEL
from buckets.ingest import ingest_events
from buckets.migrations import upgrade
from buckets.registry import Registry
from buckets.runtime import Runtime
from buckets.settings import load_settings

WINDOW = timedelta(minutes=10)
TICK = timedelta(microseconds=1)
DEFINITIONS = """
from buckets import b, define_bucket

busy = define_bucket(id="busy-10m", criteria=b.event("used").within("10m").at_least(3))
"""


def fresh_database(database_url: str | None) -> tuple[Runtime, URL, Path]:
    """A new, migrated ``<name>_flips`` database and a runtime with the bucket."""
    base = resolve_database_url(load_settings(database_url=database_url))
    name = f"{base.database or 'buckets'}_flips"
    admin_url = base.set(drivername="postgresql", database="postgres")
    with psycopg.connect(admin_url.render_as_string(False), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    ensure_database(base.set(database="postgres"), name)
    url = base.set(database=name)
    engine = create_engine(url)
    upgrade(engine)
    definitions = Path(tempfile.mkdtemp()) / "flips.py"
    definitions.write_text(DEFINITIONS)
    rt = Runtime(
        engine=engine,
        registry=Registry.load(str(definitions)),
        settings=load_settings(database_url=url.render_as_string(hide_password=False)),
    )
    return rt, url, definitions


def listen_for_leaves(url: URL, engine: Engine, flips: dict[str, datetime]) -> list[float]:
    """Each ``left`` transition's latency: its notification's arrival minus its flip instant."""
    latencies: list[float] = []
    listen = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(listen, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        last_id = 0
        deadline = max(flips.values()) + timedelta(seconds=30)
        while datetime.now(UTC) < deadline and len(latencies) < len(flips):
            for _ in listener.notifies(timeout=0.5, stop_after=1):
                pass
            received = time.time()
            with engine.connect() as conn:
                rows = conn.execute(
                    sa.text(
                        "SELECT t.id, c.external_id FROM bucket_transitions t"
                        " JOIN contacts c ON c.id = t.contact_id"
                        " WHERE t.id > :last AND t.kind = 'left'"
                    ),
                    {"last": last_id},
                ).all()
            for row in rows:
                last_id = max(last_id, row.id)
                latencies.append(received - flips[row.external_id].timestamp())
    return sorted(latencies)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--contacts", type=int, default=300)
    parser.add_argument("--spread", type=float, default=60.0, help="seconds the flips span")
    parser.add_argument("--database-url", help="[default: BUCKETS_DATABASE_URL]")
    args = parser.parse_args(argv)
    rt, url, definitions = fresh_database(args.database_url)

    start = datetime.now(UTC)
    step = args.spread / args.contacts
    flips = {f"c{i:05d}": start + timedelta(seconds=20 + i * step) for i in range(args.contacts)}
    events = [
        {"external_id": who, "event": "used", "occurred_at": at - WINDOW - TICK + offset}
        for who, at in flips.items()
        for offset in (timedelta(0), timedelta(seconds=1), timedelta(seconds=2))
    ]
    assert not ingest_events(events, now=start, runtime=rt).errors
    with rt.engine.connect() as conn:
        members = conn.execute(sa.text("SELECT count(*) FROM bucket_memberships")).scalar_one()
    print(f"{members} members, flips from +20 s to +{20 + args.spread:.0f} s")

    environment = {
        **os.environ,
        "BUCKETS_DATABASE_URL": url.render_as_string(hide_password=False),
        "BUCKETS_DEFINITIONS": str(definitions),
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "workflows.cli", "run"],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        latencies = listen_for_leaves(url, rt.engine, flips)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        rt.engine.dispose()
    if len(latencies) < args.contacts:
        print(f"only {len(latencies)} of {args.contacts} flips arrived")
        return 1
    p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)]
    print(
        f"flip latency over {len(latencies)} flips: p50 {statistics.median(latencies):.3f} s,"
        f" p99 {p99:.3f} s, max {latencies[-1]:.3f} s, min {latencies[0]:.3f} s"
        f" (target p99 < 2 s: {'met' if p99 < 2 else 'NOT met'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
