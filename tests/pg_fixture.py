"""A real PostgreSQL server for the tests: Debian's postgresql package, one server per test session.

``initdb`` + ``pg_ctl`` run as the ``postgres`` user when the tests run as root (PostgreSQL refuses root),
with the data and socket folders in a private temporary folder, listening on a free loopback port with
trust authentication (nothing else can reach it). Each test asks for its own database
(``postgres_server.database()``), so tests never see each other's rows. The Makefile's ``postgresql``
target installs the package; without it (and without root to install it) the tests that need it are skipped.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid

import pytest


def _bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return os.path.dirname(found[-1]) if found else None


class PostgresServer:
    def __init__(self, bindir: str, root: str, port: int):
        self.bindir, self.root, self.port = bindir, root, port
        self.data = os.path.join(root, "data")
        self.log = os.path.join(root, "server.log")
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        self._run(os.path.join(self.bindir, "initdb"), "-D", self.data, "--auth=trust", "-U", "postgres",
                  "--encoding=UTF8", "--no-sync")

    def start(self) -> None:
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                "-c fsync=off -c max_connections=200")
        self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-l", self.log, "-o", opts, "-w",
                  "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", mode, "-w", "stop")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    @contextlib.contextmanager
    def stopped(self, seconds: float = 0.0):
        """Stop the server (fast: connections are cut), wait ``seconds``, start it again at the end."""
        self.stop()
        try:
            time.sleep(seconds)
            yield
        finally:
            self.start()


@pytest.fixture(scope="session")
def postgres_server():
    """The session's PostgreSQL server (skipped with the reason when Debian's postgresql is not installed)."""
    from tests.api_helpers import free_port

    bindir = _bindir()
    if bindir is None:
        pytest.skip("Debian's postgresql package is not installed (make postgresql, as root, installs it)")
    pytest.importorskip("psycopg")
    root = tempfile.mkdtemp(prefix="helios-pg-")
    os.chmod(root, 0o700)
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
    server = PostgresServer(bindir, root, free_port())
    server.init()
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(postgres_server) -> str:
    """A fresh database on the session's server, for one test."""
    return postgres_server.database()
