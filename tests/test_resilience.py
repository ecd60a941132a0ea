"""The resilience mechanism itself: what counts as an outage, supervision, and a batch ingest
that tells a database rejection of one event from an outage. Real errors of a real PostgreSQL;
the loops under real restarts are in ``test_faults.py``."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from buckets import b, define_bucket, ingest_events
from buckets.errors import DatabaseUnavailableError, IngestInterruptedError
from buckets.resilience import OutageTimeout, Supervisor, is_outage, retry_outages
from buckets.validation import IngestError

PRO = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"))


def test_a_terminated_backend_is_an_outage_and_a_bad_statement_is_not(clone_db):
    with clone_db.engine.connect() as victim, clone_db.engine.connect() as admin:
        pid = victim.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        admin.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
        with pytest.raises(sa.exc.DBAPIError) as lost:
            victim.exec_driver_sql("SELECT 1")
        with pytest.raises(sa.exc.DBAPIError) as bad:
            admin.exec_driver_sql("SELECT * FROM no_such_table")
    assert is_outage(lost.value)
    assert not is_outage(bad.value)
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect("postgresql://postgres@127.0.0.1:1/x", connect_timeout=2)
    assert is_outage(refused.value)
    assert is_outage(DatabaseUnavailableError("down"))
    assert not is_outage(OutageTimeout("gave up"))


def test_retry_outages_gives_up_after_max_outage_and_never_retries_other_errors():
    calls = []

    def unreachable() -> None:
        calls.append(1)
        psycopg.connect("postgresql://postgres@127.0.0.1:1/x", connect_timeout=2)

    started = time.monotonic()
    with pytest.raises(OutageTimeout, match=r"unavailable for \d+ s, giving up"):
        retry_outages("probe", unreachable, max_outage=1.0)
    assert 1.0 <= time.monotonic() - started < 5
    assert len(calls) > 2

    def bug() -> None:
        calls.append(2)
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        retry_outages("probe", bug, max_outage=1.0)
    assert calls.count(2) == 1


def test_a_stop_interrupts_the_backoff():
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        retry_outages(
            "probe",
            lambda: psycopg.connect("postgresql://postgres@127.0.0.1:1/x"),
            stop=stop,
            max_outage=60,
        )
    assert time.monotonic() - started < 3


def test_the_supervisor_stops_everything_when_a_thread_dies_or_returns():
    stop = threading.Event()
    supervisor = Supervisor(stop)
    supervisor.start("steady", stop.wait)
    supervisor.start("buggy", lambda: 1 / 0)
    assert stop.wait(5)
    assert supervisor.join(5) == []
    assert supervisor.failure == "buggy: ZeroDivisionError: division by zero"

    stop = threading.Event()
    supervisor = Supervisor(stop)
    supervisor.start("quitter", lambda: None)
    assert stop.wait(5)
    assert supervisor.failure == "quitter: stopped unexpectedly"

    stop = threading.Event()
    supervisor = Supervisor(stop)
    supervisor.start("steady", stop.wait)
    stop.set()  # a shutdown: threads returning then are no failure
    assert supervisor.join(5) == []
    assert supervisor.failure is None


def test_a_database_rejection_stays_per_event_in_a_batch(make_runtime, clone_db):
    rt = make_runtime(PRO)
    with clone_db.engine.begin() as conn:  # a rule only the database knows about
        conn.execute(
            sa.text("ALTER TABLE user_events ADD CONSTRAINT no_forbidden CHECK (event <> 'no')")
        )
    events: list[dict[str, Any]] = [
        {"external_id": "a", "event": "x", "contact_properties": {"plan": "pro"}},
        {"external_id": "b", "event": "no"},
        {"external_id": "c", "event": "x", "contact_properties": {"plan": "pro"}},
    ]
    result = ingest_events(events, runtime=rt)
    assert result.accepted == 2
    [error] = result.errors
    assert isinstance(error, IngestError)
    assert error.index == 1
    assert "database rejected the event" in str(error)


def test_an_unreachable_database_interrupts_a_batch_instead_of_rejecting_it(make_runtime):
    from buckets.db import create_engine

    rt = make_runtime(PRO)
    rt.engine = create_engine("postgresql://postgres@127.0.0.1:1/nowhere")
    events = [{"external_id": f"c{i}", "event": "x"} for i in range(5)]
    events.insert(0, {"external_id": "", "event": "x"})  # bad input, rejected before any SQL
    with pytest.raises(IngestInterruptedError) as stopped:
        ingest_events(events, runtime=rt, chunk_size=2)
    assert stopped.value.index == 1  # the first event not ingested
    assert "resume from events[1]" in str(stopped.value)
    [rejected] = stopped.value.results.results
    assert isinstance(rejected, IngestError)
    assert rejected.index == 0
