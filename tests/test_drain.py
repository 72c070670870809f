"""Drain with a real tritonserver: SIGTERM to `python -m helios_deploy.serving.server serve` mid-stream. The node
takes no new streams, the stream ends after its current chunk with a last response {"moved": true} carrying its
state, the wrapper stops tritonserver and exits 0 with nothing left behind, and the state resumes the stream
elsewhere (here: an in-process scheduler) with every frame equal to the uninterrupted stream's.

Timing on a slow, loaded host (2 shared cores): nothing here waits for a fixed time. The stream is long
(``CHUNKS``) so that it is still playing when the drain lands however long the wrapper takes to ask for it; the
resumed part runs as a job (unpaced: its frames do not depend on pacing, and a job is never shed); and
tritonserver gets ``EXIT_TIMEOUT`` to unload the model once the stream has moved."""

from __future__ import annotations

import signal
import subprocess
import time

import numpy as np
import pytest

from .test_serve import Serve, alive, assert_ports_free, descendants, free_ports

pytestmark = pytest.mark.slow

PROMPT = "a red fox running through snow"
CHUNKS = 24  # 33 s of playback: SIGTERM goes at chunk 1, the drain must land before the stream's end
# tritonserver's budget to unload the helios model after SIGTERM: measured 1.0-1.3 s on this shared 2-core host
# (16 runs), once over 5 s (the serve default), which made tritonserver exit 1 with its stub killed
EXIT_TIMEOUT = 30


class DrainServe(Serve):
    """Serve (tests/test_serve.py) with the exit timeout above."""

    def __init__(self, env, repo, ports, log):  # noqa: D107 - Serve's, plus --exit-timeout-secs
        grpc, http, metrics = ports
        self.ports, self.log_path = ports, log
        cmd = [str(env.venv / "bin" / "python"), "-m", "helios_deploy.serving.server", "serve", str(repo),
               "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics),
               "--exit-timeout-secs", str(EXIT_TIMEOUT)]
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def repo(artifacts, tmp_path_factory):
    from helios_deploy.serving.repository import RepoOptions, write_repository

    out = tmp_path_factory.mktemp("drain") / "repo"
    write_repository(artifacts, out, RepoOptions(reference=True, chunk_seconds=0.05, max_frames=33 * 40))
    return out


def test_sigterm_mid_stream_moves_the_stream_with_its_state_and_the_node_exits(server_env, repo, artifacts,
                                                                            tmp_path):
    from helios_deploy.runtime import Pipeline
    from helios_deploy.runtime.live import LiveScheduler
    from helios_deploy.serving.client import HeliosClient, StreamMoved

    s = DrainServe(server_env, repo, free_ports(), tmp_path / "serve.log")
    try:
        s.wait_ready()
        tree = descendants(s.proc.pid)
        got, states = [], []
        with HeliosClient(f"127.0.0.1:{s.ports[0]}", timeout=120) as client:
            stream = client.stream(PROMPT, num_frames=33 * CHUNKS, seed=3, failover=True)
            with pytest.raises(StreamMoved) as moved:
                for chunk in stream:
                    got.append(chunk.frames)
                    states.append(chunk.state)
                    if chunk.index == 1:
                        s.proc.send_signal(signal.SIGTERM)  # a scale-down: Kubernetes sends SIGTERM
        t = time.monotonic()
        assert s.proc.wait(EXIT_TIMEOUT + 30) == 0, s.log()[-3000:]
        stopped_in = time.monotonic() - t
    finally:
        s.stop()
    m = moved.value
    assert all(st for st in states) and m.state and m.stream_id == client.stream_id
    assert 2 <= m.next_chunk == len(got) < CHUNKS  # it stopped after its chunk in flight, not at the end
    log = s.log()
    assert "serve: draining: 1 stream(s) to move" in log and "serve: drained: no stream left" in log, log[-3000:]
    assert "drain timed out" not in log and "Exit timeout expired" not in log, log[-3000:]
    assert f"moved after {m.next_chunk} chunks (drain)" in log
    assert stopped_in < EXIT_TIMEOUT and [pid for pid in tree if alive(pid)] == []
    assert_ports_free(s.ports)
    # the moved state resumes elsewhere: same id, next chunk, the frames of the uninterrupted stream
    pipe = Pipeline.from_artifacts(artifacts)
    with LiveScheduler(Pipeline.from_artifacts(artifacts), chunk_seconds=0.05).start() as other:
        rest = other.open(resume=m.state, lead=float("inf"))  # as a job: made at once, never shed
        assert rest.id == m.stream_id and rest.chunks_done == m.next_chunk
        while (c := rest.next(timeout=120)) is not None:
            got.append(c.frames)
    assert len(got) == CHUNKS, len(got)
    assert np.array_equal(np.concatenate(got), pipe.generate(PROMPT, num_frames=33 * CHUNKS, seed=3))
