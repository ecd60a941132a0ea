"""The criteria tree: pydantic nodes (``extra="forbid"``), parsed with precise error paths.

Three node kinds (SPEC §3.1): :class:`PropertyCondition`, :class:`EventCondition` and
:class:`Composite`. :func:`parse_criteria` turns the literal form (plain dicts, as in YAML files
and as produced by the builder ``b``) into nodes, raising :class:`CriteriaError` with the path
of the first problem (``conditions[1].within: duration must be positive``).

Value rules (decisions where the spec is silent):

* ``eq`` / ``neq`` compare against a JSON scalar (string, number, boolean or null); ``eq null``
  matches a key present with JSON null. Arrays and objects are rejected: their equality is not
  type-strict inside PostgreSQL's jsonb (``[1] = [1.0]``) nor in Python (``[True] == [1]``).
* ``contains`` takes a scalar too (array containment of objects is not equality in jsonb).
* ``gt gte lt lte`` take a number (not a boolean); ``exists`` / ``not_exists`` take no value.
* Event ``count`` takes an integer ``0 <= value <= 1,000,000,000`` (:data:`MAX_COUNT`);
  ``count lt 0`` is rejected (never true).
* Numbers must be finite and representable as JSON; every string (event names, property keys,
  values) must be text PostgreSQL can store: no NUL, no lone surrogates.

Size limits, so that a definition accepted here also compiles and runs (checked while parsing,
before any recursion could go deeper, with the path of the offending node):

* at most :data:`MAX_DEPTH` (12) levels of nesting (the root is level 1; ``where`` conditions
  are one level below their event);
* at most :data:`MAX_CONDITIONS` (256) conditions, property and event, ``where`` included;
* at most :data:`MAX_EVENT_CONDITIONS` (64) of them event conditions. The set-wide queries
  (members, clock) outer-join one aggregate per event name: about 450 of them exhaust Python's
  recursion limit while compiling, and PostgreSQL's planning time grows steeply with them
  (measured on PostgreSQL 15 without JIT, over 100 contacts: 0.16 s at 64, 0.4 s at 128,
  3.9 s at 256, 17 s at 400). Property conditions are cheap. Each step of a sequence counts
  as one event condition;
* at most :data:`MAX_STEPS` (16) steps in a sequence: its SQL nests a level of subqueries per
  step (the clock's window functions, the members' ``EXISTS``), and past about 40 levels
  compiling it exhausts Python's recursion limit.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from buckets.criteria.durations import MAX_DURATION, format_duration, parse_duration
from buckets.criteria.instants import parse_instant
from buckets.inputs import text_problem

PropertyOperator = Literal[
    "eq",
    "neq",
    "gt",
    "gte",
    "lt",
    "lte",
    "contains",
    "exists",
    "not_exists",
    "in",
    "not_in",
    "before",
    "after",
    "within_past",
    "within_next",
]
CountOperator = Literal["gt", "gte", "lt", "lte", "eq"]
EventCheck = Literal[
    "exists", "not_exists", "count", "sum", "avg", "min", "max", "last", "regularly"
]
AGGREGATE_CHECKS = frozenset({"sum", "avg", "min", "max"})

VALUELESS_OPERATORS = frozenset({"exists", "not_exists"})
NUMERIC_OPERATORS = frozenset({"gt", "gte", "lt", "lte"})
LIST_OPERATORS = frozenset({"in", "not_in"})
INSTANT_OPERATORS = frozenset({"before", "after"})  # compare with a fixed instant
CLOCK_OPERATORS = frozenset({"within_past", "within_next"})  # compare with now: the clock moves
INSTANT_EXAMPLE = "an instant with an offset (2026-03-01T09:00:00Z) or a date (2026-03-01)"
MAX_LIST = 1_000  # values of an ``in`` / ``not_in`` list
MAX_PATH = 16  # keys of a property path
MAX_SALT = 200  # characters of a sample's salt
RESERVED_EVENT_PREFIX = "bucket:"
MAX_COUNT = 1_000_000_000
MAX_DEPTH = 12
MAX_CONDITIONS = 256
MAX_EVENT_CONDITIONS = 64
MAX_STEPS = 16  # of a sequence: its SQL nests a subquery per step (see the module docstring)
MAX_PERIODS = 52  # periods of a ``regularly`` check
MAX_SPAN = MAX_DURATION  # periods x period of a ``regularly`` check (instants stay in range)

Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
Scalar: TypeAlias = str | int | float | bool | None


class CriteriaError(ValueError):
    """A criteria tree is invalid; ``path`` locates the problem inside the tree."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


class _FieldError(ValueError):
    """Raised by model validators so the error path names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _storable(field: str, text: str) -> None:
    problem = text_problem(text)
    if problem is not None:
        raise _FieldError(field, problem)


def is_number(value: object) -> bool:
    """JSON number: int or float, never bool (``True == 1`` in Python, not in the spec)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_scalar(value: object) -> bool:
    return value is None or isinstance(value, str | bool) or is_number(value)


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _path_form(value: object) -> object:
    """A list of keys becomes a tuple (hashable); a one-key list is that key (same meaning,
    same fingerprint)."""
    if isinstance(value, list | tuple):
        if len(value) == 1 and isinstance(value[0], str):
            return value[0]
        return tuple(value)
    return value


def _list_form(data: Any) -> Any:
    """Lists become tuples (hashable); the durations of ``within_past`` / ``within_next`` are
    parsed (a located error when they are not durations)."""
    if not isinstance(data, Mapping):
        return data
    operator = data.get("operator")
    if operator in LIST_OPERATORS and isinstance(data.get("value"), list):
        return {**data, "value": tuple(data["value"])}
    if operator in CLOCK_OPERATORS and "value" in data and data["value"] is not None:
        try:
            return {**data, "value": parse_duration(data["value"])}
        except ValueError as exc:
            raise _FieldError("value", str(exc)) from None
    return data


def _check_path(path: tuple[str, ...]) -> None:
    if not path:
        raise _FieldError("property", "a path needs at least one key")
    if len(path) > MAX_PATH:
        raise _FieldError("property", f"a path has at most {MAX_PATH} keys")
    for key in path:
        if not key:
            raise _FieldError("property", "keys must not be empty")
        _storable("property", key)


def _check_list(operator: str, value: object) -> None:
    if not isinstance(value, tuple):
        raise _FieldError(
            "value", f"operator {operator!r} needs a list, got {type(value).__name__}"
        )
    if not value:
        raise _FieldError("value", f"operator {operator!r} needs a non-empty list")
    if len(value) > MAX_LIST:
        raise _FieldError("value", f"a list has at most {MAX_LIST:,} values")
    for index, item in enumerate(value):
        if item is None:
            raise _FieldError(
                f"value[{index}]", "null is not allowed in a list (use exists/not_exists)"
            )
        if not is_scalar(item):
            raise _FieldError(
                f"value[{index}]",
                f"must be a string, number or boolean, got {type(item).__name__}",
            )
        _check_scalar(f"value[{index}]", item)


def _check_scalar(field: str, value: object) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise _FieldError(field, f"must be a finite number, got {value!r}")
    if isinstance(value, str):
        _storable(field, value)
    try:
        json.dumps(value)
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise _FieldError(field, f"cannot be written as JSON: {exc}") from None


class HeldFor(_Node):
    """``held_for`` (SPEC §3.4): how long the condition's top-level key has had its value,
    ``at_least`` or ``less_than`` a duration (exactly one). The key's ``changed_at`` is the
    instant ingest last gave it a different value (``contacts.property_changed_at``), or the
    contact's ``created_at`` when none is recorded."""

    at_least: Duration | None = None
    less_than: Duration | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> HeldFor:
        if (self.at_least is None) == (self.less_than is None):
            raise ValueError("needs exactly one of at_least, less_than")
        return self

    @builtins.property
    def span(self) -> timedelta:
        found = self.at_least if self.at_least is not None else self.less_than
        assert found is not None  # validated
        return found

    def holds(self, changed_at: datetime, now: datetime) -> bool:
        """``changed_at <= now - D`` (``at_least``) / ``changed_at > now - D`` (``less_than``)."""
        old_enough = changed_at <= now - self.span
        return old_enough if self.at_least is not None else not old_enough

    def flips_at(self, changed_at: datetime, now: datetime) -> datetime | None:
        """The first instant after ``now`` at which :meth:`holds` changes (``changed_at + D``,
        when the clock alone reaches it: ``at_least`` matures, ``less_than`` expires)."""
        boundary = changed_at + self.span
        return boundary if boundary > now else None


class PropertyCondition(_Node):
    """A condition on a key, or a path of keys into nested objects (SPEC §3.4), of a
    properties object (the contact's or an event's). ``held_for`` (contact properties only)
    also asks how long the top-level key has had its value."""

    type: Literal["property"] = "property"
    property: Annotated[str | tuple[str, ...], BeforeValidator(_path_form)]
    operator: PropertyOperator
    value: Any = None
    held_for: HeldFor | None = None

    @model_validator(mode="before")
    @classmethod
    def _lists_are_tuples(cls, data: Any) -> Any:
        return _list_form(data)

    @builtins.property  # ``property`` is a field here
    def path(self) -> tuple[str, ...]:
        """The keys from the top level down (one key: a top-level key, dots and all)."""
        return (self.property,) if isinstance(self.property, str) else self.property

    @builtins.property
    def top_key(self) -> str:
        """The top-level key the condition reads (what the real-time index knows)."""
        return self.path[0]

    @model_validator(mode="after")
    def _value_fits_operator(self) -> PropertyCondition:
        _check_path(self.path)
        given = "value" in self.model_fields_set
        value = self.value
        if self.operator in VALUELESS_OPERATORS:
            if given:
                raise _FieldError("value", f"operator {self.operator!r} takes no value")
        elif not given:
            raise _FieldError("value", f"operator {self.operator!r} needs a value")
        elif self.operator in LIST_OPERATORS:
            _check_list(self.operator, value)
            return self
        elif self.operator in INSTANT_OPERATORS:
            if parse_instant(value) is None:
                raise _FieldError(
                    "value", f"operator {self.operator!r} needs {INSTANT_EXAMPLE}, got {value!r}"
                )
            return self
        elif self.operator in CLOCK_OPERATORS:
            if not isinstance(value, timedelta):
                raise _FieldError("value", f"operator {self.operator!r} needs a duration")
            return self
        elif self.operator in NUMERIC_OPERATORS:
            if not is_number(value):
                raise _FieldError(
                    "value", f"operator {self.operator!r} needs a number, got {value!r}"
                )
        elif not is_scalar(value):
            raise _FieldError(
                "value",
                f"operator {self.operator!r} needs a string, number, boolean or null,"
                f" got {type(value).__name__}",
            )
        _check_scalar("value", value)
        return self


class EventCondition(_Node):
    """A condition on the contact's events of one name (SPEC §3.1, §3.4): how many count, or
    an aggregate of a numeric property over them."""

    type: Literal["event"] = "event"
    event: str = Field(min_length=1)
    check: EventCheck
    operator: CountOperator | None = None
    value: Any = None  # count: an integer; aggregates: a number (checked below)
    within: Duration | None = None
    where: tuple[PropertyCondition, ...] | None = None
    property: Annotated[str | tuple[str, ...] | None, BeforeValidator(_path_form)] = None
    older_than: Duration | None = None  # only events with occurred_at < now - older_than count
    # check regularly: ``periods`` periods of ``period`` back from now, ``min_periods`` of them
    # with a count satisfying operator/value (default gte 1)
    period: Duration | None = None
    periods: int | None = None
    min_periods: int | None = None

    @model_validator(mode="after")
    def _count_fields_fit_check(self) -> EventCondition:
        _storable("event", self.event)
        if self.event.startswith(RESERVED_EVENT_PREFIX):
            raise _FieldError(
                "event", f"event names starting with {RESERVED_EVENT_PREFIX!r} are reserved"
            )
        if self.check == "count":
            self._check_count()
        elif self.check == "regularly":
            self._check_regularly()
        elif self.check in AGGREGATE_CHECKS:
            self._check_aggregate()
        elif self.operator is not None or self.value is not None:
            field = "operator" if self.operator is not None else "value"
            raise _FieldError(field, f"check {self.check!r} takes no operator or value")
        if self.property is not None and self.check not in AGGREGATE_CHECKS:
            raise _FieldError("property", f"check {self.check!r} takes no property")
        if self.where is not None and not self.where:
            raise _FieldError("where", "must list at least one condition (or be left out)")
        self._check_ages()
        return self

    def _check_ages(self) -> None:
        """``older_than`` and the fields of ``regularly``: where they are allowed."""
        if self.check != "regularly":
            for field in ("period", "periods", "min_periods"):
                if getattr(self, field) is not None:
                    raise _FieldError(field, "only allowed with check 'regularly'")
        if self.older_than is not None and self.check in ("last", "regularly"):
            raise _FieldError("older_than", f"not allowed with check {self.check!r}")
        if (
            self.older_than is not None
            and self.within is not None
            and self.older_than >= self.within
        ):
            raise _FieldError(
                "older_than",
                f"older_than ({format_duration(self.older_than)}) must be shorter than within"
                f" ({format_duration(self.within)}): no event could count",
            )
        for index, where in enumerate(self.where or ()):
            if where.held_for is not None:
                raise _FieldError(
                    f"where[{index}].held_for",
                    "held_for is not allowed in where (an event's properties have no history;"
                    " it applies to the contact's properties)",
                )
            if where.operator in CLOCK_OPERATORS:
                raise _FieldError(
                    f"where[{index}].operator",
                    f"{where.operator!r} compares with now and is not allowed in where"
                    " (an event's properties are read as of each decision; use before/after)",
                )

    def _check_count(self) -> None:
        if self.operator is None:
            raise _FieldError("operator", "check 'count' needs one of gt, gte, lt, lte, eq")
        if not isinstance(self.value, int) or isinstance(self.value, bool):
            raise _FieldError("value", f"check {self.check!r} needs an integer value >= 0")
        if self.value < 0:
            raise _FieldError("value", f"count value must be >= 0, got {self.value}")
        if self.value > MAX_COUNT:
            raise _FieldError("value", f"count value must be at most {MAX_COUNT:,}")
        if self.operator == "lt" and self.value == 0:
            raise _FieldError("value", "count lt 0 can never be true")

    def _check_regularly(self) -> None:
        if self.period is None:
            raise _FieldError("period", "check 'regularly' needs a period (a duration)")
        for field, low, high in (
            ("periods", 1, MAX_PERIODS),
            ("min_periods", 1, self.periods or MAX_PERIODS),
        ):
            value = getattr(self, field)
            if value is None:
                raise _FieldError(field, f"check 'regularly' needs {field} ({low} to {high})")
            if not low <= value <= high:
                bound = f"periods ({high})" if field == "min_periods" else str(high)
                raise _FieldError(field, f"must be between {low} and {bound}, got {value}")
        assert self.periods is not None
        if self.period * self.periods > MAX_SPAN:
            raise _FieldError(
                "periods",
                f"periods x period must be at most {MAX_SPAN.days:,} days"
                f" (got {self.periods} x {format_duration(self.period)})",
            )
        if self.within is not None:
            raise _FieldError("within", "not allowed with check 'regularly' (periods set the span)")
        if (self.operator is None) != (self.value is None):
            missing = "value" if self.value is None else "operator"
            raise _FieldError(
                missing, "a period's count needs both operator and value (or neither)"
            )
        if self.operator is not None:
            self._check_count()

    def _check_aggregate(self) -> None:
        if self.property is None:
            raise _FieldError("property", f"check {self.check!r} needs the property to aggregate")
        _check_path(self.aggregated)
        if self.operator is None:
            raise _FieldError("operator", f"check {self.check!r} needs one of gt, gte, lt, lte, eq")
        if self.value is None:
            raise _FieldError("value", f"check {self.check!r} needs a number")
        if not is_number(self.value):
            raise _FieldError("value", f"check {self.check!r} needs a number, got {self.value!r}")
        _check_scalar("value", self.value)

    @builtins.property  # ``property`` is a field here
    def aggregated(self) -> tuple[str, ...]:
        """The path of the event property an aggregate reads."""
        found = self.property
        assert found is not None
        return (found,) if isinstance(found, str) else found

    @builtins.property
    def count_value(self) -> int:
        """The ``value`` of a ``count`` check (an integer, validated)."""
        assert isinstance(self.value, int)
        return self.value

    @builtins.property
    def is_aggregate(self) -> bool:
        return self.check in AGGREGATE_CHECKS

    @builtins.property
    def lag(self) -> timedelta:
        """How long after its ``occurred_at`` an event starts to count: at once, or with
        ``older_than: D`` one microsecond after ``occurred_at + D`` (``occurred_at < now - D``)."""
        if self.older_than is None:
            return timedelta(0)
        return self.older_than + timedelta(microseconds=1)

    @builtins.property
    def is_regularly(self) -> bool:
        return self.check == "regularly"

    @builtins.property
    def span(self) -> timedelta:
        """``check: regularly``: how far back its periods reach (``periods x period``)."""
        assert self.period is not None
        assert self.periods is not None
        return self.period * self.periods

    def period_holds(self, count: int) -> bool:
        """Whether one period's count satisfies ``check: regularly`` (default ``gte 1``)."""
        if self.operator is None:
            return count >= 1
        return compare_count(count, self.operator, self.value)

    @builtins.property
    def count_without_events(self) -> int:
        """What the counter gives for a contact with no events: 0, but for ``regularly`` the
        number of periods an empty period satisfies (all or none)."""
        if self.is_regularly:
            assert self.periods is not None
            return self.periods if self.period_holds(0) else 0
        return 0

    @builtins.property
    def is_last(self) -> bool:
        """``check: last``: the most recent event counting by time must satisfy ``where``
        (which then tests that one event instead of choosing the events that count)."""
        return self.check == "last"

    @builtins.property
    def filtering(self) -> tuple[PropertyCondition, ...] | None:
        """The ``where`` conditions that choose which events count (none for ``last``)."""
        return None if self.is_last else self.where

    def satisfied_by(self, count: int) -> bool:
        """Whether ``count`` matching events satisfy this (counting) condition (``last``: 1
        when the last event satisfies ``where``, else 0)."""
        if self.check in ("exists", "last"):
            return count > 0
        if self.is_regularly:  # count: the periods that satisfy their count
            assert self.min_periods is not None
            return count >= self.min_periods
        if self.check == "not_exists":
            return count == 0
        assert self.operator is not None
        assert self.value is not None
        return compare_count(count, self.operator, self.value)

    def holds(self, found: int | Aggregate) -> bool:
        """Whether what the events give (a count, or an aggregate) satisfies the condition."""
        if isinstance(found, Aggregate):
            return found.satisfies(self)
        return self.satisfied_by(found)


# Exact decimal arithmetic (PostgreSQL ``numeric``): enough digits for any JSON number.
EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)


def exact(number: int | float | Decimal) -> Decimal:
    """The exact decimal of a JSON number (a float by its shortest repr, as JSON writes it)."""
    if isinstance(number, Decimal):
        return number
    return Decimal(repr(number)) if isinstance(number, float) else Decimal(number)


@dataclass(frozen=True)
class Aggregate:
    """What an aggregate condition reads from the events that count: how many numeric values,
    their exact sum, minimum and maximum (None without values)."""

    numbers: int = 0
    total: Decimal = Decimal(0)
    low: Decimal | None = None
    high: Decimal | None = None

    @classmethod
    def of(cls, values: Sequence[int | float | Decimal]) -> Aggregate:
        found = [exact(value) for value in values]
        if not found:
            return cls()
        total = Decimal(0)
        for value in found:
            total = EXACT.add(total, value)
        return cls(len(found), total, min(found), max(found))

    def satisfies(self, condition: EventCondition) -> bool:
        """SPEC §3.4: ``sum`` of nothing is 0; ``avg`` / ``min`` / ``max`` of nothing fail;
        ``avg <op> v`` is decided as ``sum <op> v * count`` (no rounding)."""
        assert condition.operator is not None
        assert condition.value is not None
        wanted = exact(condition.value)
        operator = condition.operator
        match condition.check:
            case "sum":
                return compare_count(self.total, operator, wanted)
            case "avg":
                scaled = EXACT.multiply(wanted, Decimal(self.numbers))
                return self.numbers > 0 and compare_count(self.total, operator, scaled)
            case "min":
                return self.low is not None and compare_count(self.low, operator, wanted)
            case "max":
                return self.high is not None and compare_count(self.high, operator, wanted)
        raise AssertionError(condition.check)  # pragma: no cover - validated


def compare_count(count: Any, operator: str, value: Any) -> bool:
    match operator:
        case "gt":
            return bool(count > value)
        case "gte":
            return bool(count >= value)
        case "lt":
            return bool(count < value)
        case "lte":
            return bool(count <= value)
        case "eq":
            return bool(count == value)
    raise AssertionError(operator)  # pragma: no cover - validated


class Composite(_Node):
    """``and`` / ``or`` of at least one node, or ``not`` of exactly one."""

    type: Literal["composite"] = "composite"
    operator: Literal["and", "or", "not"]
    conditions: tuple[Node, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _not_has_one_condition(self) -> Composite:
        if self.operator == "not" and len(self.conditions) != 1:
            raise _FieldError(
                "conditions", f"'not' takes exactly one condition, got {len(self.conditions)}"
            )
        return self


class Everyone(_Node):
    """True for every live contact (SPEC §3.4)."""

    type: Literal["everyone"] = "everyone"


class Sample(_Node):
    """A deterministic share of contacts: ``n mod 10000 < round(percent * 100)``, with ``n``
    the first 8 hex digits of ``sha256(salt + ":" + external_id)`` (SPEC §3.4). ``salt``
    defaults to the bucket id: :func:`buckets.define_bucket` writes it into the node."""

    type: Literal["sample"] = "sample"
    percent: Any
    salt: str | None = None

    @model_validator(mode="after")
    def _percent_in_range(self) -> Sample:
        percent = self.percent
        if not is_number(percent):
            raise _FieldError("percent", f"must be a number, got {type(percent).__name__}")
        if not (isinstance(percent, int) or math.isfinite(percent)) or not 0 < percent < 100:
            raise _FieldError("percent", f"must be between 0 and 100 (exclusive), got {percent!r}")
        exponent = Decimal(repr(percent)).as_tuple().exponent
        if isinstance(exponent, int) and exponent < -2:
            raise _FieldError("percent", f"at most two decimals, got {percent!r}")
        if self.salt is not None:
            if len(self.salt) > MAX_SALT:
                raise _FieldError("salt", f"at most {MAX_SALT} characters")
            _storable("salt", self.salt)
        return self

    @property
    def threshold(self) -> int:
        """``round(percent * 100)``, exactly (the percent has at most two decimals)."""
        return int(Decimal(repr(self.percent)) * 100)

    def salted(self) -> str:
        if self.salt is None:
            raise ValueError("a sample needs its salt (define_bucket sets it to the bucket id)")
        return self.salt

    def hits(self, external_id: str) -> bool:
        """Whether the contact ``external_id`` falls in the sample."""
        digest = hashlib.sha256(f"{self.salted()}:{external_id}".encode()).hexdigest()
        return int(digest[:8], 16) % 10_000 < self.threshold


class Manual(_Node):
    """A manual bucket's criteria (SPEC §3.5): membership changes only by explicit calls
    (:func:`buckets.add_members` / :func:`buckets.remove_members`, the CLI, the HTTP API). Only
    allowed as the whole criteria (the root): no executor evaluates it, and every producer that
    decides from criteria (ingest, the cron, the due queue, backfills) leaves the bucket alone."""

    type: Literal["manual"] = "manual"


class SequenceStep(_Node):
    """One step of a :class:`EventSequence`: an event of a name (with ``where`` on its own
    properties), at most ``gap`` after the previous step's event; the last step may be
    ``absent``: no such event within ``gap`` after the previous one (SPEC §3.4)."""

    event: str = Field(min_length=1)
    where: tuple[PropertyCondition, ...] | None = None
    gap: Duration | None = None
    absent: bool = False

    @model_validator(mode="after")
    def _step_fields(self) -> SequenceStep:
        _storable("event", self.event)
        if self.event.startswith(RESERVED_EVENT_PREFIX):
            raise _FieldError(
                "event", f"event names starting with {RESERVED_EVENT_PREFIX!r} are reserved"
            )
        if self.where is not None and not self.where:
            raise _FieldError("where", "must list at least one condition (or be left out)")
        for index, where in enumerate(self.where or ()):
            if where.operator in CLOCK_OPERATORS:
                raise _FieldError(
                    f"where[{index}].operator",
                    f"{where.operator!r} compares with now and is not allowed in where"
                    " (an event's properties are read as of each decision; use before/after)",
                )
        return self


class EventSequence(_Node):
    """Events in order (SPEC §3.4): true iff events ``e1 … ek`` exist for the steps that are
    not absent, each matching its step, strictly increasing in ``occurred_at``, each at most
    its step's ``gap`` after the previous one, all ``<= now``, ``e1`` inside ``within`` when
    set; with an absent last step, ``ek + gap <= now`` and no event matching that step in
    ``(ek, ek + gap]``. Any chain of events may witness it."""

    type: Literal["sequence"] = "sequence"
    steps: tuple[SequenceStep, ...]
    within: Duration | None = None

    @model_validator(mode="after")
    def _steps_fit(self) -> EventSequence:
        if len(self.steps) < 2:
            raise _FieldError(
                "steps", f"a sequence needs at least two steps, got {len(self.steps)}"
            )
        if len(self.steps) > MAX_STEPS:
            raise _FieldError("steps", f"a sequence has at most {MAX_STEPS} steps (the limit)")
        if self.steps[0].gap is not None:
            raise _FieldError("steps[0].gap", "the first step has no gap (nothing comes before it)")
        for index, step in enumerate(self.steps[:-1]):
            if step.absent:
                raise _FieldError(f"steps[{index}].absent", "only the last step may be absent")
        last = self.steps[-1]
        if last.absent and last.gap is None:
            raise _FieldError(
                f"steps[{len(self.steps) - 1}].gap",
                "an absent step needs a gap (how long after the previous step it must not happen)",
            )
        if last.absent and self.within is not None:
            assert last.gap is not None
            # A chain holds from ek + gap to e1 + within, and ek >= e1: never when gap > within.
            if last.gap > self.within:
                raise _FieldError(
                    f"steps[{len(self.steps) - 1}].gap",
                    "an absent step's gap longer than the sequence's within can never be true",
                )
        return self

    @builtins.property
    def present(self) -> tuple[SequenceStep, ...]:
        """The steps whose events must exist (all but an absent last step)."""
        return self.steps[:-1] if self.steps[-1].absent else self.steps

    @builtins.property
    def absent(self) -> SequenceStep | None:
        """The absent last step, if any."""
        return self.steps[-1] if self.steps[-1].absent else None

    @builtins.property
    def event_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(step.event for step in self.steps))


BUCKET_ID_PATTERN = r"[a-z0-9]+(?:[-_][a-z0-9]+)*"  # the slug of a bucket id (definitions)
MAX_BUCKET_ID = 64


class BucketReference(_Node):
    """``{type: bucket, bucket: <id>, check: member | not_member}`` (SPEC §3.5): whether the
    contact has an *active* membership in bucket ``<id>`` as the deciding transaction sees it.
    That the bucket exists and that references form no cycle needs every definition: checked
    where the set is loaded (:class:`buckets.registry.Registry`)."""

    type: Literal["bucket"] = "bucket"
    bucket: str
    check: Literal["member", "not_member"]

    @model_validator(mode="after")
    def _bucket_is_a_slug(self) -> BucketReference:
        if len(self.bucket) > MAX_BUCKET_ID or not re.fullmatch(BUCKET_ID_PATTERN, self.bucket):
            raise _FieldError(
                "bucket",
                f"must be a bucket id (a slug of at most {MAX_BUCKET_ID} characters),"
                f" got {self.bucket[:80]!r}",
            )
        return self

    def holds(self, member: bool) -> bool:
        """The value given whether the contact is an active member of the bucket."""
        return member == (self.check == "member")


Node: TypeAlias = (
    PropertyCondition
    | EventCondition
    | Composite
    | Everyone
    | Sample
    | EventSequence
    | BucketReference
    | Manual
)
Leaf: TypeAlias = (
    PropertyCondition | EventCondition | Everyone | Sample | EventSequence | BucketReference
)
NODE_CLASSES = (
    PropertyCondition,
    EventCondition,
    Composite,
    Everyone,
    Sample,
    EventSequence,
    BucketReference,
    Manual,
)
LEAF_CLASSES = (PropertyCondition, EventCondition, Everyone, Sample, EventSequence, BucketReference)
Composite.model_rebuild()
NODE_TYPES: dict[str, type[_Node]] = {
    "property": PropertyCondition,
    "event": EventCondition,
    "composite": Composite,
    "everyone": Everyone,
    "sample": Sample,
    "sequence": EventSequence,
    "bucket": BucketReference,
    "manual": Manual,
}
MANUAL_NOT_EVALUATED = (
    "a manual bucket's criteria are not evaluated: its members change only by"
    " add_members / remove_members"
)
MANUAL_ONLY_AT_ROOT = (
    "'manual' is only allowed as the whole criteria of a bucket (criteria: {type: manual})"
)
TYPE_NAMES = ", ".join(repr(name) for name in NODE_TYPES)


@dataclass
class _Budget:
    """What a tree may still hold while it is parsed (a shared sub-tree counts every time)."""

    conditions: int = MAX_CONDITIONS
    events: int = MAX_EVENT_CONDITIONS

    def spend(self, path: str, *, event: bool) -> None:
        self.conditions -= 1
        if self.conditions < 0:
            raise CriteriaError(
                path, f"more than {MAX_CONDITIONS} conditions in one criteria tree (the limit)"
            )
        self.events -= event
        if self.events < 0:
            raise CriteriaError(
                path,
                f"more than {MAX_EVENT_CONDITIONS} event conditions in one criteria tree"
                " (the limit)",
            )


def parse_criteria(data: object, path: str = "") -> Node:
    """Validate the literal form ``data`` (or an already parsed node) into a node tree."""
    return _parse(data, path, 1, _Budget())


def _parse(data: object, path: str, depth: int, budget: _Budget) -> Node:
    if depth > MAX_DEPTH:
        raise CriteriaError(path, f"nested deeper than {MAX_DEPTH} levels (the limit)")
    if isinstance(data, NODE_CLASSES):
        _check_parsed(data, path, depth, budget)
        return data
    if not isinstance(data, Mapping):
        raise CriteriaError(path, f"expected a condition object, got {type(data).__name__}")
    kind = data.get("type")
    if not isinstance(kind, str) or kind not in NODE_TYPES:
        where = _join(path, "type")
        if kind is None:
            raise CriteriaError(where, f"required (one of {TYPE_NAMES})")
        shown = kind if isinstance(kind, str) and len(kind) <= 40 else type(kind).__name__
        raise CriteriaError(where, f"must be one of {TYPE_NAMES}, got {shown!r}")
    if kind == "manual" and depth > 1:
        raise CriteriaError(_join(path, "type"), MANUAL_ONLY_AT_ROOT)
    for key in (
        "event",
        "property",
        "value",
        "salt",
        "bucket",
    ):  # before pydantic, which cannot say why
        text = data.get(key)
        problem = text_problem(text) if isinstance(text, str) else None
        if problem is not None:
            raise CriteriaError(_join(path, key), problem)
    fields = dict(data)
    if kind == "composite":
        fields["conditions"] = _parse_list(
            data, "conditions", path, lambda item, at: _parse(item, at, depth + 1, budget)
        )
    elif kind == "sequence" and data.get("steps") is not None:
        fields["steps"] = _parse_list(
            data, "steps", path, lambda item, at: _parse_step(item, at, depth + 1, budget)
        )
    else:
        budget.spend(path, event=kind == "event")
        if kind == "event" and data.get("where") is not None:
            fields["where"] = _parse_list(
                data, "where", path, lambda item, at: _parse_where(item, at, depth + 1, budget)
            )
    return _validate(NODE_TYPES[kind], fields, path)


def _check_parsed(node: Node, path: str, depth: int, budget: _Budget) -> None:
    """The size limits for a tree built from nodes directly (not from the literal form)."""
    if depth > MAX_DEPTH:
        raise CriteriaError(path, f"nested deeper than {MAX_DEPTH} levels (the limit)")
    if isinstance(node, Composite):
        for index, child in enumerate(node.conditions):
            _check_parsed(child, f"{_join(path, 'conditions')}[{index}]", depth + 1, budget)
        return
    if isinstance(node, EventSequence):
        for index, step in enumerate(node.steps):
            at = f"{_join(path, 'steps')}[{index}]"
            if depth + 1 > MAX_DEPTH:
                raise CriteriaError(at, f"nested deeper than {MAX_DEPTH} levels (the limit)")
            budget.spend(at, event=True)
            for number, where in enumerate(step.where or ()):
                _check_parsed(where, f"{_join(at, 'where')}[{number}]", depth + 2, budget)
        return
    if isinstance(node, Manual) and depth > 1:
        raise CriteriaError(_join(path, "type"), MANUAL_ONLY_AT_ROOT)
    budget.spend(path, event=isinstance(node, EventCondition))
    if isinstance(node, EventCondition):
        for index, where in enumerate(node.where or ()):
            _check_parsed(where, f"{_join(path, 'where')}[{index}]", depth + 1, budget)


def _parse_step(data: object, path: str, depth: int, budget: _Budget) -> SequenceStep:
    """A sequence's step: one event condition of the budget (each is a probe of its own)."""
    if depth > MAX_DEPTH:
        raise CriteriaError(path, f"nested deeper than {MAX_DEPTH} levels (the limit)")
    if isinstance(data, SequenceStep):
        budget.spend(path, event=True)
        for index, where in enumerate(data.where or ()):
            _check_parsed(where, f"{_join(path, 'where')}[{index}]", depth + 1, budget)
        return data
    if not isinstance(data, Mapping):
        raise CriteriaError(path, f"expected a step object, got {type(data).__name__}")
    text = data.get("event")
    problem = text_problem(text) if isinstance(text, str) else None
    if problem is not None:
        raise CriteriaError(_join(path, "event"), problem)
    budget.spend(path, event=True)
    fields = dict(data)
    if data.get("where") is not None:
        fields["where"] = _parse_list(
            data, "where", path, lambda item, at: _parse_where(item, at, depth + 1, budget)
        )
    step = _validated(SequenceStep, fields, path)
    assert isinstance(step, SequenceStep)
    return step


def _parse_where(data: object, path: str, depth: int, budget: _Budget) -> PropertyCondition:
    node = _parse(data, path, depth, budget)
    if not isinstance(node, PropertyCondition):
        raise CriteriaError(_join(path, "type"), "where conditions must be of type 'property'")
    return node


def _parse_list(
    data: Mapping[str, Any], key: str, path: str, parse: Callable[[object, str], _Node]
) -> Any:
    items = data.get(key)
    if items is None:
        return items
    if isinstance(items, str | bytes) or not isinstance(items, Sequence):
        raise CriteriaError(_join(path, key), f"expected a list, got {type(items).__name__}")
    return tuple(parse(item, f"{_join(path, key)}[{index}]") for index, item in enumerate(items))


def _validate(model: type[_Node], fields: dict[str, Any], path: str) -> Node:
    node = _validated(model, fields, path)
    assert isinstance(node, NODE_CLASSES)
    return node


def _validated(model: type[_Node], fields: dict[str, Any], path: str) -> _Node:
    try:
        node = model.model_validate(fields)
    except ValidationError as exc:
        errors = exc.errors()  # a misspelt key first: it explains the "required" next to it
        error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        loc = list(error["loc"])
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, _FieldError):
            loc.append(cause.field)
        raise CriteriaError(_join(path, _format_loc(loc)), _message(error)) from None
    return node


def _format_loc(loc: Sequence[int | str]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _message(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required"
    if kind == "too_short":
        return "must not be empty"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def _join(path: str, key: str) -> str:
    if not key:
        return path
    if not path or key.startswith("["):
        return f"{path}{key}"
    return f"{path}.{key}"


def walk(node: Node) -> list[Node]:
    """Every node of the tree, depth first, parents before children."""
    nodes: list[Node] = [node]
    if isinstance(node, Composite):
        for child in node.conditions:
            nodes.extend(walk(child))
    return nodes


def leaves(node: Node) -> list[Leaf]:
    return [n for n in walk(node) if isinstance(n, LEAF_CLASSES)]


def resolve_salts(node: Node, salt: str) -> Node:
    """``node`` with every sample that names no salt salted with ``salt`` (the bucket id)."""
    if isinstance(node, Sample) and node.salt is None:
        return node.model_copy(update={"salt": salt})
    if isinstance(node, Composite):
        children = tuple(resolve_salts(child, salt) for child in node.conditions)
        if children != node.conditions:
            return node.model_copy(update={"conditions": children})
    return node


def references(node: Node) -> list[BucketReference]:
    """The bucket references of the tree, in order, each once."""
    return list(dict.fromkeys(n for n in walk(node) if isinstance(n, BucketReference)))
