"""A PostgreSQL server of the test's own, which the test may restart and crash at will.

The machine's server (``BUCKETS_TEST_DATABASE_URL``) is shared with other people's tests, so
fault tests never restart it: they start a private one from the binaries the ``pgserver``
package ships (no system PostgreSQL needed), on a free TCP port of 127.0.0.1, in a temporary
directory. ``initdb`` refuses to run as root, so as root the server runs as the system user
``pgserver`` (the one pgserver itself creates and uses); otherwise as the current user.

``fsync=off``: a crash of PostgreSQL's processes (``-m immediate``, ``kill -9``) loses nothing
with it — the operating system keeps what was written — and the tests run faster.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import URL

SYSTEM_USER = "pgserver"


def _bin(name: str) -> str:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # platformdirs without XDG_RUNTIME_DIR
        from pgserver._commands import POSTGRES_BIN_PATH
    return str(POSTGRES_BIN_PATH / name)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivateServer:
    """initdb + pg_ctl on a temporary directory; :meth:`restart` and :meth:`terminate`."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="buckets-faults-pg-"))
        self.pgdata = self.root / "pgdata"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                from pgserver.utils import (
                    ensure_folder_permissions,
                    ensure_prefix_permissions,
                    ensure_user_exists,
                )
            import stat

            entry = ensure_user_exists(SYSTEM_USER)
            assert entry is not None
            binaries = Path(_bin("postgres")).parent
            ensure_prefix_permissions(binaries)
            readable = stat.S_IRGRP | stat.S_IROTH
            ensure_folder_permissions(binaries, readable | stat.S_IXGRP | stat.S_IXOTH)
            ensure_folder_permissions(binaries.parent / "lib", readable)
            self.root.chmod(0o755)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self.user = SYSTEM_USER
        self._run(
            _bin("initdb"),
            "-D",
            str(self.pgdata),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        options = (
            f"-p {self.port} -h 127.0.0.1 -k {self.root} -c fsync=off -c full_page_writes=off"
            " -c max_connections=200"
        )
        self._options = ["-o", options, "-l", str(self.log)]
        self._pg_ctl("start")

    @property
    def url(self) -> URL:
        return URL.create(
            "postgresql+psycopg", username="postgres", host="127.0.0.1", port=self.port
        ).set(database="postgres")

    def _run(self, *command: str) -> None:
        subprocess.run(command, check=True, capture_output=True, user=self.user, timeout=120)

    def _pg_ctl(self, *action: str) -> None:
        command = [_bin("pg_ctl"), "-D", str(self.pgdata), *self._options, "-w", "-t", "60"]
        subprocess.run(
            [*command, *action], check=True, capture_output=True, user=self.user, timeout=120
        )

    def restart(self, mode: str) -> None:
        """``pg_ctl restart -m fast|immediate`` (``immediate``: a crash, then recovery)."""
        self._pg_ctl("restart", "-m", mode)

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("stop", "-m", mode)

    def start(self) -> None:
        self._pg_ctl("start")

    def terminate(self, database: str) -> int:
        """``pg_terminate_backend`` of every connection to ``database``; how many."""
        with self.connect() as conn:
            return len(
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    (database,),
                ).fetchall()
            )

    def connect(self, database: str = "postgres") -> psycopg.Connection[Any]:
        url = self.url.set(drivername="postgresql", database=database)
        return psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)

    def wait_ready(self, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                self.connect().close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def create_database(self, name: str, template: str | None = None) -> URL:
        suffix = f' TEMPLATE "{template}"' if template else ""
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"{suffix}')
        return self.url.set(database=name)

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self._pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(self.root, ignore_errors=True)
