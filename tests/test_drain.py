"""Drain with a real tritonserver: SIGTERM to `python -m helios_deploy.serving.server serve` mid-stream. The node
takes no new streams, the stream ends after its current chunk with a last response {"moved": true} carrying its
state, the wrapper stops tritonserver and exits 0 with nothing left behind, and the state resumes the stream
elsewhere (here: an in-process scheduler) with every frame equal to the uninterrupted stream's."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from .test_serve import Serve, alive, assert_ports_free, descendants, free_ports

pytestmark = pytest.mark.slow

PROMPT = "a red fox running through snow"
CHUNKS = 8


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

    s = Serve(server_env, repo, free_ports(), tmp_path / "serve.log")
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
        assert s.proc.wait(60) == 0, s.log()[-3000:]
        stopped_in = time.monotonic() - t
    finally:
        s.stop()
    m = moved.value
    assert all(st for st in states) and m.state and m.stream_id == client.stream_id
    assert 2 <= m.next_chunk == len(got) < CHUNKS  # it stopped after its chunk in flight, not at the end
    log = s.log()
    assert "serve: draining: 1 stream(s) to move" in log and "serve: drained: no stream left" in log
    assert f"moved after {m.next_chunk} chunks (drain)" in log
    assert stopped_in < 30 and [pid for pid in tree if alive(pid)] == []
    assert_ports_free(s.ports)
    # the moved state resumes elsewhere: same id, next chunk, the frames of the uninterrupted stream
    pipe = Pipeline.from_artifacts(artifacts)
    with LiveScheduler(Pipeline.from_artifacts(artifacts), chunk_seconds=0.05).start() as other:
        rest = other.open(resume=m.state)
        assert rest.id == m.stream_id and rest.chunks_done == m.next_chunk
        got += [c.frames for c in rest]
    assert np.array_equal(np.concatenate(got), pipe.generate(PROMPT, num_frames=33 * CHUNKS, seed=3))
