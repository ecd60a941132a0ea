"""Running the Alembic migrations from code (the CLI, tests, a worker at start-up).

The revisions live in the repository's top-level ``alembic/`` directory; a wheel carries the same
files as ``buckets/_alembic`` (see pyproject.toml). ``alembic/env.py`` serialises concurrent
upgrades with an advisory lock, so several workers starting together migrate once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from buckets.errors import ConfigError

_PACKAGE_DIR = Path(__file__).resolve().parent

# An arbitrary, fixed key for pg_advisory_xact_lock serialising migrations ("bucket" + 1).
MIGRATION_LOCK_KEY = 0x6275636B6574_01


def lock_migrations(connection: Connection) -> None:
    """Wait for (then hold, until the transaction ends) the database's migration lock."""
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})


def script_location() -> Path:
    """The directory holding ``env.py`` and ``versions/``."""
    for candidate in (_PACKAGE_DIR / "_alembic", _PACKAGE_DIR.parent / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise ConfigError(f"migrations not found next to {_PACKAGE_DIR}; reinstall buckets")


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for our migrations; with ``connection``, env.py migrates through it."""
    config = Config()
    # ConfigParser interpolation treats "%" specially; paths may contain it.
    config.set_main_option("script_location", str(script_location()).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the repository always ships revisions
        raise ConfigError("no migrations found")
    return head


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at, or None when it was never migrated."""
    return MigrationContext.configure(connection).get_current_revision()


@dataclass(frozen=True)
class UpgradeResult:
    before: str | None
    after: str | None
    head: str

    @property
    def changed(self) -> bool:
        return self.before != self.after


def upgrade(engine: Engine, revision: str = "head") -> UpgradeResult:
    """Migrate the database behind ``engine`` to ``revision`` in one transaction."""
    with engine.begin() as connection:
        lock_migrations(connection)  # before reading `before`, so a waiter reports no change
        before = current_revision(connection)
        command.upgrade(alembic_config(connection), revision)
        after = current_revision(connection)
    return UpgradeResult(before=before, after=after, head=head_revision())


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate the database behind ``engine`` down to ``revision`` (``"base"`` empties it)."""
    with engine.begin() as connection:
        lock_migrations(connection)
        command.downgrade(alembic_config(connection), revision)
