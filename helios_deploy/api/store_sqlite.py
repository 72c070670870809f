"""The embedded job store: one SQLite file (``ROOT/jobs.sqlite``) and the videos in ``ROOT/videos``, for one host.

One server per store: opening takes an exclusive lock on ``ROOT/jobs.lock`` (fcntl, released by the kernel
when the process dies, even by kill -9), and a second server is refused with a message naming the first.
Because the lock proves that no other process runs the store's jobs, opening fails every job left queued or
running (``server_restarted``) at once, or marks it completed when its video was already moved into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from pathlib import Path

from .store_base import BaseStore, StoreError

_SCHEMA = """CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, key TEXT NOT NULL, created_at INTEGER NOT NULL, completed_at INTEGER,
    status TEXT NOT NULL, progress INTEGER NOT NULL DEFAULT 0, model TEXT NOT NULL, prompt TEXT NOT NULL,
    seconds TEXT NOT NULL, size TEXT NOT NULL, error_code TEXT, error_message TEXT, params TEXT NOT NULL,
    seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_key_seq ON jobs (key, seq);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS prompt_changes (stream_id TEXT NOT NULL, from_chunk INTEGER NOT NULL, prompt TEXT NOT NULL,
    recorded_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS prompt_changes_stream ON prompt_changes (stream_id);
"""
# columns added since the first version of the store (an older jobs.sqlite gets them on open)
_ADDED = {"expires_at": "INTEGER", "owner": "TEXT", "lease_until": "REAL", "attempts": "INTEGER NOT NULL DEFAULT 1"}


class SqliteStore(BaseStore):
    requeue = False
    _next_seq = "(SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs)"

    def __init__(self, root: str | Path, *, videos: str | Path | None = None, retention: float | None = None,
                 lease: float = 30.0, start: bool = True):
        root = Path(root)
        super().__init__(Path(videos) if videos else root / "videos", retention=retention, lease=lease,
                         name=str(root))
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(PermissionError):
            os.chmod(root, 0o700)
        self._lockfd = _exclusive(root / "jobs.lock")
        self._lock = threading.RLock()
        self.path = root / "jobs.sqlite"
        self._db = None
        try:
            self._connect()
            self._open_folder()
            if start:
                self.start()
        except BaseException:
            self._close()
            raise

    def _connect(self) -> None:
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)  # the WAL and shared-memory files take the database file's mode
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=5)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            have = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
            for name, kind in _ADDED.items():
                if name not in have:
                    self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
            self._db.execute("PRAGMA quick_check").fetchall()
        except sqlite3.DatabaseError as e:
            raise self._error(e) from None

    def _error(self, e: sqlite3.Error) -> StoreError:
        text = str(e)
        if "locked" in text or "busy" in text:
            return StoreError(f"the job store's database {self.path} is locked by another program ({text})",
                              fix="stop whatever else opened it (one server per SQLite store), then try again")
        return StoreError(f"the job store's database {self.path} cannot be read ({text}): it is damaged or not a "
                          "job store", fix=f"move {self.path} aside to start an empty store (its jobs are lost), or "
                          "restore it from a backup")

    @contextlib.contextmanager
    def _tx(self, write: bool = False):
        with self._lock:
            if self._db is None:
                raise StoreError(f"the job store {self.path} is closed")
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.DatabaseError as e:
                raise self._error(e) from None
            ok = False
            try:
                yield lambda sql, args=(): self._db.execute(sql, args).fetchall()
                ok = True
            except sqlite3.DatabaseError as e:
                raise self._error(e) from None
            finally:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("COMMIT" if ok else "ROLLBACK")

    def _close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
        if self._lockfd is not None:
            os.close(self._lockfd)  # releases the lock
            self._lockfd = None


def _exclusive(path: Path) -> int:
    """An exclusive fcntl lock on ``path`` (which then holds our pid), or StoreError naming the holder."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreError(f"another server is already using the job store {path.parent} (process {holder})",
                         fix="stop that server, or give this one its own --store folder; to run several API "
                             "replicas on one store, use --store postgresql://...") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd
