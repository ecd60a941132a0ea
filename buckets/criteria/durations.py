"""Durations: ``datetime.timedelta`` or ``"<n><unit>"`` strings (SPEC §1).

Units are ``s``, ``m``, ``h``, ``d``, ``w``; ``n`` is a positive integer written in ASCII
digits (``"٣d"`` is not three days). Bare numbers are rejected on purpose: in a YAML file
``within: 7`` could mean seconds or days. Durations must be positive and whole seconds (the
fingerprint normalises them to seconds), and at most :data:`MAX_DURATION` (36,500 days, about a
century): every instant the engine accepts lies in ``[BUCKETS_MIN_INSTANT,
BUCKETS_MAX_INSTANT]``, whose defaults leave that much room on both sides, so ``now - within``,
``now + max_dwell`` or ``occurred_at + within`` can never leave the range Python's ``datetime``
and PostgreSQL's ``interval`` represent.
"""

from __future__ import annotations

import re
from datetime import timedelta

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
MAX_DURATION = timedelta(days=36_500)
_PATTERN = re.compile(r"([0-9]+)([smhdw])")
_MAX_DIGITS = 12  # more digits than any duration up to MAX_DURATION in seconds needs


def parse_duration(value: object) -> timedelta:
    """A positive, whole-second ``timedelta`` from ``value``; ``ValueError`` says what is wrong."""
    if isinstance(value, timedelta):
        duration = value
    elif isinstance(value, str):
        match = _PATTERN.fullmatch(value.strip())
        if match is None:
            raise ValueError(
                f"cannot parse duration {_shown(value)} (expected <n><unit>, n in ASCII digits,"
                " unit one of s m h d w, e.g. '7d' or '90m')"
            )
        digits = match.group(1).lstrip("0") or "0"
        if len(digits) > _MAX_DIGITS:  # int() of a huge digit string is itself slow
            raise ValueError(_too_long(value))
        seconds = int(digits) * UNITS[match.group(2)]
        if seconds > duration_seconds(MAX_DURATION):
            raise ValueError(_too_long(value))
        duration = timedelta(seconds=seconds)
    else:
        raise ValueError(
            f"duration must be a timedelta or a string like '7d', got {type(value).__name__}"
            f" {value!r}"
        )
    if duration <= timedelta(0):
        raise ValueError("duration must be positive")
    if duration > MAX_DURATION:
        raise ValueError(_too_long(value))
    if duration.microseconds:
        raise ValueError("duration must be a whole number of seconds")
    return duration


def _shown(value: object) -> str:
    """``value`` for an error message: a repr, cut short (the input may be megabytes)."""
    text = repr(format_duration(value) if isinstance(value, timedelta) else value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _too_long(value: object) -> str:
    return f"duration {_shown(value)} is longer than the maximum of {MAX_DURATION.days:,} days"


def duration_seconds(duration: timedelta) -> int:
    """Whole seconds of a parsed duration (exact: parse_duration forbids fractions)."""
    return duration.days * 86_400 + duration.seconds


def format_duration(duration: timedelta) -> str:
    """The shortest ``"<n><unit>"`` spelling of ``duration`` (``"7d"``, ``"90m"``)."""
    seconds = duration_seconds(duration)
    for unit in ("w", "d", "h", "m"):
        if seconds % UNITS[unit] == 0:
            return f"{seconds // UNITS[unit]}{unit}"
    return f"{seconds}s"
