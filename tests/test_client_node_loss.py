"""HeliosClient when its node dies mid-stream (tritonserver and its backend stub killed with -9): the stream's
reader gets one clear StreamError("unavailable") at once instead of hanging, and so does the next request on the
same client (it opens a new stream on the connection, which fails the same way)."""

from __future__ import annotations

import os
import signal
import time

import pytest

pytestmark = pytest.mark.slow

PROMPT = "a red fox running through snow"


@pytest.fixture
def server(server_env, artifacts, tmp_path):
    from helios_deploy.serving.repository import RepoOptions, write_repository
    from helios_deploy.serving.server import LocalServer

    write_repository(artifacts, tmp_path / "repo", RepoOptions(reference=True, max_frames=33 * 40, chunk_seconds=0.05))
    srv = LocalServer(server_env, tmp_path / "repo", log_path=tmp_path / "tritonserver.log").start()
    yield srv
    srv.stop()


def test_node_killed_mid_stream_ends_the_stream_and_the_next_request_with_a_clear_error(server):
    from helios_deploy.runtime.live import StreamError
    from helios_deploy.serving.client import HeliosClient

    with HeliosClient(server.grpc_url, timeout=300) as client:
        stream = client.stream(PROMPT, num_frames=33 * 30, seed=1)
        assert next(stream).index == 0
        os.killpg(server.proc.pid, signal.SIGKILL)  # the server and its Python backend stub (own session)
        server.proc.wait(30)
        t = time.perf_counter()
        with pytest.raises(StreamError) as e:
            list(stream)
        assert e.value.code == "unavailable" and "lost the connection to the node" in e.value.render()
        assert time.perf_counter() - t < 30  # the loss is seen, not waited out (the client's timeout is 300 s)
        with pytest.raises(StreamError) as e:
            client.capacity()
        assert e.value.code == "unavailable"
