"""WS /v1/realtime/video on a real uvicorn: every chunk arrives as metadata + one fMP4 piece that decodes
to the runtime's frames (within H.264's loss), a prompt change takes effect at the chunk the server names
(the runtime given that prompt schedule), two concurrent streams beside a bad request, a client leaving
mid-stream frees its stream, and the key is required."""

from __future__ import annotations

import json
import threading

import pytest

from tests.api_helpers import (KEY, OTHER_KEY, assert_chunks_match, connect, make_app, receive_stream, reference_pipeline,
                               serving, wait_for)

PROMPT = "A red fox running through fresh snow at sunrise."


@pytest.fixture(scope="module")
def api(artifacts, tmp_path_factory):
    with serving(make_app(artifacts, tmp_path_factory.mktemp("jobs"))) as (url, app):
        yield url.replace("http://", "ws://") + "/v1/realtime/video", app


@pytest.fixture(scope="module")
def pipe(artifacts):
    yield from reference_pipeline(artifacts)


def test_stream_fragments_decode_to_runtime_frames(api, pipe):
    url, _ = api
    with connect(url) as ws:
        ws.send(json.dumps({"type": "session.start", "prompt": PROMPT, "num_frames": 66, "seed": 5,
                            "size": "128x64"}))
        started, chunks, end = receive_stream(ws)
        assert (started["width"], started["height"], started["num_chunks"]) == (128, 64, 2)
        assert end["type"] == "session.completed" and end["progress"]["chunks_done"] == 2
        assert chunks[0][0]["latency_s"] > 0
        ws.send(json.dumps({"type": "session.ping"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "session.pong"
    want = pipe.generate(PROMPT, num_frames=66, seed=5)
    assert_chunks_match(chunks, want, pipe.generate(PROMPT, num_frames=66, seed=6))


def test_prompt_change_takes_effect_where_the_server_says(api, pipe):
    url, _ = api
    new = "A red fox jumping into a snow drift."
    changed = {}
    with connect(url) as ws:
        ws.send(json.dumps({"type": "session.start", "prompt": PROMPT, "num_frames": 99, "seed": 2}))

        def change(meta):
            if meta["chunk_index"] == 0:
                ws.send(json.dumps({"type": "session.interaction", "prompt": new}))

        started = json.loads(ws.recv(timeout=60))
        chunks, end = [], None
        while end is None:
            msg = json.loads(ws.recv(timeout=60))
            if msg["type"] == "session.prompt_updated":
                changed = msg
            elif msg["type"] == "video.chunk_metadata":
                chunks.append((msg, ws.recv(timeout=60)))
                change(msg)
            else:
                end = msg
    assert started["num_chunks"] == 3 and end["type"] == "session.completed", end
    assert changed["prompt"] == new and 1 <= changed["from_chunk"] <= 2, changed
    want = pipe.generate({0: PROMPT, changed["from_chunk"]: new}, num_frames=99, seed=2)
    assert_chunks_match(chunks, want, pipe.generate(PROMPT, num_frames=99, seed=2), changed["from_chunk"])


def test_two_streams_and_a_bad_request(api, pipe):
    url, _ = api
    results = {}

    def run(seed, key):
        with connect(url, key) as ws:
            ws.send(json.dumps({"type": "session.start", "prompt": PROMPT, "num_frames": 33, "seed": seed}))
            results[seed] = receive_stream(ws)

    threads = [threading.Thread(target=run, args=(s, k)) for s, k in ((11, KEY), (12, OTHER_KEY))]
    for t in threads:
        t.start()
    with connect(url) as ws:  # meanwhile, bad requests on a third socket: errors, and the socket stays usable
        for bad, param in (({"prompt": PROMPT, "size": "640x384"}, "size"), ({"prompt": ""}, "prompt"),
                           ({"prompt": PROMPT, "num_frames": 10_000}, "num_frames")):
            ws.send(json.dumps({"type": "session.start", **bad}))
            err = json.loads(ws.recv(timeout=30))
            assert err["type"] == "error" and err["error"]["param"] == param, err
        ws.send("not json")
        assert json.loads(ws.recv(timeout=30))["error"]["code"] == "invalid_json"
        ws.send(json.dumps({"type": "session.interaction", "prompt": "x"}))
        assert json.loads(ws.recv(timeout=30))["error"]["code"] == "no_stream"
        ws.send(json.dumps({"type": "session.ping"}))
        assert json.loads(ws.recv(timeout=30))["type"] == "session.pong"
    for t in threads:
        t.join(timeout=120)
    for seed in (11, 12):
        started, chunks, end = results[seed]
        assert end["type"] == "session.completed"
        want = pipe.generate(PROMPT, num_frames=33, seed=seed)
        assert_chunks_match(chunks, want, pipe.generate(PROMPT, num_frames=33, seed=23 - seed))


def test_client_leaving_mid_stream_frees_its_stream(api):
    from helios_deploy.runtime.live import StreamError

    url, app = api
    backend = app.state.api.backend
    with connect(url) as ws:
        ws.send(json.dumps({"type": "session.start", "prompt": PROMPT, "num_frames": 330}))
        stream_id = json.loads(ws.recv(timeout=60))["stream_id"]
        assert json.loads(ws.recv(timeout=60))["type"] == "video.chunk_metadata"
        assert backend.metrics()["active_streams"] == 1
    # the socket closed after one of ten chunks: the stream is stopped and its state freed
    wait_for(lambda: backend.metrics()["active_streams"] == 0, timeout=10)
    with pytest.raises(StreamError) as e:
        backend.stream(stream_id)
    assert e.value.code == "finished" and "stopped" in str(e.value)
    assert not app.state.api.open_streams


def test_stop_message_ends_the_stream(api):
    url, app = api
    with connect(url) as ws:
        ws.send(json.dumps({"type": "session.start", "prompt": PROMPT, "num_frames": 330}))
        assert json.loads(ws.recv(timeout=60))["type"] == "session.started"
        ws.send(json.dumps({"type": "session.stop"}))
        msgs = []
        while not msgs or msgs[-1].get("type") not in ("session.stopped", "error"):
            m = ws.recv(timeout=60)
            msgs.append(json.loads(m) if isinstance(m, str) else {"bytes": len(m)})
        assert msgs[-1]["type"] == "session.stopped" and msgs[-1]["progress"]["chunks_done"] < 10
    assert app.state.api.backend.metrics()["active_streams"] == 0


def test_key_required(api):
    from websockets.exceptions import InvalidStatus

    url, _ = api
    for key in (None, "wrong-key-0123456789abcdef"):
        with pytest.raises(InvalidStatus) as e:
            with connect(url, key):
                pass
        assert e.value.response.status_code == 401
        assert json.loads(e.value.response.body)["error"]["code"] == "invalid_api_key"
    # a browser's way: the key as a subprotocol beside helios.v1
    with connect(url, None, subprotocols=["helios.v1", f"bearer.{KEY}"]) as ws:
        assert ws.subprotocol == "helios.v1"
        ws.send(json.dumps({"type": "session.ping"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "session.pong"


def test_streams_per_key_limit(api):
    url, app = api
    with connect(url) as a, connect(url) as b, connect(url) as c:
        for ws in (a, b):
            ws.send(json.dumps({"type": "session.start", "prompt": PROMPT, "num_frames": 330}))
            assert json.loads(ws.recv(timeout=60))["type"] == "session.started"
        c.send(json.dumps({"type": "session.start", "prompt": PROMPT, "num_frames": 33}))
        err = json.loads(c.recv(timeout=60))
        assert err["type"] == "error" and err["error"]["code"] == "too_many_streams", err
        assert err["error"]["type"] == "rate_limit_error"
    wait_for(lambda: app.state.api.backend.metrics()["active_streams"] == 0, timeout=30)
