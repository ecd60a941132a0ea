"""Crash safety: kill -9 a real dispatcher process again and again while transitions flow.

At the end every emitted transition has exactly one enrollment per journey its name triggers
(none missing, none doubled) and every emitted transition is marked dispatched.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from buckets import ingest_events
from buckets.dispatcher import dispatch_once
from buckets.models import bucket_transitions, journey_enrollments
from buckets.registry import Registry
from buckets.runtime import Runtime
from buckets.settings import Settings
from tests.conftest import CloneDB

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
DEFINITIONS = """
import time

from buckets import b, define_bucket, journey

pro = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"))
de = define_bucket(id="germany", criteria=b.prop("country").eq("DE"))

@journey(id="welcome", trigger=pro.entered, exit_on=[pro.left])
def welcome(enrollment):
    pass

@journey(id="every-entry", trigger="bucket:entered", concurrent=True)
def every_entry(enrollment):
    time.sleep(0.001)  # widen the window between enrolling and recording the delivery
"""


def test_killing_dispatchers_never_loses_or_doubles_an_enrollment(
    clone_db: CloneDB, tmp_path: Path
):
    definitions = tmp_path / "defs.py"
    definitions.write_text(DEFINITIONS)
    url = clone_db.url.render_as_string(hide_password=False)
    rt = Runtime(
        engine=clone_db.engine,
        registry=Registry.load(str(definitions)),
        settings=Settings(database_url=url, config_cache_seconds=0),
    )
    command = [
        sys.executable,
        "-m",
        "workflows.cli",
        "dispatch",
        "--database-url",
        url,
        "--definitions",
        str(definitions),
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    rng = random.Random(3)
    done = threading.Event()

    def produce() -> None:
        for round_ in range(12):
            batch = [
                {
                    "external_id": f"c{rng.randrange(400)}",
                    "event": "x",
                    "contact_properties": {
                        "plan": rng.choice(["pro", "free"]),
                        "country": rng.choice(["DE", "FR"]),
                    },
                }
                for _ in range(250)
            ]
            ingest_events(batch, now=NOW, runtime=rt)
            time.sleep(0.2 + 0.2 * (round_ % 3))
        done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    kills = 0

    def dispatched() -> int:
        with clone_db.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).where(
                        bucket_transitions.c.dispatched_at.is_not(None)
                    )
                ).scalar_one()
            )

    while not done.is_set() or kills < 6:
        before = dispatched()
        worker = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        # Each gets work done before it dies, however slow its start-up on a loaded machine:
        # wait until it dispatched something (or there was nothing to do), then a little more.
        deadline = time.monotonic() + 30
        while dispatched() == before and time.monotonic() < deadline and not done.is_set():
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        kills += 1
    producer.join()

    with clone_db.engine.connect() as conn:
        by_killed = conn.execute(
            sa.select(sa.func.count()).where(bucket_transitions.c.dispatched_at.is_not(None))
        ).scalar_one()
    assert by_killed > 500  # the killed dispatchers did real work before dying
    dispatch_once(rt, now=NOW)  # a survivor drains what the killed ones left
    with clone_db.engine.connect() as conn:
        emitted = conn.execute(
            sa.select(bucket_transitions).where(bucket_transitions.c.emitted)
        ).all()
        rows = conn.execute(sa.select(journey_enrollments)).all()
    assert len(emitted) > 1000
    assert all(t.dispatched_at is not None for t in emitted)
    expected = sorted(
        (journey.id, t.id)
        for t in emitted
        for journey in rt.registry.journeys
        if journey.triggered_by(f"bucket:{t.kind}:{t.bucket_id}")
    )
    assert sorted((row.journey_id, row.transition_id) for row in rows) == expected
    # and the per-contact order held: a welcome run is active only while the contact is pro
    with clone_db.engine.connect() as conn:
        members = set(
            conn.execute(
                sa.text(
                    "SELECT contact_id FROM bucket_memberships"
                    " WHERE bucket_id = 'pro' AND status = 'active'"
                )
            ).scalars()
        )
    running = {
        row.contact_id for row in rows if row.journey_id == "welcome" and row.status == "active"
    }
    assert running == members
    assert kills >= 6
