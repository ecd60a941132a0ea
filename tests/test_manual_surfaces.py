"""Manual buckets through the CLI (`buckets members add|remove ID FILE`, click's runner) and
the HTTP API (`POST` / `DELETE /buckets/{id}/members`, FastAPI's TestClient); bad files and
bad requests are rejected with the line (or index) named and nothing written."""

from __future__ import annotations

import io
import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from fastapi.testclient import TestClient

from buckets import b, define_bucket, journey
from buckets.member_files import MAX_LINE_BYTES, MemberFileError, read_member_file
from buckets.models import metadata
from tests.conftest import CloneDB
from tests.test_manual import T0, active
from workflows.api import create_app
from workflows.cli import main

DEFINITIONS = """
buckets:
  - id: staff
    criteria: {type: manual}
  - id: pro
    criteria: {type: property, property: plan, operator: eq, value: pro}
"""
NOW = ["--now", "2026-11-01T12:00:00Z"]
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def run(*args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), input=stdin)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def cli(clone_db: CloneDB, tmp_path: Path) -> Any:
    definitions = tmp_path / "buckets.yaml"
    definitions.write_text(DEFINITIONS)
    url = clone_db.url.render_as_string(hide_password=False)
    return ["--database-url", url, "--definitions", str(definitions)]


def counts(db: CloneDB) -> dict[str, int]:
    with db.engine.connect() as conn:
        return {
            table.name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for table in metadata.sorted_tables
        }


def members(db: CloneDB, bucket_id: str = "staff") -> set[str]:
    with db.engine.connect() as conn:
        return set(
            conn.execute(
                sa.text(
                    "SELECT c.external_id FROM bucket_memberships m JOIN contacts c"
                    " ON c.id = m.contact_id WHERE m.bucket_id = :b AND m.status = 'active'"
                ),
                {"b": bucket_id},
            ).scalars()
        )


# --- the file reader -----------------------------------------------------------------------------


def read(data: bytes) -> Any:
    return read_member_file(io.BytesIO(data))


def test_one_id_per_line_and_csv_forms():
    plain = read(b"\xef\xbb\xbfalice\r\nbob\nalice\n\n\n")
    assert (plain.ids.ids, plain.ids.duplicates, plain.form) == (["alice", "bob"], 1, "lines")
    assert (plain.lines, plain.blank_skipped) == (5, 2)
    csv = read(b'email,external_id\na@x.io,alice\n"b,@x.io","bo""b"\n')
    assert (csv.ids.ids, csv.form) == (["alice", 'bo"b'], "csv")
    alone = read(b"External_ID\nalice\n")  # the header in any case
    assert (alone.ids.ids, alone.form) == (["alice"], "csv")
    assert read(b"").ids.ids == []


GARBAGE = random.Random(7).randbytes(10 * 1024 * 1024)


@pytest.mark.parametrize(
    ("data", "line", "says"),
    [
        (b"email,name\na@x.io,Ann\n", 1, "without an 'external_id' column"),
        (b"alice\n\nbob\n", 2, "blank line"),
        (b"alice\n   \nbob\n", 2, "blank line"),
        (b"\nexternal_id\nalice\n", 1, "blank line"),
        (b"alice\n" + b"x" * 256 + b"\n", 2, "longer than 255"),
        (b"alice\nbo\x07b\n", 2, "control character"),
        (b"alice\nbob\x00\n", 2, "NUL"),
        (b"alice\n b\n", 2, "whitespace"),
        (b"alice\nb\xffb\n", 2, "not valid UTF-8"),
        (b"alice\n" + b"y" * (MAX_LINE_BYTES + 10), 2, "longer than 65,536 bytes"),
        (b"external_id,email\nalice\n", 2, "expected 2 CSV fields, got 1"),
        (b'external_id,email\n"alice,a@x\n', 2, "malformed CSV"),
        (b"external_id,email\n,a@x.io\n", 2, "must not be empty"),
        (GARBAGE, 1, ""),
    ],
)
def test_bad_files_name_the_line(data: bytes, line: int, says: str):
    with pytest.raises(MemberFileError) as caught:
        read(data)
    assert caught.value.line == line
    assert says in caught.value.message
    assert "nothing was written" in str(caught.value)


def test_ten_megabytes_of_garbage_are_refused_fast():
    for garbage in (GARBAGE, b"z" * (10 * 1024 * 1024), b"\x00" * (10 * 1024 * 1024)):
        started = time.perf_counter()
        with pytest.raises(MemberFileError):
            read(garbage)
        assert time.perf_counter() - started < 1.0


# --- the CLI -------------------------------------------------------------------------------------


def test_members_add_remove_and_list_through_the_cli(cli: list[str], clone_db: CloneDB, tmp_path):
    ids = tmp_path / "ids.csv"
    ids.write_text("external_id,email\nalice,a@x.io\nbob,b@x.io\nalice,a@x.io\n")
    code, out, err = run("members", "add", "staff", str(ids), *cli, *NOW, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["added"], report["created_contacts"], report["duplicates"]) == (2, 2, 1)
    assert report["file"] == {"form": "csv", "lines": 4, "blank_skipped": 0}
    assert members(clone_db) == {"alice", "bob"}
    # the same file again: nothing changes
    before = counts(clone_db)
    code, out, _ = run("members", "add", "staff", str(ids), *cli, *NOW)
    assert code == 0
    assert out.startswith("staff: added 0, already members 2, created contacts 0")
    assert counts(clone_db) == before
    # listing keeps working as `members ID` (SPEC §10) and as `members list ID`
    for listing in (
        ["members", "staff"],
        ["members", "list", "staff"],
        ["members", "--status", "all", "staff"],
    ):
        code, out, err = run(*listing, *cli, "--json")
        assert code == 0, err
        assert {m["external_id"] for m in json.loads(out)["members"]} == {"alice", "bob"}
    # remove from stdin, one id per line; a dry run first
    code, out, _ = run(
        "members", "remove", "staff", "-", *cli, *NOW, "--dry-run", stdin=b"bob\ncarol\n"
    )
    assert code == 0
    assert "removed 1, not members 1" in out
    assert "dry run: nothing was written" in out
    assert members(clone_db) == {"alice", "bob"}
    code, out, _ = run(
        "members", "remove", "staff", "-", *cli, *NOW, "--json", stdin=b"bob\ncarol\n"
    )
    assert code == 0
    assert (json.loads(out)["removed"], json.loads(out)["not_members"]) == (1, 1)
    assert members(clone_db) == {"alice"}


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"email,name\na@x.io,Ann\n", "line 1: a CSV header without an 'external_id' column"),
        (b"alice\n\nbob\n", "line 2: blank line"),
        (b"alice\nbob\nb\xffb\n", "line 3: not valid UTF-8"),
        (b"alice\n" + b"q" * 300 + b"\n", "line 2: external_id longer than 255"),
        (b"ok\nctl\x1bchar\n", "line 2: external_id contains a control character"),
        (GARBAGE, "line 1:"),
    ],
)
def test_bad_files_through_the_cli_write_nothing(
    cli: list[str], clone_db: CloneDB, tmp_path: Path, data: bytes, says: str
):
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    before = counts(clone_db)
    code, _out, err = run("members", "add", "staff", str(path), *cli, *NOW)
    assert code == 1
    assert err.startswith("buckets: error: ")
    assert says in err
    assert len(err.splitlines()) == 1
    assert "nothing was written" in err
    assert counts(clone_db) == before


def test_cli_refuses_a_bucket_that_is_not_manual_or_unknown(cli: list[str], clone_db, tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("alice\n")
    before = counts(clone_db)
    code, _, err = run("members", "add", "pro", str(path), *cli, *NOW)
    assert code == 1
    assert "pro: not a manual bucket" in err
    code, _, err = run("members", "remove", "nope", str(path), *cli, *NOW)
    assert code == 2
    assert "nope: no such bucket" in err
    assert counts(clone_db) == before


def test_cli_help_names_the_subcommands():
    code, out, _ = run("members", "--help")
    assert code == 0
    assert all(name in out for name in ("add", "remove", "list"))


# --- the HTTP API ------------------------------------------------------------------------------


@pytest.fixture
def api(make_runtime) -> Any:
    staff = define_bucket(id="staff", criteria=b.manual())
    pro = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"))
    hello = journey(id="hello", trigger=staff.entered, exit_on=[staff.left])(lambda e: None)
    rt = make_runtime(staff, pro, journeys=[hello], admin_token=TOKEN)
    with TestClient(create_app(rt)) as client:
        yield client, rt


def test_post_and_delete_members(api):
    client, rt = api
    now = {"now": T0.isoformat()}
    added = client.post("/buckets/staff/members", params=now, json=["a", "b", "a"], headers=AUTH)
    assert added.status_code == 200, added.text
    body = added.json()
    assert (body["added"], body["created_contacts"], body["duplicates"]) == (2, 2, 1)
    assert active(rt, "staff") == {"a", "b"}
    again = client.post("/buckets/staff/members", params=now, json=["a"], headers=AUTH).json()
    assert (again["added"], again["already_members"]) == (0, 1)
    gone = client.request(
        "DELETE", "/buckets/staff/members", params=now, json=["a", "zz"], headers=AUTH
    )
    assert gone.status_code == 200
    assert (gone.json()["removed"], gone.json()["not_members"]) == (1, 1)
    assert active(rt, "staff") == {"b"}
    dry = client.post(
        "/buckets/staff/members", params={**now, "dry_run": "true"}, json=["c"], headers=AUTH
    ).json()
    assert (dry["dry_run"], dry["added"], dry["created_contacts"]) == (True, 1, 1)
    assert active(rt, "staff") == {"b"}


def test_bad_member_requests_write_nothing(api, clone_db: CloneDB):
    client, _ = api
    before = counts(clone_db)
    too_many = client.post(
        "/buckets/staff/members", json=[f"u{n}" for n in range(10_001)], headers=AUTH
    )
    assert too_many.status_code == 413
    assert "at most 10,000" in too_many.json()["detail"][0]["msg"]
    bad = client.post("/buckets/staff/members", json=["ok", "a\nb"], headers=AUTH)
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["body", 1]
    assert "control character" in bad.json()["detail"][0]["msg"]
    assert client.post("/buckets/staff/members", json=["ok", 3], headers=AUTH).status_code == 422
    assert client.post("/buckets/staff/members", json={"ids": []}, headers=AUTH).status_code == 422
    not_manual = client.post("/buckets/pro/members", json=["a"], headers=AUTH)
    assert not_manual.status_code == 409
    assert "not a manual bucket" in not_manual.json()["detail"][0]["msg"]
    assert client.post("/buckets/nope/members", json=["a"], headers=AUTH).status_code == 404
    assert client.post("/buckets/staff/members", json=["a"]).status_code == 401
    naive = client.post(
        "/buckets/staff/members", params={"now": "2026-11-01T12:00:00"}, json=["a"], headers=AUTH
    )
    assert naive.status_code == 422
    assert counts(clone_db) == before


def test_the_member_endpoints_are_in_the_openapi_document(api):
    client, _ = api
    paths = client.get("/openapi.json").json()["paths"]["/buckets/{bucket_id}/members"]
    assert {"get", "post", "delete"} <= set(paths)
    assert {"409", "413", "422"} <= set(paths["post"]["responses"])
    assert (
        paths["delete"]["requestBody"]["content"]["application/json"]["schema"]["type"] == "array"
    )
