"""Test harness: a real PostgreSQL, migrated once, with two isolation styles.

Server, in order of preference:
1. ``BUCKETS_TEST_DATABASE_URL`` (CI exports it when a server answers on 127.0.0.1:5432);
2. a testcontainers PostgreSQL, when a Docker engine answers;
3. an embedded PostgreSQL (pgserver) in a temporary directory.

The schema is migrated once per session into a *template* database by the real Alembic
migrations. Tests then use either

* ``session`` / ``connection``: one shared work database (cloned from the template); each test
  runs inside an outer transaction that is rolled back, and commits inside the test become
  savepoints. Fast; for anything that needs a single connection.
* ``clone_db``: a database of its own, cloned from the template and dropped afterwards. For
  tests that need several connections, threads or processes, real commits, or migrations.
"""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.orm import Session

from buckets.db import (
    create_engine,
    embedded_server_url,
    parse_database_url,
    start_embedded_server,
)
from buckets.migrations import upgrade


@dataclass
class PgServer:
    """A PostgreSQL server the tests may create and drop databases on."""

    url: URL  # a maintenance database on the server
    kind: str  # "env", "testcontainers" or "embedded"

    def url_for(self, database: str) -> URL:
        return self.url.set(database=database)

    def _admin(self, sql: str) -> None:
        conninfo = self.url.set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self, name: str, template: str | None = None) -> URL:
        suffix = f' TEMPLATE "{template}"' if template else ""
        self._admin(f'CREATE DATABASE "{name}"{suffix}')
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _docker_answers() -> bool:
    # Probe the socket ourselves first: the docker client leaks its socket when the engine is
    # absent, which pytest (warnings are errors) reports as an unraisable ResourceWarning.
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://"):
        with socket.socket(socket.AF_UNIX) as probe:
            probe.settimeout(2)
            try:
                probe.connect(host.removeprefix("unix://"))
            except OSError:
                return False
    try:
        import docker

        client = docker.from_env(timeout=3)
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def _testcontainers_postgres() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:
            from testcontainers.postgres import PostgresContainer
    return PostgresContainer("postgres:16-alpine", driver="psycopg")


_servers_used: list[PgServer] = []


def pytest_addoption(parser: Any) -> None:
    parser.addoption(
        "--soak", action="store_true", help="also run the long fault runs (marked soak)"
    )


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="a long fault run: pass --soak to run it")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for server in _servers_used:
        where = server.url.render_as_string(hide_password=True)
        terminalreporter.write_line(f"buckets test PostgreSQL: {server.kind} ({where})")


@contextmanager
def _chosen_server() -> Iterator[PgServer]:
    env_url = os.environ.get("BUCKETS_TEST_DATABASE_URL", "").strip()
    if env_url:
        yield PgServer(parse_database_url(env_url, source="BUCKETS_TEST_DATABASE_URL"), "env")
    elif _docker_answers():
        container = _testcontainers_postgres()
        container.start()
        try:
            yield PgServer(parse_database_url(container.get_connection_url()), "testcontainers")
        finally:
            container.stop()
    else:
        pgdata = Path(tempfile.mkdtemp(prefix="buckets-test-pg-")) / "pgdata"
        embedded = start_embedded_server(pgdata, cleanup_mode="delete")
        try:
            yield PgServer(embedded_server_url(embedded), "embedded")
        finally:
            embedded.cleanup()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    with _chosen_server() as server:
        _servers_used.append(server)
        yield server


def unique_name(prefix: str) -> str:
    """Database names unique across concurrent test runs on one server."""
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def template_db(pg_server: PgServer) -> Iterator[str]:
    """A database migrated to head by the real migrations; cloned by the other fixtures."""
    name = unique_name("buckets_tpl")
    engine = create_engine(pg_server.create_database(name), poolclass=sa.pool.NullPool)
    try:
        upgrade(engine)
    finally:
        engine.dispose()  # a template must have no open connections to be cloned
    yield name
    pg_server.drop_database(name)


@dataclass
class CloneDB:
    name: str
    url: URL
    engine: Engine


@contextmanager
def _private_db(pg_server: PgServer, prefix: str, template: str | None) -> Iterator[CloneDB]:
    name = unique_name(prefix)
    url = pg_server.create_database(name, template=template)
    engine = create_engine(url)
    try:
        yield CloneDB(name, url, engine)
    finally:
        engine.dispose()
        pg_server.drop_database(name)


@pytest.fixture
def clone_db(pg_server: PgServer, template_db: str) -> Iterator[CloneDB]:
    """A private, migrated database for this test; dropped afterwards."""
    with _private_db(pg_server, "buckets_t", template_db) as db:
        yield db


@pytest.fixture
def empty_db(pg_server: PgServer) -> Iterator[CloneDB]:
    """A private database with no schema at all (for migration tests)."""
    with _private_db(pg_server, "buckets_e", None) as db:
        yield db


@pytest.fixture(scope="session")
def work_engine(pg_server: PgServer, template_db: str) -> Iterator[Engine]:
    """The shared database of the rollback-isolated fixtures."""
    name = unique_name("buckets_w")
    engine = create_engine(pg_server.create_database(name, template=template_db))
    yield engine
    engine.dispose()
    pg_server.drop_database(name)


@pytest.fixture
def connection(work_engine: Engine) -> Iterator[Connection]:
    """A connection inside a transaction that is rolled back after the test."""
    with work_engine.connect() as conn:
        outer = conn.begin()
        try:
            yield conn
        finally:
            outer.rollback()


@pytest.fixture
def session(connection: Connection) -> Iterator[Session]:
    """An ORM session on ``connection``; its commits become savepoints, all rolled back."""
    with Session(
        bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
    ) as sess:
        yield sess


@pytest.fixture
def make_runtime(clone_db: CloneDB) -> Any:
    """Build a :class:`Runtime` on this test's private database with the given buckets.

    Override caching is off (``config_cache_seconds=0``) unless a test asks for it.
    """
    from buckets.registry import Registry
    from buckets.runtime import Runtime
    from buckets.settings import Settings

    def make(*buckets: Any, journeys: Any = (), **settings: Any) -> Runtime:
        settings.setdefault("config_cache_seconds", 0)
        return Runtime(
            engine=clone_db.engine,
            registry=Registry(buckets, journeys),
            settings=Settings(database_url=clone_db.url.render_as_string(False), **settings),
        )

    return make


@pytest.fixture(params=["facts", "set-wide"])
def both_deciders(request: Any, monkeypatch: Any) -> str:
    """Run a test with due chunks decided from each contact's facts (the default below
    ``SET_WIDE_FROM`` pairs of a bucket) and with every bucket's state computed set-wide."""
    from buckets import decide

    if request.param == "set-wide":
        monkeypatch.setattr(decide, "SET_WIDE_FROM", 1)
    return str(request.param)
