"""Alembic environment: reads the same settings as the app (``BUCKETS_*``).

Online migrations take a transaction-scoped advisory lock first, so two processes upgrading the
same database at once run the revisions once: the second waits, then finds nothing to do.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from buckets.db import create_engine, resolve_database_url
from buckets.migrations import lock_migrations
from buckets.models import metadata
from buckets.settings import get_settings

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name)


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=metadata,
        compare_type=True,
        compare_server_default=True,
        **kwargs,  # type: ignore[arg-type]
    )


def run_migrations_offline() -> None:
    """``alembic upgrade head --sql``: emit the SQL script without a database."""
    _configure(
        url="postgresql+psycopg://",
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        lock_migrations(connection)  # re-entrant: buckets.migrations.upgrade holds it already
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(resolve_database_url(get_settings()), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            _run(connection)
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
