"""`buckets demo` end to end, as the README's quick start runs it: on an embedded PostgreSQL
(no database configured), through the installed entry point."""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from buckets.registry import Registry
from buckets.runtime import Runtime
from buckets.settings import Settings
from tests.conftest import CloneDB
from workflows.demo import DEFINITIONS, run_demo


@pytest.mark.embedded
@pytest.mark.slow
def test_the_demo_runs_on_the_embedded_database_and_leaves_it_to_explore(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETS_")}
    env["BUCKETS_DATA_DIR"] = str(tmp_path / "data")
    buckets = shutil.which("buckets") or ""
    command = [buckets] if buckets else [sys.executable, "-m", "workflows.cli"]
    try:
        run = subprocess.run(
            [*command, "demo", "--json", "--now", "2026-11-24T12:00:00Z"],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        assert "using the embedded PostgreSQL" in run.stderr
        report = json.loads(run.stdout)
        assert report["contacts"] == 10_000
        assert set(report["backfilled"]) == {
            "power-users",
            "went-dormant",
            "trial",
            "trial-ending",
            "abandoned-cart",
        }
        historical = {k: v for k, v in report["backfilled"].items() if k != "abandoned-cart"}
        assert all(count > 0 for count in historical.values())  # the history has no carts
        assert len(report["steps"]) == 4
        assert sum(sum(step["enrolled"].values()) for step in report["steps"]) > 100
        # the clock joins trials as their end comes within 3 days (a due-queue flip)
        assert all(step["enrolled"].get("trial-ending-reminder", 0) > 0 for step in report["steps"])
        # abandoned carts: a sequence whose absent step's hour elapses
        assert all(step["enrolled"].get("cart-reminder", 0) > 0 for step in report["steps"])
        assert report["explain"]["member"] is True
        assert report["seconds"] < 60

        listed = subprocess.run(
            [*command, "list", "--json", "--definitions", "workflows.demo_buckets"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert listed.returncode == 0, listed.stderr
        members = {b["id"]: b["members"] for b in json.loads(listed.stdout)["buckets"]}
        assert members["went-dormant"] > 1000
    finally:  # stop the embedded server the demo left running for later commands
        pgdata = tmp_path / "data" / "pgdata"
        if (pgdata / "postmaster.pid").exists():
            pg_ctl = shutil.which("pg_ctl")
            from buckets.db import start_embedded_server

            if pg_ctl is None:
                start_embedded_server(pgdata, cleanup_mode="stop").cleanup()
            else:
                subprocess.run([pg_ctl, "-D", str(pgdata), "stop", "-m", "fast"], check=False)


def test_the_demo_draws_one_progress_bar_on_a_terminal(clone_db: CloneDB):
    """On a terminal, `buckets demo` draws one bar (stages: the load, each first-time
    backfill, each day) that ends complete, with the day lines printed above it."""
    url = clone_db.url.render_as_string(hide_password=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETS_")}
    env.update(COLUMNS="120", LINES="40", TERM="xterm")
    command = [sys.executable, "-m", "workflows.cli", "demo", "--contacts", "200", "--days", "2"]
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [*command, "--database-url", url, "--now", "2026-11-24T12:00:00Z"],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env=env,
    )
    os.close(secondary)
    output = bytearray()
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output.extend(chunk)
    assert process.wait(timeout=240) == 0, output.decode(errors="replace")
    os.close(primary)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.decode(errors="replace"))
    # 1 load + 5 first-time backfills + 2 days; the bar's last frame shows it complete
    assert "8/8" in text
    assert "/9" not in text
    assert "/7" not in text
    assert "demo finished" in text
    assert "first-time backfill of went-dormant" in text
    assert text.count("demo finished") == 1


def test_run_demo_reports_each_stage_once(clone_db: CloneDB):
    calls: list[tuple[int, int]] = []
    registry = Registry.load(DEFINITIONS)
    settings = Settings(database_url=clone_db.url.render_as_string(False))
    run_demo(
        Runtime(engine=clone_db.engine, registry=registry, settings=settings),
        now=datetime(2026, 11, 24, 12, tzinfo=UTC),
        contacts_count=200,
        days=2,
        say=lambda _: None,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(done, 8) for done in range(9)]
