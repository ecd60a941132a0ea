"""Validation of ingested events (SPEC §5 step 1): a bad event gets a clear error, naming the
field (and, in a batch, the index and external id), and nothing of it is written.

Accepted forms: ``properties`` / ``contact_properties`` are JSON objects with string keys
(``None`` means empty), nested at most ``BUCKETS_MAX_JSON_DEPTH`` levels (the object itself is
level 1); ``occurred_at`` is an aware ``datetime`` or an ISO-8601 string with an offset (ASCII
digits; default: the ingest's ``now``), may be at most ``BUCKETS_MAX_CLOCK_SKEW`` after ``now``,
and, like ``now``, lies in ``[BUCKETS_MIN_INSTANT, BUCKETS_MAX_INSTANT]`` once its offset is
normalised; ids are non-empty strings of at most 255 characters; e-mails are stored trimmed and
lower-cased. Every string, key and value must be text PostgreSQL can store (no NUL, no lone
surrogates). The payload limit (``BUCKETS_MAX_PAYLOAD_BYTES``) counts the JSON size of
``properties`` and ``contact_properties`` plus the e-mail.

Every check runs before anything is written, and none recurses: hostile nesting or sharing
costs time proportional to the limits (see :mod:`buckets.inputs`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from buckets.criteria.model import RESERVED_EVENT_PREFIX
from buckets.errors import BucketsError
from buckets.inputs import (
    InputError,
    instant_problem,
    json_value_problem,
    parse_instant,
    shorten,
    text_problem,
)
from buckets.settings import Settings

EVENT_FIELDS = (
    "external_id",
    "event",
    "properties",
    "occurred_at",
    "contact_properties",
    "email",
    "idempotency_key",
)
MAX_ID_LENGTH = 255


class IngestError(BucketsError):
    """An event was rejected; nothing of it was written. ``index`` is its position in a batch;
    ``path`` locates the problem inside ``field`` (``a.b[2]`` in ``properties``), if it is
    inside."""

    def __init__(
        self,
        field: str,
        message: str,
        *,
        index: int | None = None,
        external_id: str = "",
        path: str = "",
    ) -> None:
        where = f"events[{index}]." if index is not None else ""
        inside = f".{path}" if path else ""
        who = f" (external_id {shorten(external_id)})" if external_id else ""
        super().__init__(f"{where}{field}{inside}: {message}{who}")
        self.field = field
        self.path = path
        self.reason = message
        self.index = index
        self.external_id = external_id

    @property
    def location(self) -> str:
        """``field`` and the path inside it: ``properties.a.b[2]``."""
        return f"{self.field}.{self.path}" if self.path else self.field


class BatchRejected(BucketsError):
    """An all-or-nothing batch had bad events (``errors``, in batch order); nothing was
    written."""

    def __init__(self, errors: list[IngestError]) -> None:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"batch rejected, nothing written: {errors[0]}{more}")
        self.errors = errors


@dataclass(frozen=True)
class EventIn:
    """A validated event."""

    external_id: str
    event: str
    properties: dict[str, Any]
    occurred_at: datetime
    contact_properties: dict[str, Any] | None = None
    email: str | None = None
    idempotency_key: str | None = None


def _json_object(
    value: object, name: str, index: int | None, external_id: str, settings: Settings
) -> tuple[dict[str, Any], int]:
    """The object and the length of its JSON, or IngestError."""
    if not isinstance(value, Mapping):
        raise IngestError(
            name,
            f"must be a JSON object, got {type(value).__name__}",
            index=index,
            external_id=external_id,
        )
    problem = json_value_problem(
        value, max_depth=settings.max_json_depth, max_size=settings.max_payload_bytes
    )
    if problem is not None:
        reason = problem.reason
        if reason.startswith("larger than"):
            reason = f"payload {reason} (BUCKETS_MAX_PAYLOAD_BYTES)"
        elif reason.startswith("nested deeper"):
            reason += " (BUCKETS_MAX_JSON_DEPTH)"
        raise IngestError(name, reason, index=index, external_id=external_id, path=problem.path)
    try:
        size = len(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise IngestError(
            name, f"not JSON-serialisable: {exc}", index=index, external_id=external_id
        ) from None
    return dict(value), size


def _instant(
    value: object, name: str, index: int | None, external_id: str, settings: Settings
) -> datetime:
    if isinstance(value, str):
        try:
            value = parse_instant(value)
        except InputError as exc:
            raise IngestError(name, exc.reason, index=index, external_id=external_id) from None
    if not isinstance(value, datetime):
        raise IngestError(
            name,
            f"must be a datetime or ISO-8601 string, got {type(value).__name__}",
            index=index,
            external_id=external_id,
        )
    problem = instant_problem(value, settings.min_instant, settings.max_instant)
    if problem is not None:
        raise IngestError(name, problem, index=index, external_id=external_id)
    return value


def check_now(now: datetime, settings: Settings, *, field: str = "now") -> datetime:
    """``now`` as given to a deciding call: aware and within the accepted instants."""
    if not isinstance(now, datetime):
        raise IngestError(field, f"must be a datetime, got {type(now).__name__}")
    problem = instant_problem(now, settings.min_instant, settings.max_instant)
    if problem is not None:
        raise IngestError(field, problem)
    return now


def future_now_problem(now: datetime, settings: Settings, clock: datetime | None = None) -> str:
    """Why ``now`` is too far after the real clock for a command that writes as of it (""
    when it is not). A tick as of the year 9999 would, for instance, stamp every bucket as
    reconciled until then."""
    clock = clock or datetime.now(UTC)
    ahead = now - clock
    if ahead <= settings.max_clock_skew:
        return ""
    return (
        f"{now.isoformat()} is {ahead} after the clock ({clock.isoformat(timespec='seconds')}),"
        f" more than the allowed clock skew of {settings.max_clock_skew}"
        " (BUCKETS_MAX_CLOCK_SKEW)"
    )


def _text(
    value: object, name: str, index: int | None, external_id: str, *, required: bool
) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise IngestError(
            name,
            f"must be a string, got {type(value).__name__}",
            index=index,
            external_id=external_id,
        )
    if not value.strip():
        raise IngestError(name, "must not be empty", index=index, external_id=external_id)
    problem = text_problem(value)
    if problem is not None:  # PostgreSQL text cannot store NUL; UTF-8 cannot encode surrogates
        raise IngestError(name, problem, index=index, external_id=external_id)
    if len(value) > MAX_ID_LENGTH and name != "email":
        raise IngestError(
            name, f"longer than {MAX_ID_LENGTH} characters", index=index, external_id=external_id
        )
    return value


def validate_event(
    data: Mapping[str, Any], *, now: datetime, settings: Settings, index: int | None = None
) -> EventIn:
    """``data`` (the fields of :func:`ingest_event`) checked and normalised, or IngestError."""
    if not isinstance(data, Mapping):
        raise IngestError("event", f"expected an object, got {type(data).__name__}", index=index)
    raw_id = data.get("external_id")
    label = raw_id if isinstance(raw_id, str) and text_problem(raw_id) is None else ""
    for key in data:
        if key not in EVENT_FIELDS:
            shown = key if isinstance(key, str) and key.isidentifier() else shorten(key)
            raise IngestError(shown, "unknown field", index=index, external_id=label)
    external_id = _text(raw_id, "external_id", index, label, required=True)
    assert external_id is not None
    name = _text(data.get("event"), "event", index, label, required=True)
    assert name is not None
    if name.startswith(RESERVED_EVENT_PREFIX):
        raise IngestError(
            "event",
            f"names starting with {RESERVED_EVENT_PREFIX!r} are reserved",
            index=index,
            external_id=label,
        )
    properties: dict[str, Any] = {}
    properties_size = 2  # "{}"
    if data.get("properties") is not None:
        properties, properties_size = _json_object(
            data["properties"], "properties", index, label, settings
        )
    patch, patch_size = None, 0
    if data.get("contact_properties") is not None:
        patch, patch_size = _json_object(
            data["contact_properties"], "contact_properties", index, label, settings
        )
    email = _text(data.get("email"), "email", index, label, required=False)
    parts = {
        "properties": properties_size,
        "contact_properties": patch_size if patch else 0,
        "email": len(email.encode()) if email else 0,
    }
    size = sum(parts.values())
    if size > settings.max_payload_bytes:
        raise IngestError(
            max(parts, key=parts.__getitem__),  # the largest part is the one to look at
            f"payload of {size} bytes (properties, contact_properties and email) is over the"
            f" limit of {settings.max_payload_bytes} (BUCKETS_MAX_PAYLOAD_BYTES)",
            index=index,
            external_id=label,
        )
    occurred = data.get("occurred_at")
    occurred_at = (
        now if occurred is None else _instant(occurred, "occurred_at", index, label, settings)
    )
    if occurred_at - now > settings.max_clock_skew:
        raise IngestError(
            "occurred_at",
            f"{occurred_at.isoformat()} is later than now ({now.isoformat()}) plus the allowed"
            f" clock skew of {settings.max_clock_skew}",
            index=index,
            external_id=label,
        )
    idempotency_key = _text(
        data.get("idempotency_key"), "idempotency_key", index, label, required=False
    )
    return EventIn(
        external_id=external_id,
        event=name,
        properties=properties,
        occurred_at=occurred_at,
        contact_properties=patch,
        email=email.strip().lower() if email else None,
        idempotency_key=idempotency_key,
    )
