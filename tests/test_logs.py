"""Logs: BUCKETS_LOG_LEVEL / BUCKETS_LOG_FORMAT, structured fields, library noise below INFO,
and no database password or admin token in any line of a real worker's log."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from buckets import logs
from buckets.errors import ConfigError
from buckets.settings import load_settings
from tests.conftest import CloneDB


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    yield stream
    for handler in [h for h in root.handlers if h.get_name() == "buckets"]:
        root.removeHandler(handler)
    root.setLevel(level)


def test_settings_are_validated():
    assert load_settings(log_level="debug", log_format="JSON").log_level == "DEBUG"
    with pytest.raises(ConfigError, match="BUCKETS_LOG_LEVEL"):
        load_settings(log_level="verbose")
    with pytest.raises(ConfigError, match="BUCKETS_LOG_FORMAT"):
        load_settings(log_format="xml")


def test_json_lines_carry_the_structured_fields(captured):
    logs.configure("INFO", "json", stream=captured)
    logging.getLogger("buckets.reconcile").info(
        "reconciled %s", "pro", extra={"bucket": "pro", "joined": 3, "seconds": 0.25}
    )
    [line] = captured.getvalue().splitlines()
    record = json.loads(line)
    assert record["message"] == "reconciled pro"
    assert record["level"] == "INFO"
    assert record["logger"] == "buckets.reconcile"
    assert (record["bucket"], record["joined"], record["seconds"]) == ("pro", 3, 0.25)
    assert "time" in record


def test_text_lines_append_the_fields(captured):
    logs.configure("INFO", "text", stream=captured)
    logging.getLogger("buckets.worker").info("hello", extra={"job": 7, "bucket": "a b"})
    line = captured.getvalue().strip()
    assert line.endswith("buckets.worker INFO hello [job=7 bucket='a b']")


def test_library_noise_is_below_info(captured):
    logs.configure("INFO", "text", stream=captured)
    logging.getLogger("apscheduler.executors.default").info('Running job "x" (trigger: cron)')
    logging.getLogger("apscheduler.scheduler").info("Adding job tentatively -- it will be ...")
    logging.getLogger("alembic.runtime.migration").info("Context impl PostgresqlImpl.")
    logging.getLogger("alembic.runtime.migration").info("Will assume transactional DDL.")
    logging.getLogger("alembic.runtime.migration").info("Running upgrade 0004 -> 0005, x")
    logging.getLogger("apscheduler.executors.default").warning("Run time of job was missed")
    lines = captured.getvalue().splitlines()
    assert len(lines) == 2
    assert "Running upgrade 0004 -> 0005" in lines[0]
    assert "WARNING" in lines[1]

    logs.configure("DEBUG", "text", stream=captured)
    logging.getLogger("apscheduler.executors.default").info('Running job "x" (trigger: cron)')
    assert 'apscheduler.executors.default DEBUG Running job "x"' in captured.getvalue()


def test_secrets_are_masked_in_messages_arguments_and_tracebacks(captured):
    logs.configure("INFO", "json", secrets=["tok-123456"], stream=captured)
    log = logging.getLogger("buckets.test")
    log.warning("cannot connect to %s", "postgresql://app:hunter2@db:5432/x")
    log.warning("dsn host=db password=hunter2 user=app; token tok-123456")
    try:
        raise RuntimeError("failed: postgresql+psycopg://app:hunter2@db/x")
    except RuntimeError:
        log.exception("boom", extra={"url": "postgres://u:hunter2@h/d"})
    text = captured.getvalue()
    assert "hunter2" not in text
    assert "tok-123456" not in text
    assert "postgresql://app:***@db:5432/x" in text
    assert len(text.splitlines()) == 3
    assert "RuntimeError" in json.loads(text.splitlines()[2])["exc_info"]


def test_a_worker_logs_no_password_nor_token(clone_db: CloneDB, tmp_path):
    """`buckets run` at DEBUG, in both formats, with a password in its URL and an admin token,
    through start-up, migrations, deployment, a tick every second and shutdown."""
    password = str(clone_db.url.password or "Pa55-never-logged")  # trust ignores it
    url = clone_db.url.set(password=password).render_as_string(hide_password=False)
    token = "admin-token-never-logged"
    definitions = tmp_path / "defs.yaml"
    definitions.write_text(
        "buckets:\n  - id: quiet\n    criteria: {type: event, event: seen, check: exists,"
        " within: 1h}\n"
    )
    for fmt in ("text", "json"):
        env = {
            **os.environ,
            "BUCKETS_DATABASE_URL": url,
            "BUCKETS_DEFINITIONS": str(definitions),
            "BUCKETS_ADMIN_TOKEN": token,
            "BUCKETS_LOG_LEVEL": "DEBUG",
            "BUCKETS_LOG_FORMAT": fmt,
            "BUCKETS_RECONCILE_CRON": "* * * * *",
            "BUCKETS_WORKER_HTTP": "127.0.0.1:0",
        }
        worker = subprocess.Popen(
            [sys.executable, "-m", "workflows.cli", "run"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(4)
        worker.send_signal(signal.SIGINT)
        out, err = worker.communicate(timeout=60)
        assert worker.returncode == 0, err
        assert "worker running" in err
        assert password not in out + err
        assert token not in out + err
        if fmt == "json":
            for line in err.splitlines():
                json.loads(line)  # every line is one JSON object
