"""Several API replicas on one PostgreSQL job store (a real server, tests/pg_fixture.py) and one shared video
folder: any replica answers for any job; a replica killed with -9 mid-job has its job run again by another
one (no job lost) while a live replica's jobs are never touched; the database going away is one clear error,
then the API recovers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from tests.api_helpers import KEY, OTHER_KEY, decode_mp4, free_port, serving, wait_for

PROMPT = "A lighthouse on a cliff at dusk, waves below."
LEASE = 3.0  # a live replica renews its leases well inside this; a dead one loses its jobs after 3 s
LONG = 1650  # frames (50 chunks) of the job killed mid-way: on an idle host 10 chunks end before 2 x LEASE pass


def _replica(artifacts, pg_url, videos, lease=LEASE):
    from helios_deploy.api.app import create_app
    from helios_deploy.api.backends import InProcessBackend
    from helios_deploy.api.jobs import open_store
    from helios_deploy.api.security import Limits

    store = open_store(pg_url, videos=videos, lease=lease, retention=3600)
    backend = InProcessBackend.open_artifacts(artifacts, max_streams=2, chunk_seconds=0.05)
    limits = Limits(max_body_bytes=1 << 20, max_frames=LONG, max_jobs_per_key=2, max_streams_per_key=2)
    return create_app(backend, store, keys=(KEY, OTHER_KEY), limits=limits)


@contextlib.contextmanager
def _served(app):
    try:
        with serving(app) as (url, _):
            yield url
    finally:
        app.state.api.store.close()


def client(url, key=KEY):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)



def healthy(url: str) -> bool:
    """The replica at ``url`` answers /health with 200 (False while it is not up yet)."""
    with contextlib.suppress(httpx.TransportError):
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    return False

def test_any_replica_answers_for_any_job(artifacts, pg_url, tmp_path):
    import openai

    videos = tmp_path / "shared-videos"
    with _served(_replica(artifacts, pg_url, videos)) as a, _served(_replica(artifacts, pg_url, videos)) as b:
        ca, cb = client(a), client(b)
        job = ca.videos.create(prompt=PROMPT, extra_body={"num_frames": 33, "seed": 1})
        done = wait_for(lambda: (v := cb.videos.retrieve(job.id)).status == "completed" and v, timeout=120)
        assert done.progress == 100 and done.expires_at == done.completed_at + 3600
        assert job.id in [v.id for v in cb.videos.list()]
        data = cb.videos.download_content(job.id).read()
        assert data == ca.videos.download_content(job.id).read() and data[4:8] == b"ftyp"
        with pytest.raises(openai.NotFoundError):
            client(b, OTHER_KEY).videos.retrieve(job.id)  # the other key sees nothing, on any replica
        assert cb.videos.delete(job.id).deleted
        with pytest.raises(openai.NotFoundError):
            ca.videos.retrieve(job.id)
        assert not (videos / f"{job.id}.mp4").exists()


def _serve_replica(artifacts, pg_url, videos, port, log):
    env = {**os.environ, "HELIOS_API_KEY": KEY}
    return subprocess.Popen([sys.executable, "-m", "helios_deploy.cli", "api", "--artifacts", str(artifacts),
                             "--store", pg_url, "--videos", str(videos), "--lease", str(LEASE), "--port", str(port),
                             "--max-frames", str(LONG)],
                            env=env, stdout=log, stderr=log, start_new_session=True)


def test_killed_replica_job_is_run_again_by_another(artifacts, pg_url, tmp_path):
    """Replica A (a process) runs a job; replica B leaves it alone while A lives (A renews its lease), then A
    is killed with -9 mid-job: B reclaims the job once A's lease expires, runs it again from the start and
    completes it, with the same frames as the same request run through B alone."""
    videos, port = tmp_path / "shared-videos", free_port()
    url_a = f"http://127.0.0.1:{port}"

    app_b = _replica(artifacts, pg_url, videos)
    store_b = app_b.state.api.store
    with open(tmp_path / "replica-a.log", "w") as log, _served(app_b) as b:
        server = _serve_replica(artifacts, pg_url, videos, port, log)
        try:
            wait_for(lambda: healthy(url_a), timeout=300, every=0.2)
            job = client(url_a).videos.create(prompt=PROMPT, extra_body={"num_frames": LONG, "seed": 2})
            cb = client(b)
            wait_for(lambda: cb.videos.retrieve(job.id).progress > 0, timeout=60)
            time.sleep(2 * LEASE)  # A lives: B must not take or fail its job
            mid = cb.videos.retrieve(job.id)
            assert mid.status == "in_progress" and mid.progress > 0, mid
            assert store_b.get(job.id)["owner"] not in (None, store_b.replica)  # still A's
        finally:
            os.killpg(server.pid, signal.SIGKILL)  # no clean shutdown: a crash or an OOM kill
            server.wait()
        done = wait_for(lambda: (v := cb.videos.retrieve(job.id)).status in ("completed", "failed") and v,
                        timeout=300, every=0.2)
        assert done.status == "completed", done
        assert store_b.get(job.id)["attempts"] == 2  # run by A, then once more by B
        got = decode_mp4(cb.videos.download_content(job.id).read(), tmp_path)
        again = cb.videos.create_and_poll(prompt=PROMPT, extra_body={"num_frames": LONG, "seed": 2})
        want = decode_mp4(cb.videos.download_content(again.id).read(), tmp_path)
        assert got.shape == want.shape and got.shape[0] >= LONG - 10 and np.array_equal(got, want)
        assert not [p for p in videos.iterdir() if p.name.startswith(".") and "video_" in p.name]  # no partial


def test_database_restart_is_one_clear_error_then_recovery(artifacts, pg_url, postgres_server, tmp_path):
    with _served(_replica(artifacts, pg_url, tmp_path / "videos")) as url:
        c = client(url)
        job = c.videos.create_and_poll(prompt=PROMPT, extra_body={"num_frames": 1})
        headers = {"Authorization": f"Bearer {KEY}"}
        with postgres_server.stopped():
            r = httpx.get(f"{url}/v1/videos/{job.id}", headers=headers, timeout=30)
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["code"] == "store_unavailable" and "PostgreSQL server" in error["message"], error
            assert "Traceback" not in r.text
        r = httpx.get(f"{url}/v1/videos/{job.id}", headers=headers, timeout=30)
        assert r.status_code == 200 and r.json()["status"] == "completed"
        assert c.videos.create_and_poll(prompt=PROMPT, extra_body={"num_frames": 1}).status == "completed"
