"""The ``buckets`` command: the composition root.

Every command accepts ``--database-url`` and ``--definitions`` (defaults from
``BUCKETS_DATABASE_URL`` / ``BUCKETS_DEFINITIONS``) and ``--json`` for machine-readable output.
Errors print one line (``buckets: error: ...``) on stderr and exit non-zero: 2 for bad
configuration or usage, 1 for everything else.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import io
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import IO, TYPE_CHECKING, Any, TypeVar

import click

from buckets.errors import BucketsError, ConfigError

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from buckets.runtime import Runtime

F = TypeVar("F", bound=Callable[..., Any])


class CliError(click.ClickException):
    """A one-line error; exit status 1 (the command ran and failed)."""


class ConfigCliError(CliError):
    """The command could not run as asked (usage, configuration, definitions, an unknown
    bucket, a busy address, a database unreachable or not migrated): exit status 2."""

    exit_code = 2


class UnreachableCliError(ConfigCliError):
    """The database did not answer the check up front (exit status 2)."""


def _one_line(message: str) -> str:
    return " / ".join(line.strip() for line in message.splitlines() if line.strip())


def report_error(message: str, exit_code: int, *, as_json: bool) -> None:
    """Every error of the command, in one format: ``buckets: error: ...`` on stderr, or with
    ``--json`` one JSON object ``{"error": ..., "exit_code": ...}`` on stderr."""
    if as_json:
        payload = {"error": _one_line(message), "exit_code": exit_code}
        click.echo(json.dumps(payload), err=True)
    else:
        click.echo(f"buckets: error: {_one_line(message)}", err=True)


class BucketsGroup(click.Group):
    """Translates the engine's errors (and stray driver errors) into one-line CLI errors, and
    prints every error, usage errors included, in one format (:func:`report_error`).

    Exit status: 0 done; 1 the command ran and failed (rejected input lines, a failed job, a
    dead worker loop, not ready in ``status``, a contact that does not exist); 2 it could not
    run as asked (usage, configuration and definitions, an unknown bucket id, a busy listen
    address, a database unreachable or not at the schema's head, an ingest stopped by the
    database)."""

    def invoke(self, ctx: click.Context) -> Any:
        from sqlalchemy.exc import DBAPIError

        from buckets.db import first_line
        from buckets.definitions import DefinitionError
        from buckets.registry import UnknownBucketError

        try:
            return super().invoke(ctx)
        except (ConfigError, DefinitionError, UnknownBucketError) as exc:
            raise ConfigCliError(str(exc)) from exc
        except BucketsError as exc:
            raise CliError(str(exc)) from exc
        except DBAPIError as exc:
            raise CliError(f"database error: {first_line(exc.orig)}") from exc

    def main(  # type: ignore[override]
        self,
        args: list[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        as_json = "--json" in argv
        try:
            result = super().main(  # the command is `buckets`, whoever invokes it
                argv, "buckets", complete_var, standalone_mode=False, **extra
            )
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "buckets"
            message = f"{exc.format_message()} (see `{where} --help`)"
            report_error(message, exc.exit_code, as_json=as_json)
            return self._exit(2, standalone_mode)
        except click.ClickException as exc:
            report_error(exc.format_message(), exc.exit_code, as_json=as_json)
            return self._exit(exc.exit_code, standalone_mode)
        except click.Abort:
            report_error("interrupted", 1, as_json=as_json)
            return self._exit(1, standalone_mode)
        code = result if isinstance(result, int) else 0  # --help, --version: Exit's code
        return self._exit(code, standalone_mode)

    @staticmethod
    def _exit(code: int, standalone_mode: bool) -> int:
        if standalone_mode:
            sys.exit(code)
        return code


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
def opened_runtime(
    database_url: str | None, definitions: str | None, *, preflight: bool = True
) -> Iterator[Runtime]:
    """The runtime (engine + loaded definitions) for the command's options, disposed after.
    With ``preflight`` (every command but those that migrate or ride outages themselves), the
    database is checked once first: reachable and at the schema's head, else one line, exit 2."""
    from buckets.db import create_engine, resolve_database_url
    from buckets.runtime import Runtime
    from buckets.settings import load_settings

    settings = load_settings(database_url=database_url, definitions=definitions)
    source = "--database-url" if database_url is not None else "BUCKETS_DATABASE_URL"
    runtime = Runtime.create(
        engine=create_engine(resolve_database_url(settings, source=source)), settings=settings
    )
    try:
        if preflight:
            check_database(runtime.engine)
        yield runtime
    finally:
        runtime.engine.dispose()


def check_database(engine: Engine, *, schema: bool = True) -> None:
    """One connection: the database answers and (with ``schema``) is at the head revision;
    otherwise :class:`ConfigCliError` (exit 2) with what to do."""
    from sqlalchemy.exc import DBAPIError

    from buckets.db import display_url, first_line
    from buckets.health import schema_problem
    from buckets.migrations import current_revision, head_revision

    where = display_url(engine.url)
    try:
        with engine.connect() as conn:
            revision = current_revision(conn) if schema else None
    except DBAPIError as exc:
        raise UnreachableCliError(f"cannot connect to {where}: {first_line(exc.orig)}") from None
    problem = schema_problem(revision, head_revision()) if schema else None
    if problem is not None:
        raise ConfigCliError(f"{where}: {problem}")


def parse_instant(value: str, *, option: str = "--now") -> datetime:
    """An ISO-8601 instant with a UTC offset (``Z`` accepted; ASCII digits), within
    ``[BUCKETS_MIN_INSTANT, BUCKETS_MAX_INSTANT]``; anything else is a usage error."""
    from buckets.inputs import InputError, instant_problem
    from buckets.inputs import parse_instant as parse
    from buckets.settings import load_settings

    try:
        parsed = parse(value)
    except InputError as exc:
        raise click.BadParameter(
            f"{exc.reason} (e.g. 2026-11-24T12:00:00Z)", param_hint=option
        ) from None
    settings = load_settings()
    problem = instant_problem(parsed, settings.min_instant, settings.max_instant)
    if problem is not None:
        raise click.BadParameter(problem, param_hint=option)
    return parsed


def now_option(*, writes: bool | Callable[[dict[str, Any]], bool] = True) -> Callable[[F], F]:
    """``--now ISO-8601``: the instant the command decides as of (default: the clock).

    A command that ``writes`` as of ``now`` (a predicate of its arguments, or always) refuses a
    ``--now`` more than ``BUCKETS_MAX_CLOCK_SKEW`` after the real clock unless ``--force`` is
    given: a tick or an ingest stamped in the future would be stored as such (a reconcile as of
    9999 marks every bucket reconciled until then). Read-only uses (explain, dry runs) may look
    at any accepted instant.
    """

    def convert(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
        return None if value is None else parse_instant(value)

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def checked(*args: Any, **kwargs: Any) -> Any:
            force = kwargs.pop("force", False)
            if kwargs["now"] is None:
                kwargs["now"] = datetime.now(UTC)
            elif not force and (writes(kwargs) if callable(writes) else writes):
                from buckets.settings import load_settings
                from buckets.validation import future_now_problem

                problem = future_now_problem(kwargs["now"], load_settings())
                if problem:
                    raise click.BadParameter(
                        f"{problem}; pass --force to decide as of it anyway", param_hint="--now"
                    )
            return func(*args, **kwargs)

        command: Any = click.option(
            "--now",
            metavar="ISO-8601",
            callback=convert,
            help="Decide as of this instant (with a UTC offset) [default: now].",
        )(checked)
        if writes:
            command = click.option(
                "--force",
                is_flag=True,
                help="Accept a --now more than BUCKETS_MAX_CLOCK_SKEW after the clock.",
            )(command)
        return command  # type: ignore[no-any-return]

    return decorate


def emit(as_json: bool, payload: dict[str, Any], human: str) -> None:
    click.echo(json.dumps(payload, default=str) if as_json else human)


@click.group(cls=BucketsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="buckets-engine", prog_name="buckets")
def main() -> None:
    """Exact, current bucket (segment) membership on PostgreSQL, driving journeys."""


@main.group(cls=BucketsGroup)
def db() -> None:
    """Database schema: migrate and inspect."""


@db.command("upgrade")
@common_options
def db_upgrade(database_url: str | None, definitions: str | None, as_json: bool) -> None:
    """Create or migrate the schema to the latest revision (a no-op when already there)."""
    from buckets.db import display_url
    from buckets.migrations import upgrade

    with opened_engine(database_url, definitions) as engine:
        check_database(engine, schema=False)  # a clear "cannot connect" before Alembic's noise
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
    from buckets.db import display_url
    from buckets.migrations import current_revision, head_revision

    with opened_engine(database_url, definitions) as engine:
        check_database(engine, schema=False)
    with opened_engine(database_url, definitions) as engine, engine.connect() as connection:
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


@main.command("status")
@now_option(writes=False)
@common_options
def status_command(
    *, now: datetime, database_url: str | None, definitions: str | None, as_json: bool
) -> None:
    """Is the engine ready? Database reachable, schema at head, definitions loaded, the
    workers' heartbeats and ticks (late after two cadences of their cron), the due backlog and
    undispatched transitions; the server's buffer and WAL settings, with advice where they are
    still PostgreSQL's small-machine defaults for a database of a GB or more (advice does not
    make it not ready). Exit status 0 when ready, 1 when not."""
    from buckets import due, health
    from buckets.db import display_url
    from buckets.registry import Registry
    from buckets.settings import load_settings

    settings = load_settings(database_url=database_url, definitions=definitions)
    payload: dict[str, Any] = {"now": now.isoformat()}
    with opened_engine(database_url, definitions) as engine:
        payload["database"] = display_url(engine.url)
        checks = health.database_checks(engine)
        registry: Registry | None = None
        try:
            registry = Registry.load(settings.definitions)
        except BucketsError as exc:
            checks.append(health.Check("definitions", False, str(exc)))
        else:
            checks.append(health.definitions_check(len(registry), len(registry.journeys)))
        workers: list[health.WorkerState] = []
        server: health.Server | None = None
        if all(check.ok for check in checks[:2]):
            with engine.connect() as conn:
                workers = health.workers(conn)
                checks.extend(health.worker_checks(workers, now))
                pending = health.undispatched(conn)
                clocked = [b.id for b in registry if b.clocked] if registry else []
                backlog = due.backlog(conn, clocked, now)
                server = health.server(conn)
            payload["server"] = server.to_dict()
            payload["undispatched"] = {
                "count": pending.count,
                "oldest_age_seconds": round(pending.age(now).total_seconds(), 3),
            }
            payload["due"] = {
                "due_now": sum(item.due for item in backlog.values()),
                "oldest_due_age_seconds": round(
                    max(
                        (item.lag(now) for item in backlog.values()), default=timedelta(0)
                    ).total_seconds(),
                    3,
                ),
            }
    report = health.Readiness(checks)
    payload = {**report.to_dict(), **payload}
    payload["workers"] = [state.to_dict(now) for state in workers]
    lines = [f"{payload['database']}: {payload['status']}"]
    width = max(len(check.name) for check in checks)
    for check in checks:
        mark = "ok  " if check.ok else "FAIL"
        lines.append(f"  {mark} {check.name.ljust(width)}  {check.detail}")
    for state in workers:
        tick = state.tick(now)
        lines.append(
            f"  worker {state.worker_id} ({state.state(now)}): beat {state.beat_at.isoformat()},"
            f" {tick.detail}"
        )
    if "undispatched" in payload:
        lines.append(
            f"  undispatched transitions: {payload['undispatched']['count']:,}"
            f" (oldest {payload['undispatched']['oldest_age_seconds']:,.1f} s)"
        )
        lines.append(
            f"  due entries now: {payload['due']['due_now']:,}"
            f" (oldest waited {payload['due']['oldest_due_age_seconds']:,.1f} s)"
        )
    if server is not None:
        lines.append(f"  server: {server.describe()}")
        lines += [f"  advice: {tip} (README: The PostgreSQL server)" for tip in server.advice()]
    emit(as_json, payload, "\n".join(lines))
    if not report.ok:
        sys.exit(1)


@main.command("ingest")
@click.argument("file", type=click.File("rb"))
@now_option()
@common_options
def ingest_command(
    file: IO[bytes],
    now: datetime,
    database_url: str | None,
    definitions: str | None,
    as_json: bool,
) -> None:
    """Ingest events from a JSON Lines FILE ("-" for stdin), one object per line with the
    fields of ingest_event, UTF-8 (a byte order mark at the start is allowed). Valid lines are
    ingested even when others are rejected; the exit status is 1 if any line was rejected (bad
    input, each one named: not UTF-8, not JSON, or an invalid event). If the database fails
    instead, nothing after the chunk in flight is attempted: the exit status is 2 and the
    message names the line to resume from (every line before it was processed)."""
    from buckets.errors import IngestInterruptedError
    from buckets.ingest import BatchResult, ingest_events
    from buckets.validation import IngestError

    lines, events, rejected = _read_jsonl(file)
    failed: dict[str, Any] | None = None
    outcomes: list[Any] = []
    with opened_runtime(database_url, definitions, preflight=False) as runtime:
        try:
            check_database(runtime.engine)
        except UnreachableCliError as exc:  # an outage, like one mid-file: resume from line 1
            if lines:
                failed = {"line": lines[0], "reason": f"database unavailable: {exc.message}"}
                rejected = [item for item in rejected if item["line"] < lines[0]]
        step = runtime.settings.ingest_chunk_size * 4  # a slice per progress step
        with _progress("ingest", total=len(events)) as bar:
            for start in range(0, len(events) if failed is None else 0, step):
                try:
                    part = ingest_events(events[start : start + step], now=now, runtime=runtime)
                except IngestInterruptedError as exc:
                    outcomes.extend(exc.results.results)
                    where = lines[start + exc.index]
                    failed = {"line": where, "reason": f"database unavailable: {exc.reason}"}
                    # lines from there on were not processed: the resumed run reads them again
                    rejected = [item for item in rejected if item["line"] < where]
                    break
                outcomes.extend(part.results)
                bar(len(outcomes), len(events))
    result = BatchResult(outcomes)
    for index, outcome in enumerate(result.results):
        if isinstance(outcome, IngestError):
            reason = f"{outcome.location}: {outcome.reason}"
            rejected.append({"line": lines[index], "reason": reason})
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
        "failed": failed,
        "resume_from_line": failed["line"] if failed else None,
    }
    human = (
        f"accepted {result.accepted:,}, duplicate {result.duplicates:,},"
        f" rejected {len(rejected):,}"
        + (f", ignored (deleted contact) {result.ignored:,}" if result.ignored else "")
        + f"; {len(transitions):,} transitions ({payload['emitted']:,} emitted)"
    )
    human += "".join(f"\nline {item['line']}: {item['reason']}" for item in rejected)
    emit(as_json, payload, human)
    if failed is not None:
        click.echo(
            f"buckets: error: line {failed['line']}: {failed['reason']}; not ingested from there"
            f" on (every line before it was processed): resume from line {failed['line']}",
            err=True,
        )
        sys.exit(2)
    if rejected:
        sys.exit(1)


def _read_jsonl(file: IO[bytes]) -> tuple[list[int], list[Any], list[dict[str, Any]]]:
    """The events of a JSON Lines file with their line numbers, and the lines rejected (not
    UTF-8, not JSON, beyond the parser's bounds)."""
    from buckets.inputs import PARSE_DEPTH_CAP, InputError, loads_json

    lines: list[int] = []  # line number of each event handed to the engine
    events: list[Any] = []
    rejected: list[dict[str, Any]] = []
    for number, raw in enumerate(file, start=1):
        start = len(codecs.BOM_UTF8) if number == 1 and raw.startswith(codecs.BOM_UTF8) else 0
        try:
            line = raw[start:].decode("utf-8")
        except UnicodeDecodeError as exc:
            byte, column = raw[start + exc.start], start + exc.start + 1
            reason = f"not valid UTF-8 (byte 0x{byte:02x} at column {column})"
            rejected.append({"line": number, "reason": reason})
            continue
        if not line.strip():
            continue
        try:
            events.append(loads_json(line, max_depth=PARSE_DEPTH_CAP))
            lines.append(number)
        except InputError as exc:
            rejected.append({"line": number, "reason": f"not accepted: {exc.reason}"})
        except ValueError as exc:
            rejected.append({"line": number, "reason": f"not valid JSON: {exc}"})
    return lines, events, rejected


@main.command("reconcile")
@click.option("--bucket", "bucket_ids", multiple=True, metavar="ID", help="Only this bucket.")
@click.option(
    "--full",
    is_flag=True,
    help="The full sweep: examine every member and candidate and rebuild the due queue; "
    "reports what the queue had missed (healed).",
)
@click.option("--chunk-size", type=click.IntRange(min=1), default=None, hidden=True)
@now_option()
@common_options
def reconcile_command(
    *,
    bucket_ids: tuple[str, ...],
    full: bool,
    chunk_size: int | None,
    now: datetime,
    database_url: str | None,
    definitions: str | None,
    as_json: bool,
) -> None:
    """Run one reconcile tick: the due-queue entries due as of --now, and the full passes
    where the queue is not complete yet (every bucket, or --bucket ones). Prints per-bucket
    counts. Exit status 1 if a bucket failed."""
    from workflows.reconcile import DEFAULT_CHUNK_SIZE, reconcile

    with opened_runtime(database_url, definitions) as runtime:
        tick = reconcile(
            now,
            list(bucket_ids) or None,
            runtime=runtime,
            chunk_size=chunk_size or DEFAULT_CHUNK_SIZE,
            full=full,
        )
    kind = "full sweep" if full else "reconcile"
    lines = [f"{kind} as of {now.isoformat()}: {len(tick.buckets)} buckets"]
    for item in tick.buckets:
        if item.status != "done":
            lines.append(f"  {item.bucket_id}: {item.status} ({item.reason})")
            continue
        left = ", ".join(f"{reason} {count}" for reason, count in sorted(item.left.items()))
        line = (
            f"  {item.bucket_id}: due {item.due}, joined {item.joined} (emitted {item.emitted},"
            f" suppressed {item.suppressed}), left {left or '0'}, deferred {item.deferred},"
            f" cleared {item.cleared}, full passes {item.passes_ran}"
        )
        if item.passes_ran != "no" and not item.passes_ran.startswith("no "):
            line += f" (joins {item.joins})"
        if full:
            line += f", healed {item.healed}"
        lines.append(f"{line}, {item.seconds * 1000:.0f} ms")
    if full:
        lines.append(f"healed {tick.healed} (what the due queue had missed; expected 0)")
    emit(as_json, tick.to_dict(), "\n".join(lines))
    if tick.failed:
        sys.exit(1)


def _log_to_stderr(settings: Any) -> None:
    """Log lines of the long-running commands (worker, dispatcher, server) on stderr, at
    ``BUCKETS_LOG_LEVEL`` in ``BUCKETS_LOG_FORMAT``, secrets masked (:mod:`buckets.logs`)."""
    from buckets.logs import configure_from_settings

    configure_from_settings(settings)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _table(
    title: str, columns: list[str], rows: list[list[Any]], *, right: Iterable[str] = ()
) -> str:
    """A rich table rendered to text (for human output): integers with thousands separators,
    columns of numbers (and those named in ``right``) right-aligned."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for index, column in enumerate(columns):
        cells = [row[index] for row in rows if row[index] not in (None, "")]
        numeric = column in right or (bool(cells) and all(_number(cell) for cell in cells))
        table.add_column(column, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(_cell(cell) for cell in row))
    console = Console(width=160, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text().rstrip()


def _warn(items: Iterable[Any]) -> None:
    """One line on stderr per warning (``buckets: warning: ...``)."""
    for item in items:
        click.echo(f"buckets: warning: {item}", err=True)


@main.command("catalog")
@click.option("--kind", type=click.Choice(["event", "property"]), help="Only this kind.")
@common_options
def catalog_command(
    *, kind: str | None, database_url: str | None, definitions: str | None, as_json: bool
) -> None:
    """What ingest has seen: event names and contact property keys, how many times, first and
    last seen, and which loaded buckets use each; then the names the buckets use that were
    never seen (typos, usually)."""
    from buckets.catalog import entries, never_seen

    with opened_runtime(database_url, definitions) as runtime, runtime.engine.connect() as conn:
        found = entries(conn, kind)
        unseen = never_seen(conn, runtime.registry)
        registry = runtime.registry
    users: dict[tuple[str, str], list[str]] = {}
    for bucket in registry:
        for name in bucket.event_names:
            users.setdefault(("event", name), []).append(bucket.id)
        for name in bucket.property_keys:
            users.setdefault(("property", name), []).append(bucket.id)
    payload = {
        "entries": [
            {**entry.to_dict(), "buckets": sorted(users.get((entry.kind, entry.name), []))}
            for entry in found
        ],
        "never_seen": [item.to_dict() for item in unseen if kind in (None, item.kind)],
    }
    rows = [
        [
            entry.kind,
            entry.name,
            entry.seen,
            entry.first_seen_at.isoformat(timespec="seconds"),
            entry.last_seen_at.isoformat(timespec="seconds"),
            ", ".join(sorted(users.get((entry.kind, entry.name), []))),
        ]
        for entry in found
    ]
    human = _table(
        f"{len(found):,} names seen",
        ["kind", "name", "seen", "first seen", "last seen", "used by"],
        rows,
    )
    emit(as_json, payload, human)
    if not as_json:
        _warn(item for item in unseen if kind in (None, item.kind))


@main.command("list")
@common_options
def list_command(database_url: str | None, definitions: str | None, as_json: bool) -> None:
    """List the loaded buckets with member counts and their effective enabled state."""
    from buckets.admin import bucket_states
    from buckets.catalog import never_seen

    with opened_runtime(database_url, definitions) as runtime, runtime.engine.connect() as conn:
        states = bucket_states(conn, runtime)
        unseen = never_seen(conn, runtime.registry)
    payload = {
        "buckets": [state.to_dict() for state in states],
        "never_seen": [item.to_dict() for item in unseen],
    }
    if not as_json:
        _warn(unseen)
    rows = [
        [
            s.bucket.id,
            "yes" if s.enabled else "no" + (" (override)" if s.override is False else ""),
            s.active,
            "yes" if s.bucket.on_cron else "no",
            "yes" if s.criteria_hash == s.bucket.fingerprint else "no",
            ("complete" if s.queue_complete else "filling") if s.bucket.clocked else "-",
            s.backlog.due,
            f"{s.backlog.lag(s.now).total_seconds():.1f} s" if s.backlog.due else "",
        ]
        for s in states
    ]
    human = _table(
        f"{len(states):,} buckets",
        ["bucket", "enabled", "members", "cron", "deployed", "queue", "due", "lag"],
        rows,
        right=["lag"],
    )
    emit(as_json, payload, human if states else "no buckets loaded (see --definitions)")


@main.command("show")
@click.argument("bucket_id")
@common_options
def show_command(
    bucket_id: str, database_url: str | None, definitions: str | None, as_json: bool
) -> None:
    """Show one bucket: definition, counts, operator state."""
    from buckets.admin import bucket_states

    with opened_runtime(database_url, definitions) as runtime, runtime.engine.connect() as conn:
        [state] = bucket_states(conn, runtime, [bucket_id])
    payload = state.to_dict(detail=True)
    human = "\n".join(f"{key}: {json.dumps(value, default=str)}" for key, value in payload.items())
    emit(as_json, payload, human)


class MembersGroup(BucketsGroup):
    """``buckets members``: ``add`` / ``remove`` (manual buckets) and ``list``; any other first
    argument is a bucket id to list (``buckets members ID`` as SPEC §10 has it). A bucket whose
    id is ``add``, ``remove`` or ``list`` is listed with ``buckets members list ID``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["list", *args]
        return super().parse_args(ctx, args)


@main.group("members", cls=MembersGroup)
def members_group() -> None:
    """List a bucket's members (``members ID`` or ``members list ID``); add or remove members
    of a manual bucket from a file (``members add|remove ID FILE``)."""


@members_group.command("list")
@click.argument("bucket_id")
@click.option(
    "--status", type=click.Choice(["active", "left", "all"]), default="active", show_default=True
)
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--after", type=int, default=None, help="Page cursor (from the previous page).")
@common_options
def members_command(
    *,
    bucket_id: str,
    status: str,
    limit: int,
    after: int | None,
    database_url: str | None,
    definitions: str | None,
    as_json: bool,
) -> None:
    """List a bucket's membership rows, a page at a time."""
    from buckets.admin import members_page

    with opened_runtime(database_url, definitions) as runtime, runtime.engine.connect() as conn:
        runtime.registry.get(bucket_id)
        page, cursor = members_page(
            conn, bucket_id, status=None if status == "all" else status, after=after, limit=limit
        )
    payload = {"bucket_id": bucket_id, "members": page, "next": cursor}
    columns = ["contact", "status", "epoch", "since", "source"]
    rows = [[m["external_id"], m["status"], m["epoch"], m["entered_at"], m["source"]] for m in page]
    if status != "active":  # the rows that left say when and why
        columns += ["left_at", "reason"]
        for row, member in zip(rows, page, strict=True):
            row += [member["left_at"], member["leave_reason"]]
    human = _table(f"{bucket_id}: {len(page):,} rows", columns, rows)
    if cursor is not None:
        human += f"\nnext page: --after {cursor}"
    emit(as_json, payload, human)


def _members_file_command(action: str) -> Callable[[F], Any]:
    """``members add|remove ID FILE``: the options both share."""

    def decorate(func: F) -> Any:
        func = common_options(func)
        func = now_option(writes=lambda kwargs: not kwargs["dry_run"])(func)
        func = click.option("--dry-run", is_flag=True, help="Print the counts; write nothing.")(
            func
        )
        func = click.argument("file", type=click.File("rb"))(func)
        func = click.argument("bucket_id")(func)
        return members_group.command(action)(func)

    return decorate


@_members_file_command("add")
def members_add_command(**options: Any) -> None:
    """Add the contacts of FILE ("-" for stdin) to the manual bucket ID, in one transaction:
    one external id per line, or a CSV whose header names an external_id column. Unknown
    contacts are created; members already in are left as they are (re-running a file changes
    nothing). A bad file is rejected with its line named and nothing written (exit 1)."""
    _members_file("add", **options)


@_members_file_command("remove")
def members_remove_command(**options: Any) -> None:
    """Remove the contacts of FILE ("-" for stdin) from the manual bucket ID, in one
    transaction (leaves with reason 'admin'; journeys listing the bucket's left transition
    exit). Ids that are not members are left alone. Same file forms as `members add`."""
    _members_file("remove", **options)


def _members_file(
    action: str,
    *,
    bucket_id: str,
    file: IO[bytes],
    dry_run: bool,
    now: datetime,
    database_url: str | None,
    definitions: str | None,
    as_json: bool,
) -> None:
    from buckets.manual import add_members, manual_bucket, remove_members
    from buckets.member_files import read_member_file

    with opened_runtime(database_url, definitions) as runtime:
        with runtime.engine.connect() as conn:  # a wrong bucket before a long file is read
            manual_bucket(runtime, conn, bucket_id)
        read = read_member_file(file)
        given = len(read.ids.ids)
        apply = add_members if action == "add" else remove_members
        with _progress(f"{action} {bucket_id}", total=given) as bar:
            result = apply(
                bucket_id,
                read.ids,
                now,
                runtime=runtime,
                dry_run=dry_run,
                progress=lambda done: bar(done, given),
            )
    payload = {
        **result.to_dict(),
        "file": {"form": read.form, "lines": read.lines, "blank_skipped": read.blank_skipped},
    }
    if action == "add":
        counts = (
            f"added {result.added:,}, already members {result.already_members:,},"
            f" created contacts {result.created_contacts:,}"
            + (
                f", deleted contacts (not added) {result.deleted_contacts:,}"
                if result.deleted_contacts
                else ""
            )
        )
    else:
        counts = f"removed {result.removed:,}, not members {result.not_members:,}"
    extra = []
    if result.duplicates:
        extra.append(f"{result.duplicates:,} duplicate ids counted once")
    if result.unchanged:
        extra.append(f"{result.unchanged:,} unchanged (decided as of a later instant)")
    human = f"{bucket_id}: {counts}" + (f" ({'; '.join(extra)})" if extra else "")
    if dry_run:
        human += "\ndry run: nothing was written"
    emit(as_json, payload, human)


@main.command("explain")
@click.argument("bucket_id")
@click.argument("external_id")
@now_option(writes=False)
@common_options
def explain_command(
    *,
    bucket_id: str,
    external_id: str,
    now: datetime,
    database_url: str | None,
    definitions: str | None,
    as_json: bool,
) -> None:
    """Why EXTERNAL_ID is (not) in BUCKET_ID as of --now, and when the clock changes that."""
    from buckets.explain import explain

    with opened_runtime(database_url, definitions) as runtime:
        result = explain(bucket_id, external_id, now=now, runtime=runtime)
    emit(as_json, result.to_dict(), render_explanation(result))


def render_explanation(result: Any) -> str:
    """The human reading of an :class:`~buckets.explain.Explanation`."""
    state = "a member" if result.member else "not a member"
    lines = [
        f"{result.external_id} is {state} of {result.bucket_id} as of {result.now.isoformat()}"
    ]
    if result.membership:
        m = result.membership
        lines.append(f"  since {m['since']} (epoch {m['epoch']}, via {m['source']})")
    lines.append(f"  criteria {'match' if result.matches else 'do not match'}:")
    for leaf in result.leaves:
        mark = "yes" if leaf.value else "no "
        extra = ""
        if leaf.count is not None:
            extra = f" — {leaf.count} matching events"
        elif leaf.property_present is not None:
            actual = json.dumps(leaf.property_value) if leaf.property_present else "missing"
            extra = f" — value {actual}"
        lines.append(f"    [{mark}] {leaf.description}{extra}")
    if not result.enabled:
        lines.append("  the bucket is disabled: nothing changes until it is enabled")
    if result.deleted:
        lines.append("  the contact is deleted")
    change = result.next_change
    if change is not None:
        lines.append(f"  next change by the clock alone: {change.at.isoformat()} ({change.detail})")
    else:
        lines.append("  the clock alone will not change this")
    if result.queued_at is not None:
        lines.append(f"  due-queue entry: {result.queued_at.isoformat()}")
    elif result.queue_complete:
        lines.append("  due-queue entry: none")
    if not result.queue_complete:
        lines.append("  (the bucket's due queue is not complete yet: every tick sweeps it)")
    return "\n".join(lines)


@main.command("enable")
@click.argument("bucket_id")
@click.option("--reset", is_flag=True, help="Drop the override: follow the definition again.")
@common_options
def enable_command(
    bucket_id: str, reset: bool, database_url: str | None, definitions: str | None, as_json: bool
) -> None:
    """Enable a bucket (an operator override of the definition's `enabled`)."""
    _set_enabled(bucket_id, None if reset else True, database_url, definitions, as_json)


@main.command("disable")
@click.argument("bucket_id")
@common_options
def disable_command(
    bucket_id: str, database_url: str | None, definitions: str | None, as_json: bool
) -> None:
    """Disable a bucket: ingest, cron and backfills skip it; its members are left untouched."""
    _set_enabled(bucket_id, False, database_url, definitions, as_json)


def _set_enabled(
    bucket_id: str,
    enabled: bool | None,
    database_url: str | None,
    definitions: str | None,
    as_json: bool,
) -> None:
    from buckets.registry import set_enabled

    with opened_runtime(database_url, definitions) as runtime:
        bucket = runtime.registry.get(bucket_id)
        with runtime.engine.begin() as conn:
            set_enabled(conn, bucket_id, enabled)
    effective = bucket.enabled if enabled is None else enabled
    word = "enabled" if effective else "disabled"
    how = "following its definition" if enabled is None else "operator override"
    emit(
        as_json,
        {"bucket_id": bucket_id, "enabled": effective, "override": enabled},
        f"{bucket_id}: {word} ({how})",
    )


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@common_options
def serve_command(
    *, host: str, port: int, database_url: str | None, definitions: str | None, as_json: bool
) -> None:
    """Serve the admin HTTP API (OpenAPI at /openapi.json, docs at /docs). Requests need
    `Authorization: Bearer $BUCKETS_ADMIN_TOKEN`."""
    import uvicorn

    from workflows.api import create_app

    with opened_runtime(database_url, definitions) as runtime:
        if not runtime.settings.admin_token:
            click.echo(
                "buckets: BUCKETS_ADMIN_TOKEN is not set: every API request will be refused (401)",
                err=True,
            )
        listener = _listen(host, port)  # a busy address: one line, exit 2
        _log_to_stderr(runtime.settings)
        config = uvicorn.Config(
            create_app(runtime),
            host=host,
            port=port,
            log_config=None,  # uvicorn's loggers go through ours (level, format, redaction)
            log_level=runtime.settings.log_level.lower(),
        )
        with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the SIGINT it got
            uvicorn.Server(config).run(sockets=[listener])


def _listen(host: str, port: int) -> Any:
    """A bound, listening socket for ``host:port``, or :class:`ConfigCliError` saying why."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigCliError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


@main.command("dispatch")
@click.option("--once", is_flag=True, help="Drain what is pending, then exit.")
@now_option()
@common_options
def dispatch_command(
    *, once: bool, now: datetime, database_url: str | None, definitions: str | None, as_json: bool
) -> None:
    """Deliver emitted transitions to the journeys bound to them. With --once, drain what is
    pending as of --now; otherwise run until SIGINT/SIGTERM (listening for new transitions),
    riding out database restarts; a database unavailable for longer than BUCKETS_MAX_OUTAGE
    ends it with exit status 1."""
    import signal
    import threading

    from buckets.dispatcher import dispatch_once, run_dispatcher

    with opened_runtime(database_url, definitions, preflight=once) as runtime:
        if once:
            result = dispatch_once(runtime, now=now)
        else:
            _log_to_stderr(runtime.settings)
            stop = threading.Event()
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, lambda *_: stop.set())
            result = run_dispatcher(runtime, stop, max_outage=runtime.settings.max_outage)
    counts = result.to_dict()
    emit(as_json, counts, ", ".join(f"{key} {value}" for key, value in counts.items()))


@main.command("backfill")
@click.argument("bucket_id", required=False)
@click.option("--deploy", is_flag=True, help="Run every job the deployed definitions need.")
@click.option("--dry-run", is_flag=True, help="Report who would join/leave; write nothing.")
@click.option(
    "--emit", "emit_joins", is_flag=True, help="Admin backfills: emit joins (entry limit applies)."
)
@click.option(
    "--take-over",
    is_flag=True,
    help="Resume the bucket's running job even though its lease holder may be alive.",
)
@click.option("--chunk-size", type=click.IntRange(min=1), default=None, hidden=True)
@now_option(writes=lambda arguments: not arguments["dry_run"])
@common_options
def backfill_command(
    *,
    bucket_id: str | None,
    deploy: bool,
    dry_run: bool,
    emit_joins: bool,
    take_over: bool,
    chunk_size: int | None,
    now: datetime,
    database_url: str | None,
    definitions: str | None,
    as_json: bool,
) -> None:
    """Backfill BUCKET_ID in the foreground (its first-time job if it never completed one,
    else an admin job), or with --deploy every first-time / re-evaluation job needed.

    If the bucket already has a job, it is resumed from its cursor when it is pending, or
    running under a lease whose holder is gone (a process of this host that no longer exists),
    or with --take-over; otherwise the command refuses. A database restart is ridden out (the
    job resumes from its cursor); one unavailable for longer than BUCKETS_MAX_OUTAGE ends the
    command with exit status 1, the job left to be resumed."""
    from buckets.resilience import retry_outages
    from workflows import backfill
    from workflows.backfill import CHUNK, Runner

    if (bucket_id is None) == (not deploy):
        raise click.UsageError("give a BUCKET_ID or --deploy (not both)")
    with opened_runtime(database_url, definitions) as runtime:
        max_outage = runtime.settings.max_outage
        if dry_run:
            if bucket_id is None:
                raise click.UsageError("--dry-run needs a BUCKET_ID")
            report = backfill.dry_run(runtime, bucket_id, now, emit=emit_joins)
            human = (
                f"{report.bucket_id} ({report.mode} backfill as of {report.as_of.isoformat()}):"
                f" would join {report.would_join}, leave {report.would_leave},"
                f" emit {report.would_emit} transitions; nothing written"
            )
            emit(as_json, report.to_dict(), human)
            return
        if deploy:

            def deployed() -> list[Any]:
                from buckets.catalog import never_seen
                from workflows import jobs

                backfill.deploy(runtime, now)
                with runtime.engine.connect() as conn:
                    _warn(never_seen(conn, runtime.registry))
                    return [j for j in jobs.jobs(conn) if j.status == "pending"]

            pending = retry_outages(
                "backfill --deploy", deployed, max_outage=max_outage, engine=runtime.engine
            )
        else:
            assert bucket_id is not None
            job, created = retry_outages(
                f"backfill {bucket_id}",
                lambda: backfill.start(runtime, bucket_id, now, emit=emit_joins),
                max_outage=max_outage,
                engine=runtime.engine,
            )
            if not created:
                _check_resumable(job, emit_joins, take_over)
            pending = [job]
        runner = Runner(runtime, chunk=chunk_size or CHUNK, max_outage=max_outage)
        finished = [_run_with_progress(runner, job, as_json) for job in pending]
    payload = {"jobs": [job.to_dict() for job in finished]}
    human = "\n".join(
        f"job {j.id} {j.bucket_id} ({j.mode}): {j.status};"
        f" processed {j.processed:,}/{'?' if j.total is None else format(j.total, ',')},"
        f" joined {j.joined:,}, left {j.left:,}" + (f"; error: {j.error}" if j.error else "")
        for j in finished
    )
    emit(as_json, payload, human or "nothing to backfill")
    if any(job.status != "completed" for job in finished):
        sys.exit(1)


def _check_resumable(job: Any, emit_joins: bool, take_over: bool) -> None:
    """The bucket's existing job may be run here (resumed from its cursor), or a CliError."""
    from workflows.backfill import holder_gone

    where = f"{job.bucket_id}: backfill job {job.id}"
    if emit_joins and not job.emit_joins:
        raise CliError(f"{where} is already {job.status}, without --emit (see `buckets jobs`)")
    if job.status == "running" and not take_over and not holder_gone(job.lease_owner):
        raise CliError(
            f"{where} is already running (lease held by {job.lease_owner} until"
            f" {job.lease_expires_at:%Y-%m-%d %H:%M:%S %Z}); if that process is gone,"
            " pass --take-over"
        )
    held = f", taken over from {job.lease_owner}" if job.status == "running" else ""
    after = (job.cursor or {}).get("after")
    origin = f"after contact id {after}" if after is not None else "from the start"
    click.echo(f"buckets: resuming {where} ({job.mode}) {origin}{held}", err=True)


def _run_with_progress(runner: Any, job: Any, quiet: bool) -> Any:
    def run(**options: Any) -> Any:
        if job.status == "running":
            return runner.take_over(job, **options)
        return runner.run(job.id, **options)

    if quiet:
        return run()
    with _progress(f"{job.bucket_id} ({job.mode})", total=None) as bar:
        return run(progress=lambda current: bar(current.processed, current.total))


@contextmanager
def _progress(label: str, total: int | None) -> Iterator[Callable[[int, int | None], None]]:
    """One progress bar on stderr (label, bar, done/total with separators, elapsed time);
    ``update(completed, total)``. Nothing is drawn when stderr is not a terminal."""
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class Counts(ProgressColumn):
        def render(self, task: Any) -> Text:
            total = "?" if task.total is None else f"{int(task.total):,}"
            return Text(f"{int(task.completed):,}/{total}", style="progress.download")

    console = _stderr()
    if not console.is_terminal:
        yield lambda completed, total: None
        return
    columns = [TextColumn("{task.description}"), BarColumn(), Counts(), TimeElapsedColumn()]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(label, total=total)
        yield lambda completed, total: bar.update(task, completed=completed, total=total)


def _stderr() -> Any:
    from rich.console import Console

    return Console(stderr=True)


@main.command("jobs")
@click.option("--bucket", "bucket_id", metavar="ID", help="Only this bucket's jobs.")
@click.option("--cancel", "cancel_id", type=int, metavar="JOB_ID", help="Cancel a job.")
@common_options
def jobs_command(
    *,
    bucket_id: str | None,
    cancel_id: int | None,
    database_url: str | None,
    definitions: str | None,
    as_json: bool,
) -> None:
    """List backfill jobs (newest first) with status and progress; --cancel JOB_ID cancels."""
    from workflows import jobs

    with opened_runtime(database_url, definitions) as runtime:
        if cancel_id is not None:
            with runtime.engine.begin() as conn:
                jobs.cancel(conn, cancel_id, datetime.now(UTC))
        with runtime.engine.connect() as conn:
            found = jobs.jobs(conn, bucket_id)
        if bucket_id is not None and not found:
            runtime.registry.get(bucket_id)  # an unknown bucket is an error, not an empty table
    rows = [
        [
            j.id,
            j.bucket_id,
            j.mode,
            j.status,
            f"{j.processed:,}/{'?' if j.total is None else format(j.total, ',')}",
            j.joined,
            j.left,
        ]
        for j in found
    ]
    human = _table(
        f"{len(found):,} jobs",
        ["job", "bucket", "mode", "status", "progress", "joined", "left"],
        rows,
        right=["progress"],
    )
    emit(as_json, {"jobs": [job.to_dict() for job in found]}, human)


@main.command("run")
@common_options
def run_command(database_url: str | None, definitions: str | None, as_json: bool) -> None:
    """Run the worker: reconcile on BUCKETS_RECONCILE_CRON, the dispatcher, backfill jobs and
    the reaper, until SIGTERM/SIGINT (then finish or release what is in flight). Database
    restarts are ridden out; a loop that dies, or a database unavailable for longer than
    BUCKETS_MAX_OUTAGE, stops the worker with exit status 1."""
    from buckets.settings import load_settings
    from workflows.worker import run_worker

    _log_to_stderr(load_settings(database_url=database_url, definitions=definitions))
    with opened_runtime(database_url, definitions, preflight=False) as runtime:
        run_worker(runtime)  # migrates, and waits for a database that is not there yet


@main.command("demo")
@click.option("--contacts", type=click.IntRange(100, 1_000_000), default=10_000, show_default=True)
@click.option("--days", type=click.IntRange(1, 30), default=4, show_default=True)
@click.option("--reset", is_flag=True, help="Empty the engine's tables of a database in use.")
@now_option()
@common_options
def demo_command(
    *,
    contacts: int,
    days: int,
    reset: bool,
    now: datetime,
    database_url: str | None,
    definitions: str | None,
    as_json: bool,
) -> None:
    """Run the whole engine on ~10k synthetic contacts: silent first-time backfills, then a
    few simulated days of ingest, cron and journeys, ending with an explain. Uses the embedded
    PostgreSQL unless a database is configured, and leaves the data there to explore."""
    import time

    from buckets.settings import load_settings
    from workflows.demo import DEFINITIONS, run_demo

    started = time.perf_counter()
    settings = load_settings(database_url=database_url)
    embedded = settings.database_url is None
    with opened_runtime(database_url, definitions or DEFINITIONS, preflight=False) as runtime:
        say = (lambda _: None) if as_json else click.echo
        with _progress("demo", total=None) as bar:
            report = run_demo(
                runtime,
                now=now,
                contacts_count=contacts,
                days=days,
                reset=reset or embedded,
                say=say,
                progress=bar,
            )
    explained = report.pop("explain")
    seconds = time.perf_counter() - started
    if as_json:
        report["explain"] = explained.to_dict() if explained else None
        report["seconds"] = round(seconds, 1)
        emit(True, report, "")
        return
    if explained is not None:
        click.echo("\n" + render_explanation(explained))
    hint = "" if embedded else " --database-url ..."
    who = explained.external_id if explained is not None else "<external id>"
    click.echo(
        f"\ndemo finished in {seconds:.1f} s. Explore it:\n"
        f"  export BUCKETS_DEFINITIONS={DEFINITIONS}\n"
        f"  buckets list{hint}\n"
        f"  buckets members went-dormant{hint}\n"
        f"  buckets explain went-dormant {who} --now {now.isoformat()}{hint}"
    )


def _table_count(engine: Engine) -> int:
    from sqlalchemy import inspect

    from buckets.models import metadata

    present = set(inspect(engine).get_table_names())
    return sum(1 for table in metadata.sorted_tables if table.name in present)


if __name__ == "__main__":
    main()
