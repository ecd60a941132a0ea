"""Why is a contact (not) in a bucket, and when will the clock alone change that? (SPEC §10)

:func:`explain` answers for one (bucket, contact) as of ``now``, from the database:

* membership: member or not, since when, epoch, source, ``max_dwell_at``, ``pending_leave_at``;
* the criteria's answer and every leaf's value with what is behind it — a property leaf's
  actual value (or that the key is missing), an event leaf's exact count of matching events in
  its window (and the window's bounds);
* the next instant at which the clock alone changes something: the criteria's answer flips
  (an event ages out of a window — it counts while ``now - within <= occurred_at``, so it drops
  out one microsecond after ``occurred_at + within`` — or an event stamped in the future starts
  to count), the maximum dwell is reached, or a deferred leave falls due;
* the pair's due-queue entry (:mod:`buckets.due`): when the worker will look at it again, which
  is that instant or, for composite criteria, an earlier one it may have to re-check.

The leaf values come from the same Python evaluator the real-time path uses, over the
contact's events loaded once; the next flip walks the lower bounds of the same clock function
the queue's entries come from (:func:`buckets.criteria.clock.exact_flip`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from buckets import due
from buckets.contacts import UnknownContactError
from buckets.criteria import Event, evaluate, in_memory_counter
from buckets.criteria.clock import exact_flip, in_memory_leaf_states, in_memory_state
from buckets.criteria.durations import format_duration
from buckets.criteria.evaluate import (
    MISSING,
    aggregate_of,
    event_counts,
    last_event,
    last_matches,
    lookup,
    period_counts,
    property_matches,
)
from buckets.criteria.held import changed_at, with_history
from buckets.criteria.instants import parse_instant
from buckets.criteria.model import (
    CLOCK_OPERATORS,
    INSTANT_OPERATORS,
    Aggregate,
    BucketReference,
    Composite,
    EventCondition,
    EventSequence,
    Everyone,
    Node,
    PropertyCondition,
    Sample,
)
from buckets.criteria.sequences import chains_of, progress, witness_chain
from buckets.definitions import Bucket
from buckets.models import bucket_memberships, contacts, user_events
from buckets.registry import read_overrides
from buckets.runtime import Runtime, get_runtime


@dataclass
class Leaf:
    path: str
    description: str
    value: bool
    count: int | None = None  # event leaves: matching events counted as of now
    window: tuple[datetime, datetime] | None = None
    property_value: Any = None  # property leaves: the contact's value
    property_present: bool | None = None
    detail: str | None = None  # what decided the leaf, where a value or a count does not say
    next_at: datetime | None = None  # the first instant the clock alone may change the leaf
    changed_at: datetime | None = None  # held_for leaves: when the key last changed
    # bucket references: the referenced bucket's active membership row (since, epoch), or None
    membership: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.path,
            "condition": self.description,
            "value": self.value,
        }
        if self.count is not None:
            out["count"] = self.count
        if self.window is not None:
            out["window"] = [self.window[0].isoformat(), self.window[1].isoformat()]
        if self.property_present is not None:
            out["present"] = self.property_present
            out["actual"] = self.property_value
        if self.detail is not None:
            out["detail"] = self.detail
        if self.changed_at is not None:
            out["changed_at"] = self.changed_at.isoformat()
        if self.next_at is not None:
            out["next_at"] = self.next_at.isoformat()
        if self.membership is not None:
            out["membership"] = self.membership
        return out


@dataclass
class Change:
    at: datetime
    reason: str  # criteria | max_dwell | pending_leave
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at.isoformat(), "reason": self.reason, "detail": self.detail}


@dataclass
class Explanation:
    bucket_id: str
    external_id: str
    now: datetime
    enabled: bool
    deleted: bool
    member: bool
    matches: bool
    membership: dict[str, Any] | None
    leaves: list[Leaf] = field(default_factory=list)
    next_change: Change | None = None
    queued_at: datetime | None = None  # the pair's due-queue entry (None: no entry)
    queue_complete: bool = False  # the bucket's entries are complete (else the cron sweeps it)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bucket_id": self.bucket_id,
            "external_id": self.external_id,
            "now": self.now.isoformat(),
            "enabled": self.enabled,
            "deleted": self.deleted,
            "member": self.member,
            "matches": self.matches,
            "membership": self.membership,
            "leaves": [leaf.to_dict() for leaf in self.leaves],
            "next_change": self.next_change.to_dict() if self.next_change else None,
            "queue": {
                "due_at": self.queued_at.isoformat() if self.queued_at else None,
                "complete": self.queue_complete,
            },
        }


def describe(node: Node) -> str:
    """A one-line reading of a leaf."""
    if isinstance(node, PropertyCondition):
        return _describe_property(node)
    if isinstance(node, EventSequence):
        return _describe_sequence(node)
    if isinstance(node, Everyone):
        return "everyone"
    if isinstance(node, Sample):
        return f"sample {node.percent}% (salt {node.salt!r})"
    if isinstance(node, BucketReference):
        return f"{'member' if node.check == 'member' else 'not a member'} of bucket {node.bucket!r}"
    if isinstance(node, EventCondition):
        text = f"event {node.event!r}"
        if node.where:
            text += " where " + " and ".join(describe(w) for w in node.where)
        if node.within is not None:
            text += f" within {format_duration(node.within)}"
        if node.older_than is not None:
            text += f" older_than {format_duration(node.older_than)}"
        if node.check == "count":
            return f"{text} count {node.operator} {node.value}"
        if node.is_regularly:
            assert node.period is not None
            each = f"{node.operator or 'gte'} {1 if node.value is None else node.value}"
            return (
                f"{text} regularly: {node.min_periods} of {node.periods} periods of"
                f" {format_duration(node.period)} with count {each}"
            )
        if node.is_aggregate:
            key = node.property if isinstance(node.property, str) else list(node.aggregated)
            return f"{text} {node.check} {key!r} {node.operator} {node.value}"
        return f"{text} {node.check}"
    assert isinstance(node, Composite)
    return f"{node.operator} of {len(node.conditions)}"


def _describe_property(node: PropertyCondition) -> str:
    value = "" if node.operator in ("exists", "not_exists") else f" {node.value!r}"
    if isinstance(node.value, tuple):
        value = f" {list(node.value)!r}"
    if isinstance(node.value, timedelta):
        value = f" {format_duration(node.value)}"
    key = node.property if isinstance(node.property, str) else list(node.path)
    held = ""
    if node.held_for is not None:
        kind = "at least" if node.held_for.at_least is not None else "less than"
        held = f", held for {kind} {format_duration(node.held_for.span)}"
    return f"property {key!r} {node.operator}{value}{held}"


def _describe_sequence(node: EventSequence) -> str:
    steps = []
    for step in node.steps:
        text = f"{'no ' if step.absent else ''}{step.event!r}"
        if step.where:
            text += " where " + " and ".join(describe(w) for w in step.where)
        if step.gap is not None:
            text += f" within {format_duration(step.gap)}"
        steps.append(text)
    within = f" (first within {format_duration(node.within)})" if node.within else ""
    return "sequence " + ", then ".join(steps) + within


def _leaves(node: Node, path: str, out: list[tuple[str, Node]]) -> None:
    if isinstance(node, Composite):
        for index, child in enumerate(node.conditions):
            _leaves(child, f"{path}.conditions[{index}]", out)
    else:
        out.append((path, node))


def _sample_detail(node: Sample, external_id: str) -> str:
    digest = hashlib.sha256(f"{node.salted()}:{external_id}".encode()).hexdigest()
    bucket = int(digest[:8], 16) % 10_000
    return f"sample slot {bucket} of 10000, in when below {node.threshold}"


def explain(
    bucket_id: str,
    external_id: str,
    *,
    now: datetime,
    runtime: Runtime | None = None,
) -> Explanation:
    rt = get_runtime(runtime)
    bucket = rt.registry.get(bucket_id)
    with rt.engine.connect() as conn:
        contact = conn.execute(
            sa.select(
                contacts.c.id,
                contacts.c.properties,
                contacts.c.deleted_at,
                contacts.c.property_changed_at.label("changed_at"),
                contacts.c.created_at,
            ).where(contacts.c.external_id == external_id)
        ).one_or_none()
        if contact is None:
            raise UnknownContactError(external_id)
        events = _events(conn, contact.id, bucket)
        row = conn.execute(
            sa.select(bucket_memberships).where(
                bucket_memberships.c.bucket_id == bucket.id,
                bucket_memberships.c.contact_id == contact.id,
                bucket_memberships.c.status == "active",
            )
        ).one_or_none()
        referenced = _referenced_rows(conn, contact.id, bucket)
        enabled = read_overrides(conn).get(bucket.id, bucket.enabled)
        queued_at = due.entry(conn, bucket.id, contact.id)
        queue_complete = due.complete(conn, bucket)
    properties = with_history(contact)
    active = frozenset(referenced)
    if bucket.manual:  # nothing to evaluate: "matching" is being a member, the clock never moves
        matches = row is not None
        paths: list[tuple[str, Node]] = []
    else:
        matches = contact.deleted_at is None and evaluate(
            bucket.criteria,
            properties,
            in_memory_counter(events, now, active),
            external_id=external_id,
            now=now,
        )
        paths = []
        _leaves(bucket.criteria, "criteria", paths)
    membership = None
    if row is not None:
        membership = {
            "since": row.entered_at.isoformat(),
            "epoch": row.entry_count,
            "source": row.source,
            "max_dwell_at": row.max_dwell_at.isoformat() if row.max_dwell_at else None,
            "pending_leave_at": row.pending_leave_at.isoformat() if row.pending_leave_at else None,
            "last_evaluated_at": row.last_evaluated_at.isoformat()
            if row.last_evaluated_at
            else None,
        }
    return Explanation(
        bucket_id=bucket.id,
        external_id=external_id,
        now=now,
        enabled=enabled,
        deleted=contact.deleted_at is not None,
        member=row is not None,
        matches=matches,
        membership=membership,
        leaves=[Leaf("criteria", "manual: members are added and removed explicitly", matches)]
        if bucket.manual
        else [
            _leaf(
                path, node, properties, events, now, external_id=external_id, referenced=referenced
            )
            for path, node in paths
        ],
        next_change=None
        if contact.deleted_at is not None or bucket.manual
        else _next_change(bucket, properties, events, now, external_id, row=row, active=active),
        queued_at=queued_at,
        queue_complete=queue_complete,
    )


def _referenced_rows(conn: Connection, contact_id: int, bucket: Bucket) -> dict[str, Any]:
    """The contact's active membership rows in the buckets ``bucket`` refers to, by bucket."""
    if not bucket.references:
        return {}
    rows = conn.execute(
        sa.select(
            bucket_memberships.c.bucket_id,
            bucket_memberships.c.entered_at,
            bucket_memberships.c.entry_count,
            bucket_memberships.c.source,
        ).where(
            bucket_memberships.c.contact_id == contact_id,
            bucket_memberships.c.bucket_id.in_(sorted(bucket.references)),
            bucket_memberships.c.status == "active",
        )
    )
    return {
        row.bucket_id: {
            "bucket_id": row.bucket_id,
            "since": row.entered_at.isoformat(),
            "epoch": row.entry_count,
            "source": row.source,
        }
        for row in rows
    }


def _events(conn: Connection, contact_id: int, bucket: Bucket) -> list[Event]:
    """The contact's events of the names the criteria mention (all of them: past and future)."""
    if not bucket.event_names:
        return []
    rows = conn.execute(
        sa.select(user_events.c.event, user_events.c.occurred_at, user_events.c.properties)
        .where(
            user_events.c.contact_id == contact_id,
            user_events.c.event.in_(sorted(bucket.event_names)),
        )
        .order_by(user_events.c.id)  # ingestion order: check 'last' breaks ties by it
    )
    return [Event(row.event, row.occurred_at, row.properties) for row in rows]


def _leaf(
    path: str,
    node: Node,
    properties: Mapping[str, Any],
    events: list[Event],
    now: datetime,
    *,
    external_id: str,
    referenced: Mapping[str, Any] | None = None,
) -> Leaf:
    rows = referenced or {}
    found = in_memory_leaf_states(properties, events, now, external_id, rows)
    if isinstance(node, BucketReference):
        row = rows.get(node.bucket)
        shown = (
            f"member of {node.bucket!r} since {row['since']} (epoch {row['epoch']})"
            if row is not None
            else f"no active membership in {node.bucket!r}"
        )
        return Leaf(path, describe(node), found(node).value, detail=shown, membership=row)
    if isinstance(node, PropertyCondition):
        actual = lookup(properties, node.path)
        detail = None
        if node.operator in INSTANT_OPERATORS or node.operator in CLOCK_OPERATORS:
            instant = parse_instant(actual)
            detail = f"instant {instant.isoformat()}" if instant else "not an instant"
        changed = None
        if node.held_for is not None:
            changed = changed_at(node, properties)
            held = "held" if node.held_for.holds(changed, now) else "not held"
            since = f"{node.top_key!r} changed at {changed.isoformat()}: {held}"
            detail = since if detail is None else f"{detail}; {since}"
        return Leaf(
            path,
            describe(node),
            property_matches(node, properties, now),
            property_present=actual is not MISSING,
            property_value=None if actual is MISSING else actual,
            detail=detail,
            next_at=found(node).next_at,
            changed_at=changed,
        )
    if isinstance(node, Everyone | Sample):
        detail = _sample_detail(node, external_id) if isinstance(node, Sample) else None
        return Leaf(path, describe(node), found(node).value, detail=detail)
    if isinstance(node, EventSequence):
        window = (now - node.within, now) if node.within is not None else None
        state = found(node)
        detail = _sequence_detail(node, events, now)
        return Leaf(
            path, describe(node), state.value, window=window, detail=detail, next_at=state.next_at
        )
    assert isinstance(node, EventCondition)
    count = sum(1 for event in events if event_counts(node, event, now))
    detail = _aggregate_detail(node, aggregate_of(node, events, now)) if node.is_aggregate else None
    window = (now - node.within, now) if node.within is not None else None
    if node.is_last:
        detail = _last_detail(node, last_event(node, events, now))
    if node.is_regularly:
        counts = period_counts(node, events, now)
        counted = [index for index, n in enumerate(counts) if node.period_holds(n)]
        detail = (
            f"periods that counted: {counted} of counts {counts} (period 0 ends now),"
            f" {len(counted)} of {node.min_periods} needed"
        )
    if node.older_than is not None:  # counted: occurred_at before now - older_than
        cutoff = now - node.older_than
        window = (window[0], cutoff) if window is not None else None
        aged = f"events before {cutoff.isoformat()} (exclusive) count"
        detail = aged if detail is None else f"{detail}; {aged}"
    return Leaf(
        path,
        describe(node),
        found(node).value,
        count=count,
        window=window,
        detail=detail,
        next_at=found(node).next_at,
    )


def _sequence_detail(node: EventSequence, events: list[Event], now: datetime) -> str:
    """The chain that matches (the one that holds longest), or the step missing."""
    chain = witness_chain(node, events, now)
    present, absent = node.present, node.absent
    if chain is not None:
        text = ", ".join(
            f"{step.event!r} at {at.isoformat()}" for step, at in zip(present, chain, strict=True)
        )
        if absent is not None:
            assert absent.gap is not None
            text += f", no {absent.event!r} until {(chain[-1] + absent.gap).isoformat()}"
        return f"matched: {text}"
    reached = progress(node, events, now)
    if reached < len(present):
        missing = present[reached]
        where = "" if reached == 0 else f" after a chain of step(s) 1-{reached}"
        return f"missing: step {reached + 1} ({missing.event!r}){where}"
    assert absent is not None
    pending = chains_of(node, events, now).upcoming
    if pending is not None:
        return f"waiting: no {absent.event!r} yet; its gap elapses at {pending.isoformat()}"
    return f"missing: every chain is followed by {absent.event!r} within its gap"


def _last_detail(node: EventCondition, last: Event | None) -> str:
    if last is None:
        return "no event counts: there is no last event"
    verdict = "satisfies" if last_matches(node, last) else "does not satisfy"
    shown = dict(last.properties)
    return f"the last event, at {last.occurred_at.isoformat()}, {verdict} where: {shown}"


def _aggregate_detail(node: EventCondition, found: Aggregate) -> str:
    if found.numbers == 0:
        value = "0" if node.check == "sum" else "none"
    elif node.check == "sum":
        value = str(found.total)
    elif node.check == "avg":
        value = f"{found.total / found.numbers} (sum {found.total})"
    else:
        value = str(found.low if node.check == "min" else found.high)
    return f"{node.check} {value} over {found.numbers} numeric value(s)"


def _next_change(
    bucket: Bucket,
    properties: Mapping[str, Any],
    events: list[Event],
    now: datetime,
    external_id: str,
    *,
    row: Any,
    active: frozenset[str] = frozenset(),
) -> Change | None:
    candidates: list[Change] = []
    flip = exact_flip(bucket.criteria, properties, events, now, external_id, memberships=active)
    if flip is not None:
        matches = in_memory_state(
            bucket.criteria, properties, events, now, external_id, memberships=active
        ).value
        detail = "the criteria stop matching" if matches else "the criteria start matching"
        candidates.append(Change(flip, "criteria", detail))
    if row is not None and row.max_dwell_at is not None and row.max_dwell_at > now:
        candidates.append(Change(row.max_dwell_at, "max_dwell", "the maximum dwell is reached"))
    if row is not None and row.pending_leave_at is not None:
        candidates.append(
            Change(
                max(row.pending_leave_at, now),
                "pending_leave",
                "a deferred leave falls due (if the criteria still fail then)",
            )
        )
    return min(candidates, key=lambda change: change.at) if candidates else None
