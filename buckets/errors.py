"""One exception root for everything the engine reports to its callers.

Errors are values with names: each subclass says what kind of thing went wrong and its message
names the bucket, field, row or setting involved. Driver errors are translated at the boundary
(see :mod:`buckets.db`) so callers never have to catch psycopg or SQLAlchemy exceptions.
"""

from __future__ import annotations

from typing import Any


class BucketsError(Exception):
    """Root of every error the engine raises on purpose."""


class ConfigError(BucketsError):
    """A setting (environment variable or CLI option) is missing or malformed."""


class DatabaseUnavailableError(BucketsError):
    """The database could not be reached, or the embedded one could not be started."""


class IngestInterruptedError(DatabaseUnavailableError):
    """A batch ingest stopped because the database became unavailable (not because of its
    input). ``index`` is the first event that is not known to be ingested — resume from it;
    ``results`` holds the outcome of every event before it (a ``BatchResult``). The chunk in
    flight was rolled back, unless the connection died during its commit: resending events
    that carry an ``idempotency_key`` is always safe."""

    def __init__(self, index: int, reason: str, results: Any = None) -> None:
        super().__init__(
            f"database unavailable at events[{index}] ({reason}); the events before it were"
            f" ingested: resume from events[{index}]"
        )
        self.index = index
        self.reason = reason
        self.results: Any = results  # a BatchResult once it leaves ingest_events
