"""The synthetic dataset (workflows/synthetic.py): deterministic, shaped as promised, and it
leaves the schema intact."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from bench.generate import EVENT_WEIGHTS, generate, measured_shares
from buckets.models import metadata
from tests.conftest import CloneDB

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
DIGEST = sa.text(
    """
    SELECT md5(string_agg(c.id || c.external_id || c.email || c.properties::text, ','
                          ORDER BY c.id))
           || md5((SELECT string_agg(e.contact_id || e.event || e.properties::text
                                     || e.occurred_at::text, ',' ORDER BY e.id)
                   FROM user_events e))
    FROM contacts c
    """
)


def test_shape_is_what_benchmarks_rely_on(clone_db: CloneDB):
    result = generate(clone_db.url, contacts=3_000, events_per_contact=10, seed=7, now=NOW)

    contacts, ever, recent = measured_shares(clone_db.url, NOW)
    assert contacts == result.contacts == 3_000
    # What the database holds is what the generator says it made.
    assert (ever, recent) == (result.ever_feature_used, result.recent_feature_used)
    assert 0.57 <= ever / contacts <= 0.63
    assert 0.22 <= recent / contacts <= 0.28
    assert 25_000 <= result.events <= 35_000

    with clone_db.engine.connect() as conn:
        first, last, received_early = conn.execute(
            sa.text(
                "SELECT min(occurred_at), max(occurred_at),"
                " count(*) FILTER (WHERE received_at < occurred_at) FROM user_events"
            )
        ).one()
        names = set(conn.execute(sa.text("SELECT DISTINCT event FROM user_events")).scalars())
        plans = set(
            conn.execute(sa.text("SELECT DISTINCT properties->>'plan' FROM contacts")).scalars()
        )
        with_seats = conn.execute(
            sa.text("SELECT count(*) FROM contacts WHERE properties->'seats' IS NOT NULL")
        ).scalar_one()
        most, fewest = conn.execute(
            sa.text(
                "SELECT max(n), min(n) FROM"
                " (SELECT count(*) AS n FROM user_events GROUP BY contact_id) AS per_contact"
            )
        ).one()
    assert NOW - timedelta(days=90) <= first
    assert last <= NOW  # nothing after `now`
    assert names == {name for name, _ in EVENT_WEIGHTS}
    assert received_early == 0
    assert plans == {"free", "pro", "trial"}
    assert 0 < with_seats < contacts  # a key that is often missing
    assert fewest >= 1
    assert most >= 5 * 10  # heavy users exist: activity is skewed, not uniform


def test_same_seed_same_data_and_schema_left_as_the_migrations_made_it(clone_db: CloneDB):
    generate(clone_db.url, contacts=500, events_per_contact=8, seed=11, now=NOW)
    with clone_db.engine.connect() as conn:
        first = conn.execute(DIGEST).scalar()
        # The bulk path dropped and rebuilt the indexes and FK: they must be back as declared.
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, metadata) == []

    generate(clone_db.url, contacts=500, events_per_contact=8, seed=11, now=NOW, reset=True)
    with clone_db.engine.connect() as conn:
        assert conn.execute(DIGEST).scalar() == first

    generate(clone_db.url, contacts=500, events_per_contact=8, seed=12, now=NOW, reset=True)
    with clone_db.engine.connect() as conn:
        assert conn.execute(DIGEST).scalar() != first


def test_runs_append_after_existing_contacts(clone_db: CloneDB):
    generate(clone_db.url, contacts=200, events_per_contact=5, seed=1, now=NOW)
    second = generate(clone_db.url, contacts=300, events_per_contact=5, seed=2, now=NOW)
    assert second.first_contact_id == 201
    with clone_db.engine.connect() as conn:
        count, distinct_ids = conn.execute(
            sa.text("SELECT count(*), count(DISTINCT external_id) FROM contacts")
        ).one()
        orphans = conn.execute(
            sa.text(
                "SELECT count(*) FROM user_events e"
                " WHERE NOT EXISTS (SELECT 1 FROM contacts c WHERE c.id = e.contact_id)"
            )
        ).scalar()
    assert (count, distinct_ids, orphans) == (500, 500, 0)
