"""A CLI that fails well: one error format and exit-code rule, checks up front, fast --help."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from buckets import b, define_bucket, ingest_events
from buckets.migrations import downgrade, head_revision
from tests.conftest import CloneDB
from workflows.cli import main

NOW = "2026-11-02T00:00:00Z"
DEFINITIONS = """
buckets:
  - id: pro
    criteria: {type: property, property: plan, operator: eq, value: pro}
"""


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def args(clone_db: CloneDB, tmp_path: Path) -> list[str]:
    path = tmp_path / "defs.yaml"
    path.write_text(DEFINITIONS)
    url = clone_db.url.render_as_string(hide_password=False)
    return ["--database-url", url, "--definitions", str(path)]


def test_help_does_not_import_the_library():
    probe = (
        "import sys, workflows.cli;"
        " print(sorted({'sqlalchemy', 'buckets.ingest'} & set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"
    import buckets

    assert buckets.ingest_event.__module__ == "buckets.ingest"  # the public names still work
    with pytest.raises(AttributeError):
        _ = buckets.no_such_name


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bogus"], "No such option '--bogus'. (see `buckets --help`)"),
        (["ingest"], "Missing argument 'FILE'. (see `buckets ingest --help`)"),
        (["list", "--nope"], "No such option '--nope'. (see `buckets list --help`)"),
        (["nosuch"], "No such command 'nosuch'. (see `buckets --help`)"),
    ],
)
def test_usage_errors_are_one_line_exit_2(argv: list[str], message: str):
    code, out, err = run(*argv)
    assert (code, out) == (2, "")
    assert err == f"buckets: error: {message}\n"
    code, out, err = run(*argv, "--json")
    assert (code, out) == (2, "")
    assert json.loads(err) == {"error": message, "exit_code": 2}


def test_database_checked_once_up_front(empty_db: CloneDB, tmp_path: Path):
    url = empty_db.url.render_as_string(hide_password=False)
    events = tmp_path / "e.jsonl"
    events.write_text('{"external_id": "a", "event": "x"}\n' * 8)
    hint = (
        f"the database has no buckets schema (head is {head_revision()}): run `buckets db upgrade`"
    )
    for argv in (["list"], ["jobs"], ["reconcile"], ["ingest", str(events)]):
        code, out, err = run(*argv, "--database-url", url)
        assert (code, out) == (2, ""), err
        assert err.count("\n") == 1
        assert err.startswith("buckets: error: postgresql+psycopg://")
        assert err.strip().endswith(hint)
    code, _, err = run("list", "--database-url", url, "--json")
    assert json.loads(err)["error"].endswith(hint)

    code, out, err = run("list", "--database-url", "postgresql://u:pw@127.0.0.1:1/x")
    assert code == 2
    assert err.startswith("buckets: error: cannot connect to postgresql+psycopg://u:***@")
    # ingest: an unreachable database is an outage at the first line, said once
    code, out, err = run("ingest", str(events), "--database-url", "postgresql://u:pw@127.0.0.1:1/x")
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith("buckets: error: line 1: database unavailable: cannot connect to ")
    assert err.strip().endswith("resume from line 1")


def test_a_schema_behind_says_to_upgrade(clone_db: CloneDB):
    downgrade(clone_db.engine, "0004")
    url = clone_db.url.render_as_string(hide_password=False)
    code, _, err = run("list", "--database-url", url)
    assert code == 2
    assert err.strip().endswith(
        f"the schema is at revision 0004, this code needs {head_revision()}:"
        " run `buckets db upgrade`"
    )


def test_unknown_bucket_ids_are_errors_everywhere(args: list[str]):
    for argv in (
        ["jobs", "--bucket", "nope"],
        ["reconcile", "--bucket", "nope", "--now", NOW],
        ["members", "nope"],
        ["show", "nope"],
        ["explain", "nope", "someone"],
        ["backfill", "nope", "--dry-run"],
        ["disable", "nope"],
    ):
        code, out, err = run(*argv, *args)
        assert (code, out) == (2, ""), (argv, out, err)
        assert err == "buckets: error: nope: no such bucket in the loaded definitions\n", argv


def test_definition_errors_are_configuration_errors(args: list[str], tmp_path: Path):
    database = args[:2]
    typo = tmp_path / "typo.yaml"
    typo.write_text("buckets:\n  - id: a\n    criteria: {type: event, evnt: x, check: exists}\n")
    code, _, err = run("list", *database, "--definitions", str(typo))
    assert code == 2
    assert err == f"buckets: error: {typo}: a: criteria.evnt: unknown key\n"

    broken = tmp_path / "broken.yaml"
    broken.write_text("buckets:\n  - id: a\n    criteria: {type: event, event: x check: y}\n")
    code, _, err = run("list", *database, "--definitions", str(broken), "--json")
    assert code == 2
    message = json.loads(err)["error"]
    assert message.startswith(f"{broken}: cannot read: ")
    assert message.endswith("(line 3, column 43)")


def test_serve_on_a_busy_port_is_one_line_exit_2(args: list[str]):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = run("serve", "--port", str(port), *args)
    assert code == 2
    assert err.splitlines()[-1] == (
        f"buckets: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


def test_members_left_and_aligned_numbers(args: list[str], clone_db: CloneDB):
    from buckets.runtime import Runtime
    from buckets.settings import Settings

    pro = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"))
    rt = Runtime(
        engine=clone_db.engine,
        registry=__import__("buckets").Registry([pro]),
        settings=Settings(config_cache_seconds=0),
    )
    at = datetime(2026, 11, 1, tzinfo=UTC)
    events = [
        {"external_id": f"c{n}", "event": "x", "contact_properties": {"plan": "pro"}}
        for n in range(1234)
    ]
    ingest_events(events, now=at, runtime=rt)
    ingest_events(
        [{"external_id": "c7", "event": "x", "contact_properties": {"plan": "free"}}],
        now=at.replace(hour=5),
        runtime=rt,
    )
    code, out, _ = run("list", *args)
    assert code == 0
    [row] = [line for line in out.splitlines() if line.startswith("│ pro")]
    cells = row.split("│")[1:-1]
    assert cells[2].strip() == "1,233"
    assert cells[2].endswith("1,233 ")  # right-aligned in its column

    code, out, _ = run("members", "pro", "--status", "left", *args)
    assert code == 0
    assert "left_at" in out
    assert "reason" in out
    [row] = [line for line in out.splitlines() if "c7" in line]
    assert "2026-11-01T05:00:00+00:00" in row
    assert "criteria" in row


def test_version_of_the_distribution():
    from importlib.metadata import version

    code, out, _ = run("--version")
    assert code == 0
    assert out == f"buckets, version {version('buckets-engine')}\n"


def test_ingest_in_slices_keeps_line_numbers(args: list[str], tmp_path: Path):
    """The CLI ingests in slices (a progress step each, drawn only on a terminal): rejected
    lines keep their numbers across slices, and nothing is drawn on a pipe."""
    events = tmp_path / "e.jsonl"
    rows = []
    for n in range(1, 31):
        event = "bucket:reserved" if n in (3, 17, 29) else "x"
        rows.append(json.dumps({"external_id": f"c{n}", "event": event}))
    events.write_text("\n".join(rows) + "\n")
    result = CliRunner(env={"BUCKETS_INGEST_CHUNK_SIZE": "2"}).invoke(
        main, ["ingest", str(events), *args, "--now", NOW, "--json"]
    )
    assert result.exit_code == 1
    assert result.stderr == ""
    report = json.loads(result.stdout)
    assert (report["accepted"], report["rejected"]) == (27, 3)
    assert [item["line"] for item in report["rejections"]] == [3, 17, 29]
