"""The ``buckets`` command: the composition root.

Every command accepts ``--database-url`` and ``--definitions`` (defaults from
``BUCKETS_DATABASE_URL`` / ``BUCKETS_DEFINITIONS``) and ``--json`` for machine-readable output.
Errors print one line (``buckets: error: ...``) on stderr and exit non-zero: 2 for bad
configuration or usage, 1 for everything else.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any, TypeVar

import click

from buckets.errors import BucketsError, ConfigError

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from buckets.runtime import Runtime

F = TypeVar("F", bound=Callable[..., Any])


class CliError(click.ClickException):
    """A one-line error; exit status 1."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"buckets: error: {self.format_message()}", file=file or sys.stderr)


class ConfigCliError(CliError):
    """Bad configuration: exit status 2, like a usage error."""

    exit_code = 2


class BucketsGroup(click.Group):
    """Translates the engine's errors (and stray driver errors) into one-line CLI errors."""

    def invoke(self, ctx: click.Context) -> Any:
        from sqlalchemy.exc import DBAPIError

        from buckets.db import first_line

        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            raise ConfigCliError(str(exc)) from exc
        except BucketsError as exc:
            raise CliError(str(exc)) from exc
        except DBAPIError as exc:
            raise CliError(f"database error: {first_line(exc.orig)}") from exc


def common_options(func: F) -> F:
    """The options every command accepts (SPEC §10)."""
    options = [
        click.option(
            "--database-url",
            metavar="URL",
            help="PostgreSQL URL [default: BUCKETS_DATABASE_URL, else an embedded PostgreSQL].",
        ),
        click.option(
            "--definitions",
            metavar="PATH",
            help="Bucket definitions: module, file or directory [default: BUCKETS_DEFINITIONS].",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@contextmanager
def opened_engine(database_url: str | None, definitions: str | None) -> Iterator[Engine]:
    """The engine for the configured (or embedded) database, disposed afterwards."""
    from buckets.db import create_engine, resolve_database_url
    from buckets.settings import load_settings

    settings = load_settings(database_url=database_url, definitions=definitions)
    source = "--database-url" if database_url is not None else "BUCKETS_DATABASE_URL"
    engine = create_engine(resolve_database_url(settings, source=source))
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def opened_runtime(database_url: str | None, definitions: str | None) -> Iterator[Runtime]:
    """The runtime (engine + loaded definitions) for the command's options, disposed after."""
    from buckets.db import create_engine, resolve_database_url
    from buckets.runtime import Runtime
    from buckets.settings import load_settings

    settings = load_settings(database_url=database_url, definitions=definitions)
    source = "--database-url" if database_url is not None else "BUCKETS_DATABASE_URL"
    runtime = Runtime.create(
        engine=create_engine(resolve_database_url(settings, source=source)), settings=settings
    )
    try:
        yield runtime
    finally:
        runtime.engine.dispose()


def parse_instant(value: str, *, option: str = "--now") -> datetime:
    """An ISO-8601 instant with a UTC offset (``Z`` accepted); naive times are refused."""
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO-8601 instant (e.g. 2026-11-24T12:00:00Z)",
            param_hint=option,
        ) from None
    if parsed.tzinfo is None:
        raise click.BadParameter(
            f"{value!r} has no UTC offset (add Z or +00:00)", param_hint=option
        )
    return parsed


def now_option(func: F) -> F:
    """``--now ISO-8601``: the instant the command decides as of (default: the clock)."""

    def convert(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime:
        return datetime.now(UTC) if value is None else parse_instant(value)

    return click.option(
        "--now",
        metavar="ISO-8601",
        callback=convert,
        help="Decide as of this instant (with a UTC offset) [default: now].",
    )(func)


def emit(as_json: bool, payload: dict[str, Any], human: str) -> None:
    click.echo(json.dumps(payload, default=str) if as_json else human)


@click.group(cls=BucketsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="buckets", prog_name="buckets")
def main() -> None:
    """Exact, current bucket (segment) membership on PostgreSQL, driving journeys."""


@main.group(cls=BucketsGroup)
def db() -> None:
    """Database schema: migrate and inspect."""


@db.command("upgrade")
@common_options
def db_upgrade(database_url: str | None, definitions: str | None, as_json: bool) -> None:
    """Create or migrate the schema to the latest revision (a no-op when already there)."""
    from buckets.db import connect, display_url
    from buckets.migrations import upgrade

    with opened_engine(database_url, definitions) as engine:
        connect(engine).close()  # a clear "cannot connect" before Alembic's noise
        result = upgrade(engine)
        tables = _table_count(engine)
        where = display_url(engine.url)
    if result.changed:
        human = f"upgraded {where} from {result.before or 'an empty database'} to {result.after}"
    else:
        human = f"{where} is already at {result.after}; nothing to do"
    human += f"\nschema at head {result.head}: {tables} tables ready"
    payload = {
        "database": where,
        "before": result.before,
        "after": result.after,
        "head": result.head,
        "changed": result.changed,
        "tables": tables,
    }
    emit(as_json, payload, human)


@db.command("current")
@common_options
def db_current(database_url: str | None, definitions: str | None, as_json: bool) -> None:
    """Show the schema revision of the database and whether it is the latest."""
    from buckets.db import connect, display_url
    from buckets.migrations import current_revision, head_revision

    with opened_engine(database_url, definitions) as engine, connect(engine) as connection:
        current = current_revision(connection)
        where = display_url(engine.url)
    head = head_revision()
    if current is None:
        human = f"{where}: no schema yet (run `buckets db upgrade`)"
    elif current == head:
        human = f"{where}: at {current} (head)"
    else:
        human = f"{where}: at {current}, head is {head} (run `buckets db upgrade`)"
    payload = {"database": where, "current": current, "head": head, "at_head": current == head}
    emit(as_json, payload, human)


@main.command("ingest")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@now_option
@common_options
def ingest_command(
    file: IO[str], now: datetime, database_url: str | None, definitions: str | None, as_json: bool
) -> None:
    """Ingest events from a JSON Lines FILE ("-" for stdin), one object per line with the
    fields of ingest_event. Valid lines are ingested even when others are rejected; the exit
    status is 1 if any line was rejected."""
    from buckets.ingest import ingest_events
    from buckets.validation import IngestError

    lines: list[int] = []  # line number of each event handed to the engine
    events: list[Any] = []
    rejected: list[dict[str, Any]] = []
    for number, line in enumerate(file, start=1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
            lines.append(number)
        except ValueError as exc:
            rejected.append({"line": number, "reason": f"not valid JSON: {exc}"})
    with opened_runtime(database_url, definitions) as runtime:
        result = ingest_events(events, now=now, runtime=runtime)
    for index, outcome in enumerate(result.results):
        if isinstance(outcome, IngestError):
            rejected.append({"line": lines[index], "reason": f"{outcome.field}: {outcome.reason}"})
    rejected.sort(key=lambda item: item["line"])
    transitions = result.transitions
    payload = {
        "accepted": result.accepted,
        "duplicate": result.duplicates,
        "ignored_deleted_contact": result.ignored,
        "rejected": len(rejected),
        "rejections": rejected,
        "transitions": len(transitions),
        "emitted": sum(1 for t in transitions if t.emitted),
    }
    human = (
        f"accepted {result.accepted}, duplicate {result.duplicates}, rejected {len(rejected)}"
        + (f", ignored (deleted contact) {result.ignored}" if result.ignored else "")
        + f"; {len(transitions)} transitions ({payload['emitted']} emitted)"
    )
    human += "".join(f"\nline {item['line']}: {item['reason']}" for item in rejected)
    emit(as_json, payload, human)
    if rejected:
        sys.exit(1)


@main.command("reconcile")
@click.option("--bucket", "bucket_ids", multiple=True, metavar="ID", help="Only this bucket.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=None, hidden=True)
@now_option
@common_options
def reconcile_command(
    *,
    bucket_ids: tuple[str, ...],
    chunk_size: int | None,
    now: datetime,
    database_url: str | None,
    definitions: str | None,
    as_json: bool,
) -> None:
    """Run one reconcile tick (every bucket on the cron's list, or --bucket ones) and print
    per-bucket counts. Exit status 1 if a bucket failed."""
    from workflows.reconcile import DEFAULT_CHUNK_SIZE, reconcile

    with opened_runtime(database_url, definitions) as runtime:
        tick = reconcile(
            now,
            list(bucket_ids) or None,
            runtime=runtime,
            chunk_size=chunk_size or DEFAULT_CHUNK_SIZE,
        )
    lines = [f"reconcile as of {now.isoformat()}: {len(tick.buckets)} buckets"]
    for item in tick.buckets:
        if item.status != "done":
            lines.append(f"  {item.bucket_id}: {item.status} ({item.reason})")
            continue
        left = ", ".join(f"{reason} {count}" for reason, count in sorted(item.left.items()))
        lines.append(
            f"  {item.bucket_id}: joined {item.joined} (emitted {item.emitted},"
            f" suppressed {item.suppressed}), left {left or '0'}, deferred {item.deferred},"
            f" cleared {item.cleared}, joins {item.joins}, {item.seconds * 1000:.0f} ms"
        )
    emit(as_json, tick.to_dict(), "\n".join(lines))
    if tick.failed:
        sys.exit(1)


def _table_count(engine: Engine) -> int:
    from sqlalchemy import inspect

    from buckets.models import metadata

    present = set(inspect(engine).get_table_names())
    return sum(1 for table in metadata.sorted_tables if table.name in present)


if __name__ == "__main__":
    main()
