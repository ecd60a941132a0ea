"""Engine and session factory, and the embedded PostgreSQL used when no URL is configured.

* :func:`parse_database_url` turns any PostgreSQL URL a user is likely to paste
  (``postgres://``, ``postgresql://``, ``postgresql+psycopg2://``) into one for psycopg 3.
* :func:`resolve_database_url` picks the configured URL or starts (or reuses) the embedded server.
* :func:`create_engine` / :func:`session_factory` build the SQLAlchemy objects every module uses.
* :func:`connect` opens a connection and translates driver errors into
  :class:`~buckets.errors.DatabaseUnavailableError` with a one-line message.

The embedded server (pgserver) runs from ``<data_dir>/pgdata``. It is shared by every process
using that directory and stopped when the last of them exits; its data stays on disk, so a later
command finds what an earlier one wrote.
"""

from __future__ import annotations

import sys
import threading
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import psycopg
import sqlalchemy as sa
from psycopg.types.array import ListBinaryDumper
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from buckets.errors import ConfigError, DatabaseUnavailableError
from buckets.settings import Settings

DRIVER = "postgresql+psycopg"
EMBEDDED_DATABASE = "buckets"
CONNECT_TIMEOUT_SECONDS = 5

_embedded_lock = threading.Lock()
_embedded_urls: dict[Path, URL] = {}
_embedded_servers: dict[Path, Any] = {}  # keeps pgserver handles alive for the process


def parse_database_url(raw: str, *, source: str = "BUCKETS_DATABASE_URL") -> URL:
    """Parse ``raw`` into a psycopg 3 URL, or raise :class:`ConfigError` naming ``source``."""
    try:
        url = sa.make_url(raw.strip())
    except ArgumentError:
        raise ConfigError(
            f"{source}: cannot parse {raw!r} as a database URL "
            "(expected postgresql://user:password@host:port/dbname)"
        ) from None
    backend = url.get_backend_name()
    if backend not in ("postgresql", "postgres"):
        raise ConfigError(f"{source}: buckets needs PostgreSQL, got a {backend!r} URL")
    return url.set(drivername=DRIVER)


def display_url(url: URL) -> str:
    """The URL as safe to print: password hidden, socket paths readable."""
    return unquote(url.render_as_string(hide_password=True))


def resolve_database_url(settings: Settings, *, source: str = "BUCKETS_DATABASE_URL") -> URL:
    """The configured database URL, or the embedded server's when none is configured.

    ``source`` names where the URL came from in errors (the CLI passes ``--database-url``).
    """
    if settings.database_url is not None:
        return parse_database_url(settings.database_url, source=source)
    return embedded_database_url(settings.embedded_pgdata)


def embedded_database_url(pgdata: Path) -> URL:
    """Start (or reuse) the embedded PostgreSQL in ``pgdata`` and return its URL.

    The first call in a process says so on stderr, so nobody wonders where their data went.
    """
    pgdata = pgdata.expanduser().resolve()
    with _embedded_lock:
        if pgdata in _embedded_urls:
            return _embedded_urls[pgdata]
        message = "BUCKETS_DATABASE_URL is not set; using the embedded PostgreSQL in"
        print(f"buckets: {message} {pgdata}", file=sys.stderr)
        server = start_embedded_server(pgdata)
        url = embedded_server_url(server)
        ensure_database(url, EMBEDDED_DATABASE)
        _embedded_servers[pgdata] = server
        _embedded_urls[pgdata] = url = url.set(database=EMBEDDED_DATABASE)
        return url


def start_embedded_server(pgdata: Path, *, cleanup_mode: str | None = "stop") -> Any:
    """Start (or attach to) a pgserver PostgreSQL in ``pgdata``; returns pgserver's handle.

    ``cleanup_mode="stop"`` stops the server when the last process using it exits;
    ``"delete"`` also removes ``pgdata`` (throw-away servers, e.g. in tests).
    """
    try:
        with warnings.catch_warnings():
            # platformdirs warns at import time when XDG_RUNTIME_DIR is unset (containers, CI);
            # pgserver then falls back to /tmp, which is what we want anyway.
            warnings.simplefilter("ignore", UserWarning)
            import pgserver
    except ImportError as exc:  # pragma: no cover - pgserver is a hard dependency
        raise DatabaseUnavailableError(f"embedded PostgreSQL unavailable: {exc}") from exc
    try:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        return pgserver.get_server(pgdata, cleanup_mode=cleanup_mode)
    except Exception as exc:  # pgserver raises assorted subprocess/OS errors
        raise DatabaseUnavailableError(
            f"could not start the embedded PostgreSQL in {pgdata}: {exc}; "
            "set BUCKETS_DATABASE_URL to use an existing server"
        ) from exc


def embedded_server_url(server: Any) -> URL:
    """The URL of a server returned by :func:`start_embedded_server` (its ``postgres`` db)."""
    # pgserver answers "postgresql://postgres:@/postgres?host=/socket/dir" (trust auth, no
    # password: drop the empty one so it is not displayed as "***").
    parsed = sa.make_url(server.get_uri())
    return URL.create(
        DRIVER,
        username=parsed.username,
        password=parsed.password or None,
        host=parsed.host,
        port=parsed.port,
        database=parsed.database,
        query=parsed.query,
    )


def ensure_database(server_url: URL, name: str) -> None:
    """Create database ``name`` on the server at ``server_url`` unless it exists."""
    conninfo = server_url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists is None:
            conn.execute(f'CREATE DATABASE "{name}"')


def create_engine(url: URL | str, **kwargs: Any) -> Engine:
    """An engine for ``url`` with the options the engine relies on.

    * ``pool_pre_ping``: workers live for days; a server restart must not break them.
    * a short connect timeout, so an unreachable server is reported in seconds, not minutes;
    * no JIT compilation: the engine's statements are index probes and set-based writes whose
      work follows the changes; JIT cost tens of milliseconds per statement for nothing
      (PERFORMANCE-NOTES.md: ticks 1.8x faster without it; 28 ms of an 83 ms facts query).
    """
    if isinstance(url, str):
        url = parse_database_url(url)
    connect_args = {
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "options": "-c jit=off",
        **kwargs.pop("connect_args", {}),
    }
    engine = sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args, **kwargs)
    sa.event.listen(engine, "connect", _binary_lists)
    return engine


def _binary_lists(dbapi_connection: Any, _record: Any) -> None:
    """Send lists (the pairs, ids and instants every set-based statement takes as arrays) in
    PostgreSQL's binary array format: psycopg dumps them 3-4x faster than the text form,
    which quotes each element (~50 ms of a 5,000-transition tick). Statements cast every
    array parameter to its type, so the wire format changes nothing else."""
    dbapi_connection.adapters.register_dumper(list, ListBinaryDumper)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (results outlive transactions)."""
    return sessionmaker(engine, expire_on_commit=False)


def connect(engine: Engine) -> Connection:
    """Open a connection, translating "cannot connect" into a one-line error."""
    try:
        return engine.connect()
    except DBAPIError as exc:
        raise DatabaseUnavailableError(
            f"cannot connect to {display_url(engine.url)}: {first_line(exc.orig)}"
        ) from exc


def first_line(exc: BaseException | None) -> str:
    """The first non-empty line of a driver error (psycopg messages span several)."""
    text = str(exc).strip() if exc is not None else ""
    return text.splitlines()[0] if text else type(exc).__name__
