"""`buckets demo` end to end, as the README's quick start runs it: on an embedded PostgreSQL
(no database configured), through the installed entry point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


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
        assert set(report["backfilled"]) == {"power-users", "went-dormant", "trial"}
        assert all(count > 0 for count in report["backfilled"].values())
        assert len(report["steps"]) == 4
        assert sum(sum(step["enrolled"].values()) for step in report["steps"]) > 100
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
