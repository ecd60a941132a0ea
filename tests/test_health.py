"""Health: /healthz and /readyz on the API and the worker, heartbeats, `buckets status`."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from fastapi.testclient import TestClient

from buckets import b, define_bucket, health
from buckets.errors import ConfigError
from buckets.migrations import downgrade, head_revision
from buckets.models import worker_heartbeats
from buckets.runtime import Runtime
from buckets.settings import load_settings
from tests.conftest import CloneDB
from workflows.api import create_app
from workflows.cli import main
from workflows.scheduler import reconcile_job
from workflows.worker import Worker

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
PRO = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"))


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _url(db: CloneDB) -> str:
    return db.url.render_as_string(hide_password=False)


def test_api_health_needs_no_token_and_reports_checks(make_runtime):
    rt = make_runtime(PRO, admin_token="t0ken")
    with TestClient(create_app(rt)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200
        checks = {c["name"]: c for c in ready.json()["checks"]}
        assert set(checks) == {"database", "schema", "definitions"}
        assert all(c["ok"] for c in checks.values())
        assert checks["schema"]["detail"] == f"at head ({head_revision()})"
        assert checks["definitions"]["detail"] == "1 buckets, 0 journeys loaded"
        assert client.get("/buckets").status_code == 401  # the rest still needs the token


def test_api_not_ready_when_schema_behind_or_database_away(clone_db: CloneDB):
    downgrade(clone_db.engine, "0004")
    rt = Runtime.create(engine=clone_db.engine, buckets=[PRO], settings=load_settings())
    with TestClient(create_app(rt)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["status"] == "not ready"
        [schema] = [c for c in ready.json()["checks"] if c["name"] == "schema"]
        assert schema["detail"] == (
            f"the schema is at revision 0004, this code needs {head_revision()}:"
            " run `buckets db upgrade`"
        )
        assert client.get("/healthz").status_code == 200  # alive all the same

    from buckets.db import create_engine

    away = create_engine("postgresql://nobody:pw@127.0.0.1:1/none")
    rt = Runtime.create(engine=away, buckets=[PRO], settings=load_settings())
    with TestClient(create_app(rt)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        [database] = [c for c in ready.json()["checks"] if c["name"] == "database"]
        assert database["detail"].startswith("unreachable: ")
        assert "pw" not in json.dumps(ready.json())
    away.dispose()


def test_tick_is_late_after_two_cadences():
    cron = "*/5 * * * *"
    assert health.cadence(cron, T0) == timedelta(minutes=5)
    assert health.tick_check(cron, T0, T0 - timedelta(hours=1), T0 + timedelta(minutes=10)).ok
    late = health.tick_check(cron, T0, T0, T0 + timedelta(minutes=10, seconds=1))
    assert not late.ok
    assert late.detail == "last tick 10 min 1 s ago (late after 10 min)"
    # before the first tick, the start counts
    assert health.tick_check(cron, None, T0, T0 + timedelta(minutes=9)).ok
    assert not health.tick_check(cron, None, T0, T0 + timedelta(minutes=11)).ok
    # an hourly cron: two hours
    assert health.tick_check("0 * * * *", T0, T0, T0 + timedelta(minutes=119)).ok


def test_worker_http_heartbeat_and_status(make_runtime, clone_db: CloneDB):
    rt = make_runtime(PRO, worker_http="127.0.0.1:0")
    worker = Worker(rt)
    runner = CliRunner()
    status_args = ["status", "--database-url", _url(clone_db), "--json"]
    # no worker yet: not ready, exit 1
    result = runner.invoke(main, status_args)
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["status"] == "not ready"
    assert {c["name"]: c["ok"] for c in report["checks"]}["workers"] is False
    try:
        worker.start()
        assert worker.http is not None
        base = f"http://{worker.http.address}"
        assert _get(f"{base}/healthz")[0] == 200
        code, ready = _get(f"{base}/readyz")
        assert code == 200, ready
        names = [c["name"] for c in ready["checks"]]
        assert names == ["database", "schema", "definitions", "tick", "loops"]
        assert _get(f"{base}/nope")[0] == 404

        with rt.engine.connect() as conn:
            [row] = conn.execute(sa.select(worker_heartbeats)).mappings().all()
        assert row["worker_id"] == worker.worker_id
        assert row["stopped_at"] is None
        assert row["last_tick_at"] is None

        worker._cron("reconcile", reconcile_job)
        assert worker.last_tick_at is not None
        with rt.engine.connect() as conn:
            assert conn.execute(sa.select(worker_heartbeats.c.last_tick_at)).scalar() == (
                worker.last_tick_at
            )

        _status_while_running(worker, status_args)
    finally:
        worker.shutdown()
    with rt.engine.connect() as conn:
        assert conn.execute(sa.select(worker_heartbeats.c.stopped_at)).scalar() is not None
    result = runner.invoke(main, status_args)
    assert json.loads(result.stdout)["workers"][0]["state"] == "stopped"


def _status_while_running(worker: Worker, status_args: list[str]) -> None:
    runner = CliRunner()
    result = runner.invoke(main, status_args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["status"] == "ready"
    [state] = report["workers"]
    assert state["state"] == "running"
    assert state["tick_late"] is False
    assert report["undispatched"] == {"count": 0, "oldest_age_seconds": 0.0}

    human = runner.invoke(main, status_args[:-1])
    assert human.exit_code == 0
    assert "ok   workers" in human.stdout
    assert f"worker {worker.worker_id} (running)" in human.stdout

    # a worker whose tick is late is not ready (its own /readyz and `status`)
    later = datetime.now(UTC) + timedelta(minutes=11)
    assert not worker.readiness(later).ok
    result = runner.invoke(main, [*status_args, "--now", later.isoformat()])
    assert result.exit_code == 1


def test_worker_http_on_a_busy_port_is_a_configuration_error(make_runtime):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        worker = Worker(make_runtime(PRO, worker_http=f"127.0.0.1:{port}"))
        with pytest.raises(
            ConfigError, match=f"BUCKETS_WORKER_HTTP: cannot listen on 127.0.0.1:{port}"
        ):
            worker.start()


@pytest.mark.parametrize("value", ["9100", "host:", ":9100", "host:99999", "host:x"])
def test_worker_http_setting_is_validated(value):
    with pytest.raises(ConfigError, match="BUCKETS_WORKER_HTTP: expected host:port"):
        load_settings(worker_http=value)


def test_status_on_a_database_without_schema_says_to_upgrade(empty_db: CloneDB):
    result = CliRunner().invoke(main, ["status", "--database-url", _url(empty_db)])
    assert result.exit_code == 1
    assert "FAIL schema" in result.stdout
    assert "run `buckets db upgrade`" in result.stdout


def test_status_reports_the_server_and_advises_only_where_the_defaults_cost(clone_db: CloneDB):
    with clone_db.engine.connect() as conn:
        found = health.server(conn)
        expected = conn.execute(
            sa.text(
                "SELECT pg_size_bytes(current_setting('shared_buffers')),"
                " pg_size_bytes(current_setting('max_wal_size')),"
                " pg_database_size(current_database()), current_setting('server_version_num')"
            )
        ).one()
    assert (found.shared_buffers, found.max_wal_size) == (expected[0], expected[1])
    assert found.database_bytes == expected[2]
    assert found.version.split(".")[0] == str(int(expected[3]) // 10000)
    assert found.wal_buffers > 0
    assert found.advice() == []  # a test database is far below a GB
    result = CliRunner().invoke(main, ["status", "--database-url", _url(clone_db), "--json"])
    report = json.loads(result.stdout)
    assert report["server"]["shared_buffers_bytes"] == expected[0]
    assert report["server"]["advice"] == []
    human = CliRunner().invoke(main, ["status", "--database-url", _url(clone_db)]).stdout
    assert f"  server: PostgreSQL {found.version}, database " in human
    assert "advice:" not in human


def test_server_advice_names_each_setting_left_at_the_small_machine_default():
    gib, mib = 1024**3, 1024**2
    defaults = health.Server("15.19", int(7.4 * gib), 128 * mib, 4 * mib, gib)
    tips = defaults.advice()
    assert [tip.split(" ")[0] for tip in tips] == ["shared_buffers", "wal_buffers", "max_wal_size"]
    assert tips[0].startswith("shared_buffers 128 MB for a 7.4 GB database")
    assert "max_wal_size 1 GB" in tips[2]
    assert "database 7.4 GB; shared_buffers 128 MB, wal_buffers 4 MB" in defaults.describe()
    sized = health.Server("15.19", int(7.4 * gib), 6 * gib, 16 * mib, 4 * gib)
    assert sized.advice() == []
    # large buffers are not judged against the database (the machine's memory is unknown)
    big = health.Server("16.4", 200 * gib, 16 * gib, 64 * mib, 16 * gib)
    assert big.advice() == []
    assert health.Server("15.19", 512 * mib, 128 * mib, 4 * mib, gib).advice() == []
