"""How long a contact's property key has had its value (SPEC §3.4 "held for").

Ingest records, per contact and top-level key, ``changed_at`` in ``contacts.property_changed_at``
(see :mod:`buckets.ingest`); a key with no recorded change takes ``contacts.created_at``. A
``held_for`` condition holds iff its property condition holds **and** ``changed_at <= now - D``
(``at_least``) / ``changed_at > now - D`` (``less_than``). For a path (``["address",
"country"]``) that is the top-level key's ``changed_at``: the record is per top-level key.

The executors read it from the same row as the properties:

* Python (the evaluator, clock states, explain): :class:`ContactProperties`, the properties
  mapping itself carrying the record, so every function that is handed a contact's properties
  can answer; a plain mapping has no history and a ``held_for`` leaf refuses it (a caller that
  forgot to fetch the record fails loudly, never answers from a guess);
* SQL: :func:`changed_at_sql` over the columns (``contacts`` or any row carrying them).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.sql.elements import ColumnElement

from buckets.criteria.instants import shifted
from buckets.criteria.model import PropertyCondition

TIMESTAMP = sa.DateTime(timezone=True)


class ContactProperties(dict[str, Any]):
    """A contact's properties with, per top-level key, when it last changed."""

    def __init__(
        self,
        properties: Mapping[str, Any] | None,
        changed: Mapping[str, Any] | None,
        created_at: datetime,
    ) -> None:
        super().__init__(properties or {})
        self.changed = {
            key: at if isinstance(at, datetime) else datetime.fromisoformat(at)
            for key, at in (changed or {}).items()
        }
        self.created_at = created_at

    def changed_at(self, key: str) -> datetime:
        """When ``key`` last changed (``created_at`` when no change is recorded)."""
        return self.changed.get(key, self.created_at)


def with_history(row: Any) -> Mapping[str, Any]:
    """The properties of a row that selected ``properties``, ``changed_at`` (the record) and
    ``created_at``; the plain properties when the row carries no record (``created_at`` NULL:
    the properties were not asked for)."""
    properties = row.properties or {}
    created_at = getattr(row, "created_at", None)
    if created_at is None:
        return properties
    return ContactProperties(properties, row.changed_at, created_at)


def changed_at(condition: PropertyCondition, properties: Mapping[str, Any]) -> datetime:
    """The ``changed_at`` of the condition's top-level key."""
    if not isinstance(properties, ContactProperties):
        raise ValueError("held_for needs when the contact's properties changed (ContactProperties)")
    return properties.changed_at(condition.top_key)


def held(condition: PropertyCondition, properties: Mapping[str, Any], now: datetime | None) -> bool:
    """The ``held_for`` part of ``condition`` (true without one)."""
    if condition.held_for is None:
        return True
    if now is None:
        raise ValueError("held_for needs the decision's now")
    return condition.held_for.holds(changed_at(condition, properties), now)


class History(NamedTuple):
    """The SQL columns holding a contact's record and its ``created_at``."""

    changed: ColumnElement[Any]
    created_at: ColumnElement[Any]


def changed_at_sql(condition: PropertyCondition, history: History) -> ColumnElement[Any]:
    """The key's ``changed_at`` in SQL (never NULL: ``created_at`` is NOT NULL)."""
    recorded = history.changed.op("->>")(sa.literal(condition.top_key, sa.Text))
    return sa.func.coalesce(sa.cast(recorded, TIMESTAMP), history.created_at)


def held_sql(
    condition: PropertyCondition,
    history: History | None,
    now: datetime | ColumnElement[Any] | None,
) -> ColumnElement[bool]:
    """The ``held_for`` part of ``condition`` in SQL (never NULL)."""
    assert condition.held_for is not None
    if history is None:
        raise ValueError("held_for needs the contact's property_changed_at and created_at")
    if now is None:
        raise ValueError("held_for needs the decision's now")
    old_enough = changed_at_sql(condition, history) <= shifted(now, -condition.held_for.span)
    return old_enough if condition.held_for.at_least is not None else sa.not_(old_enough)
