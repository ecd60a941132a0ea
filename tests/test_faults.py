"""Reliability under database faults (issue 15): real processes, a real PostgreSQL of the test's
own (``tests/private_pg.py``) that the test restarts (``pg_ctl restart -m fast`` and ``-m
immediate``) and whose backends it terminates (``pg_terminate_backend`` of every connection to
the database), over the worker (``buckets run``), ``buckets dispatch``, ``buckets ingest`` and
``buckets backfill``.

Every scenario ends with the same questions: is every process alive (or did it exit non-zero
with one line), was any transition lost or any enrollment doubled, is the membership exactly
what the criteria say. CI runs ``CI_ROUNDS`` faults of each kind per scenario; ``pytest --soak``
runs the tests marked ``soak`` (``SOAK_ROUNDS`` of each kind), which CI skips.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bench.generate import generate
from buckets.db import create_engine
from buckets.dispatcher import dispatch_once
from buckets.errors import IngestInterruptedError
from buckets.ingest import ingest_events
from buckets.migrations import upgrade
from buckets.models import (
    backfill_jobs,
    bucket_memberships,
    bucket_transitions,
    journey_enrollments,
    user_events,
)
from buckets.registry import Registry
from buckets.runtime import Runtime
from buckets.settings import Settings
from tests.conftest import unique_name
from tests.private_pg import PrivateServer

CI_ROUNDS = 3  # faults of each kind per scenario in CI
SOAK_ROUNDS = 10
KINDS = ("fast", "immediate", "terminate")
ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "BUCKETS_MAX_OUTAGE": "60"}

DEFINITIONS = """
from buckets import b, define_bucket, journey

pro = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"))
de = define_bucket(id="germany", criteria=b.prop("country").eq("DE"))
active = define_bucket(id="active", criteria=b.event("x").within("1d").exists())
went_dormant = define_bucket(
    id="went-dormant",
    criteria=b.all(
        b.event("feature.used").exists(), b.event("feature.used").within("7d").not_exists()
    ),
)

@journey(id="welcome", trigger=pro.entered, exit_on=[pro.left])
def welcome(enrollment):
    pass

@journey(id="every-entry", trigger="bucket:entered", concurrent=True)
def every_entry(enrollment):
    pass
"""


# --- the server and the databases ---------------------------------------------------------


@dataclass
class FaultDB:
    server: PrivateServer
    name: str
    url: str
    engine: sa.Engine
    definitions: Path

    def runtime(self) -> Runtime:
        return Runtime(
            engine=self.engine,
            registry=Registry.load(str(self.definitions)),
            settings=Settings(database_url=self.url, config_cache_seconds=0),
        )

    def inject(self, kind: str) -> None:
        """One fault: a restart (fast or immediate) or every backend of the database killed."""
        if kind == "terminate":
            self.server.terminate(self.name)
        else:
            self.server.restart(kind)
            self.server.wait_ready()

    def command(self, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "workflows.cli",
            *args,
            "--database-url",
            self.url,
            "--definitions",
            str(self.definitions),
        ]

    def scalar(self, query: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(query).scalar()


@pytest.fixture(scope="module")
def private_server() -> Iterator[tuple[PrivateServer, str]]:
    server = PrivateServer()
    try:
        template = unique_name("faults_tpl")
        url = server.create_database(template)
        engine = create_engine(url, poolclass=sa.pool.NullPool)
        upgrade(engine)
        engine.dispose()
        yield server, template
    finally:
        server.close()


@pytest.fixture
def fault_db(private_server: tuple[PrivateServer, str], tmp_path: Path) -> Iterator[FaultDB]:
    server, template = private_server
    server.wait_ready()
    name = unique_name("faults")
    url = server.create_database(name, template=template)
    definitions = tmp_path / "defs.py"
    definitions.write_text(DEFINITIONS)
    engine = create_engine(url)
    try:
        yield FaultDB(server, name, url.render_as_string(hide_password=False), engine, definitions)
    finally:
        engine.dispose()


def faults(rounds: int, seed: int) -> list[str]:
    """``rounds`` faults of each kind, in a shuffled order."""
    order = [kind for kind in KINDS for _ in range(rounds)]
    random.Random(seed).shuffle(order)
    return order


def spawn(command: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(command, env={**ENV, **env}, stdout=out, stderr=subprocess.STDOUT)


def eventually(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# --- what must hold after any run ------------------------------------------------------------


def assert_ledger_complete(db: FaultDB, rt: Runtime) -> dict[str, int]:
    """No transition lost, no enrollment doubled, every delivery made."""
    later = datetime.now(UTC) + timedelta(minutes=10)  # past every delivery reservation
    dispatch_once(rt, now=later)
    with db.engine.connect() as conn:
        memberships = conn.execute(sa.select(bucket_memberships)).all()
        transitions = conn.execute(sa.select(bucket_transitions)).all()
        enrollments = conn.execute(sa.select(journey_enrollments)).all()
    # every membership change has its ledger row, and the ledger nothing else
    entered = Counter(
        (t.bucket_id, t.contact_id, t.epoch) for t in transitions if t.kind == "entered"
    )
    left = Counter((t.bucket_id, t.contact_id, t.epoch) for t in transitions if t.kind == "left")
    assert entered == Counter((m.bucket_id, m.contact_id, m.entry_count) for m in memberships)
    assert left == Counter(
        (m.bucket_id, m.contact_id, m.entry_count) for m in memberships if m.status == "left"
    )
    emitted = [t for t in transitions if t.emitted]
    assert all(t.dispatched_at is not None for t in emitted)
    expected = sorted(
        (journey.id, t.id)
        for t in emitted
        for journey in rt.registry.journeys
        if journey.triggered_by(f"bucket:{t.kind}:{t.bucket_id}")
    )
    assert sorted((e.journey_id, e.transition_id) for e in enrollments) == expected
    undelivered = [e.id for e in enrollments if e.status == "active" and e.delivered_at is None]
    assert undelivered == []
    return {"transitions": len(transitions), "emitted": len(emitted), "enrolled": len(expected)}


def assert_members_match_properties(db: FaultDB) -> None:
    with db.engine.connect() as conn:
        for bucket, key, value in (("pro", "plan", "pro"), ("germany", "country", "DE")):
            members = set(
                conn.execute(
                    sa.select(bucket_memberships.c.contact_id).where(
                        bucket_memberships.c.bucket_id == bucket,
                        bucket_memberships.c.status == "active",
                    )
                ).scalars()
            )
            matching = set(
                conn.execute(
                    sa.text("SELECT id FROM contacts WHERE properties ->> :key = :value"),
                    {"key": key, "value": value},
                ).scalars()
            )
            assert members == matching, bucket


# --- a producer that rides out faults itself ---------------------------------------------


class Producer(threading.Thread):
    """Ingests batches with idempotency keys; an interrupted batch is sent again from the event
    the error names (what a caller of ingest_events does)."""

    def __init__(self, rt: Runtime, batches: int, seed: int) -> None:
        super().__init__(name="producer")
        self.rt, self.batches, self.rng = rt, batches, random.Random(seed)
        self.sent: set[str] = set()
        self.interrupted = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for number in range(self.batches):
                batch = [
                    {
                        "external_id": f"c{self.rng.randrange(300)}",
                        "event": "x",
                        "idempotency_key": f"b{number}-{i}",
                        "contact_properties": {
                            "plan": self.rng.choice(["pro", "free"]),
                            "country": self.rng.choice(["DE", "FR"]),
                        },
                    }
                    for i in range(200)
                ]
                self.send(batch)
                time.sleep(0.1)
        except BaseException as exc:
            self.error = exc

    def send(self, batch: list[dict[str, Any]]) -> None:
        start = 0
        deadline = time.monotonic() + 120
        while start < len(batch):
            try:
                result = ingest_events(batch[start:], runtime=self.rt, chunk_size=50)
            except IngestInterruptedError as exc:
                self.interrupted += 1
                rejected = exc.results.errors  # nothing was reported as rejected
                start += exc.index
                assert time.monotonic() < deadline, "the database never came back"
                time.sleep(0.2)
                assert rejected == []
                continue
            assert result.errors == []
            start = len(batch)
        self.sent.update(event["idempotency_key"] for event in batch)


# --- the worker and the dispatcher -----------------------------------------------------------


def run_worker_and_dispatcher(db: FaultDB, tmp_path: Path, rounds: int, seed: int) -> None:
    rt = db.runtime()
    generate(
        sa.make_url(db.url), contacts=3_000, events_per_contact=3, now=datetime.now(UTC), seed=seed
    )
    worker = spawn(db.command("run"), tmp_path / "worker.log", BUCKETS_RECONCILE_CRON="* * * * *")
    dispatcher = spawn(db.command("dispatch"), tmp_path / "dispatch.log")
    producer = Producer(rt, batches=10 + 4 * rounds, seed=seed)
    try:
        eventually(  # the worker deployed: the first-time backfills are done
            lambda: (
                db.scalar(sa.select(sa.func.count()).where(backfill_jobs.c.status == "completed"))
                == 4
            ),
            60,
            "the first-time backfills",
        )
        producer.start()
        rng = random.Random(seed)
        for kind in faults(rounds, seed):
            time.sleep(rng.uniform(0.3, 1.0))
            db.inject(kind)
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            assert dispatcher.poll() is None, (tmp_path / "dispatch.log").read_text()[-3000:]
        producer.join(timeout=300)
        assert producer.error is None, producer.error
        assert not producer.is_alive()
        pending = (
            sa.select(sa.func.count())
            .select_from(bucket_transitions)
            .where(bucket_transitions.c.emitted, bucket_transitions.c.dispatched_at.is_(None))
        )
        eventually(lambda: db.scalar(pending) == 0, 60, "the dispatchers to catch up")
        assert worker.poll() is None
        assert dispatcher.poll() is None
    finally:
        for process in (worker, dispatcher):
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=60) for process in (worker, dispatcher)]
    worker_log = (tmp_path / "worker.log").read_text()
    dispatch_log = (tmp_path / "dispatch.log").read_text()
    assert codes == [0, 0], worker_log[-3000:] + dispatch_log[-3000:]
    # ... and they did reconnect: an outage is logged once when it starts, once when it ends
    assert "dispatcher: database unavailable" in dispatch_log
    assert "dispatcher: database available again" in dispatch_log
    assert "database unavailable" in worker_log
    assert "dispatch failed" not in dispatch_log + worker_log
    assert dispatch_log.count("Traceback") == 0, dispatch_log[-3000:]
    # no traceback but those workflows/reconcile.py logs with a bucket that failed in a tick
    # (the tick is then retried at once: see Worker._reconcile)
    records = re.split(r"\n(?=\d{4}-\d\d-\d\d )", worker_log)
    for record in records:
        if "Traceback" in record:
            assert "buckets.reconcile ERROR reconcile of bucket" in record, record

    with db.engine.connect() as conn:
        keys = list(
            conn.execute(
                sa.select(user_events.c.idempotency_key).where(
                    user_events.c.idempotency_key.is_not(None)
                )
            ).scalars()
        )
    assert sorted(keys) == sorted(producer.sent)  # every event stored, once
    counts = assert_ledger_complete(db, rt)
    assert counts["emitted"] > 500
    assert_members_match_properties(db)


def test_worker_and_dispatcher_survive_restarts_and_terminations(fault_db, tmp_path):
    run_worker_and_dispatcher(fault_db, tmp_path, CI_ROUNDS, seed=1)


@pytest.mark.soak
def test_soak_worker_and_dispatcher(fault_db, tmp_path):
    run_worker_and_dispatcher(fault_db, tmp_path, SOAK_ROUNDS, seed=2)


# --- backfills -------------------------------------------------------------------------------

BACKFILL_NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def _backfill_state(db: FaultDB) -> tuple[set[tuple[int, int, str]], list[str]]:
    with db.engine.connect() as conn:
        rows = {
            (row.contact_id, row.entry_count, row.status)
            for row in conn.execute(
                sa.select(bucket_memberships).where(
                    bucket_memberships.c.bucket_id == "went-dormant"
                )
            )
        }
        keys = sorted(conn.execute(sa.select(bucket_transitions.c.idempotency_key)).scalars())
    return rows, keys


def _load(db: FaultDB) -> None:
    generate(
        sa.make_url(db.url),
        contacts=20_000,
        events_per_contact=5,
        now=BACKFILL_NOW - timedelta(days=1),
    )


def run_backfills(db: FaultDB, tmp_path: Path, rounds: int, seed: int) -> tuple[int, int]:
    """Backfill runs (the first-time job, then admin jobs) with faults injected while they
    run, each one once the job made progress since the previous one. Returns (runs, outages
    the runs reported)."""
    _load(db)
    command = db.command(
        "backfill", "went-dormant", "--now", BACKFILL_NOW.isoformat(), "--chunk-size", "100"
    )
    rng = random.Random(seed)
    todo = faults(rounds, seed)
    runs = outages = 0
    progress = sa.select(sa.func.coalesce(sa.func.sum(backfill_jobs.c.processed), 0))
    while todo:
        runs += 1
        log = tmp_path / f"backfill-{runs}.log"
        process = spawn([*command, "--json"], log)
        while todo and process.poll() is None:
            before = db.scalar(progress)
            deadline = time.monotonic() + 60
            while db.scalar(progress) < before + 500 and process.poll() is None:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            if process.poll() is None:
                time.sleep(rng.uniform(0, 0.2))
                db.inject(todo.pop())
        assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert "Traceback" not in text
        outages += text.count("database unavailable")
        assert text.count("database unavailable") == text.count("available again")
    with db.engine.connect() as conn:
        statuses = list(conn.execute(sa.select(backfill_jobs.c.status)).scalars())
    assert statuses == ["completed"] * runs  # none failed, none left behind
    return runs, outages


def test_backfills_survive_restarts_and_terminations(fault_db, private_server, tmp_path):
    _, outages = run_backfills(fault_db, tmp_path, CI_ROUNDS, seed=3)
    assert outages >= len(KINDS) * CI_ROUNDS // 2  # most faults hit a chunk in flight
    faulted = _backfill_state(fault_db)
    # a clean run on the same data ends in the same state
    server, template = private_server
    clean_name = unique_name("faults_clean")
    clean_url = server.create_database(clean_name, template=template)
    clean = FaultDB(
        server,
        clean_name,
        clean_url.render_as_string(hide_password=False),
        create_engine(clean_url),
        fault_db.definitions,
    )
    try:
        _load(clean)
        from workflows.backfill import Runner, start

        rt = clean.runtime()
        job, _ = start(rt, "went-dormant", BACKFILL_NOW)
        assert Runner(rt, chunk=5_000).run(job.id).status == "completed"
        assert faulted == _backfill_state(clean)
    finally:
        clean.engine.dispose()
    assert len(faulted[0]) > 5_000


@pytest.mark.soak
def test_soak_backfills(fault_db, tmp_path):
    run_backfills(fault_db, tmp_path, SOAK_ROUNDS, seed=4)


def test_a_killed_backfill_is_resumed_at_once_by_the_next_command(fault_db, tmp_path):
    _load(fault_db)
    command = fault_db.command(
        "backfill", "went-dormant", "--now", BACKFILL_NOW.isoformat(), "--chunk-size", "100"
    )
    first = spawn(command, tmp_path / "first.log")
    processed = sa.select(sa.func.max(backfill_jobs.c.processed))
    eventually(lambda: (fault_db.scalar(processed) or 0) >= 2_000, 60, "progress")
    first.send_signal(signal.SIGKILL)
    first.wait()
    with fault_db.engine.connect() as conn:
        killed = conn.execute(sa.select(backfill_jobs)).one()
    assert killed.status == "running"
    assert killed.lease_expires_at > datetime.now(UTC)  # the lease has not expired
    done = subprocess.run(
        [*command, "--json"], env=ENV, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert f"taken over from {killed.lease_owner}" in done.stderr
    assert f"after contact id {killed.cursor['after']}" in done.stderr
    [job] = json.loads(done.stdout)["jobs"]
    assert (job["status"], job["processed"], job["attempts"]) == ("completed", 20_000, 2)


# --- ingest ----------------------------------------------------------------------------------


def _events_file(path: Path, start: int, count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = [
        json.dumps(
            {
                "external_id": f"i{rng.randrange(1_000)}",
                "event": "x",
                "idempotency_key": f"k{start + n}",
                "contact_properties": {
                    "plan": rng.choice(["pro", "free"]),
                    "country": rng.choice(["DE", "FR"]),
                },
            }
        )
        for n in range(count)
    ]
    path.write_text("\n".join(lines) + "\n")
    return lines


def run_ingests(db: FaultDB, tmp_path: Path, rounds: int, seed: int) -> Counter[int]:
    """``buckets ingest`` with faults injected while it runs; an exit 2 is resumed from the
    line it names. Returns the exit statuses seen."""
    rng = random.Random(seed)
    todo = faults(rounds, seed)
    statuses: Counter[int] = Counter()
    sent: list[str] = []
    remaining: list[str] = []
    while todo or remaining:
        if not remaining:
            remaining = _events_file(
                tmp_path / "batch.jsonl", len(sent), 4_000, rng.randrange(1000)
            )
            sent.extend(json.loads(line)["idempotency_key"] for line in remaining)
        path = tmp_path / "now.jsonl"
        path.write_text("\n".join(remaining) + "\n")
        stored = db.scalar(sa.select(sa.func.count()).select_from(user_events))
        process = subprocess.Popen(
            [*db.command("ingest", str(path)), "--json"],
            env={**ENV, "BUCKETS_INGEST_CHUNK_SIZE": "50"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if todo:  # mid-run: once the first chunks are in, however slowly the process starts
            eventually(
                lambda: (
                    process.poll() is not None  # noqa: B023
                    or db.scalar(sa.select(sa.func.count()).select_from(user_events)) > stored  # noqa: B023
                ),
                60,
                "the ingest to store its first chunk",
            )
            time.sleep(rng.uniform(0.0, 0.3))
            db.inject(todo.pop())
        out, err = process.communicate(timeout=120)
        statuses[process.returncode] += 1
        assert out, err[-3000:]
        payload = json.loads(out)
        assert payload["rejected"] == 0, payload["rejections"]  # never blamed on the input
        if process.returncode == 0:
            assert payload["failed"] is None
            remaining = []
            continue
        assert process.returncode == 2, err
        resume = payload["resume_from_line"]
        assert err.strip().splitlines()[-1].startswith("buckets: error: line ")
        assert f"resume from line {resume}" in err
        assert "Traceback" not in err
        assert payload["accepted"] + payload["duplicate"] == resume - 1
        remaining = remaining[resume - 1 :]
    with db.engine.connect() as conn:
        keys = sorted(
            conn.execute(
                sa.select(user_events.c.idempotency_key).where(
                    user_events.c.idempotency_key.is_not(None)
                )
            ).scalars()
        )
    assert keys == sorted(sent)  # every line ingested, once
    return statuses


def test_ingest_fails_on_an_outage_and_resumes_from_the_line_it_names(fault_db, tmp_path):
    statuses = run_ingests(fault_db, tmp_path, CI_ROUNDS, seed=5)
    assert statuses[2] >= 1  # an outage hit a chunk in flight at least once
    assert set(statuses) <= {0, 2}
    assert_ledger_complete(fault_db, fault_db.runtime())
    assert_members_match_properties(fault_db)


@pytest.mark.soak
def test_soak_ingest(fault_db, tmp_path):
    statuses = run_ingests(fault_db, tmp_path, SOAK_ROUNDS, seed=6)
    assert set(statuses) <= {0, 2}
    assert_ledger_complete(fault_db, fault_db.runtime())


# --- giving up, and dying loudly -------------------------------------------------------------


def test_a_database_that_stays_down_ends_the_worker_and_the_dispatcher_in_one_line(
    fault_db, tmp_path
):
    worker = spawn(fault_db.command("run"), tmp_path / "worker.log", BUCKETS_MAX_OUTAGE="3")
    dispatcher = spawn(
        fault_db.command("dispatch"), tmp_path / "dispatch.log", BUCKETS_MAX_OUTAGE="3"
    )
    eventually(
        lambda: fault_db.scalar(sa.select(sa.func.count()).select_from(backfill_jobs)) == 4,
        60,
        "the worker to deploy",
    )
    time.sleep(1.0)
    fault_db.server.stop("immediate")
    try:
        codes = [process.wait(timeout=60) for process in (worker, dispatcher)]
    finally:
        fault_db.server.start()
    for code, log in zip(codes, ("worker.log", "dispatch.log"), strict=True):
        text = (tmp_path / log).read_text()
        assert code == 1, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        last = text.strip().splitlines()[-1]
        assert last.startswith("buckets: error: "), text[-3000:]
        assert "unavailable for" in last
        assert "giving up" in last


def test_a_loop_that_dies_stops_the_worker_non_zero(fault_db, tmp_path):
    worker = spawn(fault_db.command("run"), tmp_path / "worker.log")
    eventually(
        lambda: (
            fault_db.scalar(sa.select(sa.func.count()).where(backfill_jobs.c.status == "completed"))
            == 4
        ),
        60,
        "the worker to deploy",
    )
    with fault_db.engine.begin() as conn:  # not an outage: a schema the worker cannot use
        conn.execute(sa.text("ALTER TABLE backfill_jobs RENAME TO backfill_jobs_gone"))
    assert worker.wait(timeout=60) == 1
    last = (tmp_path / "worker.log").read_text().strip().splitlines()[-1]
    assert last.startswith("buckets: error: worker stopped: "), last
    assert "backfill_jobs" in last


def test_a_job_whose_holder_is_alive_is_only_taken_over_on_request(fault_db, tmp_path):
    import socket

    _load(fault_db)
    rt = fault_db.runtime()
    from workflows.backfill import start

    job, _ = start(rt, "went-dormant", BACKFILL_NOW)
    alive = f"{socket.gethostname()}:{os.getpid()}:1"  # this test process: alive
    with fault_db.engine.begin() as conn:
        conn.execute(
            sa.update(backfill_jobs)
            .where(backfill_jobs.c.id == job.id)
            .values(
                status="running",
                lease_owner=alive,
                lease_expires_at=datetime.now(UTC) + timedelta(minutes=1),
            )
        )
    command = fault_db.command("backfill", "went-dormant", "--now", BACKFILL_NOW.isoformat())
    refused = subprocess.run(command, env=ENV, capture_output=True, text=True, check=False)
    assert refused.returncode == 1
    assert "is already running (lease held by" in refused.stderr
    assert "pass --take-over" in refused.stderr
    taken = subprocess.run(
        [*command, "--take-over", "--json"], env=ENV, capture_output=True, text=True, check=False
    )
    assert taken.returncode == 0, taken.stderr
    assert f"taken over from {alive}" in taken.stderr
    assert json.loads(taken.stdout)["jobs"][0]["status"] == "completed"
