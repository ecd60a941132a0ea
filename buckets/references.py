"""Buckets that refer to buckets (SPEC §3.5): the reference graph and the cascade.

* :class:`ReferenceGraph` — which bucket reads which, checked and ordered once when the set of
  definitions is loaded (the :class:`~buckets.registry.Registry` holds it): every reference
  names a defined bucket (else a :class:`~buckets.definitions.DefinitionError` naming the
  bucket and the path of the reference) and references form no cycle (the error names the
  cycle, ``a → b → a``; a bucket referring to itself is a cycle). It gives every bucket a
  *level* (0 without references, else one more than the highest level it refers to), the
  dependency order (by level, then definition order) and each bucket's dependents.
* :func:`cascade` — the one function every producer calls after it changed memberships: it
  re-decides, for the contacts concerned, the buckets that refer to the changed ones, in the
  same transaction, level by level (set-based: one :func:`~buckets.decide.decide` per level,
  whatever the number of buckets and contacts in it), transitively. Pairs the caller still has
  to decide may be handed in too (``asks``): each is decided at its bucket's level, so that a
  bucket is never decided before a bucket it refers to in the same call (ingest).

A reference reads the referenced bucket's *active* membership row as the deciding transaction
sees it; a disabled bucket's memberships are read as they stand (nothing here looks at whether
the referenced bucket is enabled). A disabled dependent is not re-decided (``enabled``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Connection

from buckets.criteria.model import BucketReference, Composite, Node
from buckets.definitions import Bucket, DefinitionError
from buckets.membership import Source

Enabled = Callable[[Sequence[Bucket]], Sequence[Bucket]]


def located_references(node: Node, path: str = "criteria") -> list[tuple[str, BucketReference]]:
    """Every bucket reference of ``node`` with its path (``criteria.conditions[1]``)."""
    if isinstance(node, BucketReference):
        return [(path, node)]
    if isinstance(node, Composite):
        return [
            found
            for index, child in enumerate(node.conditions)
            for found in located_references(child, f"{path}.conditions[{index}]")
        ]
    return []


class ReferenceGraph:
    """The references between a set of buckets, validated and ordered."""

    def __init__(self, buckets: Iterable[Bucket]) -> None:
        self.buckets: dict[str, Bucket] = {bucket.id: bucket for bucket in buckets}
        # bucket -> the buckets it refers to (definition order of the references)
        self.refers_to: dict[str, tuple[str, ...]] = {}
        for bucket in self.buckets.values():
            found: dict[str, None] = {}
            for path, reference in located_references(bucket.criteria):
                if reference.bucket not in self.buckets:
                    raise DefinitionError(
                        bucket.id,
                        f"{path}.bucket",
                        f"refers to {reference.bucket!r}, which no loaded definition declares",
                    )
                found[reference.bucket] = None
            self.refers_to[bucket.id] = tuple(found)
        self.referred_by: dict[str, list[str]] = {bucket_id: [] for bucket_id in self.buckets}
        for bucket_id, targets in self.refers_to.items():
            for target in targets:
                self.referred_by[target].append(bucket_id)
        self.level = self._levels()
        position = {bucket_id: index for index, bucket_id in enumerate(self.buckets)}
        self.order: list[str] = sorted(
            self.buckets, key=lambda bucket_id: (self.level[bucket_id], position[bucket_id])
        )
        self._rank = {bucket_id: index for index, bucket_id in enumerate(self.order)}

    def _levels(self) -> dict[str, int]:
        """Each bucket's level, by a depth-first walk that reports the first cycle it meets."""
        level: dict[str, int] = {}
        visiting: list[str] = []

        def visit(bucket_id: str) -> int:
            if bucket_id in level:
                return level[bucket_id]
            if bucket_id in visiting:
                cycle = [*visiting[visiting.index(bucket_id) :], bucket_id]
                first = cycle[0]
                path = next(
                    at
                    for at, reference in located_references(self.buckets[first].criteria)
                    if reference.bucket == cycle[1]
                )
                raise DefinitionError(first, path, "reference cycle: " + " → ".join(cycle))
            visiting.append(bucket_id)
            found = 1 + max((visit(target) for target in self.refers_to[bucket_id]), default=-1)
            visiting.pop()
            level[bucket_id] = found
            return found

        for bucket_id in self.buckets:
            visit(bucket_id)
        return level

    @property
    def has_references(self) -> bool:
        return any(self.refers_to.values())

    def ordered(self, buckets: Iterable[Bucket]) -> list[Bucket]:
        """``buckets`` (of this graph) in dependency order."""
        return sorted(buckets, key=lambda bucket: self._rank.get(bucket.id, len(self._rank)))

    def dependents(self, bucket_id: str) -> list[str]:
        """The buckets referring to ``bucket_id`` directly or transitively, in dependency
        order."""
        seen: set[str] = set()
        stack = list(self.referred_by.get(bucket_id, ()))
        while stack:
            found = stack.pop()
            if found not in seen:
                seen.add(found)
                stack.extend(self.referred_by[found])
        return sorted(seen, key=self._rank.__getitem__)


def cascade(
    conn: Connection,
    registry: Any,
    changed: Mapping[str, Iterable[int]],
    now: datetime,
    *,
    source: Source,
    asks: Sequence[Any] = (),
    event_ids: Mapping[int, int] | None = None,
    enabled: Enabled | None = None,
    clock: bool = False,
    blocked: frozenset[str] = frozenset(),
    rows: bool = True,
    record: bool = False,
    universe: Sequence[Bucket] = (),
) -> Any:
    """Re-decide, as of ``now`` in the caller's transaction, the buckets that refer to the
    buckets of ``changed`` (bucket id -> contact ids whose membership in it changed) for those
    contacts, transitively and in dependency order; decide ``asks`` (pairs the caller wants
    decided, :class:`~buckets.decide.Ask`) at their buckets' levels on the way. The contacts
    must be locked by the caller (as for :func:`~buckets.decide.decide`). ``event_ids``: the
    event each contact's changes are attributed to (cascaded transitions carry the event id of
    the transition that caused them). ``enabled`` filters the dependents re-decided (default:
    all). ``universe``: as for :func:`~buckets.decide.decide`. Returns the merged
    :class:`~buckets.decide.Outcome` (transitions in ledger order: a bucket's before its
    dependents')."""
    from buckets.decide import Ask, Outcome, decide

    graph: ReferenceGraph = registry.graph
    events = event_ids or {}
    touched: dict[str, dict[int, int | None]] = {
        bucket_id: {contact_id: events.get(contact_id) for contact_id in contact_ids}
        for bucket_id, contact_ids in changed.items()
    }
    by_level: dict[int, list[Any]] = {}
    for ask in asks:
        by_level.setdefault(graph.level.get(ask.bucket.id, 0), []).append(ask)
    # the buckets a change may reach
    wanted = {found for bucket_id in touched for found in graph.dependents(bucket_id)}
    outcome = Outcome()
    for level in range(max(graph.level.values(), default=-1) + 1):
        batch: dict[tuple[str, int], Any] = {
            (ask.bucket.id, ask.contact_id): ask for ask in by_level.get(level, ())
        }
        reached = [registry.get(b) for b in graph.order if graph.level[b] == level and b in wanted]
        if enabled is not None and reached:
            reached = list(enabled(reached))
        for bucket in reached:
            for key, event_id in _touching(graph, bucket.id, touched):
                if key not in batch:
                    batch[key] = Ask(bucket, key[1], event_id)
        if not batch:
            continue
        needed = rows or any(graph.referred_by[bucket_id] for bucket_id, _ in batch)
        found = decide(
            conn,
            list(batch.values()),
            now,
            source=source,
            clock=clock,
            blocked=blocked,
            rows=needed,
            record=record,
            universe=universe,
        )
        if found.as_of is not None and found.as_of > now:
            now = found.as_of
        for transition in found.changes.transitions:
            touched.setdefault(transition.bucket_id, {})[transition.contact_id] = (
                transition.event_id
            )
            wanted.update(graph.dependents(transition.bucket_id))
        if not rows:
            found.changes.transitions = []
        outcome.merge(found)
    return outcome


def _touching(
    graph: ReferenceGraph, bucket_id: str, touched: Mapping[str, Mapping[int, int | None]]
) -> list[tuple[tuple[str, int], int | None]]:
    """The pairs of ``bucket_id`` whose referenced buckets changed for their contact, each
    with the event its change is attributed to."""
    return [
        ((bucket_id, contact_id), event_id)
        for target in graph.refers_to[bucket_id]
        for contact_id, event_id in touched.get(target, {}).items()
    ]
