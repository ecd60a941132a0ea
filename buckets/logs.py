"""Log configuration of the long-running commands (``buckets run``, ``dispatch``, ``serve``,
a foreground ``backfill``): ``BUCKETS_LOG_LEVEL`` and ``BUCKETS_LOG_FORMAT``.

* ``text`` (default): ``<time> <logger> <LEVEL> <message>``, then the record's structured
  fields as ``[key=value ...]``.
* ``json``: one JSON object per line (python-json-logger): ``time``, ``level``, ``logger``,
  ``message`` and the structured fields the engine attaches (``bucket``, ``job``, ``tick``,
  counts such as ``joined`` / ``left``, ``seconds``), passed with ``extra=``.

Noise is moved below INFO: APScheduler's two lines per job run ("Running job ...",
"... executed successfully") and Alembic's context lines ("Context impl ...", "Will assume
transactional DDL") are logged at DEBUG, so an idle worker at INFO is quiet.

Secrets never reach a line: every record passes :class:`Redact`, which masks the password of
any URL in the message (``postgresql://user:***@host``) and the configured admin token and
database password wherever they appear (a driver error quoting a DSN, an exception text).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from typing import Any

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")
# The attributes every LogRecord has: anything else was passed with `extra=` (a field).
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's ANSI-coloured copy of the message
}
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]+)(?=@)", re.I)
_KEYWORD_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<pw>'[^']*'|\S+)", re.I)
MASK = "***"


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of ``record`` (those given with ``extra=``)."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class Redact(logging.Filter):
    """Masks secrets in the message, its arguments and the exception text of each record."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s and len(s) >= 3}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        text = _URL_PASSWORD.sub(lambda m: m["head"] + MASK, text)
        text = _KEYWORD_PASSWORD.sub(lambda m: m["head"] + MASK, text)
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            # Formatters use the scrubbed text (python-json-logger too) once exc_info is gone.
            record.exc_text, record.exc_info = self.scrub(record.exc_text), None
        record.msg, record.args = self.scrub(message), None
        for key, value in fields(record).items():
            if isinstance(value, str):
                setattr(record, key, self.scrub(value))
        return True


class Demote(logging.Filter):
    """APScheduler's per-run lines and Alembic's context lines are DEBUG, not INFO."""

    NOISY = (
        ("apscheduler.executors", None),
        (
            "apscheduler.scheduler",
            ("Added job", "Adding job", "Scheduler started", "Scheduler has been shut"),
        ),
        ("alembic.runtime.migration", ("Context impl", "Will assume")),
    )

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO:
            return True
        for prefix, starts in self.NOISY:
            if record.name.startswith(prefix) and (
                starts is None or str(record.msg).startswith(starts)
            ):
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
                return self.level <= logging.DEBUG
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(name)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = fields(record)
        if not extra:
            return line
        head, newline, rest = line.partition("\n")  # fields before a traceback
        pairs = " ".join(f"{key}={_text(value)}" for key, value in extra.items())
        return f"{head} [{pairs}]{newline}{rest}"


def _text(value: Any) -> str:
    return str(value) if not isinstance(value, str) or " " not in value else repr(value)


def json_formatter() -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        json_default=str,
    )


def configure(
    level: str = "INFO",
    fmt: str = "text",
    *,
    secrets: Iterable[str | None] = (),
    stream: Any = None,
) -> logging.Handler:
    """Install one handler on the root logger (replacing earlier ones of ours)."""
    numeric = logging.getLevelName(level.upper())
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name("buckets")
    handler.setFormatter(json_formatter() if fmt == "json" else TextFormatter())
    handler.addFilter(Demote(numeric))
    handler.addFilter(Redact(secrets))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "buckets"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    return handler


def configure_from_settings(settings: Any, stream: Any = None) -> logging.Handler:
    """:func:`configure` with ``BUCKETS_LOG_LEVEL`` / ``BUCKETS_LOG_FORMAT`` and the secrets
    of ``settings`` (admin token, database password)."""
    password = None
    if settings.database_url:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            password = make_url(settings.database_url).password
        except ArgumentError:
            password = None
    return configure(
        settings.log_level,
        settings.log_format,
        secrets=[settings.admin_token, str(password) if password else None],
        stream=stream,
    )
