"""The job store's contract, run against both stores: SQLite (one host) and a real PostgreSQL server
(tests/pg_fixture.py); then what only one of them does (SQLite's one-server lock and damaged files,
PostgreSQL's leases between replicas and a server restart)."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from helios_deploy.api.jobs import StoreError, open_store, parse_duration
from helios_deploy.errors import UserError

ROW = dict(model="helios", prompt="a cat", seconds="1.375", size="128x64", params={"num_frames": 33, "seed": 0})


@pytest.fixture(params=["sqlite", "postgresql"])
def kind(request):
    return request.param


@pytest.fixture
def opener(kind, tmp_path, request):
    """open(**kw) -> a store of this test's kind on one database and one video folder (the same each call,
    as replicas of one store); every store opened is closed at the end."""
    spec = str(tmp_path / "store") if kind == "sqlite" else request.getfixturevalue("pg_url")
    videos = None if kind == "sqlite" else tmp_path / "videos"
    opened = []

    def open_(**kw):
        store = open_store(spec, videos=videos, **kw)
        opened.append(store)
        return store

    yield open_
    for s in opened:
        s.close()


def _finish(store, job_id, data=b"mp4 bytes"):
    staged = store.staging_path(job_id)
    staged.write_bytes(data)
    return store.complete(job_id, staged)


def test_rows_pages_and_counts(opener):
    store = opener()
    jobs = [store.create(key="a", **ROW) for _ in range(5)]
    other = store.create(key="b", **ROW)
    assert all(j["status"] == "queued" and j["id"].startswith("video_") and len(j["id"]) == 38 for j in jobs)
    assert store.get(jobs[0]["id"])["prompt"] == "a cat" and store.get("video_" + "0" * 32) is None
    assert store.get("../../etc/passwd") is None
    with pytest.raises(ValueError):
        store.video_path("../x")
    page, more = store.list(key="a", limit=2)
    assert [j["id"] for j in page] == [jobs[4]["id"], jobs[3]["id"]] and more
    page, more = store.list(key="a", after=jobs[3]["id"], limit=10)
    assert [j["id"] for j in page] == [j["id"] for j in jobs[2::-1]] and not more
    page, _ = store.list(key="a", order="asc", after=jobs[1]["id"])
    assert [j["id"] for j in page] == [j["id"] for j in jobs[2:]]
    with pytest.raises(UserError, match="out of range"):
        store.list(key="a", limit=0)
    assert store.update(jobs[0]["id"], status="in_progress", progress=40)
    assert store.get(jobs[0]["id"])["progress"] == 40
    with pytest.raises(ValueError, match="unknown job fields"):
        store.update(jobs[0]["id"], owner="someone")
    assert store.count_active("a") == 5 and store.counts() == {"queued": 5, "in_progress": 1}
    assert _finish(store, jobs[0]["id"]) and store.fail(jobs[1]["id"], "generation_failed", "boom")
    assert store.counts() == {"queued": 4, "completed": 1, "failed": 1}
    assert store.video_path(jobs[0]["id"]).read_bytes() == b"mp4 bytes"
    store.delete(jobs[0]["id"])
    assert store.get(jobs[0]["id"]) is None and not store.video_path(jobs[0]["id"]).exists()
    assert store.get(other["id"])["key"] == "b"


def test_reserve_holds_the_limit_under_a_burst(opener, kind):
    """16 threads (spread over two replicas where the store allows several) reserve for one key with a limit
    of 3: exactly 3 jobs are made; a finished job makes room for one more."""
    stores = [opener()] + ([opener()] if kind == "postgresql" else [])
    barrier = threading.Barrier(16)

    def one(i):
        barrier.wait()
        return stores[i % len(stores)].reserve(key="k", limit=3, **ROW)

    with ThreadPoolExecutor(16) as pool:
        got = [j for j in pool.map(one, range(16)) if j is not None]
    assert len(got) == 3 and stores[0].count_active("k") == 3
    assert stores[0].reserve(key="other", limit=3, **ROW) is not None
    owner = next(s for s in stores if s.replica == got[0]["owner"])
    assert owner.fail(got[0]["id"], "cancelled", "stopped")
    assert stores[-1].reserve(key="k", limit=3, **ROW) is not None
    assert stores[-1].reserve(key="k", limit=3, **ROW) is None


def test_files_are_private(opener, kind, tmp_path):
    store = opener()
    job = store.reserve(key="k", limit=2, **ROW)
    _finish(store, job["id"])
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(store.videos) == 0o700 and mode(store.video_path(job["id"])) == 0o600
    assert mode(store.videos / "helios-store.id") == 0o600
    if kind == "sqlite":
        root = tmp_path / "store"
        assert mode(root) == 0o700
        assert {p.name: mode(p) for p in root.iterdir() if p.is_file()} == {
            name: 0o600 for name in ("jobs.sqlite", "jobs.sqlite-wal", "jobs.sqlite-shm", "jobs.lock")}


def test_restart_reconciles_files_and_rows(opener, kind):
    """After a crash: a video without a row is deleted; a completed job without its video is failed; a job
    whose video was moved into place before the crash (kill -9 between rename and update) is completed with
    its video kept; a job that was running is failed (SQLite) or re-queued (PostgreSQL) and its partial
    file removed."""
    first = opener(lease=0.5)
    renamed, running, lost, kept = (first.create(key="k", **ROW) for _ in range(4))
    for j in (renamed, running):
        first.update(j["id"], status="in_progress")
    first.staging_path(running["id"]).write_bytes(b"half")
    first.video_path(renamed["id"]).write_bytes(b"whole")  # renamed, then the process died
    _finish(first, lost["id"])
    _finish(first, kept["id"])
    first.video_path(lost["id"]).unlink()
    stray = first.video_path("video_" + "a" * 32)
    stray.write_bytes(b"no row")
    first.close() if kind == "sqlite" else first._stop.set()  # a dead replica renews no lease
    time.sleep(0.8 if kind == "postgresql" else 0)
    second = opener(lease=0.5)
    assert second.recovered == 2  # renamed, running
    got = {k: second.get(j["id"]) for k, j in (("renamed", renamed), ("running", running), ("lost", lost),
                                                 ("kept", kept))}
    assert got["renamed"]["status"] == "completed" and second.video_path(renamed["id"]).read_bytes() == b"whole"
    assert got["lost"]["status"] == "failed" and got["lost"]["error_code"] == "video_lost"
    assert got["kept"]["status"] == "completed" and second.video_path(kept["id"]).exists()
    if kind == "sqlite":
        assert got["running"]["status"] == "failed" and got["running"]["error_code"] == "server_restarted"
    else:
        assert got["running"]["status"] == "queued" and got["running"]["owner"] is None
        assert got["running"]["attempts"] == 2
    assert not stray.exists() and not second.staging_path(running["id"]).exists()


def test_input_images_live_with_their_jobs(opener, kind):
    """An I2V job's input image is kept (0600, written whole, bounded) while the job is active, survives a
    reclaim that re-queues the job (another replica runs it with the same image), and goes with the job:
    completed, failed, deleted, expired, or found without a live row at a restart."""
    from helios_deploy.api.store_base import MAX_INPUT_BYTES

    first = opener(lease=0.5)
    done, failed, deleted, running, orphan = (first.create(key="k", **ROW) for _ in range(5))
    for j in (done, failed, deleted, running, orphan):
        first.save_input(j["id"], b"png of " + j["id"].encode())
    path = first.input_path(running["id"])
    assert path.name == f"{running['id']}.input.png" and first.load_input(running["id"]) == path.read_bytes()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and not list(first.videos.glob(".*partial"))
    with pytest.raises(StoreError, match="at most"):
        first.save_input(running["id"], b"\0" * (MAX_INPUT_BYTES + 1))
    assert first.load_input(running["id"]) == b"png of " + running["id"].encode()  # the kept one is untouched
    assert _finish(first, done["id"]) and first.fail(failed["id"], "generation_failed", "boom")
    first.delete(deleted["id"])
    assert [first.load_input(j["id"]) for j in (done, failed, deleted)] == [None, None, None]
    first.update(running["id"], status="in_progress")
    with first._tx() as q:  # a row gone without the store's delete (e.g. removed by hand): its input is stray
        q("DELETE FROM jobs WHERE id=?", (orphan["id"],))
    first.close() if kind == "sqlite" else first._stop.set()  # dies with the job running
    time.sleep(0.8 if kind == "postgresql" else 0)
    second = opener(lease=0.5)
    assert not second.input_path(orphan["id"]).exists()
    if kind == "sqlite":  # one host: the running job failed at the restart, its input gone
        assert second.get(running["id"])["status"] == "failed" and second.load_input(running["id"]) is None
    else:  # re-queued: the replica that claims it reads the same image
        assert second.get(running["id"])["status"] == "queued"
        assert second.load_input(running["id"]) == b"png of " + running["id"].encode()
        claimed = second.claim()
        assert claimed["id"] == running["id"] and _finish(second, running["id"])
        assert second.load_input(running["id"]) is None


def test_expired_jobs_are_swept(opener):
    store = opener(retention=parse_duration("1s"), lease=0.6)  # the thread ticks every 0.2 s
    done, failed, running = (store.create(key="k", **ROW) for _ in range(3))
    _finish(store, done["id"])
    store.fail(failed["id"], "generation_failed", "boom")
    row = store.get(done["id"])
    assert row["expires_at"] == row["completed_at"] + 1
    deadline = time.monotonic() + 10
    while store.get(done["id"]) or store.get(failed["id"]) or store.video_path(done["id"]).exists():
        assert time.monotonic() < deadline, "the sweeper did not delete the expired jobs"
        time.sleep(0.1)
    assert store.get(running["id"])["expires_at"] is None  # a job that has not ended does not expire


def test_prompt_changes_are_shared_and_swept(opener, kind):
    """api/prompt_log.py on both stores: a change one replica records, another reads back in the order recorded;
    the stream's end deletes its rows, the sweep the rows an hour old; a store that is gone fails no change."""
    from helios_deploy.api.prompt_log import PromptLog, missing

    first = opener()
    second = first if kind == "sqlite" else opener()  # a second replica of the same store
    mine, theirs = PromptLog(first), PromptLog(second)
    assert mine.record("s1", 1, "a dog") and theirs.record("s1", 3, "a cat") and theirs.record("s2", 0, "a fox")
    assert mine.record("s1", 2, "a cow")
    assert theirs.changes("s1") == [(1, "a dog"), (3, "a cat"), (2, "a cow")] and mine.changes("nope") == []
    # the holder noted (1, "a dog") and (3, "a cat") on its stream; the rest died with the node: in chunk order
    assert missing([(1, "a dog"), (3, "a cat")], theirs.changes("s1")) == [(2, "a cow")]
    assert missing([(1, "a dog")], [(1, "a dog"), (1, "a dog"), (0, "a fox")]) == [(0, "a fox"), (1, "a dog")]
    mine.ended("s1")  # deleted in the background
    wait = time.monotonic() + 10
    while theirs.changes("s1") and time.monotonic() < wait:
        time.sleep(0.05)
    assert theirs.changes("s1") == [] and theirs.changes("s2") == [(0, "a fox")]
    with first._tx() as q:  # an hour old, its stream's end never recorded (its replica died): swept
        q("UPDATE prompt_changes SET recorded_at = recorded_at - 3601")
    theirs._swept = 0.0
    theirs.ended(None)
    while mine.changes("s2") and time.monotonic() < wait:
        time.sleep(0.05)
    assert mine.changes("s2") == []
    second.close()
    assert theirs.record("s3", 1, "a dog") is False and theirs.changes("s3") is None  # logged, never raised
    for log in (mine, theirs):
        log.close()


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("15m", 900), ("24h", 86400), ("7d", 604800),
                                           ("1.5h", 5400), ("never", None), ("0", None)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["-1", "soon", "5w", ""])
def test_parse_duration_refuses(text):
    with pytest.raises(UserError, match="is not a duration"):
        parse_duration(text)


# -- SQLite only ------------------------------------------------------------------------------------
def test_sqlite_second_server_is_refused(tmp_path):
    first = open_store(tmp_path / "s")
    try:
        with pytest.raises(StoreError, match=r"another server is already using the job store .* \(process "
                                             f"{os.getpid()}\\)"):
            open_store(tmp_path / "s")
    finally:
        first.close()
    open_store(tmp_path / "s").close()  # free again once the first one closed


def test_sqlite_damaged_or_locked_database_is_one_clear_error(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    (root / "jobs.sqlite").write_bytes(b"this is not a database " * 100)
    with pytest.raises(StoreError, match="cannot be read .*file is not a database") as e:
        open_store(root)
    assert "move" in e.value.render()
    (root / "jobs.sqlite").unlink()
    store = open_store(root)
    try:
        job = store.create(key="k", **ROW)
        other = sqlite3.connect(root / "jobs.sqlite", isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")  # another program holds the database
        store._db.execute("PRAGMA busy_timeout = 200")
        with pytest.raises(StoreError, match="is locked by another program"):
            store.get(job["id"])
        other.execute("ROLLBACK")
        other.close()
        assert store.get(job["id"])["status"] == "queued"
    finally:
        store.close()


def test_cli_refuses_a_held_or_damaged_store(tmp_path, capsys):
    from tests.conftest import run_cli

    store = open_store(tmp_path / "held")
    try:
        code, _, err = run_cli(["api", "--artifacts", str(tmp_path / "none"), "--store", str(tmp_path / "held")],
                               capsys)
    finally:
        store.close()
    assert code == 1 and "another server is already using the job store" in err and "Traceback" not in err, err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "jobs.sqlite").write_bytes(b"\0garbage" * 64)
    code, _, err = run_cli(["api", "--artifacts", str(tmp_path / "none"), "--store", str(tmp_path / "bad")], capsys)
    assert code == 1 and "cannot be read" in err and "Traceback" not in err, err
    code, _, err = run_cli(["api", "--artifacts", str(tmp_path / "none"), "--store", "postgresql://x@127.0.0.1/db"],
                           capsys)
    assert code == 1 and "--videos DIR" in err, err


# -- PostgreSQL only ------------------------------------------------------------------------------
only_pg = pytest.mark.parametrize("kind", ["postgresql"])


@only_pg
def test_pg_leases_keep_live_replicas_jobs_and_reclaim_dead_ones(opener):
    a, b = opener(lease=0.6), opener(lease=0.6)
    job = a.reserve(key="k", limit=2, **ROW)
    a.update(job["id"], status="in_progress", progress=30)
    time.sleep(1.5)  # longer than the lease: a's thread renews it
    assert b.reclaim() == 0 and b.claim() is None
    assert not b.update(job["id"], status="failed") and a.get(job["id"])["status"] == "in_progress"
    a._stop.set()  # a dies: no more heartbeats
    time.sleep(1.0)
    got = None
    deadline = time.monotonic() + 5
    while got is None and time.monotonic() < deadline:
        b.reclaim()
        got = b.claim()
        time.sleep(0.05)
    assert got is not None and got["id"] == job["id"] and got["owner"] == b.replica and got["attempts"] == 2
    assert not a.update(job["id"], progress=99)  # the old owner can no longer write it
    assert not _finish(a, job["id"], b"stale") and not a.video_path(job["id"]).exists()
    assert _finish(b, job["id"], b"fresh") and b.video_path(job["id"]).read_bytes() == b"fresh"


@only_pg
def test_pg_job_failed_after_max_attempts(opener):
    from helios_deploy.api.store_base import MAX_ATTEMPTS

    a = opener(lease=0.3)
    a._stop.set()
    job = a.create(key="k", status="in_progress", **ROW)
    b = opener(lease=0.3)
    b._stop.set()
    for attempt in range(2, MAX_ATTEMPTS + 1):
        time.sleep(0.4)
        assert b.reclaim() == 1 and b.claim()["attempts"] == attempt
    time.sleep(0.4)
    assert b.reclaim() == 1
    row = b.get(job["id"])
    assert row["status"] == "failed" and row["error_code"] == "server_restarted"


@only_pg
def test_pg_queued_jobs_go_to_the_serving_replica(opener):
    """A re-queued job is handed to the callback of a replica that serves the queue; a callback that cannot
    take it (raises) hands it back for the next tick."""
    dead = opener(lease=0.3)
    dead._stop.set()
    job = dead.create(key="k", status="in_progress", **ROW)
    taken, refusals = [], []

    def take(j):
        if not refusals:
            refusals.append(j["id"])
            raise RuntimeError("over capacity")
        taken.append(j)

    live = opener(lease=0.3)
    live.serve_queue(take)
    deadline = time.monotonic() + 10
    while not taken:
        assert time.monotonic() < deadline, "the queued job was never handed over"
        time.sleep(0.05)
    assert refusals == [job["id"]] and taken[0]["id"] == job["id"] and taken[0]["status"] == "in_progress"
    assert live.get(job["id"])["owner"] == live.replica


def test_pg_restart_is_one_clear_error_then_recovery(pg_url, postgres_server, tmp_path):
    from helios_deploy.api.store_pg import PostgresStore

    """Calls fail with one StoreError while the server is down and work again after it; a job that finished
    meanwhile (its video moved into place, the row's update failed) ends completed once its lease runs out."""
    store = PostgresStore(pg_url, videos=tmp_path / "v", lease=0.6, timeout=1)
    job, finished = store.create(key="k", **ROW), store.create(key="k", status="in_progress", **ROW)
    store.staging_path(finished["id"]).write_bytes(b"video")
    with postgres_server.stopped():
        started = time.monotonic()
        with pytest.raises(StoreError, match="PostgreSQL server .* is unavailable") as e:
            store.get(job["id"])
        assert time.monotonic() - started < 3 and "Traceback" not in e.value.render()
        assert e.value.code == "store_unavailable"
        assert store.progress(finished["id"], 50)  # the job goes on
        with pytest.raises(StoreError):
            store.complete(finished["id"], store.staging_path(finished["id"]))
    try:
        back = time.monotonic() + 15  # the pool reconnects within its back-off (1 s, doubling) once it is up
        while True:
            try:
                assert store.get(job["id"])["status"] == "queued"
                break
            except StoreError:
                assert time.monotonic() < back, "the store did not recover after the server came back"
        store.update(job["id"], status="in_progress")
        time.sleep(1.0)  # the store's thread lived through it: the lease is renewed again
        assert store.get(job["id"])["lease_until"] > time.time()
        wait = time.monotonic() + 5
        while store.get(finished["id"])["status"] != "completed":
            assert time.monotonic() < wait, store.get(finished["id"])
            time.sleep(0.1)
        assert store.video_path(finished["id"]).read_bytes() == b"video"
    finally:
        store.close()


def test_pg_needs_the_shared_video_folder(pg_url, tmp_path):
    first = open_store(pg_url, videos=tmp_path / "shared")
    try:
        with pytest.raises(StoreError, match="belongs to another job store"):
            open_store(pg_url, videos=tmp_path / "elsewhere")
        open_store(pg_url, videos=tmp_path / "shared").close()
    finally:
        first.close()


def test_pg_unreachable_server_is_one_clear_error(tmp_path):
    from tests.api_helpers import free_port

    pytest.importorskip("psycopg")
    from helios_deploy.api.store_pg import PostgresStore

    with pytest.raises(StoreError, match="cannot be reached") as e:
        PostgresStore(f"postgresql://u:secret@127.0.0.1:{free_port()}/db", videos=tmp_path / "v", timeout=1)
    assert "secret" not in e.value.render()
