"""The admin HTTP API (``buckets serve``): FastAPI, OpenAPI at ``/openapi.json``.

Every endpoint needs ``Authorization: Bearer <BUCKETS_ADMIN_TOKEN>``; without the variable set,
every request is refused with 401 (the OpenAPI document, ``/docs``, ``/healthz``, ``/readyz``
and ``/metrics`` stay readable: they hold no contact data). Bad input is a 4xx whose body
names the field (``detail[].loc``, FastAPI's shape, or ``{"detail": [{"loc": [...], "msg":
...}]}`` for the engine's own checks); unknown buckets and contacts are 404. Batch ingest
validates every event first and writes nothing if one is bad; the good batch is written in one
transaction (all or nothing, even if the database fails).

Input bounds (before any handler runs): request bodies over ``BUCKETS_MAX_REQUEST_BYTES`` are
413 (FastAPI's ``max_body_size``); bodies that are not UTF-8, or JSON nested deeper than the
parsers may safely go, are 422 (``loc: ["body"]``). Types are strict: ``occurred_at`` and
``now`` are ISO-8601 strings with an offset (not numbers), ``enabled`` is a boolean or null.
``now`` must lie in ``[BUCKETS_MIN_INSTANT, BUCKETS_MAX_INSTANT]``, and where the request
writes as of it (ingest, a backfill that is not a dry run) at most ``BUCKETS_MAX_CLOCK_SKEW``
after the server's clock.
Database errors never reach the client with their SQL or parameters: bad data is 422, an
unreachable database 503, anything else 500, each with the SQLSTATE only.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from pydantic.json_schema import JsonDict
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from buckets import health
from buckets.admin import bucket_states, ledger_page, members_page, preview
from buckets.contacts import UnknownContactError
from buckets.errors import BucketsError, DatabaseUnavailableError
from buckets.explain import explain
from buckets.ingest import ingest_events
from buckets.inputs import (
    PARSE_DEPTH_CAP,
    InputError,
    instant_problem,
    json_text_depth,
    parse_instant,
)
from buckets.lookup import (
    MAX_BUCKETS,
    MAX_CONTACTS,
    ActiveMembership,
    LookupInputError,
    memberships,
)
from buckets.manual import ManualBucketError, add_members, id_problem, remove_members
from buckets.registry import UnknownBucketError, set_enabled
from buckets.runtime import Runtime
from buckets.validation import BatchRejected, IngestError, future_now_problem
from workflows import backfill, jobs

MAX_ID = 2**63 - 1
bearer = HTTPBearer(auto_error=False, description="BUCKETS_ADMIN_TOKEN")
INSTANT: JsonDict = {"format": "date-time", "examples": ["2026-11-24T12:00:00Z"]}


class EnabledPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: StrictBool | None = Field(
        description="true / false: the operator's override; null: follow the definition."
    )


class EventBody(BaseModel):
    """One event: the fields of ``ingest_event`` (checked again by the engine)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    external_id: str
    event: str
    properties: dict[str, Any] | None = None
    occurred_at: str | None = Field(
        default=None,
        max_length=64,
        json_schema_extra=INSTANT,
        description="ISO-8601 with a UTC offset (default: now).",
    )
    contact_properties: dict[str, Any] | None = None
    email: str | None = None
    idempotency_key: str | None = None


class EventBatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    events: list[EventBody] = Field(min_length=1, max_length=10_000)
    now: str | None = Field(
        default=None,
        max_length=64,
        json_schema_extra=INSTANT,
        description="Decide as of (ISO-8601 with a UTC offset; default: the clock).",
    )


def _error(status: int, loc: list[Any], message: str) -> HTTPException:
    return HTTPException(status, detail=[{"loc": loc, "msg": message}])


def _now(runtime: Runtime, value: str | None, loc: list[Any], *, writes: bool) -> datetime:
    """The request's ``now``: the clock, or an ISO-8601 instant within the accepted range and,
    when the request writes as of it, not after the clock by more than the allowed skew."""
    if value is None:
        return datetime.now(UTC)
    try:
        parsed = parse_instant(value)
    except InputError as exc:
        raise _error(422, loc, exc.reason) from None
    settings = runtime.settings
    problem = instant_problem(parsed, settings.min_instant, settings.max_instant)
    if problem is None and writes:
        problem = future_now_problem(parsed, settings) or None
    if problem is not None:
        raise _error(422, loc, problem)
    return parsed


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
NowQuery = Annotated[
    str | None,
    Query(
        max_length=64,
        json_schema_extra=INSTANT,
        description="Decide as of (ISO-8601 with a UTC offset; default: the clock).",
    ),
]


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


MAX_MEMBER_IDS = 10_000  # a request's ids; larger lists go through the CLI
MemberIds = Annotated[
    list[Any],
    Body(
        description=f"External ids (strings), at most {MAX_MEMBER_IDS:,}; an id given twice"
        " counts once.",
        examples=[["user-1", "user-2"]],
    ),
]
DryRunQuery = Annotated[bool, Query(description="Return the counts; write nothing.")]
MEMBER_RESPONSES: dict[int | str, dict[str, Any]] = {
    409: {"description": "Not a manual bucket, or the bucket is disabled: nothing written."},
    413: {"description": f"More than {MAX_MEMBER_IDS:,} ids: nothing written."},
    422: {"description": "A bad id (its index in ``loc``) or ``now``: nothing written."},
}


def _member_ids(runtime: Runtime, bucket_id: str, ids: list[Any]) -> list[str]:
    """The request's ids, each checked (422 naming the first bad one's index), at most
    :data:`MAX_MEMBER_IDS` (413); an unknown bucket is 404 first."""
    runtime.registry.get(bucket_id)
    if len(ids) > MAX_MEMBER_IDS:
        raise _error(
            413,
            ["body"],
            f"{len(ids):,} ids: at most {MAX_MEMBER_IDS:,} a request (larger lists: the CLI,"
            " `buckets members add|remove ID FILE`); nothing was written",
        )
    for index, value in enumerate(ids):
        problem = id_problem(value)
        if problem is not None:
            raise _error(422, ["body", index], f"external id {problem}; nothing was written")
    return ids


@router.post("/buckets/{bucket_id}/members", tags=["manual buckets"], responses=MEMBER_RESPONSES)
def add_bucket_members(
    runtime: RuntimeDep,
    bucket_id: PathText,
    external_ids: MemberIds,
    now: NowQuery = None,
    dry_run: DryRunQuery = False,
) -> dict[str, Any]:
    """Add contacts to a **manual** bucket, in one transaction: unknown contacts are created,
    members already in are left as they are; joins follow the entry limit and start journeys.
    Returns the counts (added, already members, created contacts, duplicates)."""
    ids = _member_ids(runtime, bucket_id, external_ids)
    at = _now(runtime, now, ["query", "now"], writes=not dry_run)
    return add_members(bucket_id, ids, at, runtime=runtime, dry_run=dry_run).to_dict()


@router.delete("/buckets/{bucket_id}/members", tags=["manual buckets"], responses=MEMBER_RESPONSES)
def remove_bucket_members(
    runtime: RuntimeDep,
    bucket_id: PathText,
    external_ids: MemberIds,
    now: NowQuery = None,
    dry_run: DryRunQuery = False,
) -> dict[str, Any]:
    """Remove contacts from a **manual** bucket, in one transaction (leaves with reason
    ``admin``, emitted: journeys that exit on the bucket's ``left`` do). Ids that are not
    members are left alone. Returns the counts (removed, not members, duplicates)."""
    ids = _member_ids(runtime, bucket_id, external_ids)
    at = _now(runtime, now, ["query", "now"], writes=not dry_run)
    return remove_members(bucket_id, ids, at, runtime=runtime, dry_run=dry_run).to_dict()


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


@router.get("/contacts/{external_id}/buckets", tags=["memberships"])
def contact_buckets(
    runtime: RuntimeDep,
    external_id: PathText,
    bucket: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=255)]] | None,
        Query(max_length=1000, description="Only these buckets (repeat the parameter)."),
    ] = None,
) -> dict[str, Any]:
    """The contact's active memberships (bucket, since, epoch, source); 404 for an unknown or
    deleted contact. One query."""
    found = _lookup(runtime, [external_id], bucket, ["path", "external_id"], ["query", "bucket"])
    if external_id not in found:
        raise UnknownContactError(external_id)
    return {"external_id": external_id, "buckets": [m.to_dict() for m in found[external_id]]}


class LookupRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    contacts: list[Annotated[str, Field(min_length=1, max_length=255)]] = Field(
        min_length=1, max_length=MAX_CONTACTS, description="External ids (at most 1,000)."
    )
    buckets: list[Annotated[str, Field(min_length=1, max_length=255)]] | None = Field(
        default=None,
        max_length=MAX_BUCKETS,
        description="Only these buckets (default: every bucket).",
    )


@router.post("/memberships/lookup", tags=["memberships"])
def lookup_memberships(runtime: RuntimeDep, body: LookupRequest) -> dict[str, Any]:
    """Which of these buckets is each of these contacts in: one query whatever the numbers.
    ``memberships`` maps every known contact to its active memberships (``[]``: none);
    ``unknown`` lists the external ids of no (or a deleted) contact."""
    found = _lookup(runtime, body.contacts, body.buckets, ["body", "contacts"], ["body", "buckets"])
    return {
        "memberships": {key: [m.to_dict() for m in held] for key, held in found.items()},
        "unknown": sorted({key for key in body.contacts if key not in found}),
    }


def _lookup(
    runtime: Runtime,
    contacts: list[str],
    buckets: list[str] | None,
    contacts_loc: list[Any],
    buckets_loc: list[Any],
) -> dict[str, list[ActiveMembership]]:
    """:func:`buckets.lookup.memberships`, its input errors as 422 located in the request."""
    try:
        return memberships(contacts, buckets, runtime=runtime)
    except LookupInputError as exc:
        name, _, index = exc.field.partition("[")
        loc = list(contacts_loc if name == "contacts" else buckets_loc)
        if index and loc[0] != "path":
            loc.append(int(index.rstrip("]")))
        raise _error(422, loc, exc.reason) from None
    except UnknownBucketError as exc:
        loc = list(buckets_loc)
        if buckets is not None and exc.bucket_id in buckets:
            loc.append(buckets.index(exc.bucket_id))
        raise _error(422, loc, str(exc)) from None


@router.get("/catalog", tags=["catalog"])
def catalog(
    runtime: RuntimeDep, kind: Literal["event", "property"] | None = None
) -> dict[str, Any]:
    """What ingest has seen (event names, contact property keys: counts, first and last seen)
    and, per loaded bucket, the names its criteria use that were never seen."""
    from buckets.catalog import entries, never_seen

    with runtime.engine.connect() as conn:
        found = entries(conn, kind)
        unseen = never_seen(conn, runtime.registry)
    return {
        "entries": [entry.to_dict() for entry in found],
        "never_seen": [item.to_dict() for item in unseen if kind in (None, item.kind)],
    }


@router.get("/buckets/{bucket_id}/explain/{external_id}", tags=["buckets"])
def explain_contact(
    runtime: RuntimeDep, bucket_id: PathText, external_id: PathText, now: NowQuery = None
) -> dict[str, Any]:
    """Member or not, each leaf's value and counts, and the next change by the clock."""
    at = _now(runtime, now, ["query", "now"], writes=False)
    return explain(bucket_id, external_id, now=at, runtime=runtime).to_dict()


@router.get("/buckets/{bucket_id}/preview", tags=["buckets"])
def preview_bucket(
    runtime: RuntimeDep, bucket_id: PathText, now: NowQuery = None
) -> dict[str, Any]:
    """Dry run: how many contacts match as of ``now`` and how many would join or leave."""
    bucket = runtime.registry.get(bucket_id)
    at = _now(runtime, now, ["query", "now"], writes=False)
    with runtime.engine.connect() as conn:
        return preview(conn, bucket, at).to_dict()


@router.post("/events", tags=["ingest"])
def ingest(runtime: RuntimeDep, batch: EventBatch) -> dict[str, Any]:
    """Ingest a batch. Every event is validated first: one bad event (a reserved ``bucket:``
    name, a naive time, ...) rejects the batch with 422 and nothing is written. The batch is
    then written in one transaction: all of it, or nothing if the database fails."""
    at = _now(runtime, batch.now, ["body", "now"], writes=True)
    raw = [  # the values as parsed (no re-serialisation: the engine bounds their nesting)
        {
            name: value
            for name in EventBody.model_fields
            if (value := getattr(event, name)) is not None
        }
        for event in batch.events
    ]
    try:
        result = ingest_events(raw, now=at, runtime=runtime, atomic=True)
    except BatchRejected as rejected:
        raise HTTPException(
            422,
            detail=[
                {"loc": ["body", "events", error.index, error.field], "msg": _located(error)}
                for error in rejected.errors
            ],
        ) from None
    return {
        "accepted": result.accepted,
        "duplicate": result.duplicates,
        "ignored_deleted_contact": result.ignored,
        "results": [
            r.to_dict() if not isinstance(r, IngestError) else {"error": str(r)}
            for r in result.results
        ],
    }


def _located(error: IngestError) -> str:
    """The message of an event's error, with the path inside the field when there is one."""
    return f"{error.path}: {error.reason}" if error.path else error.reason


class BackfillRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    emit: bool = Field(default=False, description="Admin backfills: emit joins (entry limit).")
    dry_run: bool = Field(default=False, description="Report what would change; write nothing.")
    now: str | None = Field(
        default=None,
        max_length=64,
        json_schema_extra=INSTANT,
        description="Decide as of (ISO-8601 with a UTC offset; default: the clock).",
    )


@router.post("/buckets/{bucket_id}/backfills", tags=["backfills"], status_code=202)
def start_backfill(
    runtime: RuntimeDep, bucket_id: PathText, body: BackfillRequest
) -> dict[str, Any]:
    """Enqueue the bucket's backfill (first-time if it never completed one, else admin); a
    worker (`buckets run`) executes it. 409 if the bucket already has a job in progress.
    With ``dry_run``, the report of what it would change (200), nothing written."""
    at = _now(runtime, body.now, ["body", "now"], writes=not body.dry_run)
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


health_router = APIRouter(tags=["health"])


@health_router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers (no token needed; nothing else is checked)."""
    return {"status": "ok"}


@health_router.get(
    "/readyz",
    responses={503: {"description": "Not ready: the failing checks say why."}},
)
def readyz(runtime: RuntimeDep) -> JSONResponse:
    """Ready to serve (no token needed): the database answers, its schema is at the head
    revision, the definitions are loaded. 503 with the same body otherwise."""
    registry = runtime.registry
    report = health.Readiness(
        [
            *health.database_checks(runtime.engine),
            health.definitions_check(len(registry), len(registry.journeys)),
        ]
    )
    return JSONResponse(report.to_dict(), 200 if report.ok else 503)


@health_router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
def prometheus_metrics(runtime: RuntimeDep) -> Response:
    """Prometheus metrics (no token needed; names and labels in the README): this process's
    counters and histograms, and the engine's state read from the database."""
    from buckets.metrics import render

    body, content_type = render(runtime)
    return Response(body, media_type=content_type)


def _detail(status: int, loc: list[str]) -> Any:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": [{"loc": loc, "msg": str(exc)}]}, status)

    return handler


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """A database error as a client may see it: what kind and the SQLSTATE, never the
    statement or its parameters (they may hold other contacts' data)."""
    assert isinstance(exc, DBAPIError)
    code = getattr(exc.orig, "sqlstate", None) or "unknown"
    if isinstance(exc, DataError | IntegrityError):  # a value the database cannot store
        status, what = 422, "the database refused a value of this request"
    elif isinstance(exc, OperationalError):
        status, what = 503, "the database is unavailable or failed"
    else:
        status, what = 500, "database error"
    message = f"{what} (SQLSTATE {code}); the request's transaction was rolled back"
    return JSONResponse({"detail": [{"loc": [], "msg": message}]}, status)


class JsonBodyChecks:
    """ASGI middleware: reads the request body before FastAPI parses it and refuses it (422,
    ``loc: ["body"]``) when it is not UTF-8 or is JSON nested deeper than
    :data:`PARSE_DEPTH_CAP` (the JSON parser recurses once per level). It runs inside FastAPI's
    ``max_body_size`` limit, so what it holds is at most ``BUCKETS_MAX_REQUEST_BYTES``, which
    FastAPI would hold anyway."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()  # FastAPI's limit raises here when the body is too big
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = self._problem(body)
        if problem:
            response = JSONResponse({"detail": [{"loc": ["body"], "msg": problem}]}, 422)
            await response(scope, receive, send)
            return
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    def _problem(body: bytes) -> str:
        if not body:
            return ""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"not valid UTF-8 (byte 0x{body[exc.start]:02x} at offset {exc.start})"
        depth = json_text_depth(text)
        if depth > PARSE_DEPTH_CAP:
            return f"JSON nested {depth} levels deep, more than the limit of {PARSE_DEPTH_CAP}"
        return ""


def create_app(runtime: Runtime) -> FastAPI:
    """The application serving ``runtime`` (its database, definitions and settings).

    ``/docs`` (Swagger UI) and ``/redoc`` load their scripts and styles from the assets the
    ``fastapi-offline`` package ships (under ``/static-offline-docs``), not from a CDN: they
    work without internet access."""
    from fastapi_offline import FastAPIOffline

    app = FastAPIOffline(
        title="buckets admin API",
        version="1",
        description="Buckets, members, the transition ledger, explain, preview, ingest,"
        " membership lookups for targeting, the catalogue of seen names; health and metrics.",
        max_body_size=runtime.settings.max_request_bytes,  # larger bodies: 413, unread
    )
    app.state.runtime = runtime
    app.add_exception_handler(UnknownBucketError, _detail(404, ["path", "bucket_id"]))
    app.add_exception_handler(UnknownContactError, _detail(404, ["path", "external_id"]))
    app.add_exception_handler(ManualBucketError, _detail(409, ["path", "bucket_id"]))
    app.add_exception_handler(BucketsError, _detail(409, []))
    # A batch the database stopped (not its input): nothing was written, retry later.
    app.add_exception_handler(DatabaseUnavailableError, _detail(503, []))
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_middleware(JsonBodyChecks)
    app.include_router(health_router)
    app.include_router(router)
    return app
