"""Prometheus metrics on the admin API and the worker; counted at commit; multi-process mode."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from buckets import b, define_bucket, ingest_event, journey
from buckets.dispatcher import dispatch_once
from buckets.registry import Registry
from tests.conftest import CloneDB
from workflows import backfill
from workflows.api import create_app
from workflows.backfill import Runner
from workflows.scheduler import reconcile_job
from workflows.worker import Worker

PRO = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"))
QUIET = define_bucket(
    id="quiet",
    criteria=b.all(b.event("seen").exists(), b.event("seen").within("1h").not_exists()),
)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def test_api_metrics_without_token(make_runtime):
    failing = journey(id="fails", trigger=PRO.entered, max_attempts=2)(lambda enrollment: 1 / 0)
    rt = make_runtime(PRO, QUIET, journeys=[failing], admin_token="secret")
    with TestClient(create_app(rt)) as client:
        before = client.get("/metrics").text
        ingest_event("a", "x", {}, contact_properties={"plan": "pro"}, runtime=rt)
        ingest_event("b", "seen", {}, runtime=rt)
        response = client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        after = response.text

        entered = {"bucket": "pro", "kind": "entered", "source": "ingest", "emitted": "true"}
        assert value(after, "buckets_transitions_total", **entered) == (
            value(before, "buckets_transitions_total", **entered) + 1
        )
        accepted = value(after, "buckets_ingest_events_total", outcome="accepted")
        assert accepted == value(before, "buckets_ingest_events_total", outcome="accepted") + 2
        assert value(after, "buckets_ingest_duration_seconds_count", mode="event") >= 2
        assert value(after, "buckets_members", bucket="pro") == 1
        assert value(after, "buckets_members", bucket="quiet") == 0
        assert value(after, "buckets_due_entries", bucket="quiet") == 1
        assert value(after, "buckets_due_backlog", bucket="quiet") == 0
        assert value(after, "buckets_undispatched_transitions") == 1
        assert value(after, "buckets_database_up") == 1
        assert value(after, "buckets_schema_at_head") == 1

        # the clock: the quiet contact's entry falls due; a tick decides it
        later = datetime.now(UTC) + timedelta(hours=2)
        due_text = client.get("/metrics").text
        assert value(due_text, "buckets_due_oldest_age_seconds", bucket="quiet") == 0
        reconcile_job(rt, clock=lambda: later)
        ticked = client.get("/metrics").text
        assert value(ticked, "buckets_tick_duration_seconds_count", job="reconcile") >= 1
        assert value(ticked, "buckets_due_entries_decided_total", bucket="quiet") >= 1

        # handler failures and retries
        failed_before = value(
            ticked, "buckets_handler_calls_total", journey="fails", result="failed"
        )
        dispatch_once(rt)
        dispatched = client.get("/metrics").text
        assert value(dispatched, "buckets_undispatched_transitions") == 0
        assert value(
            dispatched, "buckets_handler_calls_total", journey="fails", result="failed"
        ) == (failed_before + 1)
        assert value(dispatched, "buckets_handler_retries_total", journey="fails") >= 1


def test_transitions_are_counted_at_commit_so_a_dry_run_counts_none(make_runtime):
    rt = make_runtime(PRO)
    rt.registry = Registry()  # history written before the bucket existed
    ingest_event("a", "x", {}, contact_properties={"plan": "pro"}, runtime=rt)
    rt.registry = Registry([PRO])
    silent = {"bucket": "pro", "kind": "entered", "source": "backfill", "emitted": "false"}
    with TestClient(create_app(rt)) as client:
        before = value(client.get("/metrics").text, "buckets_transitions_total", **silent)
        report = backfill.dry_run(rt, "pro", datetime.now(UTC))
        assert report.to_dict()["would_join"] == 1  # its statements ran, then rolled back
        assert value(client.get("/metrics").text, "buckets_transitions_total", **silent) == before
        job, _ = backfill.start(rt, "pro", datetime.now(UTC))
        Runner(rt).run(job.id)
        after = value(client.get("/metrics").text, "buckets_transitions_total", **silent)
        assert after == before + 1


def test_worker_metrics_over_http(make_runtime):
    rt = make_runtime(PRO, worker_http="127.0.0.1:0")
    worker = Worker(rt)
    try:
        worker.start()
        worker._cron("reconcile", reconcile_job)
        assert worker.http is not None
        with urllib.request.urlopen(f"http://{worker.http.address}/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        worker.shutdown()
    assert value(text, "buckets_tick_duration_seconds_count", job="reconcile") >= 1
    heartbeat = value(text, "buckets_worker_heartbeat_timestamp_seconds", worker=worker.worker_id)
    assert abs(heartbeat - datetime.now(UTC).timestamp()) < 60
    assert value(text, "buckets_worker_last_tick_timestamp_seconds", worker=worker.worker_id) > 0
    assert value(text, "buckets_members", bucket="pro") == 0


def test_multi_process_mode_adds_up_every_process(clone_db: CloneDB, tmp_path: Path):
    """Two processes ingest with PROMETHEUS_MULTIPROC_DIR set; a third renders the sum."""
    url = clone_db.url.render_as_string(hide_password=False)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "BUCKETS_DATABASE_URL": url}
    ingest = textwrap.dedent(
        """
        import sys
        from buckets import Runtime, b, define_bucket, ingest_event
        pro = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"))
        rt = Runtime.create(buckets=[pro])
        for n in range(int(sys.argv[1])):
            props = {"plan": "pro"}
            ingest_event(f"{sys.argv[2]}-{n}", "x", {}, contact_properties=props, runtime=rt)
        rt.engine.dispose()
        """
    )
    render = textwrap.dedent(
        """
        from buckets import Runtime, b, define_bucket
        from buckets.metrics import render
        pro = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"))
        rt = Runtime.create(buckets=[pro])
        print(render(rt)[0].decode())
        rt.engine.dispose()
        """
    )

    def python(script: str, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", script, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    python(ingest, "3", "p1")
    python(ingest, "2", "p2")
    text = python(render)
    entered = {"bucket": "pro", "kind": "entered", "source": "ingest", "emitted": "true"}
    assert value(text, "buckets_transitions_total", **entered) == 5
    assert value(text, "buckets_ingest_events_total", outcome="accepted") == 5
    assert value(text, "buckets_members", bucket="pro") == 5  # the database's, not summed
