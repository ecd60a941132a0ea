"""Reading a file of external ids for a manual bucket (``buckets members add|remove ID FILE``).

Two forms, told apart by the first line that is not blank:

* **one id per line**: the first line has no comma and is not ``external_id``; every line is an id;
* **CSV with a header**: the first line is a CSV header naming an ``external_id`` column (in any
  case; other columns are allowed and ignored); each row has as many fields as the header.

Rules (every problem names its line; the whole file is rejected, nothing is written):

* UTF-8 (a byte order mark at the start is allowed); a line that is not valid UTF-8 is rejected;
* a line is at most :data:`MAX_LINE_BYTES` bytes, so a file without line breaks (10 MB of
  garbage) is refused after reading that much: memory stays bounded and rejection is fast;
* blank lines (empty, or only spaces) are **skipped at the end of the file** (a trailing newline
  or two) and **rejected anywhere else** (a hole in a list is more likely a broken export than
  intent);
* each id: non-empty, at most 255 characters, no control characters, no surrounding whitespace
  (:func:`buckets.manual.id_problem`);
* a first line with a comma but no ``external_id`` column is rejected (a CSV without the
  column): an id containing a comma must be given in the CSV form, quoted;
* **duplicate ids are accepted and counted once** (``duplicates`` in the counts): re-running a
  file, or a file listing someone twice, means the same thing.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from buckets.errors import BucketsError
from buckets.manual import Ids, id_problem

MAX_LINE_BYTES = 65_536
COLUMN = "external_id"


class MemberFileError(BucketsError):
    """The file is rejected; ``line`` is the 1-based line of the first problem."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}; the file was rejected, nothing was written")
        self.line = line
        self.message = message


@dataclass
class MemberFile:
    """The ids of a file (each once, in first-seen order) and what was read."""

    ids: Ids
    form: str  # "lines" | "csv"
    lines: int  # lines read, header and blank ones included
    blank_skipped: int  # blank lines at the end of the file


def _lines(file: IO[bytes]) -> Iterator[tuple[int, str]]:
    """(line number, text without its line break), UTF-8, bounded per line."""
    number = 0
    while True:
        raw = file.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        number += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            raise MemberFileError(number, f"longer than {MAX_LINE_BYTES:,} bytes")
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MemberFileError(number, f"not valid UTF-8 (byte {exc.start + 1})") from None
        yield number, text.rstrip("\n").removesuffix("\r")


def read_member_file(file: IO[bytes]) -> MemberFile:
    """The ids of ``file`` (see the module's rules); :class:`MemberFileError` otherwise."""
    lines = _lines(file)
    seen: dict[str, None] = {}
    accepted = 0
    blank: list[int] = []  # blank lines not yet followed by an id
    read = 0
    form = "lines"
    column = 0
    width = 1

    def take(number: int, value: str) -> None:
        nonlocal accepted
        if blank:
            raise MemberFileError(blank[0], "blank line (only allowed at the end of the file)")
        problem = id_problem(value)
        if problem is not None:
            raise MemberFileError(number, f"{COLUMN} {problem}")
        seen[value] = None
        accepted += 1

    for number, text in lines:
        read = number
        if not text.strip():
            blank.append(number)
            continue
        if form == "lines" and not accepted and ("," in text or text.strip().lower() == COLUMN):
            header = _row(number, text)
            names = [name.strip().lower() for name in header]
            if COLUMN not in names:
                shown = ", ".join(repr(name) for name in names[:10])
                raise MemberFileError(
                    number,
                    f"a CSV header without an {COLUMN!r} column (columns: {shown}); give"
                    f" one id per line, or a CSV whose header names {COLUMN!r}",
                )
            if blank:
                raise MemberFileError(blank[0], "blank line (only allowed at the end of the file)")
            form, column, width = "csv", names.index(COLUMN), len(names)
            continue
        if form == "csv":
            row = _row(number, text)
            if len(row) != width:
                raise MemberFileError(number, f"expected {width} CSV fields, got {len(row)}")
            take(number, row[column])
        else:
            take(number, text)
    return MemberFile(Ids(list(seen), accepted - len(seen)), form, read, len(blank))


def _row(number: int, text: str) -> list[str]:
    """One CSV record from one line (ids hold no line breaks, so a record is one line)."""
    if '"' not in text:  # nothing quoted: the fields are what lies between the commas
        return text.split(",")
    try:
        rows = list(csv.reader([text], strict=True))
    except csv.Error as exc:
        raise MemberFileError(number, f"malformed CSV: {exc}") from None
    return rows[0] if rows else []
