"""The catalogue of seen event names and property keys: set-based per ingest chunk, shown by
`buckets catalog` and GET /catalog; never-seen names warned about on deploy and list."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from click.testing import CliRunner
from fastapi.testclient import TestClient

from buckets import b, define_bucket, ingest_event, ingest_events
from buckets.catalog import entries, never_seen
from buckets.migrations import downgrade, upgrade
from tests.conftest import CloneDB
from workflows.api import create_app
from workflows.cli import main

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
PRO = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"))
TYPO = define_bucket(
    id="typo", criteria=b.all(b.event("feature.usd").exists(), b.prop("pln").eq("pro"))
)


def test_one_upsert_per_chunk_counting_accepted_events(make_runtime):
    rt = make_runtime(PRO)
    seen: list[str] = []
    sa.event.listen(rt.engine, "before_cursor_execute", lambda *args: seen.append(str(args[2])))
    events = [
        {
            "external_id": f"c{n % 10}",
            "event": "page.viewed" if n % 3 else "signup",
            "contact_properties": {"plan": "pro"} if n % 2 else {},
            "idempotency_key": f"k{n}",
        }
        for n in range(100)
    ]
    ingest_events(events, now=T0, runtime=rt)
    assert sum("catalog_entries" in statement for statement in seen) == 1
    ingest_events(events[:5], now=T0 + timedelta(hours=1), runtime=rt)  # duplicates: nothing
    ingest_event("z", "signup", {}, now=T0 + timedelta(hours=2), runtime=rt)
    with rt.engine.connect() as conn:
        found = {(e.kind, e.name): e for e in entries(conn)}
    assert {key: entry.seen for key, entry in found.items()} == {
        ("event", "page.viewed"): 66,
        ("event", "signup"): 35,
        ("property", "plan"): 50,
    }
    signup = found["event", "signup"]
    assert (signup.first_seen_at, signup.last_seen_at) == (T0, T0 + timedelta(hours=2))


def test_never_seen_names_are_warned_about(make_runtime, clone_db: CloneDB, tmp_path: Path):
    rt = make_runtime(PRO, TYPO, admin_token="t")
    ingest_event("a", "feature.used", {}, contact_properties={"plan": "pro"}, now=T0, runtime=rt)
    with rt.engine.connect() as conn:
        unseen = never_seen(conn, rt.registry)
    assert [str(item) for item in unseen] == [
        "typo: event 'feature.usd' was never seen by ingest",
        "typo: contact property key 'pln' was never seen by ingest",
    ]

    definitions = tmp_path / "defs.py"
    definitions.write_text(
        "from buckets import b, define_bucket\n"
        "pro = define_bucket(id='pro', criteria=b.prop('plan').eq('pro'))\n"
        "typo = define_bucket(id='typo', criteria=b.all(b.event('feature.usd').exists(),"
        " b.prop('pln').eq('pro')))\n"
    )
    args = [
        "--database-url",
        clone_db.url.render_as_string(False),
        "--definitions",
        str(definitions),
    ]
    result = CliRunner().invoke(main, ["list", *args])
    assert result.exit_code == 0
    assert result.stderr.splitlines() == [
        "buckets: warning: typo: event 'feature.usd' was never seen by ingest",
        "buckets: warning: typo: contact property key 'pln' was never seen by ingest",
    ]
    result = CliRunner().invoke(main, ["list", *args, "--json"])
    assert result.stderr == ""
    assert json.loads(result.stdout)["never_seen"][0] == {
        "bucket_id": "typo",
        "kind": "event",
        "name": "feature.usd",
    }

    result = CliRunner().invoke(main, ["catalog", *args])
    assert result.exit_code == 0
    [plan] = [line for line in result.stdout.splitlines() if " plan " in line]
    assert "property" in plan
    assert plan.rstrip("│ ").endswith("pro")  # used by
    result = CliRunner().invoke(main, ["catalog", "--kind", "event", *args, "--json"])
    report = json.loads(result.stdout)
    assert [e["name"] for e in report["entries"]] == ["feature.used"]
    assert [item["name"] for item in report["never_seen"]] == ["feature.usd"]

    with TestClient(create_app(rt)) as api:
        assert api.get("/catalog").status_code == 401
        body = api.get("/catalog", headers={"Authorization": "Bearer t"}).json()
        assert [(e["kind"], e["name"], e["seen"]) for e in body["entries"]] == [
            ("event", "feature.used", 1),
            ("property", "plan", 1),
        ]
        assert len(body["never_seen"]) == 2


def test_the_migration_fills_the_catalogue_from_the_data(make_runtime, clone_db: CloneDB):
    rt = make_runtime(PRO)
    ingest_event("a", "x", {}, contact_properties={"plan": "pro", "n": 1}, now=T0, runtime=rt)
    ingest_event("b", "x", {}, contact_properties={"plan": "free"}, now=T0, runtime=rt)
    ingest_event("b", "y", {}, now=T0, runtime=rt)
    downgrade(clone_db.engine, "0005")
    upgrade(clone_db.engine)
    with clone_db.engine.connect() as conn:
        found = {(e.kind, e.name): e.seen for e in entries(conn)}
    assert found == {
        ("event", "x"): 2,
        ("event", "y"): 1,
        ("property", "n"): 1,
        ("property", "plan"): 2,
    }


def test_the_worker_warns_on_deploy(make_runtime, caplog):
    from workflows.worker import Worker

    rt = make_runtime(PRO, TYPO)
    with caplog.at_level("WARNING", logger="buckets.worker"):
        Worker(rt)._warn_never_seen()
    warned = sorted((r.getMessage(), r.bucket, r.never_seen) for r in caplog.records)
    assert warned == [
        ("pro: contact property key 'plan' was never seen by ingest", "pro", "plan"),
        ("typo: contact property key 'pln' was never seen by ingest", "typo", "pln"),
        ("typo: event 'feature.usd' was never seen by ingest", "typo", "feature.usd"),
    ]
