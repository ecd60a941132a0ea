"""One exception root for everything the engine reports to its callers.

Errors are values with names: each subclass says what kind of thing went wrong and its message
names the bucket, field, row or setting involved. Driver errors are translated at the boundary
(see :mod:`buckets.db`) so callers never have to catch psycopg or SQLAlchemy exceptions.
"""

from __future__ import annotations


class BucketsError(Exception):
    """Root of every error the engine raises on purpose."""


class ConfigError(BucketsError):
    """A setting (environment variable or CLI option) is missing or malformed."""


class DatabaseUnavailableError(BucketsError):
    """The database could not be reached, or the embedded one could not be started."""
