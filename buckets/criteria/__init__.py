"""The criteria language: one semantics, two executors (SPEC §3).

* :mod:`.model` — the node tree and its validation; :mod:`.builder` — the fluent ``b``;
* :mod:`.evaluate` — one contact in Python; :mod:`.compile` — every contact in SQL;
* :mod:`.clock` — when the clock alone can change an answer; :mod:`.compile_clock` — its SQL.
"""

from __future__ import annotations

from buckets.criteria.builder import b
from buckets.criteria.clock import State, decisive_count, in_memory_state
from buckets.criteria.compile import (
    CompiledCriteria,
    compile_criteria,
    member_select,
    probe_predicate,
)
from buckets.criteria.compile_clock import Facts, clock_select, leaf_facts
from buckets.criteria.durations import parse_duration
from buckets.criteria.evaluate import Event, counts_counter, evaluate, in_memory_counter
from buckets.criteria.model import (
    Composite,
    CriteriaError,
    EventCondition,
    Node,
    PropertyCondition,
    parse_criteria,
)

__all__ = [
    "CompiledCriteria",
    "Composite",
    "CriteriaError",
    "Event",
    "EventCondition",
    "Facts",
    "Node",
    "PropertyCondition",
    "State",
    "b",
    "clock_select",
    "compile_criteria",
    "counts_counter",
    "decisive_count",
    "evaluate",
    "in_memory_counter",
    "in_memory_state",
    "leaf_facts",
    "member_select",
    "parse_criteria",
    "parse_duration",
    "probe_predicate",
]
