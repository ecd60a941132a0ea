"""What a process needs to run the engine: database, definitions, settings, caches.

The public functions (``buckets.ingest_event`` and friends) use the *default* runtime, built
lazily from the ``BUCKETS_*`` environment (database URL, definitions). Applications that want
explicit control build a :class:`Runtime` and pass it (``runtime=``), or install it as the
default with :func:`configure`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine

from buckets.registry import EnabledState, Registry
from buckets.settings import Settings, load_settings

if TYPE_CHECKING:
    from buckets.definitions import Bucket
    from buckets.journeys import Journey


@dataclass
class Runtime:
    engine: Engine
    registry: Registry
    settings: Settings = field(default_factory=load_settings)
    enabled: EnabledState = field(default_factory=EnabledState)

    def __post_init__(self) -> None:
        from buckets import metrics

        self.enabled.ttl_seconds = self.settings.config_cache_seconds
        # Before the engine is shared: connections opened from now on report their commits.
        metrics.watch(self.engine)

    @classmethod
    def create(
        cls,
        *,
        engine: Engine | None = None,
        database_url: str | None = None,
        definitions: str | None = None,
        buckets: Iterable[Bucket] | None = None,
        journeys: Iterable[Journey] = (),
        settings: Settings | None = None,
        **engine_options: Any,
    ) -> Runtime:
        """A runtime from explicit parts, the rest from settings (``BUCKETS_*``).

        ``buckets`` (and ``journeys``) given directly win over ``definitions``.
        """
        from buckets.db import create_engine, resolve_database_url

        settings = settings or load_settings(database_url=database_url, definitions=definitions)
        if engine is None:
            engine = create_engine(resolve_database_url(settings), **engine_options)
        if buckets is not None:
            registry = Registry(buckets, journeys)
        else:
            registry = Registry.load(settings.definitions)
        return cls(engine=engine, registry=registry, settings=settings)


class _Default:
    """The process-wide default runtime (a holder, so no module global is rebound)."""

    runtime: Runtime | None = None
    lock = threading.Lock()


def configure(runtime: Runtime | None = None, **parts: Any) -> Runtime:
    """Install the default runtime (``runtime``, or one built by :meth:`Runtime.create`)."""
    with _Default.lock:
        _Default.runtime = runtime if runtime is not None else Runtime.create(**parts)
        return _Default.runtime


def get_runtime(runtime: Runtime | None = None) -> Runtime:
    """``runtime`` if given, else the default one (built from the environment on first use)."""
    if runtime is not None:
        return runtime
    with _Default.lock:
        if _Default.runtime is None:
            _Default.runtime = Runtime.create()
        return _Default.runtime
