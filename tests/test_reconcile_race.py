"""Races: ingest while a reconcile runs on the same buckets; two reconcile processes on one tick.

Real threads and processes, real connections, a private database each.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from buckets import b, define_bucket, ingest_event, ingest_events
from buckets.criteria import Event, evaluate, in_memory_counter
from buckets.models import (
    bucket_configs,
    bucket_memberships,
    bucket_transitions,
    contacts,
    user_events,
)
from tests.conftest import CloneDB
from workflows.reconcile import reconcile

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
D = timedelta(days=1)
DORMANT = define_bucket(
    id="went-dormant",
    criteria=b.all(
        b.event("feature.used").exists(), b.event("feature.used").within("7d").not_exists()
    ),
)
POWER = define_bucket(id="power", criteria=b.event("feature.used").within("7d").at_least(3))
PRO_DORMANT = define_bucket(
    id="pro-dormant",
    criteria=b.all(
        b.prop("plan").eq("pro"),
        b.event("feature.used").exists(),
        b.event("feature.used").within("7d").not_exists(),
    ),
)
BUCKETS = (DORMANT, POWER, PRO_DORMANT)


def _deploy(rt: Any) -> None:
    with rt.engine.begin() as conn:
        for bucket in BUCKETS:
            conn.execute(
                pg_insert(bucket_configs).values(
                    bucket_id=bucket.id, criteria_hash=bucket.fingerprint
                )
            )


def _expected(conn: Any, now: datetime) -> set[tuple[str, int]]:
    people = {row.id: row.properties for row in conn.execute(sa.select(contacts))}
    history: dict[int, list[Event]] = {contact_id: [] for contact_id in people}
    for row in conn.execute(sa.select(user_events)):
        history[row.contact_id].append(Event(row.event, row.occurred_at, row.properties))
    return {
        (bucket.id, contact_id)
        for contact_id, properties in people.items()
        for bucket in BUCKETS
        if evaluate(bucket.criteria, properties, in_memory_counter(history[contact_id], now))
    }


def test_ingest_racing_a_reconcile_never_leaves_a_contradicted_membership(make_runtime):
    rt = make_runtime(*BUCKETS)
    _deploy(rt)
    rng = random.Random(7)
    people = [f"p{i:03d}" for i in range(300)]
    ingest_events(
        [
            {
                "external_id": who,
                "event": "feature.used",
                "occurred_at": T0 - timedelta(hours=rng.randint(0, 48)),
                "contact_properties": {"plan": rng.choice(["pro", "free"])},
            }
            for who in people
            for _ in range(rng.randint(1, 4))
        ],
        now=T0,
        runtime=rt,
    )
    for round_ in range(4):
        now = T0 + (8 + round_ * 3) * D  # everybody is dormant as of each round's now
        returning = rng.sample(people, 60)
        errors: list[BaseException] = []

        def ingest(
            who_list: list[str], now: datetime = now, errors: list[BaseException] = errors
        ) -> None:
            try:
                for who in who_list:
                    ingest_event(who, "feature.used", {}, now=now, runtime=rt)
            except BaseException as exc:
                errors.append(exc)

        def cron(now: datetime = now, errors: list[BaseException] = errors) -> None:
            try:
                result = reconcile(now, runtime=rt, chunk_size=37)
                assert not result.failed, result.failed
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=ingest, args=(returning[:30],)),
            threading.Thread(target=cron),
            threading.Thread(target=ingest, args=(returning[30:],)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []

        with rt.engine.connect() as conn:
            got = {
                (row.bucket_id, row.contact_id)
                for row in conn.execute(
                    sa.select(bucket_memberships).where(bucket_memberships.c.status == "active")
                )
            }
            assert got == _expected(conn, now), f"round {round_}"
            ledger = conn.execute(sa.select(bucket_transitions)).all()
        keys = [row.idempotency_key for row in ledger]
        assert len(keys) == len(set(keys))
        # A join by the cron followed by a leave is only right if the leave was caused by an
        # event the cron could not have seen: every such leave names its ingested event.
        for row in ledger:
            if row.kind == "left" and row.source == "ingest":
                assert row.event_id is not None


SCRIPT = """
import json, sys
from datetime import datetime
from buckets.runtime import Runtime
from workflows.reconcile import reconcile
rt = Runtime.create(database_url=sys.argv[1], definitions=sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
tick = reconcile(datetime.fromisoformat(sys.argv[3]), runtime=rt, chunk_size=50)
print(json.dumps(tick.to_dict()))
"""


def test_two_processes_on_the_same_tick_reconcile_each_bucket_once(
    clone_db: CloneDB, tmp_path: Path, make_runtime
):
    rt = make_runtime(*BUCKETS)
    _deploy(rt)
    ingest_events(
        [{"external_id": f"c{i:04d}", "event": "feature.used"} for i in range(1500)],
        now=T0,
        runtime=rt,
    )
    definitions = tmp_path / "defs.py"
    definitions.write_text("from tests.test_reconcile_race import BUCKETS\n")
    url = clone_db.url.render_as_string(hide_password=False)
    now = (T0 + 8 * D).isoformat()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, url, str(definitions), now],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    for worker in workers:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "ready"
    for worker in workers:  # release both at once
        assert worker.stdin is not None
        worker.stdin.write("go\n")
        worker.stdin.flush()
    reports = []
    for worker in workers:
        out, _ = worker.communicate(timeout=120)
        assert worker.returncode == 0
        reports.append(json.loads(out.strip().splitlines()[-1]))
    for bucket in BUCKETS:  # the full passes (the queue is not complete here) ran once
        ran = sorted(
            item["passes_ran"]
            for report in reports
            for item in report["buckets"]
            if item["bucket_id"] == bucket.id
        )
        assert ran[0] == "incomplete queue", (bucket.id, reports)
        assert ran[1].startswith("no (incomplete queue: "), (bucket.id, reports)
    joined = sum(item["joined"] for report in reports for item in report["buckets"])
    assert joined == 1500  # everybody went dormant; nobody is pro, nobody is a power user
