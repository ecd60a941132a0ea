"""Surviving a lost database: the one mechanism every long-lived loop of the engine uses.

PostgreSQL restarts, fails over, or has a backend terminated by an operator; a process that
runs for days must ride that out and carry on where it was, and must never end up half alive.

**What is an outage.** :func:`is_outage` says whether an error means "the connection is gone or
cannot be had": psycopg's connection-level errors (no SQLSTATE: connection refused, server
closed the connection, consuming input failed), SQLSTATE class 08, ``57P01``-``57P03``
(terminated by an administrator, crash shutdown, starting up / shutting down), ``53300`` (too
many connections), a connection SQLAlchemy invalidated, and
:class:`~buckets.errors.DatabaseUnavailableError`. Everything else (a bug, a constraint
violation, bad SQL) is an error of the work itself and is *not* retried here.
:func:`is_transient` adds the errors worth a plain retry (deadlock, serialization failure,
lock not available), which are logged each time but do not count as an outage.

**Retrying.** :func:`retry_outages` calls a function until it returns: an outage is retried with
capped, jittered exponential backoff (tenacity; 0.1 s doubling to 5 s, from 0.1 s again at
each new outage), logged *once* when it
starts (a warning, one line, no traceback) and once when the database answers again (given the
``engine``, it pings the database before calling again, so the end is seen at once); ``stop``
interrupts the waits (the last error is then re-raised, for the caller to see it was stopping);
after ``max_outage`` of continuous outage it raises :class:`OutageTimeout`, which is never
retried by an enclosing loop: the process gives up and says so in one line.

**Loops.** :func:`forever` turns a *step* into a thread target that runs it every ``every``
seconds until ``stop`` is set, through :func:`retry_outages`. A step keeps its state (a
listening connection, a cursor) in its closure or object and must be safe to run again after
it failed half-way: the engine's steps are, because their effects commit with the state that
says they happened (ledger unique keys, job cursors and leases, ``dispatched_at``).

**Supervision.** :class:`Supervisor` runs named threads that must live as long as the process.
The first one that ends while ``stop`` is not set — it raised (a bug, or :class:`OutageTimeout`)
or returned — is recorded (:attr:`Supervisor.failure`) and sets ``stop``: the process shuts down
and exits non-zero instead of running without it. Work run by other threads (the APScheduler
cron) reports with :meth:`Supervisor.fail`.

Adding a long-lived loop to the worker is two lines::

    step = resilience.forever(
        "waker", self._wake, self.stop, every=1.0, max_outage=limit, engine=runtime.engine
    )
    self.supervisor.start("waker", step)

:func:`lost_connections` counts the connections an engine lost in the calling thread
(SQLAlchemy's ``handle_error`` event), for callers whose inner code records failures instead of
raising them (the reconcile tick isolates buckets from each other).
"""

from __future__ import annotations

import logging
import random
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import psycopg
import sqlalchemy as sa
import tenacity
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from buckets.errors import DatabaseUnavailableError

log = logging.getLogger("buckets.resilience")
T = TypeVar("T")

OUTAGE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03"})
BACKOFF_INITIAL_SECONDS = 0.1
BACKOFF_MAX_SECONDS = 5.0


class OutageTimeout(DatabaseUnavailableError):
    """The database stayed unavailable longer than the process is willing to wait."""


def _driver_error(exc: BaseException) -> BaseException:
    return exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc


def _sqlstate(exc: BaseException) -> str | None:
    state = getattr(_driver_error(exc), "sqlstate", None)
    return state if isinstance(state, str) else None


def is_outage(exc: BaseException) -> bool:
    """The error says the database connection is lost or cannot be had (see the module doc)."""
    if isinstance(exc, OutageTimeout):
        return False
    if isinstance(exc, DatabaseUnavailableError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    error = _driver_error(exc)
    if isinstance(error, psycopg.Error):
        state = error.sqlstate
        if state is None:
            return isinstance(error, psycopg.OperationalError | psycopg.InterfaceError)
        return state.startswith("08") or state in OUTAGE_SQLSTATES
    return False


def is_transient(exc: BaseException) -> bool:
    """Worth running again at once: deadlock, serialization failure, lock not available."""
    return _sqlstate(exc) in TRANSIENT_SQLSTATES


def first_line(exc: BaseException) -> str:
    text = str(_driver_error(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class Outage:
    """The state of one loop's outage: logs its start and its end, once each."""

    name: str
    since: float | None = None  # time.monotonic() of the first failure
    retries: int = 0

    @property
    def seconds(self) -> float:
        return 0.0 if self.since is None else time.monotonic() - self.since

    def failed(self, exc: BaseException) -> None:
        if self.since is None:
            self.since = time.monotonic()
            log.warning("%s: database unavailable (%s); retrying", self.name, first_line(exc))
        else:
            log.debug("%s: still unavailable (%s)", self.name, first_line(exc))
        self.retries += 1

    def recovered(self) -> None:
        if self.since is not None:
            log.warning(
                "%s: database available again after %.1f s (%d retries); resuming",
                self.name,
                self.seconds,
                self.retries,
            )
        self.since, self.retries = None, 0


def _limit(max_outage: timedelta | float | None) -> float | None:
    if max_outage is None:
        return None
    seconds = max_outage.total_seconds() if isinstance(max_outage, timedelta) else max_outage
    return seconds if seconds > 0 else None


def retry_outages(
    name: str,
    call: Callable[[], T],
    *,
    stop: threading.Event | None = None,
    max_outage: timedelta | float | None = None,
    outage: Outage | None = None,
    engine: Engine | None = None,
) -> T:
    """``call()`` until it returns, retrying outages (and transient errors) with backoff.

    With ``engine``, a retry after an outage first checks the database answers (``SELECT 1``)
    and only then calls again: the outage's end is logged when the database is back, not when
    a long call (a whole backfill job) returns, and a call is not started only to fail. Raises
    what ``call`` raised when it is neither, the last outage when ``stop`` is set during one,
    and :class:`OutageTimeout` once the outage lasted ``max_outage`` (``None`` or 0: retry for
    ever).
    """
    stop = stop or threading.Event()
    state = outage or Outage(name)
    limit = _limit(max_outage)

    def attempt() -> T:
        if state.since is not None and engine is not None:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            state.recovered()
        return call()

    def retryable(exc: BaseException) -> bool:
        return is_outage(exc) or is_transient(exc)

    def give_up(retry_state: tenacity.RetryCallState) -> bool:
        return stop.is_set() or (limit is not None and state.seconds >= limit)

    def backoff(retry_state: tenacity.RetryCallState) -> float:
        # per outage, not per call: a long call (a backfill job) may live through several
        exponential: float = BACKOFF_INITIAL_SECONDS * 2.0 ** min(state.retries, 10)
        return min(exponential, BACKOFF_MAX_SECONDS) + random.uniform(0, BACKOFF_INITIAL_SECONDS)

    def record(retry_state: tenacity.RetryCallState) -> None:
        assert retry_state.outcome is not None
        exc = retry_state.outcome.exception()
        assert exc is not None
        if is_outage(exc):
            state.failed(exc)
        else:
            log.warning("%s: %s; retrying", name, first_line(exc))

    def sleep(seconds: float) -> None:
        stop.wait(seconds)  # interruptible: a shutdown never waits out a backoff

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(retryable),
        wait=backoff,
        stop=give_up,
        sleep=sleep,
        before_sleep=record,
        reraise=True,
    )
    try:
        result = retrying(attempt)
    except Exception as exc:
        if is_outage(exc) and not stop.is_set() and limit is not None and state.seconds >= limit:
            raise OutageTimeout(
                f"{name}: the database has been unavailable for {state.seconds:.0f} s,"
                f" giving up: {first_line(exc)}"
            ) from exc
        raise
    state.recovered()
    return result


def forever(
    name: str,
    step: Callable[[], Any],
    stop: threading.Event,
    *,
    every: float = 0.0,
    max_outage: timedelta | float | None = None,
    engine: Engine | None = None,
) -> Callable[[], None]:
    """A thread target running ``step()`` every ``every`` seconds until ``stop`` is set.

    Outages are retried (see :func:`retry_outages`, which ``engine`` is passed to: give the
    engine the step uses); the target returns when ``stop`` is set
    (also in the middle of an outage) and raises anything else, :class:`OutageTimeout`
    included.
    """

    def run() -> None:
        outage = Outage(name)
        while not stop.is_set():
            try:
                retry_outages(
                    name, step, stop=stop, max_outage=max_outage, outage=outage, engine=engine
                )
            except Exception as exc:
                if stop.is_set() and (is_outage(exc) or is_transient(exc)):
                    return
                raise
            if every:
                stop.wait(every)

    return run


@dataclass
class Supervisor:
    """Named threads that must all live as long as the process (see the module doc)."""

    stop: threading.Event
    threads: dict[str, threading.Thread] = field(default_factory=dict)
    failure: str | None = None  # "<name>: <what ended it>", the first one
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, name: str, target: Callable[[], Any]) -> threading.Thread:
        def run() -> None:
            try:
                target()
            except BaseException as exc:
                self.fail(name, exc)
            else:
                if not self.stop.is_set():
                    self.fail(name, None)

        thread = threading.Thread(target=run, name=name, daemon=True)
        self.threads[name] = thread
        thread.start()
        return thread

    def fail(self, name: str, exc: BaseException | None) -> None:
        """``name`` ended or failed for good: record it (the first one wins) and stop all."""
        if exc is None:
            what = "stopped unexpectedly"
        elif isinstance(exc, OutageTimeout):
            what = str(exc).removeprefix(f"{name}: ")
        else:
            what = f"{type(exc).__name__}: {first_line(exc)}"
        if isinstance(exc, Exception) and not isinstance(exc, OutageTimeout):
            log.error("%s failed; stopping", name, exc_info=exc)
        else:
            log.error("%s: %s; stopping", name, what)
        with self._lock:
            if self.failure is None:
                self.failure = f"{name}: {what}"
        self.stop.set()

    def join(self, timeout: float) -> list[str]:
        """Wait up to ``timeout`` seconds in all for the threads; the names still running."""
        deadline = time.monotonic() + timeout
        for thread in self.threads.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        return [name for name, thread in self.threads.items() if thread.is_alive()]


class _Disconnects:
    """Connections an engine lost, per thread (one ``handle_error`` listener per engine)."""

    def __init__(self, engine: Engine) -> None:
        self.counts: dict[int, int] = {}
        sa.event.listen(engine, "handle_error", self.on_error)

    def on_error(self, context: Any) -> None:
        if context.is_disconnect or is_outage(context.original_exception):
            thread = threading.get_ident()
            self.counts[thread] = self.counts.get(thread, 0) + 1


_watches: weakref.WeakKeyDictionary[Engine, _Disconnects] = weakref.WeakKeyDictionary()
_watches_lock = threading.Lock()


def lost_connections(engine: Engine) -> Callable[[], int]:
    """A function returning how many connections ``engine`` has lost in the calling thread so
    far. Compare before and after a call whose inner code records failures instead of raising
    them (the reconcile tick isolates buckets from each other) to tell an outage from a bug.
    Install it before the engine is shared between threads (event registration is not)."""
    with _watches_lock:
        watch = _watches.get(engine)
        if watch is None:
            watch = _watches[engine] = _Disconnects(engine)
    return lambda: watch.counts.get(threading.get_ident(), 0)
