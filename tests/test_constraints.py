"""Each constraint of the schema rejects what it should, and only that.

Every rejected write runs in its own savepoint so the test can go on; the assertion names the
constraint that fired, so a test cannot pass because some *other* constraint failed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from buckets.models import (
    BackfillJob,
    BucketMembership,
    BucketTransition,
    Contact,
    JourneyEnrollment,
    UserEvent,
)

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@contextmanager
def rejected_by(session: Session, *constraints: str) -> Iterator[None]:
    """The block's flush must fail on ``constraints`` (any of them, when a row breaks several
    and PostgreSQL reports the first it checks); the session stays usable."""
    # The flush is what must fail; the savepoint confines the failure to this block.
    with pytest.raises(IntegrityError) as failure, session.begin_nested():  # noqa: PT012
        yield
        session.flush()
    assert failure.value.orig is not None
    assert failure.value.orig.diag.constraint_name in constraints  # type: ignore[attr-defined]


def add(session: Session, row: Any) -> Any:
    session.add(row)
    session.flush()
    return row


@pytest.fixture
def contact(session: Session) -> Contact:
    return add(session, Contact(external_id="c-1", properties={"plan": "pro"}))


def membership(contact: Contact, **overrides: Any) -> BucketMembership:
    fields: dict[str, Any] = {
        "bucket_id": "power-users",
        "contact_id": contact.id,
        "status": "active",
        "entered_at": NOW,
        "entry_count": 1,
        "source": "ingest",
    }
    fields.update(overrides)
    return BucketMembership(**fields)


def left_membership(contact: Contact, epoch: int) -> BucketMembership:
    return membership(
        contact,
        status="left",
        entry_count=epoch,
        left_at=NOW + timedelta(days=epoch),
        leave_reason="criteria",
    )


def transition(m: BucketMembership, **overrides: Any) -> BucketTransition:
    fields: dict[str, Any] = {
        "bucket_id": m.bucket_id,
        "contact_id": m.contact_id,
        "membership_id": m.id,
        "kind": "entered",
        "epoch": m.entry_count,
        "source": "ingest",
        "emitted": True,
        "occurred_at": NOW,
        "idempotency_key": f"bucket:{m.bucket_id}:c-1:entered:{m.entry_count}",
    }
    fields.update(overrides)
    return BucketTransition(**fields)


# --- memberships -------------------------------------------------------------------------


def test_second_active_membership_for_same_bucket_and_contact_fails(session, contact):
    add(session, membership(contact, entry_count=1))
    with rejected_by(session, "uq_bucket_memberships_one_active"):
        session.add(membership(contact, entry_count=2))


def test_active_membership_in_another_bucket_is_fine(session, contact):
    add(session, membership(contact))
    add(session, membership(contact, bucket_id="went-dormant"))


def test_left_rows_do_not_count_against_the_one_active_rule(session, contact):
    add(session, left_membership(contact, 1))
    add(session, left_membership(contact, 2))
    add(session, membership(contact, entry_count=3))
    rows = session.query(BucketMembership).filter_by(contact_id=contact.id).all()
    assert sorted((row.entry_count, row.status) for row in rows) == [
        (1, "left"),
        (2, "left"),
        (3, "active"),
    ]


def test_two_rows_cannot_share_an_epoch(session, contact):
    add(session, left_membership(contact, 1))
    with rejected_by(session, "uq_bucket_memberships_bucket_id_contact_id_entry_count"):
        session.add(membership(contact, entry_count=1))


def test_left_row_must_say_when_and_why(session, contact):
    with rejected_by(session, "ck_bucket_memberships_left_fields_match_status"):
        session.add(membership(contact, status="left", left_at=NOW))  # no leave_reason
    with rejected_by(session, "ck_bucket_memberships_left_fields_match_status"):
        session.add(membership(contact, status="left", leave_reason="criteria"))  # no left_at
    with rejected_by(session, "ck_bucket_memberships_left_fields_match_status"):
        session.add(membership(contact, left_at=NOW, leave_reason="criteria"))  # active


def test_membership_enumerations_are_closed(session, contact):
    with rejected_by(
        session,
        "ck_bucket_memberships_status_allowed",
        "ck_bucket_memberships_left_fields_match_status",
    ):
        session.add(membership(contact, status="paused"))
    with rejected_by(session, "ck_bucket_memberships_source_allowed"):
        session.add(membership(contact, source="cron"))
    with rejected_by(session, "ck_bucket_memberships_leave_reason_allowed"):
        session.add(membership(contact, status="left", left_at=NOW, leave_reason="bored"))
    with rejected_by(session, "ck_bucket_memberships_entry_count_positive"):
        session.add(membership(contact, entry_count=0))


# --- transitions -------------------------------------------------------------------------


def test_duplicate_transition_idempotency_key_fails(session, contact):
    m = add(session, membership(contact))
    add(session, transition(m))
    with rejected_by(session, "uq_bucket_transitions_idempotency_key"):
        session.add(transition(m))


def test_transition_must_be_emitted_or_say_what_suppressed_it(session, contact):
    m = add(session, membership(contact))
    with rejected_by(session, "ck_bucket_transitions_suppression_explained"):
        session.add(transition(m, emitted=False))
    with rejected_by(session, "ck_bucket_transitions_suppression_explained"):
        session.add(transition(m, emitted=True, suppressed_by="entry_limit"))
    add(session, transition(m, emitted=False, suppressed_by="backfill"))


def test_leave_transitions_carry_a_reason_and_entries_do_not(session, contact):
    m = add(session, membership(contact))
    with rejected_by(session, "ck_bucket_transitions_reason_matches_kind"):
        session.add(transition(m, kind="left", idempotency_key="k-left"))
    with rejected_by(session, "ck_bucket_transitions_reason_matches_kind"):
        session.add(transition(m, reason="criteria"))
    with rejected_by(session, "ck_bucket_transitions_reason_allowed"):
        session.add(transition(m, kind="left", reason="whim", idempotency_key="k-left"))
    add(session, transition(m, kind="left", reason="max_dwell", idempotency_key="k-left"))


# --- events and contacts -----------------------------------------------------------------


def event(contact: Contact, **overrides: Any) -> UserEvent:
    fields: dict[str, Any] = {
        "contact_id": contact.id,
        "event": "feature.used",
        "occurred_at": NOW,
        "received_at": NOW,
    }
    fields.update(overrides)
    return UserEvent(**fields)


def test_duplicate_event_idempotency_key_fails_but_many_events_may_have_none(session, contact):
    add(session, event(contact, idempotency_key="evt-1"))
    with rejected_by(session, "uq_user_events_idempotency_key"):
        session.add(event(contact, idempotency_key="evt-1"))
    add(session, event(contact))
    add(session, event(contact))


def test_reserved_and_empty_event_names_are_rejected(session, contact):
    with rejected_by(session, "ck_user_events_event_name_allowed"):
        session.add(event(contact, event="bucket:entered:power-users"))
    with rejected_by(session, "ck_user_events_event_name_allowed"):
        session.add(event(contact, event=""))
    add(session, event(contact, event="bucketed"))  # only the "bucket:" prefix is reserved


def test_properties_must_be_json_objects(session, contact):
    with rejected_by(session, "ck_user_events_properties_is_object"):
        session.add(event(contact, properties=[1, 2]))
    with rejected_by(session, "ck_contacts_properties_is_object"):
        session.add(Contact(external_id="c-2", properties="plan=pro"))


def test_duplicate_external_id_fails(session, contact):
    with rejected_by(session, "uq_contacts_external_id"):
        session.add(Contact(external_id="c-1"))
    with rejected_by(session, "ck_contacts_external_id_not_empty"):
        session.add(Contact(external_id=""))


def test_contact_properties_default_to_an_empty_object(session):
    created = add(session, Contact(external_id="c-3"))
    session.refresh(created)
    assert created.properties == {}
    assert created.created_at is not None


# --- backfill jobs -----------------------------------------------------------------------


def job(**overrides: Any) -> BackfillJob:
    fields: dict[str, Any] = {"bucket_id": "power-users", "mode": "first_time", "as_of": NOW}
    fields.update(overrides)
    return BackfillJob(**fields)


@pytest.mark.parametrize("first", ["pending", "running"])
@pytest.mark.parametrize("second", ["pending", "running"])
def test_second_non_terminal_job_for_a_bucket_fails(session, first, second):
    add(session, job(status=first))
    with rejected_by(session, "uq_backfill_jobs_one_active"):
        session.add(job(status=second, mode="reevaluate"))


def test_terminal_jobs_do_not_block_a_new_one(session):
    add(session, job(status="completed"))
    add(session, job(status="failed"))
    add(session, job(status="cancelled"))
    add(session, job(status="pending", mode="admin"))
    add(session, job(bucket_id="went-dormant", status="running"))  # other bucket: independent


def test_job_enumerations_are_closed(session):
    with rejected_by(session, "ck_backfill_jobs_mode_allowed"):
        session.add(job(mode="nightly"))
    with rejected_by(session, "ck_backfill_jobs_status_allowed"):
        session.add(job(status="done"))
    with rejected_by(session, "ck_backfill_jobs_counters_not_negative"):
        session.add(job(processed=-1))


# --- journey enrollments -----------------------------------------------------------------


def test_one_enrollment_per_journey_and_transition(session, contact):
    m = add(session, membership(contact))
    t = add(session, transition(m))
    add(session, JourneyEnrollment(journey_id="welcome", contact_id=contact.id, transition_id=t.id))
    with rejected_by(session, "uq_journey_enrollments_journey_id_transition_id"):
        session.add(
            JourneyEnrollment(journey_id="welcome", contact_id=contact.id, transition_id=t.id)
        )
    add(session, JourneyEnrollment(journey_id="upsell", contact_id=contact.id, transition_id=t.id))
