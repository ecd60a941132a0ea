"""Instants in property values (SPEC §3.4): one definition for Python and SQL.

A value **is an instant** iff it is a string matching
``YYYY-MM-DD[THH:MM[:SS[.ffffff]](Z|±HH:MM)]`` that names a real calendar date and time: ASCII
digits, years 0001-9999, no hour 24, no second 60, offsets up to ±23:59; a date alone is
midnight UTC. An instant is held in UTC, and one that falls outside the years 0001-9999 in UTC
(possible only with an offset on the first or last day) is not an instant. Anything else
(numbers, naive date-times, other formats) is not an instant and never matches ``before`` /
``after`` / ``within_past`` / ``within_next``.

:data:`SHAPE` already refuses out-of-range fields (months, hours, minutes, seconds, offsets), so
what is left to check is the day of the month (and year 0000): Python's ``datetime`` does it,
and :func:`instant_sql` does it with ``make_date`` on the month's first day, so the cast can
never fail inside a query; the offset is subtracted by hand (PostgreSQL's casts refuse offsets
beyond ±15:59, the spec allows ±23:59).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql.elements import ColumnElement

_HOUR = "([01][0-9]|2[0-3])"
_MINUTE = "[0-5][0-9]"
# The spec's regex with every field range written out ([0-9], never \d: ASCII digits only).
DATE_SHAPE = "[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
TIME_SHAPE = f"T{_HOUR}:{_MINUTE}(:{_MINUTE}(\\.[0-9]{{1,6}})?)?(Z|[+-]{_HOUR}:{_MINUTE})"
SHAPE = f"{DATE_SHAPE}({TIME_SHAPE})?"
_SHAPE = re.compile(SHAPE)
TIMESTAMP = sa.DateTime(timezone=True)
FIRST = datetime(1, 1, 1, tzinfo=UTC)
LAST = datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)


def shifted(now: datetime | ColumnElement[Any], by: timedelta) -> ColumnElement[Any]:
    """``now + by``: a bound instant, or arithmetic on a bound parameter."""
    if isinstance(now, datetime):
        return sa.literal(now + by, TIMESTAMP)
    return now + sa.literal(by, sa.Interval)


_FIELDS = re.compile(
    "([0-9]{4})-([0-9]{2})-([0-9]{2})"
    "(?:T([0-9]{2}):([0-9]{2})(?::([0-9]{2})(?:[.]([0-9]{1,6}))?)?(?:Z|([+-])([0-9]{2}):([0-9]{2})))?"
)


def parse_instant(value: object) -> datetime | None:
    """The instant ``value`` names, or None when it is not an instant."""
    if not isinstance(value, str) or not _SHAPE.fullmatch(value):
        return None
    fields = _FIELDS.fullmatch(value)
    assert fields is not None  # the same shape, with its fields in groups
    year, month, day, hour, minute, second, fraction, sign, zone_hours, zone_minutes = (
        fields.groups()
    )
    zone: timezone = UTC
    if sign is not None:
        offset = timedelta(hours=int(zone_hours), minutes=int(zone_minutes))
        zone = timezone(-offset if sign == "-" else offset)
    try:
        local = datetime(
            int(year),
            int(month),
            int(day),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((fraction or "0").ljust(6, "0")),
            tzinfo=zone,
        )
        return local.astimezone(UTC)
    except ValueError:  # no such day (2026-02-30), or year 0000
        return None
    except OverflowError:  # in UTC before year 1 or after 9999 (an offset on an edge day)
        return None


def instant_sql(
    value: ColumnElement[Any], text: ColumnElement[Any], *, real_date: bool = False
) -> ColumnElement[Any]:
    """The instant a jsonb ``value`` (its text form ``text``) names, NULL when it is not one.
    Nested ``CASE``s: each test runs only once the previous one held (``AND`` promises no
    order), so the cast never sees a string it would refuse.

    ``real_date``: the caller has made sure that the text starts with a real date in the years
    0002-9998 (one of a list of such dates: see ``instant_predicate``). No other value can
    start so (a JSON number, boolean, array or object cannot), so only the rest of the text is
    tested: the regex runs over the time of day alone, the date's checks are skipped."""
    if real_date:
        rest = sa.func.substr(text, 11)
        timed = sa.case(
            (sa.func.length(text) == 10, sa.true()), else_=rest.op("~")(f"^{TIME_SHAPE}$")
        )
        return sa.case((timed, _cast(text)), else_=sa.null())
    shaped = sa.case(
        (sa.func.jsonb_typeof(value) == "string", text.op("~")(f"^{SHAPE}$")), else_=sa.false()
    )
    year = sa.cast(sa.func.substr(text, 1, 4), sa.Integer)
    month = sa.cast(sa.func.substr(text, 6, 2), sa.Integer)
    day = sa.cast(sa.func.substr(text, 9, 2), sa.Integer)
    first = sa.func.make_date(year, month, 1)
    last_day = sa.func.date_part(
        "day",
        first + sa.literal_column("interval '1 month'") - sa.literal_column("interval '1 day'"),
    )
    cast = _cast(text)
    # Only an offset on a day of year 0001 or 9999 can leave the years Python holds: other
    # years skip that test (the conversion is the costly part; it runs once for them).
    in_range = cast.between(sa.literal(FIRST, TIMESTAMP), sa.literal(LAST, TIMESTAMP))
    held = sa.case((year.between(2, 9998), cast), (in_range, cast), else_=sa.null())
    real = sa.case((day <= last_day, held), else_=sa.null())
    return sa.case((shaped, sa.case((year >= 1, real), else_=sa.null())), else_=sa.null())


def _cast(text: ColumnElement[Any]) -> ColumnElement[Any]:
    """The instant of a text in the shape (checked before): its local date and time, less its
    offset, applied by hand (PostgreSQL's casts refuse offsets beyond 15:59)."""
    is_date = sa.func.length(text) == 10
    zulu = sa.func.right(text, 1) == "Z"
    local = sa.case(
        (is_date, text.concat("T00:00:00")),
        (zulu, sa.func.left(text, -1)),  # all but the last character
        else_=sa.func.left(text, -6),
    )
    offset = sa.case(
        (sa.or_(is_date, zulu), sa.literal_column("interval '0'")),
        else_=sa.cast(sa.func.right(text, 6), sa.Interval),
    )
    return sa.func.timezone("UTC", sa.cast(local, sa.DateTime(timezone=False)) - offset)
