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
* Event ``count`` takes an integer ``value >= 0``; ``count lt 0`` is rejected (never true).
* Numbers must be finite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from buckets.criteria.durations import parse_duration

PropertyOperator = Literal[
    "eq", "neq", "gt", "gte", "lt", "lte", "contains", "exists", "not_exists"
]
CountOperator = Literal["gt", "gte", "lt", "lte", "eq"]
EventCheck = Literal["exists", "not_exists", "count"]

VALUELESS_OPERATORS = frozenset({"exists", "not_exists"})
NUMERIC_OPERATORS = frozenset({"gt", "gte", "lt", "lte"})
RESERVED_EVENT_PREFIX = "bucket:"

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


def is_number(value: object) -> bool:
    """JSON number: int or float, never bool (``True == 1`` in Python, not in the spec)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_scalar(value: object) -> bool:
    return value is None or isinstance(value, str | bool) or is_number(value)


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class PropertyCondition(_Node):
    """A condition on a top-level key of a properties object (the contact's or an event's)."""

    type: Literal["property"] = "property"
    property: str = Field(min_length=1)
    operator: PropertyOperator
    value: Any = None

    @model_validator(mode="after")
    def _value_fits_operator(self) -> PropertyCondition:
        given = "value" in self.model_fields_set
        value = self.value
        if self.operator in VALUELESS_OPERATORS:
            if given:
                raise _FieldError("value", f"operator {self.operator!r} takes no value")
        elif not given:
            raise _FieldError("value", f"operator {self.operator!r} needs a value")
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
        if isinstance(value, float) and not math.isfinite(value):
            raise _FieldError("value", f"must be a finite number, got {value!r}")
        return self


class EventCondition(_Node):
    """A condition on how many of the contact's events match (SPEC §3.1)."""

    type: Literal["event"] = "event"
    event: str = Field(min_length=1)
    check: EventCheck
    operator: CountOperator | None = None
    value: int | None = None
    within: Duration | None = None
    where: tuple[PropertyCondition, ...] | None = None

    @model_validator(mode="after")
    def _count_fields_fit_check(self) -> EventCondition:
        if self.event.startswith(RESERVED_EVENT_PREFIX):
            raise _FieldError(
                "event", f"event names starting with {RESERVED_EVENT_PREFIX!r} are reserved"
            )
        if self.check == "count":
            if self.operator is None:
                raise _FieldError("operator", "check 'count' needs one of gt, gte, lt, lte, eq")
            if self.value is None:
                raise _FieldError("value", "check 'count' needs an integer value >= 0")
            if self.value < 0:
                raise _FieldError("value", f"count value must be >= 0, got {self.value}")
            if self.operator == "lt" and self.value == 0:
                raise _FieldError("value", "count lt 0 can never be true")
        elif self.operator is not None or self.value is not None:
            field = "operator" if self.operator is not None else "value"
            raise _FieldError(field, f"check {self.check!r} takes no operator or value")
        if self.where is not None and not self.where:
            raise _FieldError("where", "must list at least one condition (or be left out)")
        return self

    def satisfied_by(self, count: int) -> bool:
        """Whether ``count`` matching events satisfy this condition."""
        if self.check == "exists":
            return count > 0
        if self.check == "not_exists":
            return count == 0
        assert self.operator is not None
        assert self.value is not None
        return compare_count(count, self.operator, self.value)


def compare_count(count: int, operator: str, value: int) -> bool:
    match operator:
        case "gt":
            return count > value
        case "gte":
            return count >= value
        case "lt":
            return count < value
        case "lte":
            return count <= value
        case "eq":
            return count == value
    raise AssertionError(operator)  # pragma: no cover - validated


class Composite(_Node):
    """``and`` / ``or`` of at least one node."""

    type: Literal["composite"] = "composite"
    operator: Literal["and", "or"]
    conditions: tuple[Node, ...] = Field(min_length=1)


Node: TypeAlias = PropertyCondition | EventCondition | Composite
Leaf: TypeAlias = PropertyCondition | EventCondition
Composite.model_rebuild()
NODE_TYPES: dict[str, type[_Node]] = {
    "property": PropertyCondition,
    "event": EventCondition,
    "composite": Composite,
}


def parse_criteria(data: object, path: str = "") -> Node:
    """Validate the literal form ``data`` (or an already parsed node) into a node tree."""
    if isinstance(data, PropertyCondition | EventCondition | Composite):
        return data
    if not isinstance(data, Mapping):
        raise CriteriaError(path, f"expected a condition object, got {type(data).__name__}")
    kind = data.get("type")
    if kind not in NODE_TYPES:
        where = _join(path, "type")
        if kind is None:
            raise CriteriaError(where, "required (one of 'property', 'event', 'composite')")
        raise CriteriaError(where, f"must be one of 'property', 'event', 'composite', got {kind!r}")
    fields = dict(data)
    if kind == "composite":
        fields["conditions"] = _parse_list(data, "conditions", path, parse_criteria)
    elif kind == "event" and data.get("where") is not None:
        fields["where"] = _parse_list(data, "where", path, _parse_where)
    return _validate(NODE_TYPES[kind], fields, path)


def _parse_where(data: object, path: str) -> PropertyCondition:
    node = parse_criteria(data, path)
    if not isinstance(node, PropertyCondition):
        raise CriteriaError(_join(path, "type"), "where conditions must be of type 'property'")
    return node


def _parse_list(data: Mapping[str, Any], key: str, path: str, parse: Any) -> Any:
    items = data.get(key)
    if items is None:
        return items
    if isinstance(items, str | bytes) or not isinstance(items, Sequence):
        raise CriteriaError(_join(path, key), f"expected a list, got {type(items).__name__}")
    return tuple(parse(item, f"{_join(path, key)}[{index}]") for index, item in enumerate(items))


def _validate(model: type[_Node], fields: dict[str, Any], path: str) -> Node:
    try:
        node = model.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = list(error["loc"])
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, _FieldError):
            loc.append(cause.field)
        raise CriteriaError(_join(path, _format_loc(loc)), _message(error)) from None
    assert isinstance(node, PropertyCondition | EventCondition | Composite)
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
    return [n for n in walk(node) if isinstance(n, PropertyCondition | EventCondition)]
