"""Explain (SPEC §10) on constructed histories, including the next instant of change."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from buckets import UnknownBucketError, UnknownContactError, b, define_bucket, ingest_event
from buckets.explain import explain
from buckets.models import bucket_memberships

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
D = timedelta(days=1)
US = timedelta(microseconds=1)
LAPSED = define_bucket(
    id="went-dormant",
    criteria=b.all(
        b.event("feature.used").exists(), b.event("feature.used").within("7d").not_exists()
    ),
)
BUSY = define_bucket(
    id="busy", criteria=b.event("feature.used").within("7d").at_least(2), max_dwell="3d"
)
PRO = define_bucket(
    id="pro", criteria=b.all(b.prop("plan").eq("pro"), b.prop("seats").gte(5)), min_dwell="2d"
)


def test_lapsing_contact_knows_when_it_will_join(make_runtime):
    rt = make_runtime(LAPSED)
    ingest_event("u", "feature.used", {}, occurred_at=T0, now=T0, runtime=rt)
    result = explain("went-dormant", "u", now=T0 + 3 * D, runtime=rt)
    assert (result.member, result.matches) == (False, False)
    assert [(leaf.value, leaf.count) for leaf in result.leaves] == [(True, 1), (False, 1)]
    assert result.leaves[1].window == (T0 - 4 * D, T0 + 3 * D)
    assert result.next_change is not None
    assert (result.next_change.at, result.next_change.reason) == (T0 + 7 * D + US, "criteria")
    data = result.to_dict()
    assert data["leaves"][1]["condition"] == "event 'feature.used' within 1w not_exists"


def test_member_sees_the_earliest_of_window_edge_and_max_dwell(make_runtime):
    rt = make_runtime(BUSY)
    ingest_event("u", "feature.used", {}, occurred_at=T0, now=T0, runtime=rt)
    ingest_event("u", "feature.used", {}, occurred_at=T0 + D, now=T0 + D, runtime=rt)
    result = explain("busy", "u", now=T0 + 2 * D, runtime=rt)
    assert (result.member, result.matches) == (True, True)
    assert result.membership is not None
    assert result.membership["epoch"] == 1
    assert result.membership["since"] == (T0 + D).isoformat()
    assert result.next_change is not None
    # the window edge (T0 + 7d) is later than the max dwell (joined T0+1d, + 3d)
    assert (result.next_change.at, result.next_change.reason) == (T0 + 4 * D, "max_dwell")


def test_window_edge_before_max_dwell(make_runtime):
    bucket = define_bucket(
        id="busy2", criteria=b.event("feature.used").within("1d").at_least(2), max_dwell="30d"
    )
    rt = make_runtime(bucket)
    for hours in (0, 6):
        at = T0 + timedelta(hours=hours)
        ingest_event("u", "feature.used", {}, occurred_at=at, now=at, runtime=rt)
    result = explain("busy2", "u", now=T0 + timedelta(hours=7), runtime=rt)
    assert result.next_change is not None
    assert (result.next_change.at, result.next_change.reason) == (T0 + D + US, "criteria")


def test_event_stamped_in_the_future_changes_the_answer_when_it_arrives(make_runtime):
    rt = make_runtime(BUSY)
    ingest_event("u", "feature.used", {}, occurred_at=T0, now=T0, runtime=rt)
    later = T0 + timedelta(minutes=3)
    ingest_event("u", "feature.used", {}, occurred_at=later, now=T0, runtime=rt)  # within skew
    result = explain("busy", "u", now=T0, runtime=rt)
    assert result.matches is False
    assert result.leaves[0].count == 1
    assert result.next_change is not None
    assert (result.next_change.at, result.next_change.reason) == (later, "criteria")


def test_property_leaves_show_the_values_and_a_pending_leave(make_runtime):
    rt = make_runtime(PRO)
    ingest_event("u", "x", {}, contact_properties={"plan": "pro", "seats": 9}, now=T0, runtime=rt)
    ingest_event("u", "x", {}, contact_properties={"seats": 2}, now=T0 + D, runtime=rt)  # deferred
    result = explain("pro", "u", now=T0 + D, runtime=rt)
    assert (result.member, result.matches) == (True, False)
    assert [(leaf.value, leaf.property_value) for leaf in result.leaves] == [
        (True, "pro"),
        (False, 2),
    ]
    assert result.next_change is not None
    assert (result.next_change.at, result.next_change.reason) == (T0 + 2 * D, "pending_leave")
    with rt.engine.connect() as conn:
        assert conn.execute(sa.select(bucket_memberships.c.pending_leave_at)).scalar() == T0 + 2 * D


def test_a_missing_property_and_no_clock_change(make_runtime):
    rt = make_runtime(PRO)
    ingest_event("u", "x", {}, contact_properties={"plan": "free"}, now=T0, runtime=rt)
    result = explain("pro", "u", now=T0, runtime=rt)
    assert result.leaves[1].to_dict()["present"] is False
    assert result.next_change is None


def test_unknown_bucket_or_contact_is_a_clear_error(make_runtime):
    rt = make_runtime(PRO)
    with pytest.raises(UnknownBucketError, match="nope: no such bucket"):
        explain("nope", "u", now=T0, runtime=rt)
    with pytest.raises(UnknownContactError, match="external_id 'ghost': no such contact"):
        explain("pro", "ghost", now=T0, runtime=rt)
