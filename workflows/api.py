"""The admin HTTP API (``buckets serve``): FastAPI, OpenAPI at ``/openapi.json``.

Every endpoint needs ``Authorization: Bearer <BUCKETS_ADMIN_TOKEN>``; without the variable set,
every request is refused with 401 (the OpenAPI document and ``/docs`` stay readable: they hold
no data). Bad input is a 4xx whose body names the field (``detail[].loc``, FastAPI's shape, or
``{"detail": [{"loc": [...], "msg": ...}]}`` for the engine's own checks); unknown buckets and
contacts are 404. Batch ingest validates every event first and writes nothing if one is bad.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import DataError

from buckets.admin import bucket_states, ledger_page, members_page, preview
from buckets.contacts import UnknownContactError
from buckets.errors import BucketsError, DatabaseUnavailableError
from buckets.explain import explain
from buckets.ingest import ingest_events
from buckets.registry import UnknownBucketError, set_enabled
from buckets.runtime import Runtime
from buckets.validation import IngestError, validate_event
from workflows import backfill, jobs

MAX_ID = 2**63 - 1
bearer = HTTPBearer(auto_error=False, description="BUCKETS_ADMIN_TOKEN")


class EnabledPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool | None = Field(
        description="true / false: the operator's override; null: follow the definition."
    )


class EventBody(BaseModel):
    """One event: the fields of ``ingest_event`` (checked again by the engine)."""

    model_config = ConfigDict(extra="forbid")
    external_id: str
    event: str
    properties: dict[str, Any] | None = None
    occurred_at: datetime | None = None
    contact_properties: dict[str, Any] | None = None
    email: str | None = None
    idempotency_key: str | None = None


class EventBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[EventBody] = Field(min_length=1, max_length=10_000)
    now: datetime | None = Field(default=None, description="Decide as of (default: the clock).")


def _error(status: int, loc: list[Any], message: str) -> HTTPException:
    return HTTPException(status, detail=[{"loc": loc, "msg": message}])


def _now(value: datetime | None, loc: list[Any]) -> datetime:
    if value is None:
        return datetime.now(UTC)
    if value.tzinfo is None or value.utcoffset() is None:
        raise _error(422, loc, "must carry a UTC offset (e.g. 2026-11-24T12:00:00Z)")
    return value


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(_runtime)]


def _authorised(
    runtime: RuntimeDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    token = runtime.settings.admin_token
    given = credentials.credentials if credentials else ""
    if not token or not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPException(
            401, detail="missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
        )


router = APIRouter(dependencies=[Depends(_authorised)])
PathText = Annotated[str, Path(min_length=1, max_length=255, pattern=r"^[^\x00]*$")]
Cursor = Annotated[int | None, Query(ge=0, le=MAX_ID)]
Limit = Annotated[int, Query(ge=1, le=1000)]


@router.get("/buckets", tags=["buckets"])
def list_buckets(runtime: RuntimeDep) -> dict[str, Any]:
    """Every loaded bucket with member counts and effective enabled state."""
    with runtime.engine.connect() as conn:
        return {"buckets": [state.to_dict() for state in bucket_states(conn, runtime)]}


@router.get("/buckets/{bucket_id}", tags=["buckets"])
def bucket_detail(runtime: RuntimeDep, bucket_id: PathText) -> dict[str, Any]:
    with runtime.engine.connect() as conn:
        [state] = bucket_states(conn, runtime, [bucket_id])
    return state.to_dict(detail=True)


@router.patch("/buckets/{bucket_id}", tags=["buckets"])
def patch_bucket(runtime: RuntimeDep, bucket_id: PathText, body: EnabledPatch) -> dict[str, Any]:
    """Enable or disable (operator override; null follows the definition again). Ingest and
    the cron see it within ``BUCKETS_CONFIG_CACHE_SECONDS``."""
    runtime.registry.get(bucket_id)
    with runtime.engine.begin() as conn:
        set_enabled(conn, bucket_id, body.enabled)
    runtime.enabled.invalidate()
    return bucket_detail(runtime, bucket_id)


@router.get("/buckets/{bucket_id}/members", tags=["buckets"])
def bucket_members(
    runtime: RuntimeDep,
    bucket_id: PathText,
    status: Literal["active", "left", "all"] = "active",
    after: Cursor = None,
    limit: Limit = 100,
) -> dict[str, Any]:
    """Membership rows in id order; pass ``next`` back as ``after`` for the next page."""
    runtime.registry.get(bucket_id)
    with runtime.engine.connect() as conn:
        page, cursor = members_page(
            conn, bucket_id, status=None if status == "all" else status, after=after, limit=limit
        )
    return {"members": page, "next": cursor}


@router.get("/buckets/{bucket_id}/transitions", tags=["ledger"])
def bucket_transitions(
    runtime: RuntimeDep, bucket_id: PathText, before: Cursor = None, limit: Limit = 100
) -> dict[str, Any]:
    """The bucket's ledger, newest first; pass ``next`` back as ``before``."""
    runtime.registry.get(bucket_id)
    with runtime.engine.connect() as conn:
        found, cursor = ledger_page(conn, bucket_id=bucket_id, before=before, limit=limit)
    return {"transitions": [t.to_dict() for t in found], "next": cursor}


@router.get("/contacts/{external_id}/transitions", tags=["ledger"])
def contact_transitions(
    runtime: RuntimeDep, external_id: PathText, before: Cursor = None, limit: Limit = 100
) -> dict[str, Any]:
    """A contact's ledger across buckets, newest first."""
    with runtime.engine.connect() as conn:
        found, cursor = ledger_page(conn, external_id=external_id, before=before, limit=limit)
    return {"transitions": [t.to_dict() for t in found], "next": cursor}


@router.get("/buckets/{bucket_id}/explain/{external_id}", tags=["buckets"])
def explain_contact(
    runtime: RuntimeDep, bucket_id: PathText, external_id: PathText, now: datetime | None = None
) -> dict[str, Any]:
    """Member or not, each leaf's value and counts, and the next change by the clock."""
    at = _now(now, ["query", "now"])
    return explain(bucket_id, external_id, now=at, runtime=runtime).to_dict()


@router.get("/buckets/{bucket_id}/preview", tags=["buckets"])
def preview_bucket(
    runtime: RuntimeDep, bucket_id: PathText, now: datetime | None = None
) -> dict[str, Any]:
    """Dry run: how many contacts match as of ``now`` and how many would join or leave."""
    bucket = runtime.registry.get(bucket_id)
    at = _now(now, ["query", "now"])
    with runtime.engine.connect() as conn:
        return preview(conn, bucket, at).to_dict()


@router.post("/events", tags=["ingest"])
def ingest(runtime: RuntimeDep, batch: EventBatch) -> dict[str, Any]:
    """Ingest a batch. Every event is validated first: one bad event (a reserved ``bucket:``
    name, a naive time, ...) rejects the batch with 422 and nothing is written."""
    at = _now(batch.now, ["body", "now"])
    raw = [
        {key: value for key, value in event.model_dump().items() if value is not None}
        for event in batch.events
    ]
    problems = []
    for index, data in enumerate(raw):
        try:
            validate_event(data, now=at, settings=runtime.settings, index=index)
        except IngestError as exc:
            problems.append({"loc": ["body", "events", index, exc.field], "msg": exc.reason})
    if problems:
        raise HTTPException(422, detail=problems)
    result = ingest_events(raw, now=at, runtime=runtime)
    return {
        "accepted": result.accepted,
        "duplicate": result.duplicates,
        "ignored_deleted_contact": result.ignored,
        "results": [
            r.to_dict() if not isinstance(r, IngestError) else {"error": str(r)}
            for r in result.results
        ],
    }


class BackfillRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    emit: bool = Field(default=False, description="Admin backfills: emit joins (entry limit).")
    dry_run: bool = Field(default=False, description="Report what would change; write nothing.")
    now: datetime | None = Field(default=None, description="Decide as of (default: the clock).")


@router.post("/buckets/{bucket_id}/backfills", tags=["backfills"], status_code=202)
def start_backfill(
    runtime: RuntimeDep, bucket_id: PathText, body: BackfillRequest
) -> dict[str, Any]:
    """Enqueue the bucket's backfill (first-time if it never completed one, else admin); a
    worker (`buckets run`) executes it. 409 if the bucket already has a job in progress.
    With ``dry_run``, the report of what it would change (200), nothing written."""
    at = _now(body.now, ["body", "now"])
    if body.dry_run:
        report = backfill.dry_run(runtime, bucket_id, at, emit=body.emit)
        return JSONResponse(report.to_dict(), 200)  # type: ignore[return-value]
    job, created = backfill.start(runtime, bucket_id, at, emit=body.emit)
    if not created:
        raise HTTPException(
            409,
            detail=[
                {
                    "loc": ["path", "bucket_id"],
                    "msg": f"{bucket_id}: backfill job {job.id} is already {job.status}",
                }
            ],
        )
    return job.to_dict()


@router.get("/jobs", tags=["backfills"])
def list_jobs(
    runtime: RuntimeDep,
    bucket_id: Annotated[str | None, Query(max_length=255, pattern=r"^[^\x00]*$")] = None,
    limit: Limit = 100,
) -> dict[str, Any]:
    """Backfill jobs, newest first."""
    with runtime.engine.connect() as conn:
        return {"jobs": [job.to_dict() for job in jobs.jobs(conn, bucket_id, limit)]}


@router.get("/jobs/{job_id}", tags=["backfills"])
def job_status(runtime: RuntimeDep, job_id: Annotated[int, Path(ge=1, le=MAX_ID)]) -> Any:
    """A job's status and progress (processed / total, joined, left, error)."""
    with runtime.engine.connect() as conn:
        try:
            return jobs.get(conn, job_id).to_dict()
        except jobs.JobError as exc:
            raise HTTPException(
                404, detail=[{"loc": ["path", "job_id"], "msg": str(exc)}]
            ) from None


def _detail(status: int, loc: list[str]) -> Any:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": [{"loc": loc, "msg": str(exc)}]}, status)

    return handler


def create_app(runtime: Runtime) -> FastAPI:
    """The application serving ``runtime`` (its database, definitions and settings)."""
    app = FastAPI(
        title="buckets admin API",
        version="1",
        description="Buckets, members, the transition ledger, explain, preview, ingest.",
    )
    app.state.runtime = runtime
    app.add_exception_handler(UnknownBucketError, _detail(404, ["path", "bucket_id"]))
    app.add_exception_handler(UnknownContactError, _detail(404, ["path", "external_id"]))
    app.add_exception_handler(BucketsError, _detail(409, []))
    # A batch the database stopped (not its input): retry later, from the index named.
    app.add_exception_handler(DatabaseUnavailableError, _detail(503, []))
    # The database refusing a value it cannot store is still bad input, not a server error.
    app.add_exception_handler(DataError, _detail(422, []))
    app.include_router(router)
    return app
