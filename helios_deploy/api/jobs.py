"""The video job store: one SQLite file and the finished videos beside it, in one folder.

    store = JobStore("jobs/")           # jobs/jobs.sqlite, jobs/videos/<id>.mp4
    job = store.create(key="...", model="helios", prompt="a cat", seconds="2.75", size="128x64", params={...})
    store.update(job["id"], status="in_progress", progress=50)
    store.video_path(job["id"])         # only for ids of the store's own shape: never a path outside it

Opening the store marks every job left queued or in progress by a previous process as failed (it cannot
resume: its stream died with that process); finished jobs and their videos are kept. Ids are random
(``video_`` + 32 hex digits) and checked against that shape before they become a file name.
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
import threading
import time
from pathlib import Path

from ..errors import UserError

ID_RE = re.compile(r"video_[0-9a-f]{32}")
ACTIVE = ("queued", "in_progress")
_COLUMNS = ("id", "key", "created_at", "completed_at", "status", "progress", "model", "prompt", "seconds", "size",
            "error_code", "error_message", "params")
_SCHEMA = """CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, key TEXT NOT NULL, created_at INTEGER NOT NULL, completed_at INTEGER,
    status TEXT NOT NULL, progress INTEGER NOT NULL DEFAULT 0, model TEXT NOT NULL, prompt TEXT NOT NULL,
    seconds TEXT NOT NULL, size TEXT NOT NULL, error_code TEXT, error_message TEXT, params TEXT NOT NULL,
    seq INTEGER NOT NULL)"""


class JobStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.videos = self.root / "videos"
        self.videos.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "jobs.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        self.recovered = self._fail_orphans()
        for partial in self.videos.glob(".*"):  # a video being written when the process died
            partial.unlink(missing_ok=True)

    def _fail_orphans(self) -> int:
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET status='failed', error_code='server_restarted', completed_at=?, error_message="
                "'the server stopped while this job was running; create it again' WHERE status IN (?, ?)",
                (int(time.time()), *ACTIVE))
            return cur.rowcount

    def create(self, *, key: str, model: str, prompt: str, seconds: str, size: str, params: dict) -> dict:
        job = {"id": "video_" + secrets.token_hex(16), "key": key, "created_at": int(time.time()),
               "completed_at": None, "status": "queued", "progress": 0, "model": model, "prompt": prompt,
               "seconds": seconds, "size": size, "error_code": None, "error_message": None,
               "params": json.dumps(params)}
        with self._lock:
            seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            self._db.execute(f"INSERT INTO jobs ({', '.join(_COLUMNS)}, seq) VALUES ({', '.join('?' * len(_COLUMNS))}, ?)",
                             (*(job[c] for c in _COLUMNS), seq))
        return job

    def get(self, job_id: str) -> dict | None:
        if not ID_RE.fullmatch(job_id or ""):
            return None
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id=?", (job_id,)).fetchone()
        return None if row is None else dict(zip(_COLUMNS, row))

    def update(self, job_id: str, **fields) -> None:
        bad = set(fields) - set(_COLUMNS[2:])
        if bad:
            raise ValueError(f"unknown job fields {sorted(bad)}")
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {', '.join(f'{k}=?' for k in fields)} WHERE id=?",
                             (*fields.values(), job_id))

    def list(self, *, key: str, after: str | None = None, limit: int = 20,
             order: str = "desc") -> tuple[list[dict], bool]:
        """One page of ``key``'s jobs by creation order; True if more follow."""
        if order not in ("asc", "desc"):
            raise UserError(f"order {order!r} is not asc or desc", expected="asc or desc")
        if not 1 <= limit <= 100:
            raise UserError(f"limit {limit} is out of range", expected="1 to 100")
        op, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        where, args = "WHERE key=?", [key]
        with self._lock:
            if after is not None:
                row = self._db.execute("SELECT seq FROM jobs WHERE id=?", (after,)).fetchone()
                if row is None:
                    raise LookupError(after)
                where, args = f"{where} AND seq {op} ?", [key, row[0]]
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs {where} ORDER BY seq {direction} "
                                    "LIMIT ?", (*args, limit + 1)).fetchall()
        return [dict(zip(_COLUMNS, r)) for r in rows[:limit]], len(rows) > limit

    def count_active(self, key: str) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE key=? AND status IN (?, ?)",
                                    (key, *ACTIVE)).fetchone()[0]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
        self.video_path(job_id).unlink(missing_ok=True)

    def video_path(self, job_id: str) -> Path:
        if not ID_RE.fullmatch(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.videos / f"{job_id}.mp4"

    def close(self) -> None:
        with self._lock:
            self._db.close()
