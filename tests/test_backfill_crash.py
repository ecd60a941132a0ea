"""Crash: kill -9 the process running a large backfill mid-way; the job resumes from its cursor
after its lease expires and ends exactly where a clean run ends, with no duplicate transitions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from bench.generate import generate
from buckets.models import backfill_jobs, bucket_memberships, bucket_transitions
from buckets.registry import Registry
from buckets.runtime import Runtime
from buckets.settings import Settings
from tests.conftest import CloneDB, PgServer, _private_db
from workflows import jobs
from workflows.backfill import Runner

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
DEFINITIONS = """
from buckets import b, define_bucket

went_dormant = define_bucket(
    id="went-dormant",
    criteria=b.all(
        b.event("feature.used").exists(), b.event("feature.used").within("7d").not_exists()
    ),
)
"""


def _runtime(db: CloneDB, definitions: Path) -> Runtime:
    url = db.url.render_as_string(hide_password=False)
    return Runtime(
        engine=db.engine,
        registry=Registry.load(str(definitions)),
        settings=Settings(database_url=url, config_cache_seconds=0),
    )


def _state(db: CloneDB) -> tuple[set[tuple[int, int, str]], list[str]]:
    with db.engine.connect() as conn:
        rows = {
            (row.contact_id, row.entry_count, row.status)
            for row in conn.execute(sa.select(bucket_memberships))
        }
        keys = list(conn.execute(sa.select(bucket_transitions.c.idempotency_key)).scalars())
    return rows, keys


def test_a_killed_backfill_resumes_and_ends_like_a_clean_run(
    clone_db: CloneDB, pg_server: PgServer, template_db: str, tmp_path: Path
):
    definitions = tmp_path / "defs.py"
    definitions.write_text(DEFINITIONS)
    generate(clone_db.url, contacts=20_000, events_per_contact=5, now=NOW - timedelta(days=1))
    url = clone_db.url.render_as_string(hide_password=False)
    command = [
        sys.executable,
        "-m",
        "workflows.cli",
        "backfill",
        "went-dormant",
        "--database-url",
        url,
        "--definitions",
        str(definitions),
        "--now",
        NOW.isoformat(),
        "--chunk-size",
        "150",
        "--json",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    worker = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    processed = 0
    while time.monotonic() < deadline and processed < 3000:
        time.sleep(0.02)
        with clone_db.engine.connect() as conn:
            processed = (
                conn.execute(sa.select(sa.func.max(backfill_jobs.c.processed))).scalar() or 0
            )
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    with clone_db.engine.connect() as conn:
        [job] = jobs.jobs(conn)
    assert job.status == "running"  # killed mid-way, holding a lease nobody extends
    assert 0 < job.processed < 20_000
    cursor = job.cursor
    assert cursor is not None

    rt = _runtime(clone_db, definitions)
    with clone_db.engine.begin() as conn:  # the reaper, once the lease has expired
        assert jobs.reap(conn, datetime.now(UTC) + timedelta(minutes=2)) == (1, 0)
    resumed = Runner(rt, chunk=150).run(job.id)
    assert (resumed.status, resumed.processed, resumed.attempts) == ("completed", 20_000, 2)
    crashed_rows, crashed_keys = _state(clone_db)
    assert len(crashed_keys) == len(set(crashed_keys))

    # a clean run of the same job on the same data
    with _private_db(pg_server, "buckets_clean", template_db) as clean:
        generate(clean.url, contacts=20_000, events_per_contact=5, now=NOW - timedelta(days=1))
        clean_rt = _runtime(clean, definitions)
        from workflows.backfill import start

        fresh, _ = start(clean_rt, "went-dormant", NOW)
        assert Runner(clean_rt, chunk=1000).run(fresh.id).status == "completed"
        clean_rows, clean_keys = _state(clean)
    assert crashed_rows == clean_rows
    assert sorted(crashed_keys) == sorted(clean_keys)
    assert len(clean_rows) > 5_000
