"""buckets: exact, current segment membership on PostgreSQL, driving journeys.

The public API is re-exported here::

    from buckets import define_bucket, b

    went_dormant = define_bucket(
        id="went-dormant",
        criteria=b.all(b.event("feature.used").exists(),
                       b.event("feature.used").within("7d").not_exists()),
    )
"""

from __future__ import annotations

from buckets.criteria import b, evaluate, member_select
from buckets.definitions import Bucket, DefinitionError, define_bucket, load_definitions
from buckets.errors import BucketsError, ConfigError, DatabaseUnavailableError

__all__ = [
    "Bucket",
    "BucketsError",
    "ConfigError",
    "DatabaseUnavailableError",
    "DefinitionError",
    "b",
    "define_bucket",
    "evaluate",
    "load_definitions",
    "member_select",
]
