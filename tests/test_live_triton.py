"""Live streams through a real tritonserver: one helios instance with two schedulers (devices "cpu,cpu", one
stream each: a node of two "GPUs"), the stream id in the first response, control in band (prompt change, stop,
progress, capacity, errors, owners) over the streaming connection itself, placement by free capacity inside the
node, admission, a slow reader, a client leaving, the custom metrics (demand) on the metrics port, and the
client / stream-control / streams CLIs."""

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
MAX_STREAMS = 2  # the node's: two schedulers of one stream each


@pytest.fixture(scope="module")
def server(server_env, artifacts, tmp_path_factory):
    from helios_deploy.serving.repository import RepoOptions, write_repository
    from helios_deploy.serving.server import LocalServer

    base = tmp_path_factory.mktemp("live-triton")
    report = write_repository(artifacts, base / "repo", RepoOptions(reference=True, max_frames=33 * 40, device="cpu,cpu",
                                                                    max_streams=1, chunk_seconds=0.05))
    assert report.models == ["helios"]
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


def test_prompt_change_in_band_equals_the_runtime_switching_there(server, pipe):
    """The first response carries the stream id; set_prompt, sent on the stream's own connection, changes the
    stream from its next chunk not yet started: the frames equal the in-process runtime given that schedule (which
    equals the diffusers reference fed those embeddings, test_live.py)."""
    with client_for(server) as c:
        got, at = [], None
        for chunk in c.stream(PROMPT, num_frames=33 * 4, seed=5):
            got.append(chunk.frames)
            if chunk.index == 0:
                at = c.set_prompt(c.stream_id, NEW)  # the same connection the chunks arrive on
        assert c.stream_id and len(c.stream_id) >= 16
    assert 1 <= at <= 3
    want = pipe.generate({0: PROMPT, at: NEW}, num_frames=33 * 4, seed=5)
    assert np.array_equal(np.concatenate(got), want)


def test_stop_progress_capacity_and_control_errors(server):
    with client_for(server) as c, client_for(server) as ctl:
        stream = c.stream(PROMPT, num_frames=33 * 30, seed=1)
        assert next(stream).index == 0
        sid = c.stream_id
        p = ctl.progress(sid)  # any connection to the node: a control request is a request to its helios model
        assert p["status"] == "running" and p["num_chunks"] == 30 and p["chunks_done"] >= 1 and p["stream_id"] == sid
        cap = ctl.capacity()
        assert cap["capacity"] == MAX_STREAMS and cap["active"] == 1 and cap["free"] == 1 and cap["draining"] is False
        assert [s["device"] for s in cap["schedulers"]] == ["cpu", "cpu"] and cap["demand"] == 0.5
        ctl.stop(sid)
        rest = list(stream)  # the stream ends with the final response, well before its 30 chunks
        assert len(rest) < 28
        for call, match in ((lambda: ctl.progress(sid), "has been stopped"),
                            (lambda: ctl.set_prompt(sid, NEW), "has been stopped"),
                            (lambda: ctl.stop("0123456789abcdef"), "no stream"),
                            (lambda: ctl.set_prompt(sid, "  "), "empty prompt")):
            with pytest.raises(UserError, match=match):
                call()
        # the answers as they are: JSON documents, not Triton errors (a broadcast asks every node)
        assert ctl.control("stop", "0123456789abcdef")["error"]["code"] == "not_found"
        assert ctl.control("rewind", sid)["error"]["code"] == "bad_action"
        assert ctl.control("progress")["error"]["code"] == "bad_request"  # no stream_id
        assert len(list(c.stream(PROMPT, num_frames=33, seed=2))) == 1  # still serving


def test_owner_gates_control_and_many_streams_share_one_connection(server):
    """A stream opened with an owner is steered only with that owner (others get not_found, as for an unknown id);
    one HeliosClient carries two streams and their control on one gRPC stream; the node placed them on its two
    schedulers (the most free capacity first)."""
    from helios_deploy.serving.client import HeliosClient

    with HeliosClient(server.grpc_url, timeout=300, owner="a" * 64) as mine, client_for(server) as anyone:
        s1, s2 = (mine.stream(PROMPT, num_frames=33 * 20, seed=s) for s in (6, 7))
        next(s1)
        id1 = mine.stream_id
        next(s2)
        id2 = mine.stream_id
        assert id1 != id2
        devices = [s["active"] for s in anyone.capacity()["schedulers"]]
        assert devices == [1, 1]  # one per scheduler: placement by free capacity
        assert anyone.control("progress", id1)["error"]["code"] == "not_found"
        assert anyone.control("stop", id1)["error"]["code"] == "not_found"
        assert mine.progress(id1)["status"] == "running"
        mine.stop(id1)
        mine.stop(id2)
        assert len(list(s1)) < 19 and len(list(s2)) < 19  # both ended early


def test_failover_states_in_every_chunk_and_a_resume_through_the_node(server, pipe):
    """With failover every chunk response carries the stream's state; an open with resume=<chunk 1's state> on
    the node continues that stream (same id, chunk 2 on) with the frames of the uninterrupted stream."""
    with client_for(server) as c:
        stream = c.stream(PROMPT, num_frames=33 * 4, seed=12, failover=True)
        first = [next(stream), next(stream)]
        sid = c.stream_id
        stream.close()  # stops it on the node
        assert all(ch.state for ch in first) and first[0].state != first[1].state
        resumed = list(c.stream_arrays({"resume": np.array([first[1].state], dtype=np.object_)}))
        assert c.stream_id == sid and [ch.index for ch in resumed] == [2, 3]
        assert all(ch.state is None for ch in resumed)  # failover not asked for this time: no state
    frames = np.concatenate([ch.frames for ch in first + resumed])
    assert np.array_equal(frames, pipe.generate(PROMPT, num_frames=33 * 4, seed=12))


def test_a_reader_that_falls_behind_is_stopped_with_a_clear_error(server):
    from helios_deploy.serving.client import HeliosClient

    with HeliosClient(server.grpc_url, timeout=300, max_buffered=2) as c, client_for(server) as ctl:
        stream = c.stream(PROMPT, num_frames=33 * 30, seed=8, realtime=False)  # a job: chunks as fast as they come
        next(stream)
        sid = c.stream_id
        time.sleep(3)  # do not read: the chunks pile up to the bound
        with pytest.raises(UserError, match="fell behind") as e:
            list(stream)
        assert "stopped" in e.value.render()
        end = time.time() + 30
        while ctl.control("progress", sid).get("status") == "running" and time.time() < end:
            time.sleep(0.2)
        assert ctl.control("progress", sid)["error"]["code"] == "finished"  # stopped on the node


def test_over_capacity_refused_at_once_and_the_others_go_on(server, pipe):
    clients = [client_for(server) for _ in range(MAX_STREAMS + 1)]
    try:
        streams = [clients[i].stream(PROMPT, num_frames=33 * 3, seed=10 + i) for i in range(MAX_STREAMS)]
        firsts = [next(s) for s in streams]  # both running
        t = time.perf_counter()
        with pytest.raises(UserError, match="over capacity") as e:
            list(clients[-1].stream(PROMPT, num_frames=33, seed=9))
        assert time.perf_counter() - t < 5 and e.value.code == "over_capacity"  # refused at once, by both schedulers
        # demand: (2 active + 1 refused in the last 60 s) / capacity 2, on the metrics port and in the answer
        assert clients[-1].capacity()["demand"] == pytest.approx(1.5)
        from helios_deploy.serving.live_metrics import read_metrics

        end = time.time() + 10
        while read_metrics(server.metrics_url).get("helios_live_demand", 0) < 1.5 and time.time() < end:
            time.sleep(0.25)
        assert read_metrics(server.metrics_url)["helios_live_demand"] == pytest.approx(1.5)
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
        stream.close()  # leaves the loop: the client stops the stream in band
        assert wait_active(server, 0)["helios_live_streams{active}"] == 0
        stream = c.stream(PROMPT, num_frames=33 * 30, seed=3)
        assert next(stream).index == 0
        wait_active(server, 1)
    m = wait_active(server, 0)  # the client closed its connection: the node sees the request cancelled
    assert m["helios_live_streams{active}"] == 0
    assert busy["helios_live_capacity"] == MAX_STREAMS and busy["helios_live_chunk_seconds"] == 0.05
    assert busy["helios_live_streams{active}"] == 1 and busy["helios_live_load"] > 0
    assert busy["helios_live_demand"] >= 0.5 and busy["helios_live_draining"] == 0  # 1 of 2 (+ recent refusals)
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
    code, stdout, err = run_cli(["stream-control", server.grpc_url, "--capacity"], capsys)
    assert code == 0 and json.loads(stdout)["capacity"] == MAX_STREAMS


def test_streams_command_via_triton(artifacts, tmp_path, capsys):
    out = tmp_path / "s.json"
    code, stdout, err = run_cli(["streams", artifacts, "--concurrent", "2", "--chunks", "2", "--via", "triton",
                                 "--chunk-seconds", "0.05", "--json", out], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert all(s["equal_to_solo"] is True for s in report["streams"])
    assert report["server"]["helios_live_chunks_total"] == 4
