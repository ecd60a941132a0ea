"""The `buckets` CLI skeleton: db upgrade / db current, one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from buckets.migrations import head_revision
from tests.conftest import CloneDB
from workflows.cli import main


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def url_of(db: CloneDB) -> str:
    return db.url.render_as_string(hide_password=False)


def test_help_lists_the_commands():
    code, out, _ = run("--help")
    assert code == 0
    assert "db" in out
    code, out, _ = run("db", "--help")
    assert code == 0
    assert "upgrade" in out
    assert "current" in out


def test_db_upgrade_then_again_is_a_no_op(empty_db: CloneDB):
    code, out, _ = run("db", "current", "--database-url", url_of(empty_db))
    assert code == 0
    assert "no schema yet" in out

    code, out, _ = run("db", "upgrade", "--database-url", url_of(empty_db))
    assert code == 0
    assert f"from an empty database to {head_revision()}" in out
    assert "10 tables ready" in out

    code, out, _ = run("db", "upgrade", "--database-url", url_of(empty_db), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["changed"] is False
    assert report["after"] == report["head"] == head_revision()
    assert report["tables"] == 10

    code, out, _ = run("db", "current", "--database-url", url_of(empty_db), "--json")
    assert code == 0
    assert json.loads(out)["at_head"] is True


def test_unreachable_database_is_a_one_line_error_with_exit_2():
    code, out, err = run("db", "upgrade", "--database-url", "postgresql://u:pw@127.0.0.1:1/x")
    assert code == 2
    assert out == ""
    assert err.startswith(
        "buckets: error: cannot connect to postgresql+psycopg://u:***@127.0.0.1:1/x"
    )
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not a url", "--database-url: cannot parse 'not a url'"),
        ("sqlite:///x.db", "--database-url: buckets needs PostgreSQL, got a 'sqlite' URL"),
    ],
)
def test_bad_url_is_a_one_line_config_error_with_exit_2(url: str, message: str):
    code, _, err = run("db", "current", "--database-url", url)
    assert code == 2
    assert err.startswith(f"buckets: error: {message}")
    assert err.count("\n") == 1


@pytest.mark.embedded
def test_without_a_database_url_the_cli_uses_an_embedded_postgresql(tmp_path: Path):
    """The quick-start path: no BUCKETS_* variables, no server. Real processes, real pgserver."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("BUCKETS_")}
    env["BUCKETS_DATA_DIR"] = str(tmp_path / "data")
    command = [sys.executable, "-m", "workflows.cli", "db"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, *args], env=env, capture_output=True, text=True, timeout=180, check=False
        )

    first = cli("upgrade")
    assert first.returncode == 0, first.stderr
    pgdata = tmp_path / "data" / "pgdata"
    assert first.stderr.count(f"using the embedded PostgreSQL in {pgdata}") == 1
    assert f"from an empty database to {head_revision()}" in first.stdout
    assert "10 tables ready" in first.stdout

    second = cli("upgrade", "--json")
    assert second.returncode == 0, second.stderr
    report = json.loads(second.stdout)
    assert (report["changed"], report["tables"]) == (False, 10)

    current = cli("current", "--json")
    assert current.returncode == 0, current.stderr
    assert json.loads(current.stdout)["at_head"] is True

    # The server stops with the last process that used it; the data stays.
    assert not (pgdata / "postmaster.pid").exists()
    assert (pgdata / "PG_VERSION").exists()


def test_ingest_reports_counts_and_rejected_lines(clone_db: CloneDB, tmp_path: Path):
    definitions = tmp_path / "buckets.yaml"
    definitions.write_text(
        "buckets:\n"
        "  - id: pro\n"
        "    criteria: {type: property, property: plan, operator: eq, value: pro}\n"
    )
    events = tmp_path / "events.jsonl"
    events.write_text(
        '{"external_id": "a", "event": "signup", "contact_properties": {"plan": "pro"},'
        ' "idempotency_key": "k1"}\n'
        "\n"
        '{"external_id": "b", "event": "bucket:entered:pro"}\n'
        "{not json\n"
        '{"external_id": "a", "event": "signup", "idempotency_key": "k1"}\n'
        '{"external_id": "c", "event": "x", "occurred_at": "2026-11-01T10:00:00"}\n'
    )
    args = ["--database-url", url_of(clone_db), "--definitions", str(definitions)]
    now = ["--now", "2026-11-02T00:00:00Z"]
    code, out, _ = run("ingest", str(events), *args, *now, "--json")
    assert code == 1
    report = json.loads(out)
    assert (report["accepted"], report["duplicate"], report["rejected"]) == (1, 1, 3)
    assert [item["line"] for item in report["rejections"]] == [3, 4, 6]
    assert "reserved" in report["rejections"][0]["reason"]
    assert "occurred_at" in report["rejections"][2]["reason"]
    assert (report["transitions"], report["emitted"]) == (1, 1)

    good = tmp_path / "good.jsonl"
    good.write_text('{"external_id": "d", "event": "signup"}\n')
    code, out, _ = run("ingest", str(good), *args, *now)
    assert code == 0
    assert out.startswith("accepted 1, duplicate 0, rejected 0")


def test_ingest_refuses_a_naive_now(clone_db: CloneDB, tmp_path: Path):
    events = tmp_path / "e.jsonl"
    events.write_text("")
    code, _, err = run(
        "ingest", str(events), "--database-url", url_of(clone_db), "--now", "2026-11-02"
    )
    assert code == 2
    assert "no UTC offset" in err


DEFS = """
buckets:
  - id: pro
    criteria: {type: property, property: plan, operator: eq, value: pro}
  - id: went-dormant
    criteria:
      type: composite
      operator: and
      conditions:
        - {type: event, event: feature.used, check: exists}
        - {type: event, event: feature.used, check: not_exists, within: 7d}
"""


def test_operator_commands_through_the_entry_point(clone_db: CloneDB, tmp_path: Path):
    definitions = tmp_path / "defs.yaml"
    definitions.write_text(DEFS)
    args = ["--database-url", url_of(clone_db), "--definitions", str(definitions)]
    events = tmp_path / "e.jsonl"
    events.write_text(
        '{"external_id": "a", "event": "feature.used", "contact_properties": {"plan": "pro"},'
        ' "occurred_at": "2026-11-01T00:00:00Z"}\n'
    )
    assert run("ingest", str(events), *args, "--now", "2026-11-01T00:00:00Z")[0] == 0

    code, out, _ = run("list", *args, "--json")
    assert code == 0
    listed = {b["id"]: b for b in json.loads(out)["buckets"]}
    assert (listed["pro"]["members"], listed["went-dormant"]["members"]) == (1, 0)
    assert listed["went-dormant"]["on_cron"] is True
    # a's only event is weeks old: its dormancy entry (7 days later) is due, and waiting
    queue = listed["went-dormant"]["queue"]
    assert (queue["entries"], queue["due"], queue["complete"]) == (1, 1, False)
    assert queue["lag_seconds"] > 20 * 86_400
    assert listed["pro"]["queue"]["entries"] == 0
    code, out, _ = run("list", *args)
    assert "went-dormant" in out
    assert "filling" in out  # the queue column

    code, out, _ = run("show", "pro", *args, "--json")
    assert json.loads(out)["definition"]["criteria"]["value"] == "pro"

    code, out, _ = run("members", "pro", *args, "--json")
    assert [m["external_id"] for m in json.loads(out)["members"]] == ["a"]

    code, out, _ = run("explain", "went-dormant", "a", *args, "--now", "2026-11-03T00:00:00Z")
    assert code == 0
    assert "a is not a member of went-dormant" in out
    assert "2026-11-08T00:00:00.000001+00:00" in out  # the window edge, by the clock alone

    # the cron: no joins until the first-time backfill completed, then the lapsed contact joins
    code, out, _ = run("reconcile", *args, "--now", "2026-11-09T00:00:00Z", "--json")
    assert code == 0
    [tick] = json.loads(out)["buckets"]
    assert (tick["bucket_id"], tick["joined"]) == ("went-dormant", 0)
    assert tick["joins"].startswith("off")

    code, out, _ = run("disable", "pro", *args)
    assert (code, out.strip()) == (0, "pro: disabled (operator override)")
    code, out, _ = run("list", *args, "--json")
    assert {b["id"]: b["enabled"] for b in json.loads(out)["buckets"]}["pro"] is False
    code, out, _ = run("enable", "pro", "--reset", *args)
    assert out.strip() == "pro: enabled (following its definition)"

    code, _, err = run("show", "nope", *args)
    assert code == 2
    assert err.strip() == "buckets: error: nope: no such bucket in the loaded definitions"
    code, _, err = run("explain", "pro", "ghost", *args)
    assert code == 1
    assert "external_id 'ghost': no such contact" in err
