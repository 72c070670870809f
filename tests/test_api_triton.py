"""The API in front of a real tritonserver (the CPU one from nvidia-pytriton, `make triton-env`) serving the
tiny artifacts: the same behaviour as in process. A job through the openai SDK and a live stream with a
prompt change (a control request in band, over the node's one connection) give the runtime's frames; a
client leaving frees its stream on the API and on the server; a slow Triton never blocks stop() or /health."""

from __future__ import annotations

import json

import pytest

from tests.api_helpers import (KEY, assert_chunks_match, assert_same_video, connect, decode_mp4, reference_pipeline,
                               running, wait_for)

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")
PROMPT = "A red fox running through fresh snow at sunrise."


@pytest.fixture(scope="module")
def triton(server_env, artifacts, tmp_path_factory):
    from helios_deploy.serving.repository import RepoOptions, write_repository
    from helios_deploy.serving.server import LocalServer

    base = tmp_path_factory.mktemp("api-triton")
    # the session's artifacts referenced, not hard-linked: onnx.checker refuses external data with several links
    write_repository(artifacts, base / "repo", RepoOptions(backend="onnxruntime", max_frames=330, max_streams=2,
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
    app = create_app(backend, JobStore(tmp_path_factory.mktemp("jobs")), keys=(KEY,))
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
    ws_url = url.replace("http://", "ws://") + "/v1/realtime/video"
    with connect(ws_url) as a, connect(ws_url) as b:  # the server's two streams
        for ws in (a, b):
            ws.send(json.dumps({"type": "session.start", "prompt": PROMPT, "num_frames": 330}))
            assert json.loads(ws.recv(timeout=120))["type"] == "session.started"
        r = httpx.post(f"{url}/v1/videos", headers=h, json={"prompt": PROMPT, "num_frames": 33}, timeout=120)
        assert r.status_code == 429 and r.json()["error"]["code"] == "over_capacity", r.text
    wait_for(lambda: app.state.api.backend.metrics()["active_streams"] == 0, timeout=30)


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
