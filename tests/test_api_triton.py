"""The API in front of a real tritonserver (the CPU one from nvidia-pytriton, `make triton-env`) serving the
tiny artifacts: the same behaviour as in process. A job through the openai SDK and a live stream with a
prompt change (a control request in band, over the node's one connection) give the runtime's frames; a
client leaving frees its stream on the API and on the server; a slow Triton never blocks stop() or /health
(/health answers in under 100 ms with 8 streams open and the server paused)."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx
import pytest

from tests.api_helpers import (KEY, assert_chunks_match, assert_same_video, connect, decode_mp4, reference_pipeline,
                               running, wait_for)

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")
PROMPT = "A red fox running through fresh snow at sunrise."
STREAMS = 8  # the server's capacity (its chunk time given: the same admission on a busy host)


@pytest.fixture(scope="module")
def triton(server_env, artifacts, tmp_path_factory):
    from helios_deploy.serving.repository import RepoOptions, write_repository
    from helios_deploy.serving.server import LocalServer

    base = tmp_path_factory.mktemp("api-triton")
    # the session's artifacts referenced, not hard-linked: onnx.checker refuses external data with several links
    write_repository(artifacts, base / "repo", RepoOptions(backend="onnxruntime", max_frames=330, max_streams=STREAMS,
                                                           chunk_seconds=0.05, reference=True))
    srv = LocalServer(server_env, base / "repo", log_path=base / "tritonserver.log").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api(triton, tmp_path_factory):
    from helios_deploy.api.app import create_app
    from helios_deploy.api.backends import TritonBackend
    from helios_deploy.api.jobs import JobStore

    backend = TritonBackend(triton.grpc_url)  # no cap of its own: the server admits by its capacity (2 streams)
    keys = (KEY, *(f"{KEY}-{i}" for i in range(1, STREAMS)))  # one per stream of test_health_...: 2 per key
    app = create_app(backend, JobStore(tmp_path_factory.mktemp("jobs")), keys=keys)
    with running(app) as url:
        yield url, app
    backend.close()


@pytest.fixture(scope="module")
def pipe(artifacts):
    yield from reference_pipeline(artifacts)


def test_job_through_triton_matches_runtime(api, pipe, tmp_path):
    from openai import OpenAI

    url, _ = api
    c = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    video = c.videos.create_and_poll(prompt=PROMPT, extra_body={"num_frames": 66, "seed": 4})
    assert video.status == "completed", video.error
    got = decode_mp4(c.videos.download_content(video.id).read(), tmp_path)
    want = pipe.generate(PROMPT, num_frames=66, seed=4)
    assert_same_video(got, want, pipe.generate(PROMPT, num_frames=66, seed=5), tmp_path)


def test_stream_with_prompt_change_through_triton(api, pipe):
    url, _ = api
    new = "A red fox jumping into a snow drift."
    changed, chunks, end = {}, [], None
    with connect(url.replace("http://", "ws://") + "/v1/realtime/video") as ws:
        ws.send(json.dumps({"type": "session.start", "prompt": PROMPT, "num_frames": 99, "seed": 2}))
        assert json.loads(ws.recv(timeout=120))["type"] == "session.started"
        while end is None:
            msg = json.loads(ws.recv(timeout=120))
            if msg["type"] == "session.prompt_updated":
                changed = msg
            elif msg["type"] == "video.chunk_metadata":
                chunks.append((msg, ws.recv(timeout=120)))
                if msg["chunk_index"] == 0:
                    ws.send(json.dumps({"type": "session.interaction", "prompt": new}))
            else:
                end = msg
    assert end["type"] == "session.completed", end
    assert 1 <= changed["from_chunk"] <= 2, changed
    want = pipe.generate({0: PROMPT, changed["from_chunk"]: new}, num_frames=99, seed=2)
    assert_chunks_match(chunks, want, pipe.generate(PROMPT, num_frames=99, seed=2), changed["from_chunk"])


def test_client_leaving_frees_the_stream_on_the_server(api, triton):
    url, app = api
    backend = app.state.api.backend
    with connect(url.replace("http://", "ws://") + "/v1/realtime/video") as ws:
        ws.send(json.dumps({"type": "session.start", "prompt": PROMPT, "num_frames": 330}))
        stream = backend.stream(json.loads(ws.recv(timeout=120))["stream_id"])
        assert json.loads(ws.recv(timeout=120))["type"] == "video.chunk_metadata"
    wait_for(lambda: backend.metrics()["active_streams"] == 0, timeout=30)
    node = backend.cluster.live()[0]

    def stopped_on_server():  # the node's scheduler has ended it
        answer = node.control("progress", stream.id, stream.owner)
        return answer.get("status") == "stopped" or (answer.get("error") or {}).get("code") == "finished"

    wait_for(stopped_on_server, timeout=30)


def test_image_to_video_through_triton_matches_runtime(api, pipe, tmp_path):
    import io

    import numpy as np
    from openai import OpenAI
    from PIL import Image

    url, _ = api
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 96, 3), dtype=np.uint8))  # resized
    png = io.BytesIO()
    image.save(png, format="PNG")
    c = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    video = c.videos.create_and_poll(prompt=PROMPT, input_reference=("first.png", png.getvalue(), "image/png"),
                                     extra_body={"num_frames": 33, "seed": 1})
    assert video.status == "completed", video.error
    got = decode_mp4(c.videos.download_content(video.id).read(), tmp_path)
    want = pipe.generate(PROMPT, num_frames=33, seed=1, image=image)
    assert_same_video(got, want, pipe.generate(PROMPT, num_frames=33, seed=1), tmp_path)


def test_server_refusals_keep_their_status(api):
    """Through Triton, a request the server refuses gets the same answer as in process: a setting the variant
    does not have is a 400, a stream over the server's capacity a 429."""
    import httpx

    url, app = api
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{url}/v1/videos", headers=h, json={"prompt": PROMPT, "guidance_scale": 5.0})
    assert r.status_code == 400 and "guidance" in r.json()["error"]["message"], r.text
    with _open_streams(url, STREAMS):  # the server's capacity
        r = httpx.post(f"{url}/v1/videos", headers=h, json={"prompt": PROMPT, "num_frames": 33}, timeout=120)
        assert r.status_code == 429 and r.json()["error"]["code"] == "over_capacity", r.text
    wait_for(lambda: app.state.api.backend.metrics()["active_streams"] == 0, timeout=30)


@contextlib.contextmanager
def _open_streams(url: str, n: int):
    """``n`` live streams through the API (keys of their own: the per-key limit is 2), each read at once by
    a thread; yields the list of each stream's chunk count so far. The sockets close at the end."""
    ws_url = url.replace("http://", "ws://") + "/v1/realtime/video"
    keys = [KEY] + [f"{KEY}-{i}" for i in range(1, n)]
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(connect(ws_url, key=k)) for k in keys]
        for ws in sockets:
            ws.send(json.dumps({"type": "session.start", "prompt": PROMPT, "num_frames": 330}))
            started = json.loads(ws.recv(timeout=120))
            assert started["type"] == "session.started", started
        chunks = [0] * n

        def read(i, ws):
            with contextlib.suppress(Exception):  # the socket closes at the end
                while True:
                    if isinstance(ws.recv(timeout=120), bytes):
                        chunks[i] += 1

        for i, ws in enumerate(sockets):
            threading.Thread(target=read, args=(i, ws), daemon=True).start()
        yield chunks


def test_paused_server_never_blocks_stop_or_health_and_lateness_is_measured(triton):
    """With the node's processes stopped (SIGSTOP): stop() returns within its timeout, health() says not
    ready within its probe's timeout; once resumed, the late chunks show in progress as misses."""
    import os
    import signal
    import time

    from helios_deploy.api.backends import TritonBackend

    b = TritonBackend(triton.grpc_url, lost_after=60.0)
    try:
        late = b.open(PROMPT, num_frames=165, seed=3)
        other = b.open(PROMPT, num_frames=330, seed=4)
        assert late.next(60).index == 0
        os.killpg(triton.proc.pid, signal.SIGSTOP)
        try:
            paused = time.perf_counter()
            t = time.perf_counter()
            other.stop(timeout=1.0)
            assert time.perf_counter() - t < 2.0 and other.status == "stopped"
            t = time.perf_counter()
            health = b.health()
            assert time.perf_counter() - t < 3.0 and health["ready"] is False, health
            time.sleep(max(0.0, 5.0 - (time.perf_counter() - paused)))
        finally:
            os.killpg(triton.proc.pid, signal.SIGCONT)
        while late.next(60) is not None:
            pass
        p = late.progress()
        assert p["status"] == "completed" and len(p["lateness_s"]) == p["chunks_done"] == 5, p
        assert p["misses"] == sum(x > 0 for x in p["lateness_s"]) >= 1, p
        assert b.health()["ready"] is True
    finally:
        b.close()


def test_health_answers_at_once_with_8_streams_and_the_server_paused(api, triton):
    """8 live streams through the API, then the node's processes stopped (SIGSTOP) for longer than the health
    probe's timeout: every /health answers in under 100 ms (from the last probe, off the event loop), first
    200, then 503 not ready (the node's readiness call times out after 1 s, or the probe has waited 3 s); after
    SIGCONT it is 200 again, and no stream is left once their sockets close."""
    import os
    import signal

    from helios_deploy.api.app import PROBE_TIMEOUT_S

    url, app = api
    times, answers = [], []
    with _open_streams(url, STREAMS) as chunks, httpx.Client(base_url=url, timeout=10) as c:
        wait_for(lambda: all(chunks), timeout=120)  # every stream has sent a chunk
        assert app.state.api.backend.metrics()["active_streams"] == STREAMS
        c.get("/health")  # the connection is open before the pause
        os.killpg(triton.proc.pid, signal.SIGSTOP)
        try:
            paused = time.monotonic()
            while time.monotonic() - paused < PROBE_TIMEOUT_S + 2.5:
                t = time.perf_counter()
                r = c.get("/health")
                times.append(time.perf_counter() - t)
                answers.append((round(time.monotonic() - paused, 2), r.status_code, r.json()["detail"]))
                time.sleep(0.1)
        finally:
            os.killpg(triton.proc.pid, signal.SIGCONT)
        assert max(times) < 0.1, (sorted(times)[-5:], answers)
        assert answers[0][1] == 200 and answers[-1][1] == 503, answers
        wait_for(lambda: c.get("/health").status_code == 200, timeout=30)
    wait_for(lambda: app.state.api.backend.metrics()["active_streams"] == 0, timeout=30)
