"""Journeys: what happens when a contact enters or leaves a bucket (SPEC §9).

    @journey(id="winback", trigger=went_dormant.entered, exit_on=[went_dormant.left])
    def winback(enrollment): ...

A journey is *triggered* by a transition name — ``bucket:entered:<id>`` / ``bucket:left:<id>``,
or the generic ``bucket:entered`` / ``bucket:left`` matching every bucket — and *exited* by the
names in ``exit_on``. Journeys are found next to their buckets: module-level ``Journey`` objects
(or lists of them) in the module, ``.py`` file or directory that ``BUCKETS_DEFINITIONS`` names.
The dispatcher (:mod:`buckets.dispatcher`) enrolls contacts and calls the handlers.

Decisions where the spec is silent: by default a journey runs at most once at a time per
contact (``concurrent=False``: a trigger while an enrollment is active is recorded as
``skipped``); ``exit_on`` may name any transition, entered or left; a handler is retried
``max_attempts`` times with exponential backoff from ``backoff`` (capped at one hour).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from buckets.criteria.durations import parse_duration
from buckets.definitions import Bucket, definition_modules
from buckets.errors import BucketsError

_NAME = re.compile(r"bucket:(entered|left)(?::(.+))?")
MAX_BACKOFF = timedelta(hours=1)


class JourneyError(BucketsError):
    """A journey definition is invalid; the message names the journey and the field."""

    def __init__(self, journey_id: str, field: str, message: str) -> None:
        super().__init__(f"journey {journey_id}: {field}: {message}")
        self.journey_id = journey_id
        self.field = field


@dataclass(frozen=True, eq=False)
class Journey:
    id: str
    trigger: str
    exit_on: tuple[str, ...]
    handler: Callable[..., Any]
    concurrent: bool = False
    max_attempts: int = 5
    backoff: timedelta = timedelta(seconds=30)

    def triggered_by(self, name: str) -> bool:
        """Does the transition ``name`` (``bucket:<kind>:<bucket_id>``) start this journey?"""
        return _matches(self.trigger, name)

    def exited_by(self, name: str) -> bool:
        return any(_matches(pattern, name) for pattern in self.exit_on)

    def retry_delay(self, attempts: int) -> timedelta:
        """The wait after the ``attempts``-th failed delivery."""
        delay: timedelta = self.backoff * (2 ** max(attempts - 1, 0))
        return min(delay, MAX_BACKOFF)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # still callable as a function
        return self.handler(*args, **kwargs)


def _matches(pattern: str, name: str) -> bool:
    """``bucket:entered`` matches ``bucket:entered:<any id>``; a full name matches itself."""
    return name == pattern or (name.startswith(pattern + ":") and pattern.count(":") == 1)


def journey(
    *,
    id: str,
    trigger: str,
    exit_on: Sequence[str] = (),
    concurrent: bool = False,
    max_attempts: int = 5,
    backoff: timedelta | str = timedelta(seconds=30),
) -> Callable[[Callable[..., Any]], Journey]:
    """Declare a journey whose handler receives an :class:`~buckets.dispatcher.Enrollment`."""
    if not isinstance(id, str) or not id:
        raise JourneyError(str(id), "id", "must be a non-empty string")
    if isinstance(exit_on, str):
        raise JourneyError(id, "exit_on", "must be a list of transition names, not a string")
    if not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or max_attempts < 1:
        raise JourneyError(id, "max_attempts", f"must be an integer >= 1, got {max_attempts!r}")
    try:
        delay = parse_duration(backoff)
    except ValueError as exc:
        raise JourneyError(id, "backoff", str(exc)) from None
    for field, name in [("trigger", trigger), *(("exit_on", name) for name in exit_on)]:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise JourneyError(
                id,
                field,
                f"{name!r} is not a transition name (bucket:entered[:<bucket id>] or"
                " bucket:left[:<bucket id>])",
            )

    def register(handler: Callable[..., Any]) -> Journey:
        if not callable(handler):
            raise JourneyError(id, "handler", "must be callable")
        return Journey(
            id=id,
            trigger=str(trigger),
            exit_on=tuple(str(name) for name in exit_on),
            handler=handler,
            concurrent=concurrent,
            max_attempts=max_attempts,
            backoff=delay,
        )

    return register


def validate_journeys(journeys: Iterable[Journey], buckets: Iterable[Bucket]) -> list[Journey]:
    """Unique ids, and every bucket a trigger or exit names must be defined."""
    known = {bucket.id for bucket in buckets}
    seen: set[str] = set()
    checked = []
    for item in journeys:
        if item.id in seen:
            raise JourneyError(item.id, "id", "duplicate journey id")
        seen.add(item.id)
        for field, name in [("trigger", item.trigger), *(("exit_on", n) for n in item.exit_on)]:
            match = _NAME.fullmatch(name)
            assert match is not None  # checked by journey()
            if match.group(2) is not None and match.group(2) not in known:
                raise JourneyError(item.id, field, f"unknown bucket {match.group(2)!r} in {name!r}")
        checked.append(item)
    return checked


def journeys_in(source: str, buckets: Iterable[Bucket]) -> list[Journey]:
    """Journeys defined next to the buckets of ``source``, validated against them."""
    found: list[Journey] = []
    for module in definition_modules(source):
        for value in vars(module).values():
            for candidate in value if isinstance(value, list | tuple) else (value,):
                if isinstance(candidate, Journey) and all(candidate is not j for j in found):
                    found.append(candidate)
    return validate_journeys(found, buckets)
