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

from importlib import import_module
from typing import TYPE_CHECKING, Any

# The public names and the module each lives in. They are imported on first use (PEP 562), so
# `import buckets.errors` (the CLI, `buckets --help`) does not load the whole library.
_EXPORTS = {
    "Erased": "buckets.contacts",
    "UnknownContactError": "buckets.contacts",
    "delete_contact": "buckets.contacts",
    "erase_contact": "buckets.contacts",
    "b": "buckets.criteria",
    "evaluate": "buckets.criteria",
    "member_select": "buckets.criteria",
    "Bucket": "buckets.definitions",
    "DefinitionError": "buckets.definitions",
    "define_bucket": "buckets.definitions",
    "load_definitions": "buckets.definitions",
    "BucketsError": "buckets.errors",
    "ConfigError": "buckets.errors",
    "DatabaseUnavailableError": "buckets.errors",
    "BatchResult": "buckets.ingest",
    "IngestResult": "buckets.ingest",
    "ingest_event": "buckets.ingest",
    "ingest_events": "buckets.ingest",
    "Journey": "buckets.journeys",
    "journey": "buckets.journeys",
    "Transition": "buckets.ledger",
    "ActiveMembership": "buckets.lookup",
    "ManualBucketError": "buckets.manual",
    "MemberIdError": "buckets.manual",
    "MembersResult": "buckets.manual",
    "add_members": "buckets.manual",
    "remove_members": "buckets.manual",
    "memberships": "buckets.lookup",
    "Registry": "buckets.registry",
    "UnknownBucketError": "buckets.registry",
    "set_enabled": "buckets.registry",
    "Runtime": "buckets.runtime",
    "configure": "buckets.runtime",
    "get_runtime": "buckets.runtime",
    "BatchRejected": "buckets.validation",
    "IngestError": "buckets.validation",
}

if TYPE_CHECKING:
    from buckets.contacts import Erased, UnknownContactError, delete_contact, erase_contact
    from buckets.criteria import b, evaluate, member_select
    from buckets.definitions import Bucket, DefinitionError, define_bucket, load_definitions
    from buckets.errors import BucketsError, ConfigError, DatabaseUnavailableError
    from buckets.ingest import BatchResult, IngestResult, ingest_event, ingest_events
    from buckets.journeys import Journey, journey
    from buckets.ledger import Transition
    from buckets.lookup import ActiveMembership, memberships
    from buckets.manual import (
        ManualBucketError,
        MemberIdError,
        MembersResult,
        add_members,
        remove_members,
    )
    from buckets.registry import Registry, UnknownBucketError, set_enabled
    from buckets.runtime import Runtime, configure, get_runtime
    from buckets.validation import BatchRejected, IngestError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'buckets' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "ActiveMembership",
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
    "ManualBucketError",
    "MemberIdError",
    "MembersResult",
    "Registry",
    "Runtime",
    "Transition",
    "UnknownBucketError",
    "UnknownContactError",
    "add_members",
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
    "memberships",
    "remove_members",
    "set_enabled",
]
