"""The real-time path: single-event latency and batch throughput, with 20 buckets registered.

    python -m bench.ingest [--contacts 100000] [--single 2000] [--batched 20000]
                           [--new-nodes] [--database-url URL]

On the generator's dataset (``bench/generate.py``, loaded unless present), ingests a realistic
stream — existing and new contacts, the generator's event mix, a plan or country change on
one event in ten — three ways: one ``ingest_event`` per event (p50/p99 latency, events/s), and
``ingest_events`` in batches of 100 and of 1000. Each is run with the 20 buckets of
:data:`BUCKETS` registered and again with none, so the share of bucket evaluation shows as a
ratio; with ``--new-nodes`` also with the 20 buckets of :data:`NEW_BUCKETS` (the newer
criteria nodes), so their cost shows against the classic 20 in the same run. Rows the run
inserted are deleted afterwards, so the dataset stays as generated.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from bench.dataset import NOW, clean, marks, prepare
from buckets import b, define_bucket
from buckets.definitions import Bucket
from buckets.ingest import ingest_event, ingest_events
from buckets.registry import Registry
from buckets.runtime import Runtime
from buckets.settings import load_settings

BUCKETS: list[Bucket] = [
    define_bucket(id="power-users", criteria=b.event("feature.used").within("30d").at_least(10)),
    define_bucket(
        id="went-dormant",
        criteria=b.all(
            b.event("feature.used").exists(), b.event("feature.used").within("7d").not_exists()
        ),
        entry_limit="once_per_period",
        entry_period="30d",
    ),
    define_bucket(id="pro", criteria=b.prop("plan").eq("pro")),
    define_bucket(id="trial", criteria=b.prop("plan").eq("trial"), max_dwell="14d"),
    define_bucket(id="germany", criteria=b.prop("country").eq("DE")),
    define_bucket(id="big-team", criteria=b.prop("seats").gte(20)),
    define_bucket(id="opted-in", criteria=b.prop("marketing_opt_in").eq(True)),
    define_bucket(id="buyer", criteria=b.event("purchase.completed").exists(), entry_limit="once"),
    define_bucket(
        id="big-spender",
        criteria=b.event("purchase.completed").where(b.prop("amount").gte(200)).at_least(2),
    ),
    define_bucket(id="browsing", criteria=b.event("page.viewed").within("1d").at_least(3)),
    define_bucket(
        id="pricing-curious",
        criteria=b.event("page.viewed").within("7d").where(b.prop("path").eq("/pricing")).exists(),
    ),
    define_bucket(id="email-engaged", criteria=b.event("email.clicked").within("30d").exists()),
    define_bucket(
        id="email-ignorer",
        criteria=b.all(
            b.event("email.opened").exists(), b.event("email.opened").within("14d").not_exists()
        ),
    ),
    define_bucket(id="searcher", criteria=b.event("search.performed").within("7d").at_least(5)),
    define_bucket(id="inviter", criteria=b.event("invite.sent").at_least(2)),
    define_bucket(
        id="needs-help", criteria=b.event("support.ticket.created").within("7d").exists()
    ),
    define_bucket(
        id="pro-active",
        criteria=b.all(b.prop("plan").eq("pro"), b.event("feature.used").within("14d").at_least(5)),
        min_dwell="1d",
    ),
    define_bucket(
        id="eu-trial",
        criteria=b.all(
            b.prop("plan").eq("trial"),
            b.any(b.prop("country").eq("DE"), b.prop("country").eq("FR")),
        ),
    ),
    define_bucket(id="upgrader", criteria=b.event("plan.upgraded").within("30d").exists()),
    define_bucket(
        id="session-light",
        criteria=b.event("session.started").within("7d").less_than(2),
        reconcile_joins=False,
    ),
]
# The same number of buckets written with the criteria language's newer nodes (SPEC §3.4):
# aggregates, instants, lists, all-negative criteria, samples, sequences, regularly, last,
# older_than and held_for. ``--new-nodes`` runs them beside BUCKETS in the same run.
PURCHASE = b.event("purchase.completed")
NEW_BUCKETS: list[Bucket] = [
    define_bucket(id="n-spent-500", criteria=PURCHASE.within("30d").sum("amount").gte(500)),
    define_bucket(id="n-avg-order", criteria=PURCHASE.avg("amount").gte(200)),
    define_bucket(id="n-max-order", criteria=PURCHASE.within("30d").max("amount").gte(450)),
    define_bucket(id="n-trial-ending", criteria=b.prop("trial_ends_at").within_next("3d")),
    define_bucket(id="n-new-signup", criteria=b.prop("signup_at").within_past("30d")),
    define_bucket(id="n-early-signup", criteria=b.prop("signup_at").before("2026-06-01")),
    define_bucket(id="n-eu", criteria=b.prop("country").in_(["DE", "FR", "NL"])),
    define_bucket(id="n-never-bought", criteria=PURCHASE.not_exists()),
    define_bucket(id="n-not-free", criteria=b.not_(b.prop("plan").eq("free"))),
    define_bucket(id="n-sample", criteria=b.sample(10, salt="bench")),
    define_bucket(
        id="n-abandoned",
        criteria=b.sequence(
            b.step("session.started"),
            b.step("purchase.completed", gap="1d", absent=True),
            within="30d",
        ),
    ),
    define_bucket(
        id="n-open-click",
        criteria=b.sequence(
            b.step("email.opened"), b.step("email.clicked", gap="1h"), within="30d"
        ),
    ),
    define_bucket(
        id="n-daily-habit",
        criteria=b.event("feature.used").regularly("1d", periods=7, min_periods=4),
    ),
    define_bucket(id="n-steady-buyer", criteria=PURCHASE.regularly("1w", periods=4, min_periods=2)),
    define_bucket(
        id="n-last-pricing",
        criteria=b.event("page.viewed").where(b.prop("path").eq("/pricing")).last(),
    ),
    define_bucket(
        id="n-first-purchase",
        criteria=b.all(PURCHASE.within("7d").exists(), PURCHASE.older_than("7d").not_exists()),
    ),
    define_bucket(id="n-pro-held", criteria=b.prop("plan").eq("pro").held_for(at_least="14d")),
    define_bucket(id="n-trial-fresh", criteria=b.prop("plan").eq("trial").held_for(less_than="3d")),
    define_bucket(
        id="n-searcher-earlier",
        criteria=b.event("search.performed").within("30d").older_than("7d").at_least(2),
    ),
    define_bucket(
        id="n-eu-pro-spender",
        criteria=b.all(
            b.prop("country").in_(["DE", "FR"]),
            b.prop("plan").eq("pro"),
            PURCHASE.within("30d").sum("amount").gte(100),
        ),
    ),
]
NAMES = [
    ("page.viewed", 30),
    ("feature.used", 25),
    ("session.started", 15),
    ("email.opened", 8),
    ("search.performed", 6),
    ("email.clicked", 5),
    ("purchase.completed", 4),
    ("invite.sent", 3),
    ("support.ticket.created", 2),
    ("plan.upgraded", 2),
]


def stream(count: int, contacts: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    names = [name for name, _ in NAMES]
    weights = [weight for _, weight in NAMES]
    events: list[dict[str, Any]] = []
    for index in range(count):
        if rng.random() < 0.05:
            external_id = f"bench-new-{seed}-{index}"
        else:
            external_id = f"u{rng.randint(1, contacts):08d}"
        name = rng.choices(names, weights)[0]
        event: dict[str, Any] = {
            "external_id": external_id,
            "event": name,
            "properties": {"amount": round(rng.uniform(5, 500), 2), "path": "/pricing"},
            "occurred_at": NOW - timedelta(seconds=rng.randint(0, 3600)),
        }
        if rng.random() < 0.1:
            event["contact_properties"] = rng.choice(
                [{"plan": "pro"}, {"plan": "free"}, {"plan": "trial"}, {"country": "DE"}]
            )
        events.append(event)
    return events


def single(rt: Runtime, events: list[dict[str, Any]]) -> dict[str, float]:
    latencies = []
    started = time.perf_counter()
    for event in events:
        began = time.perf_counter()
        ingest_event(**event, now=NOW, runtime=rt)
        latencies.append(time.perf_counter() - began)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "events_per_s": len(events) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }


def batched(rt: Runtime, events: list[dict[str, Any]], size: int) -> dict[str, float]:
    started = time.perf_counter()
    for start in range(0, len(events), size):
        result = ingest_events(events[start : start + size], now=NOW, runtime=rt, chunk_size=size)
        assert not result.errors, result.errors[:3]
    return {"events_per_s": len(events) / (time.perf_counter() - started)}


def materialise(engine: Any, buckets: list[Bucket]) -> None:
    """Start from the state a deployment leaves: every bucket holds its members as of NOW
    (silent joins, as the first-time backfill writes them)."""
    from buckets.criteria import member_select
    from buckets.membership import Policy, join
    from buckets.models import contacts

    with engine.begin() as conn:
        for bucket in buckets:
            candidates = member_select(bucket.criteria, NOW).with_only_columns(
                sa.literal(bucket.id).label("bucket_id"), contacts.c.id.label("contact_id")
            )
            join(conn, candidates, [Policy.of(bucket)], now=NOW, source="backfill", silent=True)
    with engine.begin() as conn:  # as a completed backfill does: fresh statistics
        conn.execute(sa.text("ANALYZE bucket_memberships"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--events-per-contact", type=int, default=20)
    parser.add_argument("--single", type=int, default=2_000, help="events ingested one by one")
    parser.add_argument("--batched", type=int, default=20_000, help="events per batch run")
    parser.add_argument(
        "--new-nodes",
        action="store_true",
        help="also run the 20 buckets of NEW_BUCKETS (the newer criteria nodes)",
    )
    parser.add_argument("--database-url", help="[default: BUCKETS_DATABASE_URL or embedded]")
    args = parser.parse_args(argv)

    engine, url = prepare(args.database_url, args.contacts, args.events_per_contact)
    settings = load_settings(database_url=url.render_as_string(hide_password=False))
    loaded = marks(engine)
    sets = {"20 buckets": BUCKETS}
    if args.new_nodes:
        sets["20 new-node"] = NEW_BUCKETS
    materialise(engine, [bucket for buckets in sets.values() for bucket in buckets])
    runtimes = {
        label: Runtime(engine=engine, registry=Registry(buckets), settings=settings)
        for label, buckets in sets.items()
    }
    runtimes["no buckets"] = Runtime(engine=engine, registry=Registry(), settings=settings)
    figures: dict[str, dict[str, dict[str, float]]] = {}
    try:
        for seed, (label, rt) in enumerate(runtimes.items()):
            figures[label] = {
                "single": single(rt, stream(args.single, args.contacts, seed * 10 + 1)),
                "batch 100": batched(rt, stream(args.batched, args.contacts, seed * 10 + 2), 100),
                "batch 1000": batched(rt, stream(args.batched, args.contacts, seed * 10 + 3), 1000),
            }
    finally:
        with engine.begin() as conn:  # leave the dataset as generated
            clean(conn, loaded)
        engine.dispose()
    report(figures)
    return 0


def report(figures: dict[str, dict[str, dict[str, float]]]) -> None:
    """Rates per mode and set; ratios: time with 20 buckets / time with none (the cost of
    bucket evaluation) and, with ``--new-nodes``, new-node buckets / the classic 20."""
    labels = list(figures)
    newer = "20 new-node" in figures
    head = "".join(f"{label:>16}" for label in labels)
    print(f"\n{'mode':<12}{head} {'ratio':>7}" + (f" {'new/20':>7}" if newer else ""))
    for mode in ("single", "batch 100", "batch 1000"):
        rates = {label: figures[label][mode]["events_per_s"] for label in labels}
        line = "".join(f"{rates[label]:>11,.0f} ev/s" for label in labels)
        line += f" {rates['no buckets'] / rates['20 buckets']:>7.2f}"
        if newer:
            line += f" {rates['20 buckets'] / rates['20 new-node']:>7.2f}"
        print(f"{mode:<12}{line}")
    for label, modes in figures.items():
        print(
            f"single-event latency, {label}: p50 {modes['single']['p50_ms']:.2f} ms,"
            f" p99 {modes['single']['p99_ms']:.2f} ms"
        )
    print("(ratio = time with 20 buckets / time with none: the cost of bucket evaluation)")


if __name__ == "__main__":
    sys.exit(main())
