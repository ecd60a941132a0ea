"""Sequences in Python: which chains of events witness a :class:`.EventSequence` (SPEC §3.4).

A *chain* is one event per step that is not absent, each matching its step (name, ``where``),
strictly increasing in ``occurred_at``, each at most its step's ``gap`` after the previous one,
and, with an absent last step, no event matching that step in ``(ek, ek + gap]``. Whether a
chain is one does not depend on ``now``; ``now`` only decides *when* it witnesses the sequence:
from its **start** (``ek``, or ``ek + gap`` with an absent step) to its **end** (``e1 + within``,
or forever), bounds inclusive. So the sequence's value over time is a union of intervals, and
one dynamic programme over the contact's events gives the value and the clock at once:

* only chains with ``e1 >= now - within`` can witness now or later (the others have ended);
* per step, each matching event ``t`` keeps ``f``: the **latest** first event of a chain ending
  at ``t`` — the one that witnesses longest (``f`` is the max over the previous step's events in
  ``[t - gap, t)``, strictly before ``t``: equal timestamps never chain);
* :class:`Chains` ``witness``: the latest ``f`` over chains that have started (``start <= now``);
  the sequence holds iff there is one, and keeps holding at least until ``witness + within``;
* :class:`Chains` ``upcoming``: the earliest start after ``now`` of a chain that will witness
  at all (``start <= f + within``): an absent step's gap elapsing, or a future-stamped event.

The same programme is written in SQL with window functions (:mod:`.compile_sequence`), for the
clock set-wide and per contact; the member set and the probes use nested ``EXISTS`` instead.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from buckets.criteria.evaluate import Event, property_matches
from buckets.criteria.model import EventSequence, SequenceStep

Ends = list[tuple[datetime, datetime]]  # (occurred_at of the step's event, latest first event)


@dataclass(frozen=True)
class Chains:
    """What a sequence's chains say as of ``now`` (see the module docstring)."""

    witness: datetime | None  # the latest first event of a chain that holds now
    upcoming: datetime | None  # the first instant after now a chain not holding now starts to

    @property
    def value(self) -> bool:
        return self.witness is not None


def step_matches(step: SequenceStep, event: Event) -> bool:
    """``event`` has the step's name and satisfies every ``where`` condition."""
    if event.name != step.event:
        return False
    return all(property_matches(w, event.properties) for w in step.where or ())


def _extend(ends: Ends, times: Sequence[datetime], gap: timedelta | None) -> Ends:
    """The ends of the chains one step further: each of ``times`` (sorted) with the latest
    first event over the previous ends in ``[t - gap, t)`` (strictly before ``t``)."""
    instants = [t for t, _ in ends]
    found: Ends = []
    if gap is None:
        best: list[datetime] = []  # best[i]: the latest first event of ends[: i + 1]
        for _, first in ends:
            best.append(max(best[-1], first) if best else first)
        for t in times:
            before = bisect_left(instants, t)
            if before:
                found.append((t, best[before - 1]))
        return found
    for t in times:
        low, high = bisect_left(instants, t - gap), bisect_left(instants, t)
        if high > low:
            found.append((t, max(first for _, first in ends[low:high])))
    return found


def step_ends(sequence: EventSequence, events: Iterable[Event], now: datetime) -> list[Ends]:
    """Per step that is not absent, the ends of the chains through it (sorted by instant):
    events of any time (future ones too: they may start chains later), the first step's
    inside ``[now - within, ...)``, the later ones after ``now - within``."""
    history = list(events)
    lower = now - sequence.within if sequence.within is not None else None
    present = sequence.present
    first = sorted(
        (e.occurred_at, e.occurred_at)
        for e in history
        if step_matches(present[0], e) and (lower is None or e.occurred_at >= lower)
    )
    found = [first]
    for step in present[1:]:
        times = sorted(
            e.occurred_at
            for e in history
            if step_matches(step, e) and (lower is None or e.occurred_at > lower)
        )
        found.append(_extend(found[-1], times, step.gap))
    return found


def chain_starts(
    sequence: EventSequence, ends: Ends, events: Iterable[Event]
) -> list[tuple[datetime, datetime, datetime]]:
    """``(start, first, last)`` of the chains ending at ``ends`` (the last present step's): with
    an absent step, only those no matching event follows within its gap, starting at
    ``last + gap``."""
    absent = sequence.absent
    if absent is None:
        return [(last, first, last) for last, first in ends]
    assert absent.gap is not None
    gap = absent.gap
    missing = sorted(e.occurred_at for e in events if step_matches(absent, e))
    starts = []
    for last, first in ends:
        index = bisect_right(missing, last)
        if index == len(missing) or missing[index] > last + gap:
            starts.append((last + gap, first, last))
    return starts


def chains_of(sequence: EventSequence, events: Iterable[Event], now: datetime) -> Chains:
    """The sequence's :class:`Chains` as of ``now`` over a contact's events in memory."""
    history = list(events)
    ends = step_ends(sequence, history, now)[-1]
    starts = chain_starts(sequence, ends, history)
    within = sequence.within
    witness = max((first for start, first, _ in starts if start <= now), default=None)
    upcoming = min(
        (
            start
            for start, first, _ in starts
            if start > now and (within is None or start <= first + within)
        ),
        default=None,
    )
    return Chains(witness, upcoming)


def witness_chain(
    sequence: EventSequence, events: Iterable[Event], now: datetime
) -> list[datetime] | None:
    """The instants of one chain that holds as of ``now`` (the one that holds longest), or
    None: explain shows them."""
    history = list(events)
    per_step = step_ends(sequence, history, now)
    starts = [s for s in chain_starts(sequence, per_step[-1], history) if s[0] <= now]
    if not starts:
        return None
    _, first, last = max(starts, key=lambda s: (s[1], s[2]))
    chain = [last]
    for index in range(len(per_step) - 1, 0, -1):
        gap = sequence.present[index].gap
        t = chain[0]
        chain.insert(
            0,
            max(
                p
                for p, f in per_step[index - 1]
                if p < t and f == first and (gap is None or p >= t - gap)
            ),
        )
    return chain


def progress(sequence: EventSequence, events: Iterable[Event], now: datetime) -> int:
    """How many steps that are not absent a chain reaches with events up to ``now`` (inside
    ``within``): explain names the first step missing."""
    past = [e for e in events if e.occurred_at <= now]
    reached = 0
    for ends in step_ends(sequence, past, now):
        if not ends:
            break
        reached += 1
    return reached
