"""Validation of ingested events (SPEC §5 step 1): a bad event gets a clear error, naming the
field (and, in a batch, the index and external id), and nothing of it is written.

Accepted forms: ``properties`` / ``contact_properties`` are JSON objects with string keys
(``None`` means empty); ``occurred_at`` is an aware ``datetime`` or an ISO-8601 string with an
offset (default: the ingest's ``now``) and may be at most ``BUCKETS_MAX_CLOCK_SKEW`` after
``now``; ids are non-empty strings of at most 255 characters; e-mails are stored trimmed and
lower-cased.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from buckets.criteria.model import RESERVED_EVENT_PREFIX
from buckets.errors import BucketsError
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
    """An event was rejected; nothing of it was written. ``index`` is its position in a batch."""

    def __init__(
        self, field: str, message: str, *, index: int | None = None, external_id: str = ""
    ) -> None:
        where = f"events[{index}]." if index is not None else ""
        who = f" (external_id {external_id!r})" if external_id else ""
        super().__init__(f"{where}{field}: {message}{who}")
        self.field = field
        self.reason = message
        self.index = index
        self.external_id = external_id


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


def _json_object(value: object, name: str, index: int | None, external_id: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise IngestError(
            name,
            f"must be a JSON object, got {type(value).__name__}",
            index=index,
            external_id=external_id,
        )
    for key in value:
        if not isinstance(key, str):
            raise IngestError(
                name, f"keys must be strings, got {key!r}", index=index, external_id=external_id
            )
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise IngestError(
            name, f"not JSON-serialisable: {exc}", index=index, external_id=external_id
        ) from None
    if _has_nul(value):  # PostgreSQL's jsonb cannot store NUL characters
        raise IngestError(
            name, "contains a NUL character (\\u0000)", index=index, external_id=external_id
        )
    return dict(value)


def _has_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, Mapping):
        return any(_has_nul(key) or _has_nul(item) for key, item in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(item) for item in value)
    return False


def _instant(value: object, name: str, index: int | None, external_id: str) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise IngestError(
                name, f"not an ISO-8601 instant: {value!r}", index=index, external_id=external_id
            ) from None
    if not isinstance(value, datetime):
        raise IngestError(
            name,
            f"must be a datetime or ISO-8601 string, got {type(value).__name__}",
            index=index,
            external_id=external_id,
        )
    if value.tzinfo is None or value.utcoffset() is None:
        raise IngestError(
            name, "must be timezone-aware (naive datetime)", index=index, external_id=external_id
        )
    return value


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
    if "\x00" in value:  # PostgreSQL text cannot store NUL characters
        raise IngestError(name, "contains a NUL character", index=index, external_id=external_id)
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
    label = raw_id if isinstance(raw_id, str) else ""
    for key in data:
        if key not in EVENT_FIELDS:
            raise IngestError(str(key), "unknown field", index=index, external_id=label)
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
    properties = data.get("properties")
    properties = {} if properties is None else _json_object(properties, "properties", index, label)
    patch = data.get("contact_properties")
    if patch is not None:
        patch = _json_object(patch, "contact_properties", index, label)
    size = len(json.dumps(properties)) + (len(json.dumps(patch)) if patch else 0)
    if size > settings.max_payload_bytes:
        raise IngestError(
            "properties",
            f"payload of {size} bytes is over the limit of {settings.max_payload_bytes}",
            index=index,
            external_id=label,
        )
    occurred = data.get("occurred_at")
    occurred_at = now if occurred is None else _instant(occurred, "occurred_at", index, label)
    if occurred_at > now + settings.max_clock_skew:
        raise IngestError(
            "occurred_at",
            f"{occurred_at.isoformat()} is later than now ({now.isoformat()}) plus the allowed"
            f" clock skew of {settings.max_clock_skew}",
            index=index,
            external_id=label,
        )
    email = _text(data.get("email"), "email", index, label, required=False)
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
