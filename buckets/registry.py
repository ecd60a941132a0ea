"""The deployed buckets, indexed for the real-time path, and their effective enabled state.

* :class:`Registry` — the buckets (and journeys) loaded from the definitions, with indexes by
  event name and by contact property key: an ingested event touches only the buckets whose
  criteria mention its name or a property key it changed.
* :class:`EnabledState` — ``bucket_configs.enabled`` is the operator's override and wins over
  the definition (SPEC §8). It is read from the database and cached for at most
  ``BUCKETS_CONFIG_CACHE_SECONDS`` (default 1 s), so a disable reaches every process within
  about a second without a query per event.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from buckets.definitions import Bucket, DefinitionError, load_definitions
from buckets.errors import BucketsError
from buckets.models import bucket_configs
from buckets.references import ReferenceGraph

if TYPE_CHECKING:
    from buckets.journeys import Journey


class UnknownBucketError(BucketsError):
    """A bucket id that no loaded definition declares."""

    def __init__(self, bucket_id: str) -> None:
        super().__init__(f"{bucket_id}: no such bucket in the loaded definitions")
        self.bucket_id = bucket_id


class Registry:
    """An immutable set of bucket definitions (and the journeys bound to them)."""

    def __init__(self, buckets: Iterable[Bucket] = (), journeys: Iterable[Journey] = ()) -> None:
        self.buckets: dict[str, Bucket] = {}
        for bucket in buckets:
            if bucket.id in self.buckets:
                raise BucketsError(f"{bucket.id}: duplicate bucket id")
            self.buckets[bucket.id] = bucket
        from buckets.journeys import validate_journeys

        self.journeys: tuple[Journey, ...] = tuple(
            validate_journeys(journeys, self.buckets.values())
        )
        # Which bucket reads which (SPEC §3.5): checked here, where the whole set is known
        # (unknown buckets, cycles), and ordered once; every producer asks it.
        self.graph = ReferenceGraph(self.buckets.values())
        # Decided for every new contact (see Bucket.matches_new_contacts).
        self.on_creation = [b for b in self.buckets.values() if b.matches_new_contacts]
        self._by_event: dict[str, list[Bucket]] = {}
        self._by_property: dict[str, list[Bucket]] = {}
        for bucket in self.buckets.values():
            for name in bucket.event_names:
                self._by_event.setdefault(name, []).append(bucket)
            for key in bucket.property_keys:
                self._by_property.setdefault(key, []).append(bucket)

    @classmethod
    def load(cls, source: str | None) -> Registry:
        """The buckets (and journeys) defined by ``source`` (see ``load_definitions``)."""
        if source is None:
            return cls()
        from buckets.journeys import journeys_in

        buckets = load_definitions(source)
        try:
            return cls(buckets, journeys_in(source, buckets))
        except DefinitionError as exc:  # a reference: name where the definitions came from
            raise exc.located(str(source)) from None

    def __iter__(self) -> Any:
        return iter(self.buckets.values())

    def __len__(self) -> int:
        return len(self.buckets)

    def get(self, bucket_id: str) -> Bucket:
        try:
            return self.buckets[bucket_id]
        except KeyError:
            raise UnknownBucketError(bucket_id) from None

    def ordered(self, buckets: Iterable[Bucket]) -> list[Bucket]:
        """``buckets`` in dependency order: every bucket after the buckets it refers to
        (definition order otherwise)."""
        return self.graph.ordered(buckets)

    def dependents(self, bucket_id: str) -> list[Bucket]:
        """The buckets that refer to ``bucket_id``, directly or through others, in dependency
        order."""
        return [self.buckets[found] for found in self.graph.dependents(bucket_id)]

    def affected(
        self, event: str | None, property_keys: Iterable[str] = (), *, created: bool = False
    ) -> list[Bucket]:
        """Buckets whose criteria mention ``event`` or one of ``property_keys`` (and, for a
        contact just ``created``, those a new contact matches), in definition order."""
        found: dict[str, Bucket] = (
            {bucket.id: bucket for bucket in self.on_creation} if created else {}
        )
        for bucket in self._by_event.get(event or "", ()):
            found[bucket.id] = bucket
        for key in property_keys:
            for bucket in self._by_property.get(key, ()):
                found[bucket.id] = bucket
        order = {bucket_id: index for index, bucket_id in enumerate(self.buckets)}
        return sorted(found.values(), key=lambda bucket: order[bucket.id])


def read_overrides(conn: Connection) -> dict[str, bool]:
    """The operators' enabled overrides (``bucket_configs.enabled`` not NULL)."""
    rows = conn.execute(
        sa.select(bucket_configs.c.bucket_id, bucket_configs.c.enabled).where(
            bucket_configs.c.enabled.is_not(None)
        )
    )
    return {bucket_id: bool(enabled) for bucket_id, enabled in rows}


class EnabledState:
    """Effective enabled state of buckets: override if set, else the definition's."""

    def __init__(
        self, ttl_seconds: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._overrides: dict[str, bool] = {}
        self._read_at: float | None = None

    def overrides(self, conn: Connection) -> dict[str, bool]:
        with self._lock:
            fresh = self._read_at is not None and self._clock() - self._read_at < self.ttl_seconds
            if fresh:
                return self._overrides
        overrides = read_overrides(conn)
        with self._lock:
            self._overrides, self._read_at = overrides, self._clock()
        return overrides

    def invalidate(self) -> None:
        with self._lock:
            self._read_at = None

    def is_enabled(self, conn: Connection, bucket: Bucket) -> bool:
        return self.overrides(conn).get(bucket.id, bucket.enabled)

    def enabled(self, conn: Connection, buckets: Sequence[Bucket]) -> list[Bucket]:
        overrides = self.overrides(conn) if buckets else {}
        return [bucket for bucket in buckets if overrides.get(bucket.id, bucket.enabled)]


def set_enabled(conn: Connection, bucket_id: str, enabled: bool | None) -> None:
    """Set (or, with None, clear) the operator's override for ``bucket_id``. Disabling also
    marks the bucket's due queue incomplete: ingest stops maintaining it (buckets.due)."""
    from sqlalchemy.dialects.postgresql import insert

    values: dict[str, Any] = {"enabled": enabled}
    if enabled is False:
        values["due_hash"] = None
    statement = insert(bucket_configs).values(bucket_id=bucket_id, **values)
    conn.execute(
        statement.on_conflict_do_update(
            index_elements=[bucket_configs.c.bucket_id],
            set_={**values, "updated_at": sa.func.now()},
        )
    )
