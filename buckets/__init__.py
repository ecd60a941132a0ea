"""buckets: exact, current segment membership on PostgreSQL, driving journeys.

The public API is re-exported here::

    from buckets import define_bucket, b, ingest_event

    went_dormant = define_bucket(
        id="went-dormant",
        criteria=b.all(b.event("feature.used").exists(),
                       b.event("feature.used").within("7d").not_exists()),
    )
    ingest_event("user-42", "feature.used", {"feature": "export"})
"""

from __future__ import annotations

from buckets.contacts import Erased, UnknownContactError, delete_contact, erase_contact
from buckets.criteria import b, evaluate, member_select
from buckets.definitions import Bucket, DefinitionError, define_bucket, load_definitions
from buckets.errors import BucketsError, ConfigError, DatabaseUnavailableError
from buckets.ingest import BatchResult, IngestResult, ingest_event, ingest_events
from buckets.journeys import Journey, journey
from buckets.ledger import Transition
from buckets.registry import Registry, UnknownBucketError, set_enabled
from buckets.runtime import Runtime, configure, get_runtime
from buckets.validation import BatchRejected, IngestError

__all__ = [
    "BatchRejected",
    "BatchResult",
    "Bucket",
    "BucketsError",
    "ConfigError",
    "DatabaseUnavailableError",
    "DefinitionError",
    "Erased",
    "IngestError",
    "IngestResult",
    "Journey",
    "Registry",
    "Runtime",
    "Transition",
    "UnknownBucketError",
    "UnknownContactError",
    "b",
    "configure",
    "define_bucket",
    "delete_contact",
    "erase_contact",
    "evaluate",
    "get_runtime",
    "ingest_event",
    "ingest_events",
    "journey",
    "load_definitions",
    "member_select",
    "set_enabled",
]
