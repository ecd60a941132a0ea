"""Reading memberships for targeting: buckets.memberships, GET /contacts/{id}/buckets and
POST /memberships/lookup, each one statement."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

import buckets
from buckets import b, define_bucket, ingest_event
from buckets.contacts import delete_contact
from buckets.lookup import LookupInputError
from buckets.registry import UnknownBucketError
from workflows.api import create_app

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
TOKEN = "lookup-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PRO = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"))
MANY = [define_bucket(id=f"b{n:02d}", criteria=b.prop(f"k{n}").eq(1)) for n in range(50)]


@contextmanager
def statements(engine: sa.Engine) -> Iterator[list[str]]:
    seen: list[str] = []

    def record(*args: object) -> None:  # conn, cursor, statement, parameters, ...
        seen.append(str(args[2]))

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


@pytest.fixture
def rt(make_runtime):
    runtime = make_runtime(PRO, *MANY, admin_token=TOKEN)
    props = {f"k{n}": 1 for n in range(0, 50, 2)} | {"plan": "pro"}
    ingest_event("a", "x", {}, contact_properties=props, now=T0, runtime=runtime)
    ingest_event("b", "x", {}, contact_properties={"plan": "free"}, now=T0, runtime=runtime)
    # c joins, leaves, joins again: epoch 2
    for hours, plan in ((1, "pro"), (2, "free"), (3, "pro")):
        ingest_event(
            "c",
            "x",
            {},
            contact_properties={"plan": plan},
            now=T0 + timedelta(hours=hours),
            runtime=runtime,
        )
    ingest_event("gone", "x", {}, contact_properties={"plan": "pro"}, now=T0, runtime=runtime)
    delete_contact("gone", now=T0 + timedelta(hours=4), runtime=runtime)
    return runtime


def test_memberships_of_many_contacts_in_one_statement(rt):
    with statements(rt.engine) as seen:
        found = buckets.memberships(["a", "b", "c", "gone", "nobody"], runtime=rt)
    assert len(seen) == 1
    assert set(found) == {"a", "b", "c"}  # unknown and deleted contacts are absent
    assert found["b"] == []
    assert [m.bucket_id for m in found["a"]] == sorted(
        ["pro", *(f"b{n:02d}" for n in range(0, 50, 2))]
    )
    [c] = found["c"]
    assert (c.bucket_id, c.epoch, c.since, c.source) == (
        "pro",
        2,
        T0 + timedelta(hours=3),
        "ingest",
    )
    assert c.to_dict() == {
        "bucket_id": "pro",
        "since": (T0 + timedelta(hours=3)).isoformat(),
        "epoch": 2,
        "source": "ingest",
    }


def test_one_contact_fifty_buckets_is_one_statement(rt):
    wanted = [bucket.id for bucket in MANY]
    with statements(rt.engine) as seen:
        found = buckets.memberships(["a"], wanted, runtime=rt)
    assert len(seen) == 1
    assert len(found["a"]) == 25
    assert buckets.memberships(["a", "b"], ["pro", "b01"], runtime=rt) == {
        "a": [found_pro := buckets.memberships(["a"], ["pro"], runtime=rt)["a"][0]],
        "b": [],
    }
    assert found_pro.bucket_id == "pro"
    assert buckets.memberships(["a", "nobody"], [], runtime=rt) == {"a": []}


@pytest.mark.parametrize(
    ("contacts", "wanted", "field"),
    [
        ("a", None, "contacts"),
        (["a", ""], None, "contacts[1]"),
        (["a", 7], None, "contacts[1]"),
        (["a\x00"], None, "contacts[0]"),
        ([f"c{n}" for n in range(1001)], None, "contacts"),
        (["a"], ["pro", ""], "buckets[1]"),
    ],
)
def test_bad_arguments_name_the_field(rt, contacts, wanted, field):
    with pytest.raises(LookupInputError) as raised:
        buckets.memberships(contacts, wanted, runtime=rt)
    assert raised.value.field == field


def test_unknown_bucket_is_an_error(rt):
    with pytest.raises(UnknownBucketError):
        buckets.memberships(["a"], ["pro", "nope"], runtime=rt)


def test_http_lookup(rt):
    with TestClient(create_app(rt)) as api:
        assert api.get("/contacts/c/buckets").status_code == 401
        response = api.get("/contacts/c/buckets", headers=AUTH)
        assert response.status_code == 200
        assert response.json() == {
            "external_id": "c",
            "buckets": [
                {
                    "bucket_id": "pro",
                    "since": (T0 + timedelta(hours=3)).isoformat(),
                    "epoch": 2,
                    "source": "ingest",
                }
            ],
        }
        only = api.get("/contacts/a/buckets", params={"bucket": ["b00", "b01"]}, headers=AUTH)
        assert [m["bucket_id"] for m in only.json()["buckets"]] == ["b00"]
        assert api.get("/contacts/nobody/buckets", headers=AUTH).status_code == 404
        assert api.get("/contacts/gone/buckets", headers=AUTH).status_code == 404
        bad = api.get("/contacts/a/buckets", params={"bucket": ["pro", "nope"]}, headers=AUTH)
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["loc"] == ["query", "bucket", 1]

        body = {"contacts": ["a", "b", "nobody", "gone"], "buckets": ["pro", "b02"]}
        looked = api.post("/memberships/lookup", json=body, headers=AUTH)
        assert looked.status_code == 200
        result = looked.json()
        assert result["unknown"] == ["gone", "nobody"]
        assert {
            key: [m["bucket_id"] for m in held] for key, held in result["memberships"].items()
        } == {
            "a": ["b02", "pro"],
            "b": [],
        }
        for bad_body, loc in (
            ({"contacts": []}, ["body", "contacts"]),
            ({"contacts": ["a"], "buckets": ["nope"]}, ["body", "buckets", 0]),
            ({"contacts": ["a"], "extra": 1}, ["body", "extra"]),
            ({"contacts": [1]}, ["body", "contacts", 0]),
        ):
            refused = api.post("/memberships/lookup", json=bad_body, headers=AUTH)
            assert refused.status_code == 422, bad_body
            assert refused.json()["detail"][0]["loc"] == loc, bad_body
