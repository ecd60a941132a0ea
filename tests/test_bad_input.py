"""Bad input on every surface (Python, CLI, HTTP): a named error, no traceback, nothing written.

One table of hostile events (issue 15, item 4) is run through ``ingest_event`` /
``ingest_events``, ``buckets ingest`` and ``POST /events``; then the ``now`` checks, the byte
level (UTF-8, BOM, body size) and strict HTTP types. Every case counts the rows of every table
before and after. The database is shared by the module: nothing may be written to it, and the
counts prove it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from fastapi.testclient import TestClient

from buckets import BatchRejected, IngestError, b, define_bucket, ingest_event, ingest_events
from buckets.models import bucket_configs, metadata, user_events
from buckets.registry import Registry
from buckets.runtime import Runtime
from buckets.settings import Settings
from tests.conftest import CloneDB, PgServer, _private_db
from workflows.api import create_app
from workflows.cli import main

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
PRO = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"))
DEFINITIONS = """
buckets:
  - id: pro
    criteria: {type: property, property: plan, operator: eq, value: pro}
"""
GOOD = {"external_id": "alice", "event": "signup", "contact_properties": {"plan": "pro"}}
SQL_WORDS = ("SELECT", "INSERT", "UPDATE", "%(", "[SQL", "parameters")


def nested(depth: int) -> dict[str, Any]:
    """An object ``depth`` levels deep: ``{"a": {"a": ... {}}}`` (itself level 1)."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


@dataclass
class Bad:
    name: str
    change: dict[str, Any]  # applied to GOOD; JSON-serialisable (instants as strings)
    where: str  # the location the error names: "occurred_at", "properties.k", ...
    says: str  # and a piece of its reason
    cli: str = ""  # what `buckets ingest` says instead, when its text parser refuses first
    http: list[Any] = field(default_factory=list)  # the loc HTTP gives instead, if not the field


BAD_EVENTS = [
    Bad("surrogate in external_id", {"external_id": "al\ud800ice"}, "external_id", "surrogate"),
    Bad("surrogate in event", {"event": "sign\udfffup"}, "event", "surrogate"),
    Bad("surrogate in a value", {"properties": {"k": "\ud800"}}, "properties.k", "surrogate"),
    Bad("surrogate in a key", {"properties": {"k\ud800": 1}}, "properties", "surrogate"),
    Bad(
        "surrogate in contact properties",
        {"contact_properties": {"plan": ["pro", "\udc00"]}},
        "contact_properties.plan[1]",
        "surrogate",
    ),
    Bad("surrogate in email", {"email": "a\ud800@example.com"}, "email", "surrogate"),
    Bad("surrogate in key", {"idempotency_key": "k\ud800"}, "idempotency_key", "surrogate"),
    Bad("NUL in external_id", {"external_id": "a\x00"}, "external_id", "NUL"),
    Bad("nested 65 deep", {"properties": nested(65)}, "properties.a", "deeper than 64"),
    Bad(
        "nested 400 deep",
        {"properties": nested(400)},
        "properties.a",
        "deeper than 64",
        cli="JSON nested 401 levels deep",
        http=["body"],
    ),
    Bad(
        "nested 100,000 deep",
        {"properties": nested(100_000)},
        "properties.a",
        "deeper than 64",
        cli="JSON nested 100001 levels deep",
        http=["body"],
    ),
    Bad("NaN", {"properties": {"x": float("nan")}}, "properties.x", "not a finite number"),
    Bad("infinity", {"properties": {"x": float("inf")}}, "properties.x", "not a finite number"),
    Bad("year 1 +14:00", {"occurred_at": "0001-01-01T00:00:00+14:00"}, "occurred_at", "outside"),
    Bad("year 9999", {"occurred_at": "9999-12-31T23:59:59Z"}, "occurred_at", "outside"),
    Bad("before 1970", {"occurred_at": "1969-12-31T23:59:59Z"}, "occurred_at", "outside"),
    Bad("number instant", {"occurred_at": 1_700_000_000}, "occurred_at", "string"),
    Bad(
        "non-ASCII digits",
        {"occurred_at": "\u0662\u0660\u0662\u0666-11-01T00:00:00Z"},
        "occurred_at",
        "not an ISO-8601",
    ),
    Bad("naive instant", {"occurred_at": "2026-11-01T10:00:00"}, "occurred_at", "UTC offset"),
    Bad("1 MB email", {"email": "a" * 1_000_000 + "@x.io"}, "email", "over the limit of 65536"),
]


@pytest.fixture(scope="module")
def db(pg_server: PgServer, template_db: str) -> Iterator[CloneDB]:
    with _private_db(pg_server, "buckets_bad", template_db) as clone:
        yield clone


@pytest.fixture(scope="module")
def rt(db: CloneDB) -> Runtime:
    settings = Settings(
        database_url=db.url.render_as_string(False), admin_token=TOKEN, config_cache_seconds=0
    )
    return Runtime(engine=db.engine, registry=Registry([PRO]), settings=settings)


@pytest.fixture(scope="module")
def api(rt: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(rt)) as client:
        yield client


def rows(rt: Runtime) -> dict[str, int]:
    """Rows of every table of the schema."""
    with rt.engine.connect() as conn:
        return {
            table.name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for table in metadata.sorted_tables
        }


def event_of(case: Bad) -> dict[str, Any]:
    return {**GOOD, **case.change}


def event_text(case: Bad) -> str:
    """The event as JSON text (ASCII: lone surrogates stay escaped), built without recursion
    for nesting the json module cannot write."""
    event = event_of(case)
    deep = event.get("properties")
    if isinstance(deep, dict) and list(deep) == ["a"]:
        depth = 1
        while deep.get("a") is not None:
            deep, depth = deep["a"], depth + 1
        text = json.dumps({**event, "properties": "DEEP"})
        return text.replace('"DEEP"', '{"a": ' * (depth - 1) + "{}" + "}" * (depth - 1))
    return json.dumps(event)


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback: the test fails with it
    return result.exit_code, result.stdout, result.stderr


def cli_args(db: CloneDB, tmp_path: Path) -> list[str]:
    definitions = tmp_path / "defs.yaml"
    definitions.write_text(DEFINITIONS)
    return ["--database-url", db.url.render_as_string(False), "--definitions", str(definitions)]


def post(api: TestClient, body: bytes) -> Any:
    return api.post("/events", content=body, headers=AUTH)


def no_sql(text: str) -> None:
    assert not any(word in text for word in SQL_WORDS), text


# --- one table, three surfaces ----------------------------------------------------------------


@pytest.mark.parametrize("case", BAD_EVENTS, ids=[case.name for case in BAD_EVENTS])
def test_python_ingest_event_names_the_field_and_writes_nothing(rt: Runtime, case: Bad):
    before = rows(rt)
    with pytest.raises(IngestError) as raised:
        ingest_event(**event_of(case), now=T0, runtime=rt)
    assert raised.value.location.startswith(case.where)
    assert case.says in raised.value.reason
    assert rows(rt) == before


@pytest.mark.parametrize("case", BAD_EVENTS, ids=[case.name for case in BAD_EVENTS])
def test_python_atomic_batch_rejects_everything(rt: Runtime, case: Bad):
    before = rows(rt)
    with pytest.raises(BatchRejected) as raised:
        ingest_events([GOOD, event_of(case)], now=T0, runtime=rt, atomic=True)
    [error] = raised.value.errors
    assert (error.index, error.location[: len(case.where)]) == (1, case.where)
    assert rows(rt) == before  # not even the good event


@pytest.mark.parametrize("case", BAD_EVENTS, ids=[case.name for case in BAD_EVENTS])
def test_cli_ingest_rejects_the_line_naming_the_field(
    rt: Runtime, db: CloneDB, tmp_path: Path, case: Bad
):
    events = tmp_path / "events.jsonl"
    events.write_text(event_text(case) + "\n")
    before = rows(rt)
    code, out, err = cli(
        "ingest", str(events), *cli_args(db, tmp_path), "--now", T0.isoformat(), "--json"
    )
    assert (code, err) == (1, "")
    [rejection] = json.loads(out)["rejections"]
    assert rejection["line"] == 1
    if case.cli:
        assert case.cli in rejection["reason"]
    else:
        assert rejection["reason"].startswith(case.where)
        assert case.says in rejection["reason"]
    assert rows(rt) == before


@pytest.mark.parametrize("case", BAD_EVENTS, ids=[case.name for case in BAD_EVENTS])
def test_http_batch_is_refused_whole_naming_the_field(rt: Runtime, api: TestClient, case: Bad):
    body = f'{{"now": "{T0.isoformat()}", "events": [{json.dumps(GOOD)}, {event_text(case)}]}}'
    before = rows(rt)
    response = post(api, body.encode())
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    expected = case.http or ["body", "events", 1, case.where.split(".")[0].split("[")[0]]
    assert [item["loc"][: len(expected)] for item in detail] == [expected]
    no_sql(response.text)
    assert rows(rt) == before  # the good event of the batch was not written either


# --- now ----------------------------------------------------------------------------------------

BAD_NOWS = ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59Z", "1969-07-20T20:17:00Z"]


@pytest.mark.parametrize("now", BAD_NOWS)
def test_now_out_of_range_is_refused_everywhere(
    rt: Runtime, db: CloneDB, api: TestClient, tmp_path: Path, now: str
):
    before = rows(rt)
    with pytest.raises(IngestError, match=r"^now: .* is outside the accepted range"):
        ingest_event("alice", "signup", now=datetime.fromisoformat(now), runtime=rt)
    events = tmp_path / "e.jsonl"
    events.write_text(json.dumps(GOOD) + "\n")
    args = cli_args(db, tmp_path)
    for command in (
        ["ingest", str(events), "--force"],  # --force lifts the clock check, not the range
        ["reconcile", "--force"],
        ["explain", "pro", "alice"],
    ):
        code, _, err = cli(*command, *args, "--now", now)
        assert code == 2
        assert "--now" in err
        assert "outside the accepted range" in err
    body = {"now": now, "events": [GOOD]}
    response = post(api, json.dumps(body).encode())
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "now"]
    for path in ("/buckets/pro/preview", "/buckets/pro/explain/alice"):
        response = api.get(path, params={"now": now}, headers=AUTH)
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["query", "now"]
    response = api.post("/buckets/pro/backfills", json={"now": now, "dry_run": True}, headers=AUTH)
    assert response.status_code == 422
    assert rows(rt) == before


def test_a_future_now_needs_force_where_it_would_be_stored(
    rt: Runtime, db: CloneDB, api: TestClient, tmp_path: Path
):
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    events = tmp_path / "e.jsonl"
    events.write_text(json.dumps(GOOD) + "\n")
    args = cli_args(db, tmp_path)
    before = rows(rt)
    for command in (
        ["ingest", str(events)],
        ["reconcile"],
        ["backfill", "pro"],
        ["dispatch", "--once"],
    ):
        code, _, err = cli(*command, *args, "--now", tomorrow)
        assert code == 2, err
        assert "after the clock" in err
        assert "pass --force" in err
    response = post(api, json.dumps({"now": tomorrow, "events": [GOOD]}).encode())
    assert response.status_code == 422
    assert "BUCKETS_MAX_CLOCK_SKEW" in response.json()["detail"][0]["msg"]
    response = api.post("/buckets/pro/backfills", json={"now": tomorrow}, headers=AUTH)
    assert (response.status_code, response.json()["detail"][0]["loc"]) == (422, ["body", "now"])
    assert rows(rt) == before
    # read-only looks at the future are fine
    assert cli("backfill", "pro", "--dry-run", *args, "--now", tomorrow)[0] == 0
    assert (
        api.get("/buckets/pro/preview", params={"now": tomorrow}, headers=AUTH).status_code == 200
    )
    response = api.post(
        "/buckets/pro/backfills", json={"now": tomorrow, "dry_run": True}, headers=AUTH
    )
    assert response.status_code == 200
    assert rows(rt) == before


def test_force_accepts_a_future_now(clone_db: CloneDB, tmp_path: Path):
    args = cli_args(clone_db, tmp_path)
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    code, out, err = cli("reconcile", *args, "--now", tomorrow.isoformat(), "--force", "--json")
    assert code == 0, err
    assert datetime.fromisoformat(json.loads(out)["now"]) == tomorrow


# --- bytes, sizes, strict types ----------------------------------------------------------------


def test_cli_ingest_decodes_each_line_and_accepts_a_leading_bom(
    rt: Runtime, db: CloneDB, tmp_path: Path
):
    events = tmp_path / "events.jsonl"
    good = json.dumps({**GOOD, "external_id": "bom-contact"}).encode()
    events.write_bytes(
        b"\xef\xbb\xbf" + good + b"\n"  # a BOM at the start of the file is not content
        b'{"external_id": "b\xff", "event": "x"}\n'  # not UTF-8
        b'{"external_id": "c", "event": "x", "properties": {"k": "\xc3"}}\n'  # truncated
        b"\xef\xbb\xbf" + good + b"\n"  # a BOM later is not allowed
    )
    before = rows(rt)
    code, out, err = cli(
        "ingest", str(events), *cli_args(db, tmp_path), "--now", T0.isoformat(), "--json"
    )
    assert (code, err) == (1, "")
    report = json.loads(out)
    assert report["accepted"] == 1
    assert [(r["line"], r["reason"][:30]) for r in report["rejections"]] == [
        (2, "not valid UTF-8 (byte 0xff at "),
        (3, "not valid UTF-8 (byte 0xc3 at "),
        (4, "not valid JSON: Unexpected UTF"),
    ]
    after = rows(rt)
    assert after["user_events"] == before["user_events"] + 1
    with rt.engine.begin() as conn:  # leave the shared database as it was
        conn.execute(
            sa.text(
                "TRUNCATE contacts, user_events, bucket_memberships, bucket_transitions CASCADE"
            )
        )
    assert rows(rt) == {
        **after,
        "contacts": 0,
        "user_events": 0,
        "bucket_memberships": 0,
        "bucket_transitions": 0,
    }


def test_http_body_bytes_and_size(rt: Runtime, api: TestClient):
    before = rows(rt)
    bad_utf8 = b'{"events": [{"external_id": "a\xff", "event": "x"}]}'
    response = post(api, bad_utf8)
    assert response.status_code == 422
    assert response.json()["detail"] == [
        {"loc": ["body"], "msg": "not valid UTF-8 (byte 0xff at offset 30)"}
    ]
    big = json.dumps({"events": [{**GOOD, "properties": {"x": "y" * 20_000_000}}]}).encode()
    response = post(api, big)
    assert response.status_code == 413
    deep = b'{"events": [' + b"[" * 300 + b"]" * 300 + b"]}"
    response = post(api, deep)
    assert response.status_code == 422
    assert response.json()["detail"][0]["msg"].startswith("JSON nested 302 levels deep")
    assert rows(rt) == before


@pytest.mark.parametrize("enabled", ["yes", 1, 0, "true", [True]])
def test_http_enabled_must_be_a_boolean_or_null(rt: Runtime, api: TestClient, enabled: Any):
    before = rows(rt)
    response = api.patch("/buckets/pro", json={"enabled": enabled}, headers=AUTH)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "enabled"]
    assert rows(rt) == before
    with rt.engine.connect() as conn:
        assert conn.execute(sa.select(bucket_configs.c.enabled)).all() in ([], [(None,)])


# --- batches: validated whole before the first write -----------------------------------------


def test_python_batch_validates_everything_before_the_first_chunk(clone_db: CloneDB, make_runtime):
    rt = make_runtime(PRO)
    events: list[Any] = [{"external_id": f"c{i}", "event": "x"} for i in range(600)]
    events[550] = {"external_id": "c550", "event": "x", "properties": {"k": "\ud800"}}
    with pytest.raises(BatchRejected):
        ingest_events(events, now=T0, runtime=rt, chunk_size=500, atomic=True)
    assert rows(rt)["user_events"] == 0
    result = ingest_events(events, now=T0, runtime=rt, chunk_size=500)  # per-event contract
    assert [(e.index, e.location) for e in result.errors] == [(550, "properties.k")]
    assert result.accepted == 599
    assert rows(rt)["user_events"] == 599


def test_a_database_error_reaches_the_client_without_sql_and_rolls_back_the_batch(
    clone_db: CloneDB, make_runtime
):
    """A failure no validation can foresee (here a real trigger raising in PostgreSQL): the
    client gets the SQLSTATE, not the statement or its parameters, and nothing is written."""
    rt = make_runtime(PRO, admin_token=TOKEN)
    with rt.engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                " IF NEW.event = 'poison' THEN RAISE EXCEPTION 'refused %', NEW.properties"
                " USING ERRCODE = '22023'; END IF; RETURN NEW; END $$;"
                " CREATE TRIGGER refuse BEFORE INSERT ON user_events"
                " FOR EACH ROW EXECUTE FUNCTION refuse()"
            )
        )
    body = {
        "now": T0.isoformat(),
        "events": [GOOD, {"external_id": "bob", "event": "poison", "properties": {"pii": "x"}}],
    }
    with TestClient(create_app(rt)) as client:
        response = post(client, json.dumps(body).encode())
    assert response.status_code == 422
    assert response.json()["detail"] == [
        {
            "loc": [],
            "msg": "the database refused a value of this request (SQLSTATE 22023);"
            " the request's transaction was rolled back",
        }
    ]
    no_sql(response.text)
    assert "pii" not in response.text
    counts = rows(rt)
    assert (counts["user_events"], counts["contacts"], counts["bucket_transitions"]) == (0, 0, 0)
    with rt.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(user_events)).scalar_one() == 0
