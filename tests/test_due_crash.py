"""Crash: kill -9 a process deciding due-queue entries mid-chunk, restart, nothing lost or doubled.

3,000 contacts go dormant at the same instant; a real subprocess processes their entries in
chunks of 50 (each chunk one transaction: claim, decide, ledger, new entries) and is killed with
SIGKILL while it works, three times; a last process finishes. Every contact must have joined
exactly once (one active row, one ``entered`` transition, epoch 1), and no entry may be left due.
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

from buckets import ingest_events
from buckets.models import bucket_due, bucket_memberships, bucket_transitions
from buckets.registry import Registry
from buckets.runtime import Runtime
from buckets.settings import Settings
from tests.conftest import CloneDB
from workflows.backfill import Runner, deploy

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
CONTACTS = 3_000
DEFINITIONS = """
from buckets import b, define_bucket

went_dormant = define_bucket(
    id="went-dormant",
    criteria=b.all(b.event("used").exists(), b.event("used").within("7d").not_exists()),
)
"""
WORKER = """
import sys
from datetime import datetime
from buckets.runtime import Runtime
from workflows.reconcile import reconcile

rt = Runtime.create(database_url=sys.argv[1], definitions=sys.argv[2])
print("ready", flush=True)
tick = reconcile(datetime.fromisoformat(sys.argv[3]), runtime=rt, due_only=True, due_chunk=50)
assert not tick.failed, tick.failed
print("done", tick.buckets[0].due, flush=True)
"""


def _joined(db: CloneDB) -> int:
    with db.engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count()).where(bucket_transitions.c.kind == "entered")
            ).scalar_one()
        )


def test_killing_a_worker_mid_chunk_loses_and_doubles_nothing(clone_db: CloneDB, tmp_path: Path):
    definitions = tmp_path / "defs.py"
    definitions.write_text(DEFINITIONS)
    url = clone_db.url.render_as_string(hide_password=False)
    rt = Runtime(
        engine=clone_db.engine,
        registry=Registry.load(str(definitions)),
        settings=Settings(database_url=url, config_cache_seconds=0),
    )
    ingest_events(
        [{"external_id": f"c{i:05d}", "event": "used"} for i in range(CONTACTS)],
        now=T0,
        runtime=rt,
    )
    deploy(rt, T0 + timedelta(hours=1))
    for job in Runner(rt, clock=lambda: T0 + timedelta(hours=1)).run_pending():
        assert job.status == "completed"
    now = (T0 + timedelta(days=8)).isoformat()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    command = [sys.executable, "-c", WORKER, url, str(definitions), now]
    kills = 0
    for _ in range(3):
        before = _joined(clone_db)
        worker = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while _joined(clone_db) <= before + 100 and time.monotonic() < deadline:
            time.sleep(0.02)  # let it commit a few chunks, then kill it in the middle of one
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
        worker.stdout.close()
        kills += worker.returncode == -signal.SIGKILL
    assert kills == 3
    assert _joined(clone_db) < CONTACTS  # the kills did interrupt the work
    finished = subprocess.run(
        command, check=False, capture_output=True, text=True, env=env, timeout=300
    )
    assert finished.returncode == 0, finished.stderr
    with clone_db.engine.connect() as conn:
        rows = conn.execute(
            sa.select(bucket_memberships.c.status, bucket_memberships.c.entry_count)
        ).all()
        keys = list(conn.execute(sa.select(bucket_transitions.c.idempotency_key)).scalars())
        due_now = conn.execute(
            sa.select(sa.func.count()).where(bucket_due.c.due_at <= datetime.fromisoformat(now))
        ).scalar_one()
    assert sorted(set(rows)) == [("active", 1)]
    assert len(rows) == CONTACTS
    assert len(keys) == len(set(keys)) == CONTACTS
    assert due_now == 0
