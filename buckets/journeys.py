"""Journeys: handlers triggered on ``bucket:entered`` and exited on ``bucket:left`` (SPEC §9).

(The dispatcher lands with the journeys issue; this module so far declares what a journey is,
so definitions and the registry can carry them.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from buckets.definitions import Bucket


@dataclass(frozen=True, eq=False)
class Journey:
    id: str
    trigger: str
    exit_on: tuple[str, ...]
    handler: Callable[..., Any]


def journey(
    *, id: str, trigger: str, exit_on: Sequence[str] = ()
) -> Callable[[Callable[..., Any]], Journey]:
    def register(handler: Callable[..., Any]) -> Journey:
        return Journey(
            id=id, trigger=str(trigger), exit_on=tuple(map(str, exit_on)), handler=handler
        )

    return register


def journeys_in(source: str, buckets: Iterable[Bucket]) -> list[Journey]:
    """Journeys defined next to the buckets of ``source`` (filled in by the journeys issue)."""
    return []
