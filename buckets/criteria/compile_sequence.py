"""Sequences in SQL (SPEC §3.4): two forms of the same semantics as :mod:`.sequences`.

* :func:`sequence_exists` — the value as nested ``EXISTS``, literally the spec's existential:
  "an ``e1`` (in the window) such that an ``e2`` after it (within its gap) such that …", and
  with an absent last step ``NOT EXISTS`` a matching event in ``(ek, ek + gap]``. Correlated
  to a contact id, it is both the member set's predicate (the planner turns the top-level
  ``EXISTS`` into a semi-join that drives from the first step's events, and each inner level
  probes the index ``(event, contact_id, occurred_at)``) and the per-contact probe.
* :func:`sequence_chains` — the clock: the dynamic programme of :mod:`.sequences` with window
  functions. Per step, the previous step's chain ends and the step's events are put in one
  ordered set per contact; ``max(first) FILTER (previous) OVER (RANGE BETWEEN gap PRECEDING
  AND 1 microsecond PRECEDING)`` gives each event the latest first event of a chain it ends
  (strictly earlier events only: equal timestamps never chain). Then per contact ``witness``
  and ``upcoming``. Set-wide it is one grouped subquery per sequence, outer-joined like the
  event aggregates; per contact (the real-time path's facts) the same statement correlated to
  the contact, returning ``[witness, upcoming]``.

The ingest path (executor 4) therefore does not fetch a sequence's events: it fetches the two
instants the programme computes for the contact, which decide the value and the clock
(:class:`.sequences.Chains`), bounded whatever the contact's number of events.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import array as pg_array
from sqlalchemy.sql.elements import ColumnElement, FrameClause, FrameClauseType

from buckets.criteria.compile import TIMESTAMP, property_predicate, user_events
from buckets.criteria.instants import shifted
from buckets.criteria.model import EventSequence, SequenceStep

TICK = timedelta(microseconds=1)
Moment = datetime | ColumnElement[Any]
Scope = Callable[[Any], list[ColumnElement[bool]]]  # restrictions on an alias of user_events


def _at(now: Moment) -> ColumnElement[Any]:
    return sa.literal(now, TIMESTAMP) if isinstance(now, datetime) else now


def _matching(step: SequenceStep, events: Any) -> list[ColumnElement[bool]]:
    """The step's name and ``where`` over an alias of ``user_events``."""
    found: list[ColumnElement[bool]] = [events.c.event == step.event]
    found.extend(property_predicate(where, events.c.properties) for where in step.where or ())
    return found


def _interval(duration: timedelta) -> ColumnElement[Any]:
    return sa.literal(duration, sa.Interval)


# --- the value: nested EXISTS --------------------------------------------------------------


def sequence_exists(
    sequence: EventSequence,
    now: datetime,
    contact_id: ColumnElement[Any],
    scope: Scope | None = None,
) -> ColumnElement[bool]:
    """The sequence holds as of ``now`` for the contact ``contact_id`` (a column of the
    enclosing query). ``scope`` adds restrictions on the first step's events (a chunk's
    contact ids)."""
    present = sequence.present
    absent = sequence.absent
    at = sa.literal(now, TIMESTAMP)
    lower = sa.literal(now - sequence.within, TIMESTAMP) if sequence.within else None
    aliases = [user_events.alias() for _ in present]
    inner: ColumnElement[bool] | None = None
    for index in range(len(present) - 1, -1, -1):
        step, events = present[index], aliases[index]
        occurred = events.c.occurred_at
        where = _matching(step, events)
        if index == 0:
            where.append(events.c.contact_id == contact_id)
            if lower is not None:
                where.append(occurred >= lower)
            where.extend(scope(events) if scope is not None else ())
        else:
            previous = aliases[index - 1]
            where.append(events.c.contact_id == previous.c.contact_id)
            where.append(occurred > previous.c.occurred_at)
            if step.gap is not None:
                where.append(occurred <= previous.c.occurred_at + _interval(step.gap))
            if lower is not None:  # implied (after e1), but it bounds the index range
                where.append(occurred > lower)
        last = index == len(present) - 1
        if last and absent is not None:
            assert absent.gap is not None
            where.append(occurred <= sa.literal(now - absent.gap, TIMESTAMP))
            followers = user_events.alias()
            follows = (
                sa.select(sa.literal(1))
                .where(
                    *_matching(absent, followers),
                    followers.c.contact_id == events.c.contact_id,
                    followers.c.occurred_at > occurred,
                    followers.c.occurred_at <= occurred + _interval(absent.gap),
                )
                .correlate_except(followers)
            )
            where.append(~sa.exists(follows))
        else:
            where.append(occurred <= at)
        if inner is not None:
            where.append(inner)
        inner = sa.exists(sa.select(sa.literal(1)).where(*where).correlate_except(events))
    assert inner is not None
    return inner


# --- the clock: the dynamic programme -------------------------------------------------------


def _frame(gap: timedelta | None) -> FrameClause:
    """``RANGE BETWEEN gap PRECEDING (or UNBOUNDED) AND 1 microsecond PRECEDING``."""
    return FrameClause(
        start=_interval(gap) if gap is not None else None,
        end=_interval(TICK),
        start_frame_type=FrameClauseType.PRECEDING
        if gap is not None
        else FrameClauseType.UNBOUNDED,
        end_frame_type=FrameClauseType.PRECEDING,
    )


def _chain_ends(sequence: EventSequence, now: Moment, scope: Scope) -> sa.Subquery:
    """``(contact_id, t, f)``: every event of the last step that is not absent ending a chain,
    with the latest first event ``f`` of such a chain (see :mod:`.sequences`)."""
    present = sequence.present
    lower = shifted(now, -sequence.within) if sequence.within is not None else None
    first = user_events.alias()
    occurred = first.c.occurred_at
    where = [*_matching(present[0], first), *scope(first)]
    if lower is not None:
        where.append(occurred >= lower)
    rows = (
        sa.select(first.c.contact_id, occurred.label("t"), occurred.label("f"))
        .where(*where)
        .correlate_except(first)
    )
    for step in present[1:]:
        ends = rows.subquery()
        events = user_events.alias()
        where = [*_matching(step, events), *scope(events)]
        if lower is not None:
            where.append(events.c.occurred_at > lower)
        candidates = (
            sa.select(
                events.c.contact_id,
                events.c.occurred_at.label("t"),
                sa.null().label("f"),
                sa.literal(1).label("k"),
            )
            .where(*where)
            .correlate_except(events)
        )
        earlier = sa.select(ends.c.contact_id, ends.c.t, ends.c.f, sa.literal(0).label("k"))
        both = sa.union_all(earlier, candidates).subquery()
        best = (
            sa.func.max(both.c.f)
            .filter(both.c.k == 0)
            .over(partition_by=both.c.contact_id, order_by=both.c.t, range_=_frame(step.gap))
        )
        windowed = sa.select(
            both.c.contact_id, both.c.t, both.c.k, sa.type_coerce(best, TIMESTAMP).label("f")
        ).subquery()
        rows = sa.select(windowed.c.contact_id, windowed.c.t, windowed.c.f).where(
            windowed.c.k == 1, windowed.c.f.is_not(None)
        )
    return rows.subquery()


def _starts(sequence: EventSequence, now: Moment, scope: Scope) -> sa.Subquery:
    """``(contact_id, start, f)`` of every chain: its start (``ek``, or ``ek + gap`` when no
    matching event follows within an absent step's gap) and its latest first event."""
    ends = _chain_ends(sequence, now, scope)
    absent = sequence.absent
    if absent is None:
        return sa.select(ends.c.contact_id, ends.c.t.label("start"), ends.c.f).subquery()
    assert absent.gap is not None
    followers = user_events.alias()
    follows = (
        sa.select(sa.literal(1))
        .where(
            *_matching(absent, followers),
            followers.c.contact_id == ends.c.contact_id,
            followers.c.occurred_at > ends.c.t,
            followers.c.occurred_at <= ends.c.t + _interval(absent.gap),
        )
        .correlate_except(followers)
    )
    return (
        sa.select(
            ends.c.contact_id,
            sa.type_coerce(ends.c.t + _interval(absent.gap), TIMESTAMP).label("start"),
            ends.c.f,
        )
        .where(~sa.exists(follows))
        .subquery()
    )


def _summary(sequence: EventSequence, now: Moment, starts: Any) -> tuple[Any, Any]:
    """``witness`` and ``upcoming`` as aggregates over ``starts``."""
    at = _at(now)
    witness = sa.func.max(starts.c.f).filter(starts.c.start <= at)
    future = [starts.c.start > at]
    if sequence.within is not None:
        future.append(starts.c.start <= starts.c.f + _interval(sequence.within))
    upcoming = sa.func.min(starts.c.start).filter(sa.and_(*future))
    return witness, upcoming


def sequence_chains(sequence: EventSequence, now: datetime, scope: Scope, name: str) -> sa.Subquery:
    """Set-wide: ``(contact_id, witness, upcoming)`` of every contact with a chain (the
    others have none: NULL, NULL after an outer join)."""
    starts = _starts(sequence, now, scope)
    witness, upcoming = _summary(sequence, now, starts)
    return (
        sa.select(starts.c.contact_id, witness.label("witness"), upcoming.label("upcoming"))
        .group_by(starts.c.contact_id)
        .subquery(name)
    )


def sequence_facts(sequence: EventSequence, now: Moment, contact_id: Any) -> ColumnElement[Any]:
    """Per contact (a column of the enclosing query): ``ARRAY[witness, upcoming]``."""

    def scope(events: Any) -> list[ColumnElement[bool]]:
        return [events.c.contact_id == contact_id]

    starts = _starts(sequence, now, scope)
    witness, upcoming = _summary(sequence, now, starts)
    found: ColumnElement[Any] = sa.select(
        pg_array([witness, upcoming], type_=TIMESTAMP)
    ).scalar_subquery()
    return sa.type_coerce(found, ARRAY(TIMESTAMP))
