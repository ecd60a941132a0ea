"""The migrations are real code: they build the models' schema, and undo it."""

from __future__ import annotations

import json
import subprocess
import sys

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from buckets.migrations import current_revision, downgrade, head_revision, upgrade
from buckets.models import metadata
from tests.conftest import CloneDB

SPEC_TABLES = {
    "bucket_due",  # the due queue (not in SPEC §2; the engine's own)
    "worker_heartbeats",  # `buckets run` processes (health; not in SPEC §2)
    "catalog_entries",  # event names and property keys seen (not in SPEC §2)
    "contacts",
    "user_events",
    "bucket_configs",
    "bucket_memberships",
    "bucket_transitions",
    "backfill_jobs",
    "journey_enrollments",
}


def _tables(db: CloneDB) -> set[str]:
    return set(sa.inspect(db.engine).get_table_names()) - {"alembic_version"}


def _revision(db: CloneDB) -> str | None:
    with db.engine.connect() as conn:
        return current_revision(conn)


def test_upgrade_creates_every_spec_table_and_a_second_upgrade_is_a_no_op(empty_db: CloneDB):
    assert _tables(empty_db) == set()

    first = upgrade(empty_db.engine)
    assert first.before is None
    assert first.after == head_revision()
    assert _tables(empty_db) == SPEC_TABLES

    second = upgrade(empty_db.engine)
    assert not second.changed
    assert second.after == head_revision()
    assert _tables(empty_db) == SPEC_TABLES


def test_upgrade_downgrade_upgrade_round_trip(empty_db: CloneDB):
    upgrade(empty_db.engine)
    downgrade(empty_db.engine, "base")
    assert _tables(empty_db) == set()
    assert _revision(empty_db) is None

    upgrade(empty_db.engine)
    assert _tables(empty_db) == SPEC_TABLES
    assert _revision(empty_db) == head_revision()


def test_models_and_migrations_agree(clone_db: CloneDB):
    """Autogenerate against a migrated database finds nothing to do (`alembic check`)."""
    with clone_db.engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        assert compare_metadata(context, metadata) == []


def test_partial_indexes_have_the_predicates_the_models_declare(clone_db: CloneDB):
    """Autogenerate does not compare index predicates; check the ones correctness rests on."""
    with clone_db.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT indexname, indexdef FROM pg_indexes WHERE indexname LIKE 'uq_%'")
        ).all()
    definitions: dict[str, str] = {row.indexname: row.indexdef for row in rows}
    assert "WHERE (status = 'active'::text)" in definitions["uq_bucket_memberships_one_active"]
    assert "UNIQUE" in definitions["uq_bucket_memberships_one_active"]
    assert "(bucket_id, contact_id)" in definitions["uq_bucket_memberships_one_active"]
    assert "'pending'::text, 'running'::text" in definitions["uq_backfill_jobs_one_active"]
    assert "UNIQUE" in definitions["uq_backfill_jobs_one_active"]


def test_concurrent_upgrades_migrate_once(empty_db: CloneDB):
    """Several workers starting together: the advisory lock makes one migrate, others wait.

    Real processes running the real CLI (Alembic's module-level context is per process).
    """
    url = empty_db.url.render_as_string(hide_password=False)
    command = [sys.executable, "-m", "workflows.cli", "db", "upgrade", "--json"]
    procs = [
        subprocess.Popen([*command, "--database-url", url], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]

    assert [proc.returncode for proc in procs] == [0, 0, 0]
    reports = [json.loads(output) for output in outputs]
    assert sorted(report["changed"] for report in reports) == [False, False, True]
    assert {report["after"] for report in reports} == {head_revision()}
    assert _tables(empty_db) == SPEC_TABLES
