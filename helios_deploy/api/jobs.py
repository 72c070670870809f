"""The video job store: rows (SQLite on one host, or PostgreSQL shared by API replicas) and the finished
videos as ``<id>.mp4`` in one folder.

    store = open_store("jobs/")                                   # jobs/jobs.sqlite, jobs/videos/ (one host)
    store = open_store("postgresql://u:p@db/helios", videos="/shared/videos", retention=parse_duration("7d"))
    job = store.reserve(key="...", limit=2, model="helios", prompt="a cat", seconds="2.75", size="128x64",
                        params={...})                            # None: this key already has 2 active jobs
    store.update(job["id"], status="in_progress", progress=50)
    write_mp4(store.staging_path(job["id"]), frames)              # then:
    store.complete(job["id"], store.staging_path(job["id"]))     # or store.fail(job["id"], code, message)
    store.video_path(job["id"])   # only for ids of the store's own shape: never a path outside the folder

Every call is one transaction and safe from any thread. A database that cannot be used (unreachable,
locked, corrupt, or an SQLite store another server holds) is one StoreError (a UserError, ``code``
"store_unavailable"), never a raw driver traceback. Opening reconciles files with rows (store_base.py) and
starts a thread that renews this replica's leases, reclaims dead replicas' jobs, hands re-queued jobs to
the callback given to ``serve_queue()``, and deletes expired jobs (``retention`` seconds after they end).
Ids are random (``video_`` + 32 hex digits) and checked against that shape before they become a file name.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .store_base import ACTIVE, ID_RE, BaseStore, StoreError, parse_duration
from .store_sqlite import SqliteStore

__all__ = ["ACTIVE", "ID_RE", "BaseStore", "JobStore", "StoreError", "is_url", "open_store", "parse_duration"]

JobStore = SqliteStore  # the embedded default: JobStore("jobs/")
DEFAULT_RETENTION = "7d"
LEASE_SECONDS = 30.0


def is_url(spec) -> bool:
    return str(spec).startswith(("postgresql://", "postgres://"))


def open_store(spec: str | Path, *, videos: str | Path | None = None, retention: float | None = None,
               lease: float = LEASE_SECONDS) -> BaseStore:
    """A PostgreSQL store for a ``postgresql://`` URL (``videos`` is then required: the folder every replica
    shares), else the SQLite store in the folder ``spec`` (videos in ``spec/videos`` unless given)."""
    if is_url(spec):
        if videos is None:
            raise UserError("a PostgreSQL job store needs the folder for its videos", expected="--videos DIR, a "
                            "folder every API replica mounts", fix="--store postgresql://... --videos /shared/videos")
        from .store_pg import PostgresStore

        return PostgresStore(str(spec), videos=videos, retention=retention, lease=lease)
    return SqliteStore(spec, videos=videos, retention=retention, lease=lease)
