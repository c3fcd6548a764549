"""PostgreSQL for tests: find a running server, or start a private one, and hand out fresh databases.

Order: the server at ``EDGE_TEST_PG_URL`` if set, else ``postgresql://postgres@127.0.0.1:5432/postgres`` if it
answers, else a private server: ``initdb`` into a temporary directory and ``pg_ctl start`` on a free loopback port
(trust authentication, Unix socket in the same directory, fsync off: test data need not survive a crash). initdb
refuses to run as root, so as root the server runs as the ``postgres`` user (``runuser``) in a directory it owns.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
from mqtt_broker import free_port

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def answers(url: str, timeout: int = 2) -> bool:
    """Whether a PostgreSQL server accepts a connection at ``url``."""
    try:
        with psycopg.connect(url, connect_timeout=timeout, autocommit=True) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def running_server_url() -> str | None:
    """The URL of the configured or default server if it answers, else None."""
    url = os.environ.get("EDGE_TEST_PG_URL", DEFAULT_URL)
    return url if answers(url) else None


class PrivateServer:
    """A PostgreSQL cluster of its own, on a free port of 127.0.0.1, removed when stopped."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="edge-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=timeout)

    def start(self) -> None:
        """initdb and start; waits until the server accepts connections."""
        self._run(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"
        )
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off -c full_page_writes=off"
        self._run(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), "-o", options, "-w", "start"
        )

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its directory."""
        with contextlib.suppress(subprocess.SubprocessError):
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """Create an empty database on the server of ``admin_url``; drop it afterwards.

    Yields:
        The URL of the new database.
    """
    name = f"edge_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield urllib.parse.urlsplit(admin_url)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
