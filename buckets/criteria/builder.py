"""The fluent builder ``b``: a readable way to write the literal criteria tree.

Every builder call returns exactly the literal form (plain dicts, durations as given), so
``b.event("x").within("7d").exists() == {"type": "event", "event": "x", "check": "exists",
"within": "7d"}``. Nothing is validated here: :func:`buckets.define_bucket` validates the whole
tree at once, so every error names the bucket and the path of the problem.

    b.prop("plan").eq("pro")
    b.event("purchase.completed").within("30d").where(b.prop("amount").gte(50)).at_least(2)
    b.all(b.event("feature.used").exists(), b.event("feature.used").within("7d").not_exists())
    b.sequence(b.step("cart.added"), b.step("order.completed", gap="1h", absent=True), within="7d")
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

Criteria = dict[str, Any]


class PropertyCriteria(dict[str, Any]):
    """A property condition in its literal form (a plain dict to every reader), which can also
    say how long the key has held its value:
    ``b.prop("plan").eq("trial").held_for(at_least="14d")``."""

    def held_for(self, *, at_least: Any = None, less_than: Any = None) -> PropertyCriteria:
        """``held_for: {at_least: D}`` or ``{less_than: D}`` (give exactly one)."""
        held: Criteria = {}
        if at_least is not None:
            held["at_least"] = at_least
        if less_than is not None:
            held["less_than"] = less_than
        return PropertyCriteria({**self, "held_for": held})


class PropertyBuilder:
    """Conditions on one property key, or a path of keys into nested objects:
    ``b.prop("plan").eq("pro")``, ``b.prop(["address", "country"]).in_(["DE", "FR"])``."""

    def __init__(self, key: str | list[str]) -> None:
        self._key = list(key) if isinstance(key, list | tuple) else key

    def _leaf(self, operator: str, *value: Any) -> PropertyCriteria:
        key = list(self._key) if isinstance(self._key, list) else self._key
        leaf = PropertyCriteria({"type": "property", "property": key, "operator": operator})
        if value:
            leaf["value"] = value[0]
        return leaf

    def eq(self, value: Any) -> PropertyCriteria:
        return self._leaf("eq", value)

    def neq(self, value: Any) -> PropertyCriteria:
        return self._leaf("neq", value)

    def gt(self, value: Any) -> PropertyCriteria:
        return self._leaf("gt", value)

    def gte(self, value: Any) -> PropertyCriteria:
        return self._leaf("gte", value)

    def lt(self, value: Any) -> PropertyCriteria:
        return self._leaf("lt", value)

    def lte(self, value: Any) -> PropertyCriteria:
        return self._leaf("lte", value)

    def contains(self, value: Any) -> PropertyCriteria:
        return self._leaf("contains", value)

    def exists(self) -> PropertyCriteria:
        return self._leaf("exists")

    def not_exists(self) -> PropertyCriteria:
        return self._leaf("not_exists")

    def in_(self, values: Any) -> PropertyCriteria:
        """Equal to one of ``values`` (a list of scalars)."""
        return self._leaf("in", list(values) if isinstance(values, tuple) else values)

    def not_in(self, values: Any) -> PropertyCriteria:
        """Equal to none of ``values`` (a missing key counts as none)."""
        return self._leaf("not_in", list(values) if isinstance(values, tuple) else values)

    def before(self, instant: Any) -> PropertyCriteria:
        """An instant earlier than ``instant`` (``"2026-03-01T09:00:00Z"``, ``"2026-03-01"``)."""
        return self._leaf("before", instant)

    def after(self, instant: Any) -> PropertyCriteria:
        return self._leaf("after", instant)

    def within_past(self, duration: Any) -> PropertyCriteria:
        """An instant in ``[now - duration, now]``."""
        return self._leaf("within_past", duration)

    def within_next(self, duration: Any) -> PropertyCriteria:
        """An instant in ``[now, now + duration]``: ``b.prop("trial_ends").within_next("3d")``."""
        return self._leaf("within_next", duration)


class EventBuilder:
    """Conditions on a contact's events of one name; ``within`` and ``where`` narrow them."""

    def __init__(
        self,
        name: str,
        within: timedelta | str | None = None,
        where: tuple[Criteria, ...] = (),
        older_than: timedelta | str | None = None,
    ) -> None:
        self._name = name
        self._within = within
        self._where = where
        self._older_than = older_than

    def within(self, duration: timedelta | str) -> EventBuilder:
        """Count only events in ``[now - duration, now]``."""
        return EventBuilder(self._name, duration, self._where, self._older_than)

    def older_than(self, duration: timedelta | str) -> EventBuilder:
        """Count only events with ``occurred_at < now - duration`` (with :meth:`within`:
        ``now - within <= occurred_at < now - duration``)."""
        return EventBuilder(self._name, self._within, self._where, duration)

    def where(self, *conditions: Criteria) -> EventBuilder:
        """Count only events whose own properties satisfy every condition."""
        return EventBuilder(self._name, self._within, self._where + conditions, self._older_than)

    def _leaf(
        self,
        check: str,
        operator: str | None = None,
        value: Any = None,
        key: str | list[str] | None = None,
    ) -> Criteria:
        leaf: Criteria = {"type": "event", "event": self._name, "check": check}
        if key is not None:
            leaf["property"] = key
        if operator is not None:
            leaf["operator"] = operator
            leaf["value"] = value
        if self._within is not None:
            leaf["within"] = self._within
        if self._older_than is not None:
            leaf["older_than"] = self._older_than
        if self._where:
            leaf["where"] = list(self._where)
        return leaf

    def exists(self) -> Criteria:
        return self._leaf("exists")

    def not_exists(self) -> Criteria:
        return self._leaf("not_exists")

    def last(self) -> Criteria:
        """The most recent event (inside :meth:`within`, if given) satisfies every
        :meth:`where` condition: ``b.event("plan.set").where(b.prop("to").eq("pro")).last()``."""
        return self._leaf("last")

    def regularly(
        self,
        period: timedelta | str,
        periods: int,
        min_periods: int,
        operator: str | None = None,
        value: int | None = None,
    ) -> Criteria:
        """At least ``min_periods`` of the last ``periods`` periods of ``period`` each hold a
        count of events satisfying ``operator value`` (default: at least one):
        ``b.event("app.opened").regularly("1d", periods=7, min_periods=4)``."""
        leaf = self._leaf("regularly", operator, value)
        leaf.update(period=period, periods=periods, min_periods=min_periods)
        return leaf

    def count(self, operator: str, value: int) -> Criteria:
        """``count(op, n)`` with ``op`` one of gt, gte, lt, lte, eq."""
        return self._leaf("count", operator, value)

    def at_least(self, value: int) -> Criteria:
        return self.count("gte", value)

    def at_most(self, value: int) -> Criteria:
        return self.count("lte", value)

    def more_than(self, value: int) -> Criteria:
        return self.count("gt", value)

    def less_than(self, value: int) -> Criteria:
        return self.count("lt", value)

    def exactly(self, value: int) -> Criteria:
        return self.count("eq", value)

    def sum(self, key: str | list[str]) -> AggregateBuilder:
        """The sum of the events' numeric ``key`` (a key or a path): ``.sum("amount").gte(100)``."""
        return AggregateBuilder(self, "sum", key)

    def avg(self, key: str | list[str]) -> AggregateBuilder:
        return AggregateBuilder(self, "avg", key)

    def min(self, key: str | list[str]) -> AggregateBuilder:
        return AggregateBuilder(self, "min", key)

    def max(self, key: str | list[str]) -> AggregateBuilder:
        return AggregateBuilder(self, "max", key)


class AggregateBuilder:
    """The comparison of an aggregate: ``b.event("order").within("30d").sum("amount").gte(100)``."""

    def __init__(self, events: EventBuilder, check: str, key: str | list[str]) -> None:
        self._events, self._check = events, check
        self._key = list(key) if isinstance(key, list | tuple) else key

    def _compare(self, operator: str, value: Any) -> Criteria:
        return self._events._leaf(self._check, operator, value, self._key)

    def gt(self, value: Any) -> Criteria:
        return self._compare("gt", value)

    def gte(self, value: Any) -> Criteria:
        return self._compare("gte", value)

    def lt(self, value: Any) -> Criteria:
        return self._compare("lt", value)

    def lte(self, value: Any) -> Criteria:
        return self._compare("lte", value)

    def eq(self, value: Any) -> Criteria:
        return self._compare("eq", value)


class CriteriaBuilder:
    """The ``b`` entry point."""

    def prop(self, key: str | list[str]) -> PropertyBuilder:
        """A top-level key (``"a.b"`` is one key), or a list of keys: a nested path."""
        return PropertyBuilder(key)

    def event(self, name: str) -> EventBuilder:
        return EventBuilder(name)

    def all(self, *conditions: Criteria) -> Criteria:
        return {"type": "composite", "operator": "and", "conditions": list(conditions)}

    def any(self, *conditions: Criteria) -> Criteria:
        return {"type": "composite", "operator": "or", "conditions": list(conditions)}

    def not_(self, condition: Criteria) -> Criteria:
        return {"type": "composite", "operator": "not", "conditions": [condition]}

    def everyone(self) -> Criteria:
        return {"type": "everyone"}

    def in_bucket(self, bucket: Any) -> Criteria:
        """The contact is an active member of ``bucket`` (a :class:`~buckets.Bucket` or its
        id): ``{"type": "bucket", "bucket": id, "check": "member"}`` (SPEC §3.5)."""
        return {"type": "bucket", "bucket": _bucket_id(bucket), "check": "member"}

    def not_in_bucket(self, bucket: Any) -> Criteria:
        """The contact is not an active member of ``bucket`` (a ``Bucket`` or its id)."""
        return {"type": "bucket", "bucket": _bucket_id(bucket), "check": "not_member"}

    member = in_bucket
    not_member = not_in_bucket

    def manual(self) -> Criteria:
        """A manual bucket's criteria (the whole criteria, never inside another condition):
        its members change only through ``add_members`` / ``remove_members``."""
        return {"type": "manual"}

    def step(
        self,
        event: str,
        *where: Criteria,
        gap: timedelta | str | None = None,
        absent: bool = False,
    ) -> Criteria:
        """One step of a sequence: an event named ``event`` whose properties satisfy every
        ``where`` condition, at most ``gap`` after the previous step's event; ``absent``
        (the last step only, with a ``gap``): no such event within ``gap``."""
        found: Criteria = {"event": event}
        if where:
            found["where"] = list(where)
        if gap is not None:
            found["gap"] = gap
        if absent:
            found["absent"] = True
        return found

    def sequence(self, *steps: Criteria, within: timedelta | str | None = None) -> Criteria:
        """Events in order: ``b.sequence(b.step("cart.added"), b.step("order.completed",
        gap="1h", absent=True), within="7d")`` (the first step's event inside ``within``)."""
        node: Criteria = {"type": "sequence", "steps": list(steps)}
        if within is not None:
            node["within"] = within
        return node

    def sample(self, percent: float, salt: str | None = None) -> Criteria:
        """A stable ``percent`` of contacts (salted with the bucket id unless ``salt``)."""
        node: Criteria = {"type": "sample", "percent": percent}
        if salt is not None:
            node["salt"] = salt
        return node


def _bucket_id(bucket: Any) -> Any:
    """A bucket's id: the ``id`` of a ``Bucket`` object, else the value as given (validated
    with the tree)."""
    found = getattr(bucket, "id", bucket)
    return found if isinstance(found, str) else bucket


b = CriteriaBuilder()
