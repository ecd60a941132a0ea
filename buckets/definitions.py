"""Bucket definitions: ``define_bucket``, validation, the criteria fingerprint (SPEC §3.3, §4).

Every error is a :class:`DefinitionError` whose message names the bucket and the path of the
problem, e.g. ``went-dormant: criteria.conditions[1].within: duration must be positive``;
definitions loaded from files are also prefixed with the file.

Decisions where the spec is silent:

* ``id`` is a slug: lower-case letters and digits, single ``-``/``_`` between them, at most 64
  characters (it appears in transition names and idempotency keys, which use ``:``).
* ``entry_period`` is accepted only with ``entry_limit="once_per_period"`` (elsewhere it would
  be silently meaningless).
* All-negative criteria are allowed (SPEC §3.4 replaced the positive-leaf rule): a bucket that
  a contact with no data may match (``never purchased``, ``everyone``, a ``sample``) is decided
  for every contact when it is created (:attr:`Bucket.matches_new_contacts`), by backfills, and
  by the cron where the clock can join (:attr:`Bucket.cron_joins`).
* A ``sample`` without ``salt`` is salted with the bucket id, written into the tree here: the
  fingerprint then says which contacts the sample holds (two buckets with the same percent and
  no salt hold different contacts, and have different hashes).
* A manual bucket (``criteria: {type: manual}``, SPEC §3.5) takes no ``min_dwell``,
  ``max_dwell`` nor ``reconcile_joins``: they ask the cron to change memberships, and only
  explicit calls change a manual bucket's (see :mod:`buckets.manual`). Its entry limit applies.
* ``name`` and ``description`` must be text PostgreSQL can store (no NUL, no lone surrogates):
  they are stored with the deployed definition.

Loading files is bounded so a small hostile file cannot take minutes or gigabytes: JSON and
YAML nested deeper than :data:`MAX_DOCUMENT_DEPTH` (80) levels are refused before the parser
recurses that deep, and a YAML document whose aliases expand to more than
:data:`MAX_DOCUMENT_NODES` (200,000) nodes, or that refers to itself, is refused before it is
constructed (see :mod:`buckets.inputs`). Criteria have their own limits (depth, number of
conditions: :mod:`buckets.criteria.model`). Every loading error is one line.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import yaml

from buckets.criteria.clock import threshold
from buckets.criteria.durations import duration_seconds, parse_duration
from buckets.criteria.model import (
    CLOCK_OPERATORS,
    Aggregate,
    BucketReference,
    Composite,
    CriteriaError,
    EventCondition,
    EventSequence,
    Everyone,
    Leaf,
    Manual,
    Node,
    PropertyCondition,
    Sample,
    SequenceStep,
    leaves,
    parse_criteria,
    resolve_salts,
)
from buckets.errors import BucketsError
from buckets.inputs import InputError, load_yaml, loads_json, shorten, text_problem

EntryLimit = Literal["unlimited", "once", "once_per_period"]
ENTRY_LIMITS = ("unlimited", "once", "once_per_period")
_SLUG = re.compile(r"[a-z0-9]+(?:[-_][a-z0-9]+)*")
MAX_ID_LENGTH = 64
MAX_DOCUMENT_DEPTH = 80
MAX_DOCUMENT_NODES = 200_000


class DefinitionError(BucketsError):
    """A bucket definition is invalid. The message names the source (file or module, when
    loaded from one), the bucket and the path."""

    def __init__(self, bucket_id: str, path: str, message: str, *, source: str = "") -> None:
        where = ": ".join(part for part in (source, bucket_id, path) if part)
        super().__init__(f"{where}: {message}" if where else message)
        self.bucket_id = bucket_id
        self.path = path
        self.message = message
        self.source = source

    def located(self, source: str) -> DefinitionError:
        """The same error, attributed to ``source`` (a file or module)."""
        return DefinitionError(self.bucket_id, self.path, self.message, source=source)


class TransitionName(str):
    """``bucket:entered:<id>`` / ``bucket:left:<id>``: a string that knows its parts."""

    bucket_id: str
    kind: str

    def __new__(cls, kind: str, bucket_id: str) -> TransitionName:
        name = super().__new__(cls, f"bucket:{kind}:{bucket_id}")
        name.kind = kind
        name.bucket_id = bucket_id
        return name


@dataclass(frozen=True, eq=False)
class Bucket:
    """A validated bucket definition. Build it with :func:`define_bucket`. Derived facts
    (fingerprint, indexes) are computed once: the definition is immutable."""

    id: str
    name: str
    description: str
    enabled: bool
    criteria: Node
    entry_limit: EntryLimit
    entry_period: timedelta | None
    min_dwell: timedelta | None
    max_dwell: timedelta | None
    reconcile_joins: bool | None

    @property
    def entered(self) -> TransitionName:
        return TransitionName("entered", self.id)

    @property
    def left(self) -> TransitionName:
        return TransitionName("left", self.id)

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON of the criteria (SPEC §4)."""
        return criteria_fingerprint(self.criteria)

    @cached_property
    def manual(self) -> bool:
        """Membership changes only by explicit calls (SPEC §3.5): no producer that decides from
        criteria (ingest, the cron, the due queue, backfills) touches it."""
        return isinstance(self.criteria, Manual)

    @cached_property
    def time_based(self) -> bool:
        """The criteria contain a ``within`` window or an ``older_than`` age, or compare a
        property with now (``within_past`` / ``within_next``, ``held_for``)."""
        return any(
            (isinstance(leaf, EventCondition) and (leaf.within or leaf.older_than or leaf.period))
            or (
                isinstance(leaf, PropertyCondition)
                and (leaf.operator in CLOCK_OPERATORS or leaf.held_for is not None)
            )
            or (isinstance(leaf, EventSequence) and (leaf.within or leaf.absent))
            for leaf in leaves(self.criteria)
        )

    @cached_property
    def on_cron(self) -> bool:
        """The reconcile tick looks at this bucket (time-based, or min/max dwell)."""
        return self.time_based or self.max_dwell is not None or self.min_dwell is not None

    @cached_property
    def cron_joins(self) -> bool:
        """The cron joins matching non-members (SPEC §6.3): ``reconcile_joins`` true, or unset
        and the criteria have a clock-joinable leaf."""
        if self.reconcile_joins is not None:
            return self.reconcile_joins
        return clock_can_join(self.criteria)

    @cached_property
    def clocked(self) -> bool:
        """The clock alone can change some answer or membership of this bucket, so it has
        due-queue entries: an event leaf (a window, or a future-stamped event starting to
        count, SPEC §6.7) or a dwell limit."""
        return bool(self.event_names) or self.on_cron

    @cached_property
    def matches_new_contacts(self) -> bool:
        """A contact with no properties and no events may match (``count lt 2``,
        ``not_exists``, ``neq``, ``everyone``, a ``sample``, which depends on the external id):
        such buckets are decided for every contact when it is created, whatever its first
        event (nothing else would ever ask)."""
        return True in empty_contact_values(self.criteria)

    @cached_property
    def event_names(self) -> frozenset[str]:
        """Event names the criteria mention (the real-time path's index): every step of a
        sequence, absent ones included (their event may break a chain)."""
        names = {leaf.event for leaf in leaves(self.criteria) if isinstance(leaf, EventCondition)}
        for leaf in leaves(self.criteria):
            if isinstance(leaf, EventSequence):
                names.update(leaf.event_names)
        return frozenset(names)

    @cached_property
    def references(self) -> frozenset[str]:
        """The ids of the buckets the criteria refer to (SPEC §3.5)."""
        return frozenset(
            leaf.bucket for leaf in leaves(self.criteria) if isinstance(leaf, BucketReference)
        )

    @cached_property
    def property_keys(self) -> frozenset[str]:
        """Top-level contact property keys the criteria read (a path indexes its first key; not
        event ``where`` keys)."""
        return frozenset(
            leaf.top_key for leaf in leaves(self.criteria) if isinstance(leaf, PropertyCondition)
        )

    def to_dict(self) -> dict[str, Any]:
        """The definition in the literal form (durations as seconds), e.g. for storage."""
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "enabled": self.enabled,
            "criteria": canonical_criteria(self.criteria),
            "entry_limit": self.entry_limit,
            "entry_period": _seconds(self.entry_period),
            "min_dwell": _seconds(self.min_dwell),
            "max_dwell": _seconds(self.max_dwell),
            "reconcile_joins": self.reconcile_joins,
        }

    def __repr__(self) -> str:
        return f"Bucket(id={self.id!r}, fingerprint={self.fingerprint[:12]!r})"


def _seconds(duration: timedelta | None) -> int | None:
    return None if duration is None else duration_seconds(duration)


def define_bucket(
    *,
    id: str,
    criteria: Any,
    name: str | None = None,
    description: str = "",
    enabled: bool = True,
    entry_limit: str = "unlimited",
    entry_period: timedelta | str | None = None,
    min_dwell: timedelta | str | None = None,
    max_dwell: timedelta | str | None = None,
    reconcile_joins: bool | None = None,
) -> Bucket:
    """Validate a bucket definition (SPEC §4). ``criteria`` is the builder's result, a literal
    tree (plain dicts, as in YAML), or a parsed node."""
    bucket_id = _valid_id(id)

    def fail(path: str, message: str) -> DefinitionError:
        return DefinitionError(bucket_id, path, message)

    def duration(field: str, value: object) -> timedelta | None:
        if value is None:
            return None
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise fail(field, str(exc)) from None

    if name is not None and not isinstance(name, str):
        raise fail("name", f"must be a string, got {type(name).__name__}")
    if not isinstance(description, str):
        raise fail("description", f"must be a string, got {type(description).__name__}")
    for field, text in (("name", name or ""), ("description", description)):
        problem = text_problem(text)
        if problem is not None:
            raise fail(field, problem)
    if not isinstance(enabled, bool):
        raise fail("enabled", f"must be true or false, got {enabled!r}")
    if reconcile_joins is not None and not isinstance(reconcile_joins, bool):
        raise fail("reconcile_joins", f"must be true, false or unset, got {reconcile_joins!r}")
    if entry_limit not in ENTRY_LIMITS:
        raise fail("entry_limit", f"must be one of {', '.join(ENTRY_LIMITS)}, got {entry_limit!r}")
    period = duration("entry_period", entry_period)
    if entry_limit == "once_per_period" and period is None:
        raise fail("entry_period", "required with entry_limit 'once_per_period'")
    if entry_limit != "once_per_period" and period is not None:
        raise fail("entry_period", "only allowed with entry_limit 'once_per_period'")
    minimum = duration("min_dwell", min_dwell)
    maximum = duration("max_dwell", max_dwell)
    if minimum is not None and maximum is not None and maximum < minimum:
        raise fail("max_dwell", "must be at least min_dwell")

    try:
        tree = resolve_salts(parse_criteria(criteria, "criteria"), bucket_id)
    except CriteriaError as exc:
        raise fail(exc.path, exc.message) from None
    if isinstance(tree, Manual):
        _manual_fields(fail, min_dwell=minimum, max_dwell=maximum, reconcile_joins=reconcile_joins)

    return Bucket(
        id=bucket_id,
        name=name if name else bucket_id,
        description=description,
        enabled=enabled,
        criteria=tree,
        entry_limit=entry_limit,  # type: ignore[arg-type]
        entry_period=period,
        min_dwell=minimum,
        max_dwell=maximum,
        reconcile_joins=reconcile_joins,
    )


def _manual_fields(fail: Callable[[str, str], DefinitionError], **fields: object) -> None:
    """A manual bucket takes none of the fields that ask the cron to change members."""
    for field, given in fields.items():
        if given is not None:
            raise fail(
                field,
                "not allowed on a manual bucket (its members change only by explicit"
                " add/remove, never by the cron)",
            )


def _valid_id(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise DefinitionError("", "id", f"must be a non-empty string, got {shorten(value)}")
    if len(value) > MAX_ID_LENGTH or not _SLUG.fullmatch(value):
        raise DefinitionError(
            _key(value),
            "id",
            "must be a slug: lower-case letters and digits separated by single '-' or '_',"
            f" at most {MAX_ID_LENGTH} characters",
        )
    return value


def clock_joinable(leaf: Leaf) -> bool:
    """Time alone can turn the leaf from false to true (SPEC §6.2, §6.7)."""
    if isinstance(leaf, PropertyCondition):  # an instant coming into the window, or maturing
        held = leaf.held_for
        return leaf.operator in CLOCK_OPERATORS or (held is not None and held.at_least is not None)
    if isinstance(leaf, EventSequence):  # an absent step's gap elapsing
        return leaf.absent is not None
    if not isinstance(leaf, EventCondition):
        return False
    return _event_moves(leaf, to=True)


def _event_moves(leaf: EventCondition, *, to: bool) -> bool:
    """Time alone can turn the event leaf to ``to``: events leave a ``within`` window (the
    count falls) and age into ``older_than`` (it rises); an aggregate moves either way."""
    falls, rises = leaf.within is not None, leaf.older_than is not None
    if leaf.is_regularly:  # events move from period to period, and out of the last one
        return True
    if leaf.is_last:  # the last event leaving the window turns it false (none is newer)
        return falls and not to
    if leaf.is_aggregate:
        return falls or rises
    kind = threshold(leaf)[0]
    if kind == "eq":
        return falls or rises
    if (kind == "below") == to:  # "below" turns true as the count falls, "at_least" false
        return falls
    return rises


def clock_can_join(node: Node, negated: bool = False) -> bool:
    """Time alone can turn some leaf of ``node`` the way that may make the criteria true
    (SPEC §6.7): a clock-joinable leaf, or under ``not`` a leaf time can make false (a
    windowed ``exists`` / ``count gt|gte|eq`` whose events age out)."""
    if isinstance(node, Composite):
        flip = negated != (node.operator == "not")
        return any(clock_can_join(child, flip) for child in node.conditions)
    if not negated:
        return isinstance(
            node, EventCondition | PropertyCondition | EventSequence
        ) and clock_joinable(node)
    if isinstance(node, PropertyCondition):  # an instant leaving the window, or expiring
        held = node.held_for
        return node.operator in CLOCK_OPERATORS or (held is not None and held.less_than is not None)
    if isinstance(node, EventSequence):  # its first event leaving the window
        return node.within is not None
    return isinstance(node, EventCondition) and _event_moves(node, to=False)


def empty_contact_values(node: Node) -> set[bool]:
    """The values ``node`` may take for a contact with no properties and no events (a
    ``sample`` may take both: it depends on the external id)."""
    if isinstance(node, PropertyCondition):
        from buckets.criteria.evaluate import value_matches

        value = value_matches(node, {})
        # held_for: a new contact's keys are held since it was created, so at_least fails and
        # less_than holds; both are kept possible (a decision may be as of a later instant)
        return {value} if node.held_for is None else {value, False}
    if isinstance(node, EventCondition):
        return {node.holds(Aggregate() if node.is_aggregate else node.count_without_events)}
    if isinstance(node, EventSequence | Manual):  # no events, no chain; manual: nobody asks
        return {False}
    if isinstance(node, Everyone | Sample | BucketReference):
        return _static_values(node)
    children = [empty_contact_values(child) for child in node.conditions]
    if node.operator == "not":
        return {not value for value in children[0]}
    found: set[bool] = set()
    if node.operator == "and":
        if all(True in values for values in children):
            found.add(True)
        if any(False in values for values in children):
            found.add(False)
    else:
        if any(True in values for values in children):
            found.add(True)
        if all(False in values for values in children):
            found.add(False)
    return found


def _static_values(node: Everyone | Sample | BucketReference) -> set[bool]:
    if isinstance(node, Everyone):
        return {True}
    if isinstance(node, Sample):  # depends on the external id
        return {True, False}
    return {node.check == "not_member"}  # a new contact is in no bucket until decided


def canonical_criteria(node: Node) -> dict[str, Any]:
    """The literal form with only the keys that carry meaning; durations in seconds. (Part 1
    nodes keep exactly their part 1 form: their fingerprints do not change.)"""
    if isinstance(node, Composite):
        return {
            "type": "composite",
            "operator": node.operator,
            "conditions": [canonical_criteria(child) for child in node.conditions],
        }
    if isinstance(node, Everyone | BucketReference | Manual):  # every field carries meaning
        return node.model_dump()
    if isinstance(node, Sample):
        return {"type": "sample", "percent": node.percent, "salt": node.salted()}
    if isinstance(node, EventSequence):
        sequence: dict[str, Any] = {
            "type": "sequence",
            "steps": [_canonical_step(step) for step in node.steps],
        }
        if node.within is not None:
            sequence["within"] = duration_seconds(node.within)
        return sequence
    if isinstance(node, PropertyCondition):
        return _canonical_property(node)
    out: dict[str, Any] = {"type": "event", "event": node.event, "check": node.check}
    if node.check == "count" or node.is_aggregate:
        out["operator"] = node.operator
        out["value"] = node.value
    if node.is_aggregate:
        out["property"] = node.property if isinstance(node.property, str) else list(node.aggregated)
    if node.within is not None:
        out["within"] = duration_seconds(node.within)
    if node.older_than is not None:  # absent from older definitions: their hash is unchanged
        out["older_than"] = duration_seconds(node.older_than)
    if node.is_regularly:  # the per-period count written out: gte 1 when left out
        assert node.period is not None
        out["period"] = duration_seconds(node.period)
        out["periods"], out["min_periods"] = node.periods, node.min_periods
        out["operator"] = node.operator or "gte"
        out["value"] = 1 if node.value is None else node.value
    if node.where is not None:
        out["where"] = [canonical_criteria(where) for where in node.where]
    return out


def _canonical_property(node: PropertyCondition) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": "property",
        "property": node.property if isinstance(node.property, str) else list(node.path),
        "operator": node.operator,
    }
    if node.operator in CLOCK_OPERATORS:
        out["value"] = duration_seconds(node.value)
    elif node.operator not in ("exists", "not_exists"):
        out["value"] = list(node.value) if isinstance(node.value, tuple) else node.value
    if node.held_for is not None:  # absent: the fingerprint of a definition without it
        kind = "at_least" if node.held_for.at_least is not None else "less_than"
        out["held_for"] = {kind: duration_seconds(node.held_for.span)}
    return out


def _canonical_step(step: SequenceStep) -> dict[str, Any]:
    """A sequence step's keys that carry meaning (``absent`` only when true)."""
    out: dict[str, Any] = {"event": step.event}
    if step.where is not None:
        out["where"] = [canonical_criteria(where) for where in step.where]
    if step.gap is not None:
        out["gap"] = duration_seconds(step.gap)
    if step.absent:
        out["absent"] = True
    return out


def canonical_json(node: Node) -> str:
    """Sorted keys, no whitespace, durations as seconds: the fingerprint's input."""
    return json.dumps(
        canonical_criteria(node), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )


def criteria_fingerprint(node: Node) -> str:
    return hashlib.sha256(canonical_json(node).encode("utf-8")).hexdigest()


BUCKET_FIELDS = frozenset(
    {
        "id",
        "name",
        "description",
        "enabled",
        "criteria",
        "entry_limit",
        "entry_period",
        "min_dwell",
        "max_dwell",
        "reconcile_joins",
    }
)


def bucket_from_mapping(data: object, path: str = "") -> Bucket:
    """A bucket from the file form (one entry of the ``buckets:`` list at ``path``)."""
    if not isinstance(data, Mapping):
        raise DefinitionError(
            "", path, f"expected a mapping of bucket fields, got {type(data).__name__}"
        )
    bucket_id = data.get("id")
    label = _key(bucket_id) if isinstance(bucket_id, str) else ""
    for key in data:
        if key not in BUCKET_FIELDS:
            raise DefinitionError(label or path, _key(key), "unknown field")
    for key in ("id", "criteria"):
        if key not in data:
            raise DefinitionError(label or path, key, "required")
    return define_bucket(**{str(key): value for key, value in data.items()})


# --- loading ------------------------------------------------------------------------------

FILE_SUFFIXES = (".py", ".yaml", ".yml", ".json")
_MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def load_definitions(source: str | Path) -> list[Bucket]:
    """Every bucket defined by ``source``: a module path (``myapp.buckets``), a ``.py``,
    ``.yaml``/``.yml`` or ``.json`` file, or a directory of such files (not recursive; names
    starting with ``_`` or ``.`` are skipped). Bucket ids must be unique across all of them."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(
            entry
            for entry in path.iterdir()
            if entry.is_file()
            and entry.suffix in FILE_SUFFIXES
            and not entry.name.startswith(("_", "."))
        )
        loaded = [(str(file), bucket) for file in files for bucket in _load_file(file)]
    elif path.suffix in FILE_SUFFIXES or path.exists():
        if not path.is_file():
            raise DefinitionError("", "", "no such file or directory", source=text)
        loaded = [(text, bucket) for bucket in _load_file(path)]
    elif _MODULE_PATH.fullmatch(text):
        loaded = [(text, bucket) for bucket in _load_module(text)]
    else:
        raise DefinitionError(
            "",
            "",
            "not a module path, nor an existing .py/.yaml/.json file or directory",
            source=text,
        )
    seen: dict[str, str] = {}
    for origin, bucket in loaded:
        if bucket.id in seen:
            first = seen[bucket.id]
            where = f"in {first}" if first == origin else f"in {first} and {origin}"
            raise DefinitionError(bucket.id, "id", f"duplicate bucket id (defined {where})")
        seen[bucket.id] = origin
    return [bucket for _, bucket in loaded]


def _load_file(path: Path) -> list[Bucket]:
    if path.suffix == ".py":
        return _load_python_file(path)
    try:
        raw = path.read_text(encoding="utf-8-sig")  # a byte order mark is not content
        if path.suffix == ".json":
            data = loads_json(raw, max_depth=MAX_DOCUMENT_DEPTH)
        else:
            data = load_yaml(raw, max_depth=MAX_DOCUMENT_DEPTH, max_nodes=MAX_DOCUMENT_NODES)
    except (OSError, ValueError, yaml.YAMLError) as exc:  # InputError, UnicodeDecodeError too
        reason = exc.reason if isinstance(exc, InputError) else _one_line(exc)
        raise DefinitionError("", "", f"cannot read: {reason}", source=str(path)) from None
    try:
        return _buckets_from_document(data)
    except DefinitionError as exc:
        raise exc.located(str(path)) from None


def _buckets_from_document(data: object) -> list[Bucket]:
    if not isinstance(data, Mapping):
        raise DefinitionError("", "", "expected a mapping with a 'buckets:' list at the top")
    for key in data:
        if key != "buckets":
            raise DefinitionError("", _key(key), "unknown top-level key (expected 'buckets')")
    entries = data.get("buckets")
    if not isinstance(entries, list):
        raise DefinitionError("", "buckets", "expected a list of bucket definitions")
    return [bucket_from_mapping(entry, f"buckets[{index}]") for index, entry in enumerate(entries)]


def _python_module_name(path: Path) -> str:
    resolved = path.resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    return f"_buckets_definitions_{resolved.stem}_{digest}"


def _load_python_file(path: Path) -> list[Bucket]:
    resolved = path.resolve()
    module_name = _python_module_name(path)
    if module_name in sys.modules:  # loaded before (e.g. for its journeys): the same objects
        return _buckets_in(sys.modules[module_name])
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise DefinitionError("", "", "cannot import", source=str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pydantic look themselves up here
    try:
        spec.loader.exec_module(module)
    except DefinitionError as exc:
        del sys.modules[module_name]
        raise exc.located(str(path)) from None
    except Exception as exc:
        del sys.modules[module_name]
        raise DefinitionError(
            "", "", f"cannot import: {type(exc).__name__}: {_one_line(exc)}", source=str(path)
        ) from exc
    return _buckets_in(module)


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (YAML errors span several), cut at 300 characters."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:  # without the quoted snippet
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        context = f"{exc.context}: " if exc.context else ""
        return f"{context}{exc.problem}{where}"
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = text or type(exc).__name__
    return text if len(text) <= 300 else f"{text[:297]}..."


def _key(key: object) -> str:
    """A mapping key (or a bucket id) as an error message shows it: as written when short and
    printable, else a shortened repr."""
    if isinstance(key, str) and len(key) <= MAX_ID_LENGTH and key.isprintable():
        return key
    return shorten(key)


def _load_module(name: str) -> list[Bucket]:
    try:
        module = importlib.import_module(name)
    except DefinitionError as exc:
        raise exc.located(name) from None
    except Exception as exc:
        raise DefinitionError(
            "", "", f"cannot import: {type(exc).__name__}: {_one_line(exc)}", source=name
        ) from exc
    return _buckets_in(module)


def definition_modules(source: str | Path) -> list[ModuleType]:
    """The Python modules ``source`` names (a module path, a ``.py`` file, or the ``.py`` files
    of a directory), imported once: where journeys are found next to their buckets."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        files = [p for p in sorted(path.iterdir()) if p.suffix == ".py" and p.is_file()]
        files = [p for p in files if not p.name.startswith(("_", "."))]
    elif path.suffix == ".py" and path.is_file():
        files = [path]
    elif path.suffix in FILE_SUFFIXES or path.exists() or not _MODULE_PATH.fullmatch(text):
        return []
    else:
        _load_module(text)
        return [sys.modules[text]]
    for file in files:
        _load_python_file(file)
    return [sys.modules[_python_module_name(file)] for file in files]


def _buckets_in(module: ModuleType) -> list[Bucket]:
    """Module-level buckets (and lists/tuples of them), in definition order, each once."""
    found: list[Bucket] = []
    for value in vars(module).values():
        candidates = value if isinstance(value, list | tuple) else (value,)
        for candidate in candidates:
            if isinstance(candidate, Bucket) and all(candidate is not seen for seen in found):
                found.append(candidate)
    return found
