"""Bounds on untrusted input, shared by every surface (Python, CLI, HTTP, definition files).

Everything here runs *before* anything is written and before any recursive code (``json``,
PyYAML's composer, pydantic, the criteria parser, SQLAlchemy) sees the input, and none of it
recurses itself, so hostile input costs time and memory proportional to its size:

* :func:`text_problem` — text PostgreSQL can store: no NUL (``text`` and ``jsonb`` refuse it)
  and no lone surrogates (``"\\ud800"`` is not Unicode text: UTF-8 cannot encode it, so the
  driver would fail in the middle of a transaction).
* :func:`json_value_problem` — a decoded JSON value: string keys, storable text, finite
  numbers, at most ``max_depth`` levels of nesting and about ``max_size`` characters of JSON,
  checked iteratively (a self-referencing or alias-shared structure cannot make it loop).
* :func:`json_text_depth` / :func:`loads_json` — the nesting depth of JSON *text*, measured
  without parsing, so ``json.loads`` (recursive in C) never sees more than a bound.
* :func:`load_yaml` — PyYAML's safe loader with the nesting depth bounded while composing and
  the document's size *after alias expansion* bounded before anything is constructed (a 1 KB
  file of nested aliases otherwise expands to billions of nodes); recursive aliases refused.

Errors are :class:`InputError` (a ``ValueError``) with ``path`` (where inside the value, e.g.
``a.b[3]``; empty for the whole input) and ``reason``; each surface wraps it in its own error
naming the field, line or file.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import datetime
from itertools import accumulate
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

PARSE_DEPTH_CAP = 256
"""JSON text nested deeper than this is refused before it is parsed, whatever the configured
limits: the parsers (``json``, pydantic, PyYAML's composer) recurse once per level, and every
accepted depth limit (``BUCKETS_MAX_JSON_DEPTH`` <= 200 plus an envelope, the criteria depth)
stays below it, so values between a limit and the cap get the precise, located error."""


class InputError(ValueError):
    """Input refused; ``path`` locates the problem inside the value (may be empty)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


# --- text -----------------------------------------------------------------------------------

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(text: str) -> str | None:
    """Why PostgreSQL could not store ``text`` (None: it can)."""
    if "\x00" in text:
        return "contains a NUL character (\\u0000)"
    found = None if text.isascii() else _LONE_SURROGATE.search(text)
    if found is not None:
        return (
            f"contains a lone surrogate ({ascii(found.group())[1:-1]} at index {found.start()}),"
            " which is not valid Unicode text"
        )
    return None


def shorten(value: object, limit: int = 60) -> str:
    """A repr of ``value`` for an error message, cut short and always ASCII."""
    text = ascii(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


# --- decoded JSON values ----------------------------------------------------------------------

# Where a value sits: (parent's place, key or index), () for the root. Built as tuples while
# walking (cheap); spelled out (``a.b[2]``) only for an error.
Place = tuple[Any, ...]


def _spelled(place: Place) -> str:
    steps: list[object] = []
    while place:
        place, step = place
        steps.append(step)
    path = ""
    for step in reversed(steps):
        if isinstance(step, int):
            path += f"[{step}]"
            continue
        name = step if isinstance(step, str) and step.isidentifier() else json.dumps(step)
        name = name if len(name) <= 40 else f"{name[:37]}..."
        path = f"{path}.{name}" if path else name
    return path


def json_value_problem(value: object, *, max_depth: int, max_size: int) -> InputError | None:
    """Why ``value`` is not a storable JSON value within the bounds (None: it is).

    ``value`` itself is depth 1 (``{}``; ``{"a": {}}`` is depth 2). ``max_size`` bounds a
    lower estimate of the JSON text's length (string lengths plus punctuation), so the walk
    stops after at most ``max_size`` nodes whatever the sharing of sub-structures; the exact
    size is for the caller to measure once this passed.
    """
    stack: list[tuple[object, int, Place]] = [(value, 1, ())]
    size = 0
    while stack:
        item, depth, place = stack.pop()
        problem: str | None = None
        if isinstance(item, str):
            size += len(item) + 2
            problem = text_problem(item)
        elif isinstance(item, dict | list | tuple | Mapping):
            if depth > max_depth:
                problem = f"nested deeper than {max_depth} levels"
            else:
                added, problem = _push(item, depth, place, stack)
                size += added
        elif isinstance(item, float) and not math.isfinite(item):
            problem = f"not a finite number: {item!r}"
        else:
            size += 1
        if problem is not None:
            return InputError(_spelled(place), problem)
        if size > max_size:
            return InputError("", f"larger than the limit of {max_size} bytes")
    return None


def _push(
    item: Mapping[Any, Any] | list[Any] | tuple[Any, ...],
    depth: int,
    place: Place,
    stack: list[tuple[object, int, Place]],
) -> tuple[int, str | None]:
    """Put ``item``'s children on the stack: the JSON length of its punctuation and keys, and
    the problem of a key that is not storable text."""
    below = depth + 1
    if not isinstance(item, Mapping):
        stack.extend((child, below, (place, index)) for index, child in enumerate(item))
        return 2 + len(item), None
    size = 2 + len(item)
    for key in item:
        if not isinstance(key, str):
            return size, f"keys must be strings, got {shorten(key)}"
        problem = text_problem(key)
        if problem is not None:
            return size, f"key {shorten(key)} {problem}"
        size += len(key) + 2
    stack.extend((child, below, (place, key)) for key, child in item.items())
    return size, None


# --- instants ---------------------------------------------------------------------------------


def instant_problem(value: datetime, lowest: datetime, highest: datetime) -> str | None:
    """Why the aware ``value`` is out of bounds (None: it is within ``[lowest, highest]``).

    Compared as instants (the offset is normalised away): ``0001-01-01T00:00:00+14:00`` is in
    year 0 and is refused, not stored as a BC timestamp.
    """
    if value.tzinfo is None or value.utcoffset() is None:
        return "must be timezone-aware (naive datetime)"
    if value < lowest or value > highest:
        return (
            f"{value.isoformat()} is outside the accepted range {lowest.isoformat()} .."
            f" {highest.isoformat()} (BUCKETS_MIN_INSTANT / BUCKETS_MAX_INSTANT)"
        )
    return None


_ISO_CHARACTERS = re.compile(r"[0-9T:.+\-Z ]+")


def parse_instant(text: str) -> datetime:
    """An aware datetime from ISO-8601 ``text`` (``Z`` accepted; ASCII digits only).

    Raises :class:`InputError` for anything else, including naive times. Bounds are the
    caller's (:func:`instant_problem`).
    """
    stripped = text.strip()
    if len(stripped) > 64 or not _ISO_CHARACTERS.fullmatch(stripped):
        raise InputError("", f"not an ISO-8601 instant: {shorten(text)}")
    try:
        parsed = datetime.fromisoformat(stripped.replace("Z", "+00:00"))
    except ValueError:
        raise InputError("", f"not an ISO-8601 instant: {shorten(text)}") from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise InputError(
            "", f"must be timezone-aware: {shorten(text)} has no UTC offset (add Z or +00:00)"
        )
    return parsed


# --- JSON text --------------------------------------------------------------------------------

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_NESTING = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_text_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON ``text``, without parsing it.

    Brackets inside strings do not count. For malformed text the figure is an estimate (the
    parser refuses such text anyway).
    """
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(map(_NESTING.__getitem__, brackets)), default=0)


def loads_json(text: str, *, max_depth: int) -> Any:
    """``json.loads(text)`` for text nested at most ``max_depth`` levels, else InputError.

    ``ValueError`` (``json.JSONDecodeError``) for text that is not JSON, as ``json.loads``.
    """
    depth = json_text_depth(text)
    if depth > max_depth:
        raise InputError("", f"JSON nested {depth} levels deep, more than the limit of {max_depth}")
    return json.loads(text)


# --- YAML -------------------------------------------------------------------------------------


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses deep nesting while composing (PyYAML's composer
    recurses once per level)."""

    max_depth = 100
    _depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        self._depth += 1
        try:
            if self._depth > self.max_depth:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise InputError(
                    "",
                    f"YAML nested more than {self.max_depth} levels deep"
                    f" (line {mark.line + 1}, column {mark.column + 1})",
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expansion(root: Node, *, max_depth: int, max_nodes: int) -> None:
    """Size and depth of the document with every alias expanded, computed on the composed
    graph (each node once, children before parents); cycles refused."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            on_path.discard(key)
            children = _children(node)
            size[key] = 1 + sum(size[id(child)] for child in children)
            depth[key] = 1 + max((depth[id(child)] for child in children), default=0)
            mark = node.start_mark
            where = f" (the node at line {mark.line + 1}, column {mark.column + 1})"
            if size[key] > max_nodes:
                raise InputError(
                    "",
                    f"YAML document expands to more than {max_nodes:,} nodes once its aliases"
                    f" are expanded{where}",
                )
            if depth[key] > max_depth:
                raise InputError(
                    "",
                    f"YAML nested more than {max_depth} levels deep once its aliases are"
                    f" expanded{where}",
                )
            continue
        if key in size:
            continue
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                mark = child.start_mark
                raise InputError(
                    "",
                    "YAML alias refers to a node that contains it (a recursive structure)"
                    f" at line {mark.line + 1}, column {mark.column + 1}",
                )
            if id(child) not in size:
                stack.append((child, False))


def load_yaml(text: str, *, max_depth: int, max_nodes: int) -> Any:
    """``yaml.safe_load(text)`` with nesting and alias expansion bounded (InputError), else
    ``yaml.YAMLError`` as PyYAML raises it."""
    loader = _BoundedLoader(text)
    loader.max_depth = max_depth
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        _check_expansion(root, max_depth=max_depth, max_nodes=max_nodes)
        return loader.construct_document(root)
    finally:
        loader.dispose()
