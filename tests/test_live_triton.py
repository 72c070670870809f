"""Live streams through a real tritonserver: many streams per helios instance, the stream id in the first
response, helios_control (prompt change, stop, progress, errors), admission, a client leaving, the
custom metrics on the metrics port, and the client / stream-control / streams CLIs."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from helios_deploy.errors import UserError

from .conftest import HEIGHT, WIDTH, run_cli

pytestmark = pytest.mark.slow

PROMPT = "a red fox running through snow"
NEW = "a red car on a coastal road"
MAX_STREAMS = 2


@pytest.fixture(scope="module")
def server(server_env, artifacts, tmp_path_factory):
    from helios_deploy.serving.repository import RepoOptions, write_repository
    from helios_deploy.serving.server import LocalServer

    base = tmp_path_factory.mktemp("live-triton")
    report = write_repository(artifacts, base / "repo", RepoOptions(reference=True, max_frames=33 * 40,
                                                                    max_streams=MAX_STREAMS, chunk_seconds=0.05))
    assert report.models == ["helios", "helios_control"]
    srv = LocalServer(server_env, base / "repo", log_path=base / "tritonserver.log").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def pipe(artifacts):
    from helios_deploy.runtime import Pipeline

    return Pipeline.from_artifacts(artifacts)


def client_for(server):
    from helios_deploy.serving.client import HeliosClient

    return HeliosClient(server.grpc_url, timeout=300)


def wait_active(server, n: int, timeout=60.0) -> dict:
    """The metrics once they show ``n`` active streams (published every second), or at the time-out."""
    from helios_deploy.serving.live_metrics import read_metrics

    end = time.time() + timeout
    while True:
        m = read_metrics(server.metrics_url)
        if m.get("helios_live_streams{active}") == n or time.time() > end:
            return m
        time.sleep(0.25)


def test_prompt_change_through_helios_control_equals_the_runtime_switching_there(server, pipe):
    """The first response carries the stream id; set_prompt from a second client changes the stream from its
    next chunk not yet started: the frames equal the in-process runtime given that schedule (which equals the
    diffusers reference fed those embeddings, test_live.py)."""
    with client_for(server) as c:
        got, at = [], None
        for chunk in c.stream(PROMPT, num_frames=33 * 4, seed=5):
            got.append(chunk.frames)
            if chunk.index == 0:
                with client_for(server) as other:  # any client may control the stream by its id
                    at = other.set_prompt(c.stream_id, NEW)
        assert c.stream_id and len(c.stream_id) == 16
    assert 1 <= at <= 3
    want = pipe.generate({0: PROMPT, at: NEW}, num_frames=33 * 4, seed=5)
    assert np.array_equal(np.concatenate(got), want)


def test_stop_progress_and_control_errors(server):
    with client_for(server) as c, client_for(server) as ctl:
        stream = c.stream(PROMPT, num_frames=33 * 30, seed=1)
        assert next(stream).index == 0
        sid = c.stream_id
        p = ctl.progress(sid)
        assert p["status"] == "running" and p["num_chunks"] == 30 and p["chunks_done"] >= 1
        ctl.stop(sid)
        rest = list(stream)  # the stream ends with the final response, well before its 30 chunks
        assert len(rest) < 28
        for call, match in ((lambda: ctl.progress(sid), "has been stopped"),
                            (lambda: ctl.set_prompt(sid, NEW), "has been stopped"),
                            (lambda: ctl.stop("0123456789abcdef"), "no stream"),
                            (lambda: ctl.set_prompt(sid, "  "), "empty prompt"),
                            (lambda: ctl._control(sid, "rewind"), "unknown action")):
            with pytest.raises(UserError, match=match):
                call()
        assert len(list(c.stream(PROMPT, num_frames=33, seed=2))) == 1  # still serving


def test_over_capacity_refused_at_once_and_the_others_go_on(server, pipe):
    clients = [client_for(server) for _ in range(MAX_STREAMS + 1)]
    try:
        streams = [clients[i].stream(PROMPT, num_frames=33 * 3, seed=10 + i) for i in range(MAX_STREAMS)]
        firsts = [next(s) for s in streams]  # both running
        t = time.perf_counter()
        with pytest.raises(UserError, match="over capacity"):
            list(clients[-1].stream(PROMPT, num_frames=33, seed=9))
        assert time.perf_counter() - t < 5  # refused at once, not after the others
        for i, (s, f) in enumerate(zip(streams, firsts)):
            frames = np.concatenate([f.frames] + [c.frames for c in s])
            assert np.array_equal(frames, pipe.generate(PROMPT, num_frames=33 * 3, seed=10 + i))
    finally:
        for c in clients:
            c.close()


def test_client_leaving_frees_its_stream_and_metrics_show_it(server):
    with client_for(server) as c:
        stream = c.stream(PROMPT, num_frames=33 * 30, seed=3)
        assert next(stream).index == 0
        busy = wait_active(server, 1)
        stream.close()  # cancels the request
    m = wait_active(server, 0)
    assert m["helios_live_streams{active}"] == 0
    assert busy["helios_live_capacity"] == MAX_STREAMS and busy["helios_live_chunk_seconds"] == 0.05
    assert busy["helios_live_streams{active}"] == 1 and busy["helios_live_load"] > 0
    for name in ("helios_live_chunks_total", "helios_live_streams_total", "helios_live_first_chunks_total",
                 "helios_live_chunk_run_seconds_total", "helios_live_deadline_misses_total", "helios_live_load",
                 "helios_live_streams_refused_total", "helios_live_lateness_seconds_total"):
        assert name in m, name
    assert m["helios_live_chunks_total"] >= 1 and m["helios_live_streams_total"] >= 1
    assert "request cancelled by the client; stopped" in server.log()


def test_client_and_stream_control_clis(server, tmp_path, capsys):
    out = tmp_path / "fox.mp4"
    code, _, err = run_cli(["client", server.grpc_url, "--prompt", PROMPT, "--frames", 99, "--prompt-at", f"1:{NEW}",
                            "-o", out], capsys)
    assert code == 0, err
    assert "prompt changed from chunk" in err and out.is_file()
    code, _, err = run_cli(["client", server.grpc_url, "--prompt", PROMPT, "--prompt-at", "x", "-o", tmp_path / "y.mp4"],
                           capsys)
    assert code != 0 and "CHUNK:PROMPT" in err and not (tmp_path / "y.mp4").exists()
    with client_for(server) as c:
        stream = c.stream(PROMPT, num_frames=33 * 20, seed=4)
        next(stream)
        code, stdout, err = run_cli(["stream-control", server.grpc_url, c.stream_id, "--progress"], capsys)
        assert code == 0 and json.loads(stdout)["status"] == "running"
        code, stdout, err = run_cli(["stream-control", server.grpc_url, c.stream_id, "--stop"], capsys)
        assert code == 0 and "stopped" in stdout
        list(stream)
    code, _, err = run_cli(["stream-control", server.grpc_url, "ffffffffffffffff", "--stop"], capsys)
    assert code == 1 and "no stream" in err


def test_streams_command_via_triton(artifacts, tmp_path, capsys):
    out = tmp_path / "s.json"
    code, stdout, err = run_cli(["streams", artifacts, "--concurrent", "2", "--chunks", "2", "--via", "triton",
                                 "--chunk-seconds", "0.05", "--json", out], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert all(s["equal_to_solo"] is True for s in report["streams"])
    assert report["server"]["helios_live_chunks_total"] == 4
