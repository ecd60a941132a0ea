"""Load the synthetic dataset (:mod:`workflows.synthetic`) into a database.

python -m bench.generate --contacts 100000 --events-per-contact 20 [--seed 42] [--now ISO]
                         [--database-url URL] [--reset]
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

import sqlalchemy as sa

from buckets.db import create_engine, resolve_database_url
from buckets.migrations import upgrade
from buckets.settings import load_settings
from workflows.synthetic import EVENT_WEIGHTS, GenerateResult, generate, measured_shares

__all__ = ["EVENT_WEIGHTS", "GenerateResult", "generate", "main", "measured_shares"]


def _parse_now(raw: str | None) -> datetime:
    if raw is None:
        return datetime.now(UTC).replace(microsecond=0)
    parsed = datetime.fromisoformat(raw)
    if parsed.tzinfo is None:
        raise SystemExit(f"generate: --now {raw!r} has no timezone")
    return parsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--events-per-contact", type=int, default=20)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--now", help="ISO-8601 instant the history ends at [default: now]")
    parser.add_argument("--database-url", help="[default: BUCKETS_DATABASE_URL or embedded]")
    parser.add_argument("--reset", action="store_true", help="empty the engine's tables first")
    args = parser.parse_args(argv)

    now = _parse_now(args.now)
    settings = load_settings(database_url=args.database_url)
    url = resolve_database_url(settings)
    engine = create_engine(url, poolclass=sa.pool.NullPool)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    result = generate(
        url,
        contacts=args.contacts,
        events_per_contact=args.events_per_contact,
        seed=args.seed,
        now=now,
        reset=args.reset,
    )
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
