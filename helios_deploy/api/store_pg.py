"""The shared job store: rows in PostgreSQL (``--store postgresql://...``), videos in a folder every API
replica mounts (``--videos DIR``). Any replica answers for any job; each replica runs the jobs it created
or claimed, under a lease it renews (store_base.py), so a dead replica's jobs are re-queued and run by
another one, and a live replica's jobs are never touched.

Connections come from a psycopg_pool pool (each call takes one for its transaction, so calls from the API's
threadpool run side by side); a connection the server dropped is checked and replaced on the next call. When
the server cannot be reached, a call fails within a few seconds with one StoreError naming the server.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

from .store_base import BaseStore, StoreError

_SCHEMA = """CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, key TEXT NOT NULL, created_at BIGINT NOT NULL, completed_at BIGINT, expires_at BIGINT,
    status TEXT NOT NULL, progress INTEGER NOT NULL DEFAULT 0, model TEXT NOT NULL, prompt TEXT NOT NULL,
    seconds TEXT NOT NULL, size TEXT NOT NULL, error_code TEXT, error_message TEXT, params TEXT NOT NULL,
    owner TEXT, lease_until DOUBLE PRECISION, attempts INTEGER NOT NULL DEFAULT 1, seq BIGSERIAL);
CREATE INDEX IF NOT EXISTS jobs_key_seq ON jobs (key, seq);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS prompt_changes (stream_id TEXT NOT NULL, from_chunk INTEGER NOT NULL, prompt TEXT NOT NULL,
    recorded_at DOUBLE PRECISION NOT NULL);
CREATE INDEX IF NOT EXISTS prompt_changes_stream ON prompt_changes (stream_id);
"""
_SCHEMA_LOCK = 0x68656C696F73  # advisory lock id: replicas starting together create the schema one at a time
TIMEOUT = 5.0  # seconds a call waits for a connection before it fails with StoreError


class PostgresStore(BaseStore):
    requeue = True
    _skip_locked = " FOR UPDATE SKIP LOCKED"
    _key_lock = "SELECT pg_advisory_xact_lock(hashtext(?))::text"

    def __init__(self, url: str, *, videos: str | Path, retention: float | None = None, lease: float = 30.0,
                 start: bool = True, timeout: float = TIMEOUT):
        import psycopg
        from psycopg_pool import ConnectionPool, PoolTimeout

        super().__init__(Path(videos), retention=retention, lease=lease, name=_shown(url))
        # the pool logs every failed reconnect while the server is away; our StoreError says it once per call
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
        self._errors = (psycopg.OperationalError, PoolTimeout)
        self._pool = ConnectionPool(url, min_size=1, max_size=8, timeout=timeout, open=False,
                                    check=ConnectionPool.check_connection, name="helios-jobs",
                                    kwargs={"autocommit": True, "connect_timeout": max(1, int(timeout))})
        try:
            self._pool.open(wait=True, timeout=timeout)
        except PoolTimeout:
            self._pool.close()
            raise StoreError(f"the job store's PostgreSQL server {self.name} cannot be reached",
                             fix="check the URL (postgresql://USER:PASSWORD@HOST:PORT/DATABASE) and that the "
                                 "server runs and accepts this user") from None
        try:
            with self._tx() as q:
                q("SELECT pg_advisory_xact_lock(?)::text", (_SCHEMA_LOCK,))
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    q(statement)
            self._open_folder()
            if start:
                self.start()
        except BaseException:
            self._close()
            raise

    @contextlib.contextmanager
    def _tx(self, write: bool = False):
        try:
            with self._pool.connection() as conn, conn.transaction():
                yield lambda sql, args=(): _rows(conn.execute(sql.replace("?", "%s"), args))
        except self._errors as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StoreError(f"the job store's PostgreSQL server {self.name} is unavailable ({first})",
                             fix="check that the server runs; calls succeed again as soon as it is back") from None

    def _close(self) -> None:
        self._pool.close()


def _rows(cursor) -> list[tuple]:
    return cursor.fetchall() if cursor.description is not None else []


def _shown(url: str) -> str:
    """The URL without its password."""
    return re.sub(r"(//[^:/@]*):[^@/]*@", r"\1:***@", url)
