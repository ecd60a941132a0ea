"""Buckets that refer to buckets on the real-time path: 5 buckets referring to 5 others vs the
same 5 with their criteria inlined (SPEC §3.5; target: per-event latency within 1.2x).

    python -m bench.references [--contacts 100000] [--single 2000] [--batched 10000]
                               [--database-url URL]

On the generator's dataset (``bench/generate.py``, loaded unless present), both registries hold
the same 5 referenced buckets; the 5 others read them through ``bucket`` references in one, and
carry their criteria inlined in the other. Each registry ingests the same kind of stream
(``bench.ingest.stream``: existing and new contacts, a plan or country change on one event in
ten) one event at a time (p50/p99 latency) and in batches of 100 and 1000 (throughput), from
the same materialised starting state; the ratio (references / inlined) is printed from the
same run. Rows the run inserted are deleted afterwards, so the dataset stays as generated.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import sqlalchemy as sa

from bench.dataset import NOW, Marks, clean, marks, prepare
from bench.ingest import batched, single, stream
from buckets import b, define_bucket
from buckets.definitions import Bucket
from buckets.registry import Registry
from buckets.runtime import Runtime
from buckets.settings import load_settings

POWER = b.event("feature.used").within("30d").at_least(10)
GERMANY = b.prop("country").eq("DE")
BUYER = b.event("purchase.completed").exists()
BROWSING = b.event("page.viewed").within("1d").at_least(3)
ENGAGED = b.event("email.clicked").within("30d").exists()

REFERENCED: list[Bucket] = [
    define_bucket(id="power-users", criteria=POWER),
    define_bucket(id="germany", criteria=GERMANY),
    define_bucket(id="buyer", criteria=BUYER, entry_limit="once"),
    define_bucket(id="browsing", criteria=BROWSING),
    define_bucket(id="email-engaged", criteria=ENGAGED),
]


def dependents(inline: bool) -> list[Bucket]:
    """The 5 buckets over the 5 above: through references, or with their criteria inlined."""

    def ref(bucket_id: str, criteria: dict[str, Any]) -> dict[str, Any]:
        return criteria if inline else b.in_bucket(bucket_id)

    def not_ref(bucket_id: str, criteria: dict[str, Any]) -> dict[str, Any]:
        return b.not_(criteria) if inline else b.not_in_bucket(bucket_id)

    return [
        define_bucket(
            id="power-pro", criteria=b.all(ref("power-users", POWER), b.prop("plan").eq("pro"))
        ),
        define_bucket(
            id="de-not-buyer", criteria=b.all(ref("germany", GERMANY), not_ref("buyer", BUYER))
        ),
        define_bucket(
            id="browsing-paid",
            criteria=b.all(ref("browsing", BROWSING), b.prop("plan").neq("free")),
        ),
        define_bucket(
            id="engaged-or-buyer",
            criteria=b.any(ref("email-engaged", ENGAGED), ref("buyer", BUYER)),
        ),
        define_bucket(id="not-power", criteria=not_ref("power-users", POWER)),
    ]


def materialise(engine: Any, registry: Registry) -> None:
    """Every bucket holds its members as of NOW (silent joins, as the first-time backfill
    writes them), in dependency order: referring buckets read the memberships just written."""
    from buckets.criteria import member_select
    from buckets.membership import Policy, join
    from buckets.models import contacts

    with engine.begin() as conn:
        for bucket in registry.ordered(registry):
            candidates = member_select(bucket.criteria, NOW).with_only_columns(
                sa.literal(bucket.id).label("bucket_id"), contacts.c.id.label("contact_id")
            )
            join(conn, candidates, [Policy.of(bucket)], now=NOW, source="backfill", silent=True)
    with engine.begin() as conn:
        conn.execute(sa.text("ANALYZE bucket_memberships"))


BACKUP = "bench_references_contacts"  # the contacts' mutable columns, as generated


def snapshot(engine: Any) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {BACKUP}"))
        conn.execute(
            sa.text(
                f"CREATE TABLE {BACKUP} AS SELECT id, properties, property_changed_at, email,"
                " revision FROM contacts"
            )
        )
        conn.execute(sa.text(f"ALTER TABLE {BACKUP} ADD PRIMARY KEY (id)"))


def reset(engine: Any, until: Marks) -> None:
    """Back to the dataset as generated: every run starts from the same state (the stream's
    property changes undone, so each registry sees the same changes)."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"UPDATE contacts c SET properties = b.properties,"
                " property_changed_at = b.property_changed_at, email = b.email,"
                f" revision = b.revision FROM {BACKUP} b"
                " WHERE c.id = b.id AND c.revision <> b.revision"
            )
        )
        clean(conn, until)


def transitions(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM bucket_transitions")).scalar_one())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--events-per-contact", type=int, default=20)
    parser.add_argument("--single", type=int, default=2_000, help="events ingested one by one")
    parser.add_argument("--batched", type=int, default=10_000, help="events per batch run")
    parser.add_argument("--database-url", help="[default: BUCKETS_DATABASE_URL or embedded]")
    args = parser.parse_args(argv)

    engine, url = prepare(args.database_url, args.contacts, args.events_per_contact)
    settings = load_settings(database_url=url.render_as_string(hide_password=False))
    loaded = marks(engine)
    registries = {
        "references": Registry([*dependents(inline=False), *REFERENCED]),
        "inlined": Registry([*dependents(inline=True), *REFERENCED]),
    }
    figures: dict[str, dict[str, dict[str, float]]] = {}
    written: dict[str, int] = {}
    snapshot(engine)
    try:
        # each mode from the same starting state, the two registries alternating
        for mode, seed in (("single", 1), ("batch 100", 2), ("batch 1000", 3)):
            for label, registry in registries.items():
                reset(engine, loaded)
                materialise(engine, registry)
                before = transitions(engine)
                rt = Runtime(engine=engine, registry=registry, settings=settings)
                if mode == "single":
                    found = single(rt, stream(args.single, args.contacts, seed))
                else:
                    size = 100 if mode == "batch 100" else 1000
                    found = batched(rt, stream(args.batched, args.contacts, seed), size)
                figures.setdefault(label, {})[mode] = found
                written[f"{label} {mode}"] = transitions(engine) - before
    finally:
        reset(engine, loaded)
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE {BACKUP}"))
        engine.dispose()

    refs, inlined = figures["references"], figures["inlined"]
    print(f"\n{'mode':<12} {'references':>14} {'inlined':>14} {'ratio':>7}")
    for mode in ("single", "batch 100", "batch 1000"):
        rate, base = refs[mode]["events_per_s"], inlined[mode]["events_per_s"]
        print(f"{mode:<12} {rate:>10,.0f} ev/s {base:>10,.0f} ev/s {base / rate:>7.2f}")
    for label, modes in figures.items():
        print(
            f"single-event latency, {label}: p50 {modes['single']['p50_ms']:.2f} ms,"
            f" p99 {modes['single']['p99_ms']:.2f} ms"
        )
    p50 = refs["single"]["p50_ms"] / inlined["single"]["p50_ms"]
    p99 = refs["single"]["p99_ms"] / inlined["single"]["p99_ms"]
    print(f"latency ratio (references / inlined): p50 {p50:.2f}, p99 {p99:.2f} (target <= 1.2)")
    print("transitions written:", ", ".join(f"{k} {v:,}" for k, v in written.items()))
    print("(throughput ratio = time with references / time inlined)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
