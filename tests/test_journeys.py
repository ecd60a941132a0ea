"""Journeys end to end (SPEC §9): enrollment from the ledger, exits, retries, validation."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from buckets import b, define_bucket, delete_contact, ingest_event, ingest_events, journey
from buckets.dispatcher import Dispatcher, Enrollment, complete_enrollment, dispatch_once
from buckets.journeys import JourneyError
from buckets.membership import Policy, join, pairs
from buckets.models import bucket_transitions, contacts, journey_enrollments
from buckets.registry import Registry
from tests.test_reconcile import deployed
from workflows.reconcile import reconcile

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
D = timedelta(days=1)
PRO = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"), entry_limit="once")
DORMANT = define_bucket(
    id="went-dormant",
    criteria=b.all(
        b.event("feature.used").exists(), b.event("feature.used").within("7d").not_exists()
    ),
)


class Inbox:
    """Handlers that record what they were given (and can be told to fail)."""

    def __init__(self) -> None:
        self.calls: list[Enrollment] = []
        self.failing: set[str] = set()
        self.lock = threading.Lock()

    def handler(self, enrollment: Enrollment) -> None:
        with self.lock:
            self.calls.append(enrollment)
        if enrollment.external_id in self.failing:
            raise RuntimeError(f"cannot reach {enrollment.external_id}")


def enrollments(rt: Any) -> list[Any]:
    with rt.engine.connect() as conn:
        return conn.execute(
            sa.select(journey_enrollments, contacts.c.external_id)
            .join(contacts, contacts.c.id == journey_enrollments.c.contact_id)
            .order_by(journey_enrollments.c.id)
        ).all()


def plan(rt: Any, who: str, value: str, at: datetime) -> None:
    ingest_event(who, "x", {}, contact_properties={"plan": value}, now=at, runtime=rt)


def test_enter_enrolls_and_leave_exits_from_ingest(make_runtime):
    inbox = Inbox()
    welcome = journey(id="welcome", trigger=PRO.entered, exit_on=[PRO.left])(inbox.handler)
    rt = make_runtime(PRO, journeys=[welcome])
    plan(rt, "alice", "pro", T0)
    counts = dispatch_once(rt, now=T0)
    assert (counts.transitions, counts.enrolled, counts.delivered) == (1, 1, 1)
    [call] = inbox.calls
    assert (call.journey_id, call.external_id, call.bucket_id, call.epoch, call.attempt) == (
        "welcome",
        "alice",
        "pro",
        1,
        1,
    )
    assert call.idempotency_key == "bucket:pro:alice:entered:1"
    [row] = enrollments(rt)
    assert (row.status, row.delivered_at, row.attempts) == ("active", T0, 1)
    plan(rt, "alice", "free", T0 + D)
    assert dispatch_once(rt, now=T0 + D).exited == 1
    [row] = enrollments(rt)
    assert (row.status, row.finished_at) == ("exited", T0 + D)
    assert dispatch_once(rt, now=T0 + 2 * D).transitions == 0  # nothing left, nothing twice


def test_cron_joins_enroll_too(make_runtime):
    inbox = Inbox()
    winback = journey(id="winback", trigger=DORMANT.entered, exit_on=[DORMANT.left])(inbox.handler)
    rt = make_runtime(DORMANT, journeys=[winback])
    deployed(rt, DORMANT)
    ingest_event("u", "feature.used", {}, now=T0, runtime=rt)
    reconcile(T0 + 8 * D, runtime=rt)
    dispatch_once(rt, now=T0 + 8 * D)
    assert [(c.external_id, c.bucket_id, c.kind) for c in inbox.calls] == [
        ("u", "went-dormant", "entered")
    ]
    ingest_event("u", "feature.used", {}, now=T0 + 9 * D, runtime=rt)  # back: leaves, exits
    dispatch_once(rt, now=T0 + 9 * D)
    assert [row.status for row in enrollments(rt)] == ["exited"]


def test_generic_triggers_match_every_bucket(make_runtime):
    inbox = Inbox()
    audit = journey(id="audit", trigger="bucket:entered", concurrent=True)(inbox.handler)
    leavers = journey(id="leavers", trigger="bucket:left", concurrent=True)(inbox.handler)
    rt = make_runtime(PRO, DORMANT, journeys=[audit, leavers])
    deployed(rt, DORMANT)
    plan(rt, "a", "pro", T0)
    ingest_event("a", "feature.used", {}, now=T0, runtime=rt)
    reconcile(T0 + 8 * D, runtime=rt)
    plan(rt, "a", "free", T0 + 8 * D)
    dispatch_once(rt, now=T0 + 9 * D)
    got = sorted((c.journey_id, c.bucket_id, c.kind) for c in inbox.calls)
    assert got == [
        ("audit", "pro", "entered"),
        ("audit", "went-dormant", "entered"),
        ("leavers", "pro", "left"),
    ]


def test_suppressed_and_silent_transitions_never_enroll(make_runtime):
    inbox = Inbox()
    welcome = journey(id="welcome", trigger=PRO.entered)(inbox.handler)
    rt = make_runtime(PRO, journeys=[welcome])
    with rt.engine.begin() as conn:  # a first-time backfill's silent join
        conn.execute(sa.insert(contacts).values(external_id="old"))
        old = conn.execute(sa.select(contacts.c.id)).scalar_one()
        join(conn, pairs(["pro"], [old]), [Policy.of(PRO)], now=T0, source="backfill", silent=True)
    plan(rt, "a", "pro", T0)
    plan(rt, "a", "free", T0 + D)
    plan(rt, "a", "pro", T0 + 2 * D)  # entry limit `once`: suppressed
    delete_contact("a", now=T0 + 3 * D, runtime=rt)  # not emitted
    dispatch_once(rt, now=T0 + 3 * D)
    assert [(c.external_id, c.epoch) for c in inbox.calls] == [("a", 1)]
    with rt.engine.connect() as conn:
        undispatched = conn.execute(
            sa.select(sa.func.count()).where(bucket_transitions.c.dispatched_at.is_(None))
        ).scalar_one()
    assert undispatched == 3  # the silent, suppressed and deletion rows are never claimed


def test_failing_handler_is_retried_with_backoff_then_failed_without_blocking(make_runtime):
    inbox = Inbox()
    inbox.failing = {"bad"}
    welcome = journey(id="welcome", trigger=PRO.entered, max_attempts=3, backoff="1m")(
        inbox.handler
    )
    rt = make_runtime(PRO, journeys=[welcome])
    plan(rt, "bad", "pro", T0)
    plan(rt, "good", "pro", T0)
    first = dispatch_once(rt, now=T0)
    assert (first.delivered, first.retried) == (1, 1)
    bad = next(row for row in enrollments(rt) if row.external_id == "bad")
    assert (bad.attempts, bad.next_attempt_at, bad.status) == (
        1,
        T0 + timedelta(minutes=1),
        "active",
    )
    assert "RuntimeError: cannot reach bad" in bad.last_error
    assert dispatch_once(rt, now=T0 + timedelta(seconds=59)).retried == 0  # not due yet
    assert dispatch_once(rt, now=T0 + timedelta(minutes=1)).retried == 1  # 2nd attempt
    bad = next(row for row in enrollments(rt) if row.external_id == "bad")
    assert bad.next_attempt_at == T0 + timedelta(minutes=3)  # backoff doubled
    last = dispatch_once(rt, now=T0 + timedelta(minutes=3))
    assert last.failed == 1
    bad = next(row for row in enrollments(rt) if row.external_id == "bad")
    assert (bad.status, bad.attempts) == ("failed", 3)
    assert [c.attempt for c in inbox.calls if c.external_id == "bad"] == [1, 2, 3]
    assert [c.external_id for c in inbox.calls].count("good") == 1


def test_a_delivery_left_by_a_dead_dispatcher_is_made_again(make_runtime):
    inbox = Inbox()
    welcome = journey(id="welcome", trigger=PRO.entered)(inbox.handler)
    rt = make_runtime(PRO, journeys=[welcome])
    plan(rt, "a", "pro", T0)
    dispatcher = Dispatcher(rt)
    _, deliveries = dispatcher.dispatch_batch(T0)  # enrolled and committed; then "crashed"
    assert len(deliveries) == 1
    assert dispatch_once(rt, now=T0 + timedelta(minutes=4)).delivered == 0  # still reserved
    assert dispatch_once(rt, now=T0 + timedelta(minutes=5)).delivered == 1
    assert [c.attempt for c in inbox.calls] == [1]


def test_one_run_at_a_time_unless_concurrent(make_runtime):
    inbox = Inbox()
    solo = journey(id="solo", trigger=PRO.entered)(inbox.handler)
    many = journey(id="many", trigger=PRO.entered, concurrent=True)(inbox.handler)
    unlimited = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"))
    rt = make_runtime(unlimited, journeys=[solo, many])
    for day, value in enumerate(["pro", "free", "pro"]):
        plan(rt, "a", value, T0 + day * D)
    dispatch_once(rt, now=T0 + 3 * D)
    statuses = sorted((row.journey_id, row.status) for row in enrollments(rt))
    assert statuses == [
        ("many", "active"),
        ("many", "active"),
        ("solo", "active"),
        ("solo", "skipped"),
    ]
    [first_solo] = [
        row for row in enrollments(rt) if row.journey_id == "solo" and row.status == "active"
    ]
    assert complete_enrollment(first_solo.id, now=T0 + 4 * D, runtime=rt) is True
    assert complete_enrollment(first_solo.id, now=T0 + 4 * D, runtime=rt) is False
    plan(rt, "a", "free", T0 + 5 * D)
    plan(rt, "a", "pro", T0 + 6 * D)
    dispatch_once(rt, now=T0 + 6 * D)
    assert [row.status for row in enrollments(rt) if row.journey_id == "solo"] == [
        "completed",
        "skipped",
        "active",
    ]


def test_two_dispatchers_in_parallel_never_enroll_twice(make_runtime):
    inbox = Inbox()
    welcome = journey(id="welcome", trigger=PRO.entered, exit_on=[PRO.left])(inbox.handler)
    everything = journey(id="everything", trigger="bucket:entered", concurrent=True)(inbox.handler)
    unlimited = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"))
    rt = make_runtime(unlimited, journeys=[welcome, everything])
    events = [
        {
            "external_id": f"c{i % 150}",
            "event": "x",
            "contact_properties": {"plan": ["pro", "free"][i // 150 % 2]},
        }
        for i in range(1200)
    ]
    ingest_events(events, now=T0, runtime=rt)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            Dispatcher(rt, batch_size=37).drain(T0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    dispatch_once(rt, now=T0)  # whatever a thread found locked by the other
    with rt.engine.connect() as conn:
        emitted_entered = (
            conn.execute(
                sa.select(bucket_transitions.c.id).where(
                    bucket_transitions.c.emitted, bucket_transitions.c.kind == "entered"
                )
            )
            .scalars()
            .all()
        )
    rows = enrollments(rt)
    everything_rows = [row.transition_id for row in rows if row.journey_id == "everything"]
    assert sorted(everything_rows) == sorted(emitted_entered)  # exactly one each
    assert len(emitted_entered) == 600
    assert len([c for c in inbox.calls if c.journey_id == "everything"]) == 600
    # each contact's welcome runs were exited by its leaves, in order: at most one active
    active = [row for row in rows if row.journey_id == "welcome" and row.status == "active"]
    assert len(active) <= 150
    assert len({row.contact_id for row in active}) == len(active)


def test_validation_names_the_journey_and_field():
    handler = Inbox().handler
    with pytest.raises(
        JourneyError, match="journey j: trigger: 'bucket:joined:pro' is not a transition name"
    ):
        journey(id="j", trigger="bucket:joined:pro")(handler)
    with pytest.raises(JourneyError, match="journey j: exit_on: must be a list"):
        journey(id="j", trigger=PRO.entered, exit_on=PRO.left)(handler)
    with pytest.raises(JourneyError, match="journey j: max_attempts: must be an integer >= 1"):
        journey(id="j", trigger=PRO.entered, max_attempts=0)(handler)
    unknown = journey(id="j", trigger="bucket:entered:nope")(handler)
    with pytest.raises(JourneyError, match="journey j: trigger: unknown bucket 'nope'"):
        Registry([PRO], [unknown])
    leaving = journey(id="k", trigger=PRO.entered, exit_on=["bucket:left:ghost"])(handler)
    with pytest.raises(JourneyError, match="journey k: exit_on: unknown bucket 'ghost'"):
        Registry([PRO], [leaving])
    one = journey(id="dup", trigger=PRO.entered)(handler)
    two = journey(id="dup", trigger="bucket:left")(handler)
    with pytest.raises(JourneyError, match="journey dup: id: duplicate journey id"):
        Registry([PRO], [one, two])


def test_journeys_load_next_to_their_buckets(tmp_path):
    source = tmp_path / "defs.py"
    source.write_text(
        "from buckets import b, define_bucket, journey\n"
        "pro = define_bucket(id='pro', criteria=b.prop('plan').eq('pro'))\n"
        "@journey(id='welcome', trigger=pro.entered, exit_on=[pro.left])\n"
        "def welcome(enrollment):\n"
        "    return enrollment\n"
    )
    registry = Registry.load(str(source))
    assert [j.id for j in registry.journeys] == ["welcome"]
    assert registry.journeys[0].exited_by("bucket:left:pro")
    assert Registry.load(str(source)).journeys[0] is registry.journeys[0]  # imported once
