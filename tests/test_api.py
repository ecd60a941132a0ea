"""The admin HTTP API through FastAPI's TestClient, and schemathesis on its OpenAPI."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from buckets import b, define_bucket, ingest_event
from buckets.runtime import Runtime
from buckets.settings import Settings
from workflows.api import create_app

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PRO = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"))
DORMANT = define_bucket(
    id="went-dormant",
    criteria=b.all(
        b.event("feature.used").exists(), b.event("feature.used").within("7d").not_exists()
    ),
)


@pytest.fixture
def api(make_runtime) -> Any:
    rt = make_runtime(PRO, DORMANT, admin_token=TOKEN)
    with TestClient(create_app(rt)) as client:
        yield client, rt


def test_every_request_without_the_token_is_refused(api):
    api, _ = api
    for method, path in [
        ("get", "/buckets"),
        ("get", "/buckets/pro"),
        ("patch", "/buckets/pro"),
        ("get", "/buckets/pro/members"),
        ("post", "/events"),
    ]:
        assert api.request(method, path).status_code == 401
        assert (
            api.request(method, path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        )
    assert api.get("/openapi.json").status_code == 200  # the schema itself is published


def test_no_token_configured_refuses_everything(make_runtime):
    with TestClient(create_app(make_runtime(PRO))) as client:
        assert client.get("/buckets", headers={"Authorization": "Bearer "}).status_code == 401
        assert client.get("/buckets", headers=AUTH).status_code == 401


def test_buckets_members_ledger_explain_preview(api):
    api, rt = api
    ingest_event("a", "feature.used", {}, contact_properties={"plan": "pro"}, now=T0, runtime=rt)
    ingest_event("b", "x", {}, contact_properties={"plan": "pro"}, now=T0, runtime=rt)
    listed = api.get("/buckets", headers=AUTH).json()["buckets"]
    assert {item["id"]: item["members"] for item in listed} == {"pro": 2, "went-dormant": 0}
    page = api.get("/buckets/pro/members?limit=1", headers=AUTH).json()
    assert [m["external_id"] for m in page["members"]] == ["a"]
    second = api.get(f"/buckets/pro/members?limit=1&after={page['next']}", headers=AUTH).json()
    assert [m["external_id"] for m in second["members"]] == ["b"]
    assert second["next"] is None
    ledger = api.get("/buckets/pro/transitions", headers=AUTH).json()["transitions"]
    assert [t["external_id"] for t in ledger] == ["b", "a"]  # newest first
    contact = api.get("/contacts/a/transitions", headers=AUTH).json()["transitions"]
    assert [t["idempotency_key"] for t in contact] == ["bucket:pro:a:entered:1"]
    later = (T0 + 8 * timedelta(days=1)).isoformat()
    explained = api.get(
        "/buckets/went-dormant/explain/a", params={"now": later}, headers=AUTH
    ).json()
    assert (explained["member"], explained["matches"]) == (False, True)
    previewed = api.get("/buckets/went-dormant/preview", params={"now": later}, headers=AUTH).json()
    assert (previewed["matching"], previewed["would_join"], previewed["would_leave"]) == (1, 1, 0)


def test_patch_enabled_takes_effect_for_the_next_ingest(api):
    api, rt = api
    response = api.patch("/buckets/pro", json={"enabled": False}, headers=AUTH)
    assert response.status_code == 200
    assert (response.json()["enabled"], response.json()["enabled_override"]) == (False, False)
    result = ingest_event("a", "x", {}, contact_properties={"plan": "pro"}, now=T0, runtime=rt)
    assert result.transitions == []
    api.patch("/buckets/pro", json={"enabled": None}, headers=AUTH)
    again = ingest_event("a", "x", {}, contact_properties={"plan": "pro"}, now=T0, runtime=rt)
    assert [t.kind for t in again.transitions] == ["entered"]


def test_batch_ingest_and_its_validation(api):
    api, _ = api
    body = {
        "now": T0.isoformat(),
        "events": [
            {"external_id": "a", "event": "signup", "contact_properties": {"plan": "pro"}},
            {"external_id": "b", "event": "bucket:entered:pro"},
        ],
    }
    refused = api.post("/events", json=body, headers=AUTH)
    assert refused.status_code == 422
    assert refused.json()["detail"] == [
        {"loc": ["body", "events", 1, "event"], "msg": "names starting with 'bucket:' are reserved"}
    ]
    assert api.get("/buckets/pro", headers=AUTH).json()["members"] == 0  # nothing written
    body["events"] = body["events"][:1]
    accepted = api.post("/events", json=body, headers=AUTH).json()
    assert accepted["accepted"] == 1
    assert accepted["results"][0]["transitions"][0]["kind"] == "entered"


def test_bad_input_is_4xx_naming_the_field(api):
    api, _ = api
    assert api.get("/buckets/nope", headers=AUTH).status_code == 404
    assert api.get("/buckets/pro/members?limit=0", headers=AUTH).json()["detail"][0]["loc"] == [
        "query",
        "limit",
    ]
    naive = api.get("/buckets/pro/preview?now=2026-11-01T00:00:00", headers=AUTH)
    assert naive.status_code == 422
    assert naive.json()["detail"][0]["loc"] == ["query", "now"]
    ghost = api.get("/buckets/pro/explain/ghost", headers=AUTH)
    assert ghost.status_code == 404
    assert ghost.json()["detail"][0]["loc"] == ["path", "external_id"]
    extra = api.patch("/buckets/pro", json={"enabled": True, "x": 1}, headers=AUTH)
    assert extra.status_code == 422
    nul = api.get("/contacts/a%00b/transitions", headers=AUTH)
    assert nul.status_code == 422
    assert nul.json()["detail"][0]["loc"] == ["path", "external_id"]


# --- schemathesis: generated requests against the published schema never get a 5xx ----------

PLACEHOLDER = Runtime.__new__(Runtime)  # the runtime is installed per test below
PLACEHOLDER.settings = Settings()
APP = create_app(PLACEHOLDER)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture
def served(make_runtime) -> Any:
    rt = make_runtime(PRO, DORMANT, admin_token=TOKEN)
    ingest_event("a", "feature.used", {}, contact_properties={"plan": "pro"}, now=T0, runtime=rt)
    APP.state.runtime = rt
    return rt


@schema.parametrize()
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_no_server_errors_on_generated_input(case, served):
    case.call_and_validate(headers=AUTH, checks=[not_a_server_error])


def test_backfill_endpoints(api):
    api, rt = api
    ingest_event("a", "x", {}, contact_properties={"plan": "pro"}, now=T0, runtime=rt)
    preview = api.post("/buckets/pro/backfills", json={"dry_run": True}, headers=AUTH)
    assert preview.status_code == 200
    assert preview.json()["mode"] == "first_time"
    started = api.post("/buckets/pro/backfills", json={"now": T0.isoformat()}, headers=AUTH)
    assert started.status_code == 202
    job = started.json()
    assert (job["bucket_id"], job["mode"], job["status"]) == ("pro", "first_time", "pending")
    again = api.post("/buckets/pro/backfills", json={}, headers=AUTH)
    assert again.status_code == 409
    assert "is already pending" in again.json()["detail"][0]["msg"]
    from workflows.backfill import Runner

    Runner(rt).run(job["id"])
    status = api.get(f"/jobs/{job['id']}", headers=AUTH).json()
    assert (status["status"], status["processed"]) == ("completed", 1)
    assert [j["id"] for j in api.get("/jobs?bucket_id=pro", headers=AUTH).json()["jobs"]] == [
        job["id"]
    ]
    assert api.get("/jobs/999999", headers=AUTH).status_code == 404
    assert api.post("/buckets/nope/backfills", json={}, headers=AUTH).status_code == 404
