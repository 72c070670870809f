"""What both job stores share: the job rows' shape, the video folder, leases, reconciling files with rows,
expiry. The SQL backends (store_sqlite.py, store_pg.py) only say how to connect and run one transaction.

Leases: a job that a replica runs carries ``owner`` (the replica's id) and ``lease_until``; a thread renews
the leases of the replica's own jobs every ``lease / 3`` seconds. Only a job whose lease expired (its
replica died or lost the store for longer than ``lease``) is reclaimed: re-queued (``owner`` cleared) so
another replica claims and runs it again, or failed after ``MAX_ATTEMPTS`` runs. A job whose finished video
is already in the folder when it is reclaimed (the replica died between the video's rename and the row's
update) is marked completed instead.

An image-to-video job's input image is kept beside the videos as ``<id>.input.png`` (0600, at most
MAX_INPUT_BYTES) while the job is queued or running, so a replica that reclaims the job runs it again with the
same image; it is deleted when the job ends (completed, failed, deleted or expired).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import threading
import time
import uuid
from pathlib import Path

from ..errors import UserError

ID_RE = re.compile(r"video_[0-9a-f]{32}")
ACTIVE = ("queued", "in_progress")
MAX_ATTEMPTS = 3
COLUMNS = ("id", "key", "created_at", "completed_at", "expires_at", "status", "progress", "model", "prompt",
           "seconds", "size", "error_code", "error_message", "params", "owner", "lease_until", "attempts")
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM jobs"
UPDATABLE = frozenset(COLUMNS[2:14])
INPUT_SUFFIX = ".input.png"  # an I2V job's input image, kept while the job is active
MAX_INPUT_BYTES = 32 << 20  # the API stores it at the video's size (at most a few MB as PNG)
MARKER = "helios-store.id"  # in the video folder: which store it belongs to (not a dot file: no partial)


class StoreError(UserError):
    """The job store cannot be used: unreachable, locked, corrupt, or held by another server."""

    code = "store_unavailable"


def parse_duration(text) -> float | None:
    """'90', '90s', '15m', '24h', '7d' -> seconds; 'never' / '0' -> None (kept until deleted)."""
    value = str(text).strip().lower()
    if value in ("never", "0", "0s", "none"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd]?)", value)
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"retention {text!r} is not a duration", expected="seconds, or a number with s, m, h or d "
                        "(90, 15m, 24h, 7d), or never", fix="--retention 24h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


class BaseStore:
    """Job rows in a database, finished videos as ``<id>.mp4`` in one folder. Subclasses give ``_tx()``
    (one transaction; yields ``q(sql, args) -> rows``, ``?`` placeholders) and a few SQL spellings."""

    requeue = True  # reclaimed jobs are re-queued (False: failed, as one host's restart did before)
    _next_seq = "DEFAULT"
    _skip_locked = ""
    _key_lock = ""  # SQL run first in reserve() to serialize one key's reservations (PostgreSQL)

    def __init__(self, videos: Path, *, retention: float | None = None, lease: float = 30.0, name: str = ""):
        self.videos, self.retention, self.lease, self.name = Path(videos), retention, lease, name
        self.replica = uuid.uuid4().hex
        self._on_claim = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._abandoned: set[str] = set()  # our jobs whose end could not be written: their lease runs out
        self.recovered = 0

    # -- opening ------------------------------------------------------------------------------------
    def _open_folder(self) -> None:
        self.videos.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(PermissionError):
            os.chmod(self.videos, 0o700)
        with self._tx(write=True) as q:
            fresh = bool(q("INSERT INTO meta (name, value) VALUES ('videos', ?) ON CONFLICT (name) DO NOTHING "
                           "RETURNING value", (secrets.token_hex(16),)))
            token = q("SELECT value FROM meta WHERE name='videos'")[0][0]
        marker, legacy = self.videos / MARKER, self.videos / ".helios-store"  # the marker's first name
        if legacy.is_file() and not marker.exists():
            os.replace(legacy, marker)
        if fresh:  # a new store (or one from before the marker): this folder is its folder
            _write_private(marker, token.encode())
        if not marker.is_file() or marker.read_text().strip() != token:
            raise StoreError(f"the video folder {self.videos} belongs to another job store (its {MARKER} does not "
                             f"match {self.name})", fix="give every replica of one store the same shared --videos "
                             "folder, and each store its own")

    def start(self, tick: float | None = None) -> "BaseStore":
        """Reconcile files with rows, then renew leases / reclaim / claim / expire in a thread."""
        self.recovered = self.reclaim(all_active=not self.requeue)
        self.reconcile()
        self.sweep()
        self._tick = tick or max(0.2, self.lease / 3)
        self._thread = threading.Thread(target=self._loop, name="job-store", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self._tick):
            with contextlib.suppress(StoreError):  # the database away for a while: try again next tick
                self.maintain()

    def maintain(self) -> None:
        """One round of the thread's work: renew our leases, reclaim expired ones, run queued jobs, expire."""
        self.heartbeat()
        self.reclaim()
        while self._on_claim is not None and (job := self.claim()) is not None:
            try:
                self._on_claim(job)
            except Exception:  # noqa: BLE001 - cannot run it here (e.g. over capacity): leave it to a replica
                self.release(job["id"])
                break
        self.sweep()

    def serve_queue(self, on_claim) -> None:
        """Call ``on_claim(job)`` for each re-queued job this replica claims (it owns it: run it, then
        complete()/fail() it; raise to hand it back to the queue)."""
        self._on_claim = on_claim

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._close()

    # -- rows -----------------------------------------------------------------------------------------
    def _new(self, key, model, prompt, seconds, size, params, status) -> dict:
        return {"id": "video_" + secrets.token_hex(16), "key": key, "created_at": int(time.time()),
                "completed_at": None, "expires_at": None, "status": status, "progress": 0, "model": model,
                "prompt": prompt, "seconds": seconds, "size": size, "error_code": None, "error_message": None,
                "params": json.dumps(params), "owner": self.replica, "lease_until": time.time() + self.lease,
                "attempts": 1}

    def _insert(self, q, job: dict) -> None:
        q(f"INSERT INTO jobs ({', '.join(COLUMNS)}, seq) VALUES ({', '.join('?' * len(COLUMNS))}, "
          f"{self._next_seq})", tuple(job[c] for c in COLUMNS))

    def create(self, *, key: str, model: str, prompt: str, seconds: str, size: str, params: dict,
               status: str = "queued") -> dict:
        """A new job owned by this replica (no per-key limit: see reserve())."""
        job = self._new(key, model, prompt, seconds, size, params, status)
        with self._tx() as q:
            self._insert(q, job)
        return job

    def reserve(self, *, key: str, limit: int, model: str, prompt: str, seconds: str, size: str, params: dict,
                status: str = "queued") -> dict | None:
        """Count ``key``'s queued/running jobs and insert a new one in one transaction: the new job (owned
        by this replica), or None when ``key`` already has ``limit`` (so a burst never exceeds it)."""
        job = self._new(key, model, prompt, seconds, size, params, status)
        with self._tx(write=True) as q:
            if self._key_lock:
                q(self._key_lock, (key,))
            n = q("SELECT COUNT(*) FROM jobs WHERE key=? AND status IN (?, ?)", (key, *ACTIVE))[0][0]
            if n >= limit:
                return None
            self._insert(q, job)
        return job

    def get(self, job_id: str) -> dict | None:
        if not ID_RE.fullmatch(job_id or ""):
            return None
        with self._tx() as q:
            rows = q(f"{_SELECT} WHERE id=?", (job_id,))
        return dict(zip(COLUMNS, rows[0])) if rows else None

    def update(self, job_id: str, **fields) -> bool:
        """Set fields of a job this replica owns (or nobody does); False if it is gone or another's."""
        bad = set(fields) - UPDATABLE
        if bad:
            raise ValueError(f"unknown job fields {sorted(bad)}")
        with self._tx() as q:
            rows = q(f"UPDATE jobs SET {', '.join(f'{k}=?' for k in fields)} WHERE id=? AND "
                     "(owner IS NULL OR owner=?) RETURNING id", (*fields.values(), job_id, self.replica))
        return bool(rows)

    def progress(self, job_id: str, percent: int) -> bool:
        """A running job's progress; False when the job was deleted or another replica holds it (stop it).
        While the database is away the job goes on (True): progress is not worth failing a job for."""
        try:
            return self.update(job_id, progress=percent)
        except StoreError:
            return True

    def list(self, *, key: str, after: str | None = None, limit: int = 20,
             order: str = "desc") -> tuple[list[dict], bool]:
        """One page of ``key``'s jobs by creation order; True if more follow."""
        if order not in ("asc", "desc"):
            raise UserError(f"order {order!r} is not asc or desc", expected="asc or desc")
        if not 1 <= limit <= 100:
            raise UserError(f"limit {limit} is out of range", expected="1 to 100")
        op, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        with self._tx() as q:
            where, args = "WHERE key=?", [key]
            if after is not None:
                row = q("SELECT seq FROM jobs WHERE id=?", (after,))
                if not row:
                    raise LookupError(after)
                where, args = f"{where} AND seq {op} ?", [key, row[0][0]]
            rows = q(f"{_SELECT} {where} ORDER BY seq {direction} LIMIT ?", (*args, limit + 1))
        return [dict(zip(COLUMNS, r)) for r in rows[:limit]], len(rows) > limit

    def count_active(self, key: str) -> int:
        with self._tx() as q:
            return q("SELECT COUNT(*) FROM jobs WHERE key=? AND status IN (?, ?)", (key, *ACTIVE))[0][0]

    def counts(self) -> dict[str, int]:
        with self._tx() as q:
            return {s: n for s, n in q("SELECT status, COUNT(*) FROM jobs GROUP BY status")}

    def delete(self, job_id: str) -> None:
        """The row and its video, from any replica (the running replica's writer notices: complete() -> False)."""
        with self._tx() as q:
            q("DELETE FROM jobs WHERE id=?", (job_id,))
        self.video_path(job_id).unlink(missing_ok=True)
        self.drop_input(job_id)

    # -- files ----------------------------------------------------------------------------------------
    def video_path(self, job_id: str) -> Path:
        if not ID_RE.fullmatch(job_id or ""):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.videos / f"{job_id}.mp4"

    def input_path(self, job_id: str) -> Path:
        return self.videos / f"{self.video_path(job_id).stem}{INPUT_SUFFIX}"

    def save_input(self, job_id: str, data: bytes) -> None:
        """Keep an I2V job's input image (PNG bytes) with the job: written whole (a hidden file moved into
        place), 0600; StoreError when it is over MAX_INPUT_BYTES or cannot be written."""
        if len(data) > MAX_INPUT_BYTES:
            raise StoreError(f"the input image is {len(data):,} bytes; the store keeps at most {MAX_INPUT_BYTES:,}")
        path = self.input_path(job_id)
        partial = self.videos / f".{path.name}.partial"
        try:
            _write_private(partial, data)
            os.replace(partial, path)
        except OSError as e:
            partial.unlink(missing_ok=True)
            raise StoreError(f"the input image could not be written to {self.videos}: {e}") from None

    def load_input(self, job_id: str) -> bytes | None:
        """The input image kept with the job, or None (not an I2V job, or its image is gone)."""
        try:
            return self.input_path(job_id).read_bytes()
        except FileNotFoundError:
            return None

    def drop_input(self, job_id: str) -> None:
        self.input_path(job_id).unlink(missing_ok=True)

    def staging_path(self, job_id: str) -> Path:
        """Where the runner writes the video; complete() moves it into place."""
        return self.videos / f".{self.video_path(job_id).name}"

    def complete(self, job_id: str, staged: Path) -> bool:
        """Move the finished video into place (0600), then mark the job completed (expires_at set). False
        (and no file left) if the job was deleted or another replica holds it now."""
        path = self.video_path(job_id)
        os.chmod(staged, 0o600)
        os.replace(staged, path)
        now = int(time.time())
        try:
            with self._tx() as q:
                done = q("UPDATE jobs SET status='completed', progress=100, completed_at=?, expires_at=?, "
                         "owner=NULL, lease_until=NULL WHERE id=? AND owner=? RETURNING id",
                         (now, self._expiry(now), job_id, self.replica))
        except StoreError:
            self._abandoned.add(job_id)  # its lease runs out, then reclaim() finds the video: completed
            raise
        if not done:
            held = self.get(job_id)
            if held is None or held["owner"] not in (None, self.replica):
                path.unlink(missing_ok=True)
        if done or self.get(job_id) is None:  # ended here, or deleted: its input is no longer needed
            self.drop_input(job_id)
        return bool(done)

    def fail(self, job_id: str, code: str, message: str) -> bool:
        """Mark our job failed; False if it is gone or another's, or the database is away (its lease then
        runs out and reclaim() ends it)."""
        self.staging_path(job_id).unlink(missing_ok=True)
        now = int(time.time())
        try:
            with self._tx() as q:
                failed = bool(q("UPDATE jobs SET status='failed', completed_at=?, expires_at=?, error_code=?, "
                                "error_message=?, owner=NULL, lease_until=NULL WHERE id=? AND owner=? RETURNING id",
                                (now, self._expiry(now), code, message, job_id, self.replica)))
        except StoreError:
            self._abandoned.add(job_id)
            return False
        if failed:
            self.drop_input(job_id)
        return failed

    def _expiry(self, now: int) -> int | None:
        return None if self.retention is None else now + int(round(self.retention))

    # -- leases, reconciling, expiry --------------------------------------------------------------------
    def heartbeat(self) -> int:
        """Renew the leases of our queued / running jobs (not of those abandoned); their count."""
        skip = list(self._abandoned)
        not_in = f" AND id NOT IN ({', '.join('?' * len(skip))})" if skip else ""
        with self._tx() as q:
            return len(q(f"UPDATE jobs SET lease_until=? WHERE owner=? AND status IN (?, ?){not_in} RETURNING id",
                         (time.time() + self.lease, self.replica, *ACTIVE, *skip)))

    def claim(self) -> dict | None:
        """Take the oldest unowned queued job (it becomes this replica's, in progress), or None."""
        with self._tx(write=True) as q:
            rows = q(f"UPDATE jobs SET owner=?, lease_until=?, status='in_progress', progress=0 WHERE id = ("
                     f"SELECT id FROM jobs WHERE status='queued' AND owner IS NULL ORDER BY seq LIMIT 1"
                     f"{self._skip_locked}) RETURNING {', '.join(COLUMNS)}", (self.replica, time.time() + self.lease))
        return dict(zip(COLUMNS, rows[0])) if rows else None

    def release(self, job_id: str) -> None:
        """Hand a claimed job back to the queue (this replica cannot run it now)."""
        with self._tx() as q:
            q("UPDATE jobs SET status='queued', owner=NULL, lease_until=NULL, attempts=attempts-1 "
              "WHERE id=? AND owner=?", (job_id, self.replica))

    def reclaim(self, all_active: bool = False) -> int:
        """Jobs whose lease expired (``all_active``: every queued/running job, when this process alone can
        hold the store): completed if their video is in place, else re-queued or failed. Their count."""
        now = time.time()
        with self._tx(write=True) as q:
            cond = "status IN (?, ?)" + ("" if all_active else " AND lease_until < ?")
            args = (*ACTIVE,) if all_active else (*ACTIVE, now)
            rows = q(f"SELECT id, attempts FROM jobs WHERE {cond}{self._skip_locked}", args)
            ended = [job_id for job_id, attempts in rows if not self._reclaim_one(q, job_id, attempts, int(now))]
        for job_id, _ in rows:  # the dead writer's partial files
            self._abandoned.discard(job_id)
            for p in self.videos.glob(f".*{job_id}*"):
                p.unlink(missing_ok=True)
        for job_id in ended:  # a re-queued job keeps its input image for the replica that runs it again
            self.drop_input(job_id)
        return len(rows)

    def _reclaim_one(self, q, job_id: str, attempts: int, now: int) -> bool:
        """True when the job was re-queued (it runs again), False when it ended."""
        if self.video_path(job_id).is_file():  # died after the rename, before the row's update
            q("UPDATE jobs SET status='completed', progress=100, completed_at=?, expires_at=?, owner=NULL, "
              "lease_until=NULL WHERE id=?", (now, self._expiry(now), job_id))
            return False
        if self.requeue and attempts < MAX_ATTEMPTS:
            q("UPDATE jobs SET status='queued', owner=NULL, lease_until=NULL, progress=0, attempts=attempts+1 "
              "WHERE id=?", (job_id,))
            return True
        q("UPDATE jobs SET status='failed', error_code='server_restarted', completed_at=?, expires_at=?, "
          "owner=NULL, lease_until=NULL, error_message=? WHERE id=?",
          (now, self._expiry(now), "the server stopped while this job was running; create it again", job_id))
        return False

    def reconcile(self) -> dict[str, int]:
        """Files and rows both ways: a video (or partial) without a live row is deleted; a completed job
        without its video is marked failed."""
        with self._tx() as q:
            rows = dict(q("SELECT id, status FROM jobs"))
        removed = 0
        for p in self.videos.iterdir():
            m = ID_RE.search(p.name)
            if not m or p.name == MARKER:
                continue
            status = rows.get(m.group(0))
            if p.name.startswith(".") or p.name.endswith(INPUT_SUFFIX):  # partial files; inputs of active jobs
                keep = status in ACTIVE
            else:
                keep = status == "completed"
            if not keep and p.is_file():
                p.unlink(missing_ok=True)
                removed += 1
        lost = [i for i, s in rows.items() if s == "completed" and not self.video_path(i).is_file()]
        now = int(time.time())
        with self._tx() as q:
            for job_id in lost:
                q("UPDATE jobs SET status='failed', error_code='video_lost', error_message=?, expires_at=? "
                  "WHERE id=? AND status='completed'",
                  ("the finished video's file is gone from the store's folder", self._expiry(now), job_id))
        return {"files_removed": removed, "videos_lost": len(lost)}

    def sweep(self, now: float | None = None) -> int:
        """Delete the jobs (rows and videos) whose expires_at has passed; their count."""
        with self._tx() as q:
            gone = [r[0] for r in q("DELETE FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ? RETURNING id",
                                    (int(now if now is not None else time.time()),))]
        for job_id in gone:
            self.video_path(job_id).unlink(missing_ok=True)
            self.drop_input(job_id)
        return len(gone)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
