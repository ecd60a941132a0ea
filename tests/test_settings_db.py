"""Settings come from BUCKETS_* variables; database URLs are normalised or rejected clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from buckets.db import connect, create_engine, parse_database_url
from buckets.errors import ConfigError, DatabaseUnavailableError
from buckets.settings import DEFAULT_RECONCILE_CRON, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BUCKETS_DATABASE_URL", "BUCKETS_DEFINITIONS", "BUCKETS_RECONCILE_CRON"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    "raw",
    [
        "postgres://u:p@db.example:5433/app",
        "postgresql://u:p@db.example:5433/app",
        "postgresql+psycopg2://u:p@db.example:5433/app",
        "  postgresql+psycopg://u:p@db.example:5433/app  ",
    ],
)
def test_postgres_urls_are_normalised_to_psycopg3(raw: str):
    url = parse_database_url(raw)
    assert url.drivername == "postgresql+psycopg"
    assert (url.host, url.port, url.database, url.username) == ("db.example", 5433, "app", "u")


def test_non_postgres_and_garbage_urls_are_rejected_naming_their_source():
    with pytest.raises(
        ConfigError, match=r"^--database-url: buckets needs PostgreSQL, got a 'mysql'"
    ):
        parse_database_url("mysql://u@h/db", source="--database-url")
    with pytest.raises(ConfigError, match=r"^BUCKETS_DATABASE_URL: cannot parse 'not a url'"):
        parse_database_url("not a url")


def test_settings_read_the_buckets_prefix_and_explicit_overrides_win(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("BUCKETS_DATABASE_URL", "postgresql://env@h/db")
    monkeypatch.setenv("BUCKETS_DEFINITIONS", "myapp.buckets")
    monkeypatch.setenv("BUCKETS_DATA_DIR", str(tmp_path))

    settings = load_settings()
    assert settings.database_url == "postgresql://env@h/db"
    assert settings.definitions == "myapp.buckets"
    assert settings.reconcile_cron == DEFAULT_RECONCILE_CRON == "*/5 * * * *"
    assert settings.embedded_pgdata == tmp_path / "pgdata"

    overridden = load_settings(database_url="postgresql://cli@h/db", definitions=None)
    assert overridden.database_url == "postgresql://cli@h/db"
    assert overridden.definitions == "myapp.buckets"  # None means "not given"


def test_blank_url_means_unset(monkeypatch):
    monkeypatch.setenv("BUCKETS_DATABASE_URL", "   ")
    assert load_settings().database_url is None


def test_bad_crontab_is_a_config_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("BUCKETS_RECONCILE_CRON", "every five minutes")
    with pytest.raises(ConfigError, match=r"^BUCKETS_RECONCILE_CRON: not a valid crontab"):
        load_settings()


def test_unreachable_database_is_one_line_without_the_password():
    engine = create_engine("postgresql://alice:s3cret@127.0.0.1:1/nowhere")
    try:
        with pytest.raises(DatabaseUnavailableError) as failure:
            connect(engine)
    finally:
        engine.dispose()
    message = str(failure.value)
    assert message.startswith("cannot connect to postgresql+psycopg://alice:***@127.0.0.1:1/")
    assert "s3cret" not in message
    assert "\n" not in message


def test_engine_talks_to_the_test_database(work_engine: sa.Engine):
    with connect(work_engine) as conn:
        assert conn.execute(sa.text("SELECT current_setting('server_version_num')::int")).scalar()


def test_lists_travel_in_binary_and_arrive_intact(work_engine: sa.Engine):
    """The engine's connections send lists in the binary array format (cheaper to dump);
    whatever the elements, the server receives exactly the list given."""
    from psycopg.adapt import PyFormat, Transformer

    awkward = ["a,b", 'q"uote', "{braces}", "NULL", "back\\slash", " space ", "ü", ""]
    given = {
        "texts": (awkward, "TEXT[]"),
        "with_null": ([None, "x"], "TEXT[]"),
        "ids": ([1, None, 2**40], "BIGINT[]"),
        "empty": ([], "BIGINT[]"),
        "instants": ([None], "TIMESTAMPTZ[]"),
    }
    with connect(work_engine) as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        dumper = Transformer(raw).get_dumper(["x"], PyFormat.AUTO)
        assert type(dumper).__name__ == "ListBinaryDumper"
        for name, (values, cast) in given.items():
            back = conn.execute(sa.text(f"SELECT CAST(:v AS {cast})"), {"v": values}).scalar()
            assert back == values, name
