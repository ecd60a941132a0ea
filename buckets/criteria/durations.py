"""Durations: ``datetime.timedelta`` or ``"<n><unit>"`` strings (SPEC §1).

Units are ``s``, ``m``, ``h``, ``d``, ``w``; ``n`` is a positive integer. Bare numbers are
rejected on purpose: in a YAML file ``within: 7`` could mean seconds or days. Durations must be
positive and whole seconds (the fingerprint normalises them to seconds).
"""

from __future__ import annotations

import re
from datetime import timedelta

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_PATTERN = re.compile(r"(\d+)([smhdw])")


def parse_duration(value: object) -> timedelta:
    """A positive, whole-second ``timedelta`` from ``value``; ``ValueError`` says what is wrong."""
    if isinstance(value, timedelta):
        duration = value
    elif isinstance(value, str):
        match = _PATTERN.fullmatch(value.strip())
        if match is None:
            raise ValueError(
                f"cannot parse duration {value!r} (expected <n><unit>, unit one of s m h d w,"
                " e.g. '7d' or '90m')"
            )
        try:
            duration = timedelta(seconds=int(match.group(1)) * UNITS[match.group(2)])
        except OverflowError:
            raise ValueError(f"duration {value!r} is too large") from None
    else:
        raise ValueError(
            f"duration must be a timedelta or a string like '7d', got {type(value).__name__}"
            f" {value!r}"
        )
    if duration <= timedelta(0):
        raise ValueError("duration must be positive")
    if duration.microseconds:
        raise ValueError("duration must be a whole number of seconds")
    return duration


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
