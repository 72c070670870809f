"""The API under bad input, bursts and faults (issue 27), on a real uvicorn over the tiny artifacts: upper
bounds on every request field (400 in the OpenAI shape, over the WebSocket an error message and the socket
stays usable), per-key limits that a burst cannot pass, no stream without a job row, DELETE while a job's
video is still being encoded, a client gone while its chunk was being sent, a viewer too slow to keep up,
the host's H.264 encode capacity in admission, and health that fails when the worker is dead."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import struct
import threading
import time
import zlib

import httpx
import pytest

from tests.api_helpers import KEY, OTHER_KEY, connect, make_app, serving, wait_for

PROMPT = "A red fox running through fresh snow at sunrise."
FPS = 96.0  # a chunk period of 0.34 s: the pacing tests run four times faster than playback at 24 fps
H = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def api(artifacts, tmp_path_factory):
    app = make_app(artifacts, tmp_path_factory.mktemp("jobs"), max_streams=8, fps=FPS, max_message_bytes=64 << 10,
                   send_buffer_bytes=64 << 10)
    with serving(app) as (url, app):
        yield url, app


def _ws(url):
    return url.replace("http://", "ws://") + "/v1/realtime/video"


def _error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert code is None or err["code"] == code, err
    assert param is None or err["param"] == param, err
    return err


def _idle(app, timeout=30):
    wait_for(lambda: app.state.api.backend.metrics()["active_streams"] == 0 and not app.state.api.open_streams,
             timeout=timeout)


def _png(width: int, height: int) -> bytes:
    """A real 1-bit PNG of ``width`` x ``height`` zeros: a few KB on the wire, ``width * height`` pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)
    z = zlib.compressobj(9)
    raw = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def test_every_field_has_an_upper_bound(api):
    url, app = api

    def post(**fields):
        return httpx.post(f"{url}/v1/videos", headers=H, json={"prompt": PROMPT, **fields}, timeout=60)

    _error(post(steps=[1, 1, 51]), 400, "invalid_request", "steps")
    _error(post(pyramid_steps="1," * 10_000), 400, "invalid_request", "steps")
    _error(post(num_inference_steps=10 ** 9), 400, "invalid_request", "num_inference_steps")
    _error(post(guidance_scale=1e12), 400, "invalid_request", "guidance_scale")
    _error(post(seed=2 ** 64), 400, "invalid_request", "seed")  # was a 500 (the generator's overflow)
    _error(post(seed=-1), 400, "invalid_request", "seed")
    _error(post(seconds="inf"), 400, "invalid_request", "seconds")  # was a 500 (round(inf))
    _error(post(seconds=1e300), 400, "invalid_request", "num_frames")
    _error(post(prompt="x" * 5000), 400, "invalid_request", "prompt")
    _error(post(negative_prompt="x" * 5000), 400, "invalid_request", "negative_prompt")
    bomb = _png(20_000, 20_000)  # 400 M pixels (Pillow's bomb limit: 179 M) in a few tens of KB
    assert len(bomb) < 100_000
    r = httpx.post(f"{url}/v1/videos", headers=H, data={"prompt": PROMPT},
                   files={"input_reference": ("bomb.png", bomb, "image/png")}, timeout=60)
    _error(r, 400, "image_too_large", "input_reference")  # was a 500 (DecompressionBombError)
    r = httpx.post(f"{url}/v1/videos", headers=H, data={"prompt": PROMPT},
                   files={"input_reference": ("big.png", _png(5000, 5000), "image/png")}, timeout=60)
    _error(r, 400, "image_too_large", "input_reference")  # 25 M pixels: under Pillow's limit, over ours
    assert app.state.api.backend.metrics()["active_streams"] == 0


def test_websocket_bad_input_is_an_error_message_never_a_bare_close(api):
    url, app = api
    with connect(_ws(url)) as ws:
        for bad, code in (({"prompt": PROMPT, "seed": 2 ** 64}, "invalid_request"),  # was a bare 1011 close
                          ({"prompt": PROMPT, "steps": "1,1,500"}, "invalid_request"),
                          ({"prompt": PROMPT, "seconds": "inf"}, "invalid_request")):
            ws.send(json.dumps({"type": "session.start", **bad}))
            err = json.loads(ws.recv(timeout=30))
            assert err["type"] == "error" and err["error"]["code"] == code, err
        ws.send(json.dumps({"type": "session.ping", "padding": "x" * (100 << 10)}))  # over the 64 KiB limit
        err = json.loads(ws.recv(timeout=30))
        assert err["error"]["code"] == "message_too_large" and "65536" in err["error"]["message"], err
        ws.send(b"\0" * 16)
        assert json.loads(ws.recv(timeout=30))["error"]["code"] == "invalid_json"
        ws.send(json.dumps({"type": "session.start", "prompt": PROMPT, "num_frames": 33}))
        assert json.loads(ws.recv(timeout=30))["type"] == "session.started"  # the socket still serves
        ws.send(json.dumps({"type": "session.interaction", "prompt": "y" * 5000}))
        while (m := ws.recv(timeout=30)) and (isinstance(m, bytes) or json.loads(m)["type"] != "error"):
            pass  # the stream's chunks meanwhile
        assert json.loads(m)["error"]["param"] == "prompt", m
    _idle(app)


def test_a_burst_cannot_pass_the_per_key_limits(api):
    url, app = api
    results, barrier = [], threading.Barrier(6)

    def start():
        with connect(_ws(url)) as ws:
            barrier.wait()
            ws.send(json.dumps({"type": "session.start", "prompt": PROMPT, "num_frames": 330}))
            msg = json.loads(ws.recv(timeout=60))
            results.append(msg.get("type") if msg["type"] != "error" else msg["error"]["code"])
            time.sleep(1.0)  # hold the stream while the others try

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == ["session.started"] * 2 + ["too_many_streams"] * 4, results
    _idle(app)

    def create(i):
        return httpx.post(f"{url}/v1/videos", headers={"Authorization": f"Bearer {OTHER_KEY}"},
                          json={"prompt": f"{PROMPT} {i}", "num_frames": 330}, timeout=60)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(create, range(6)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200, 200, 429, 429, 429, 429], [r.text for r in answers]
    for r in answers:
        if r.status_code == 200:
            assert httpx.delete(f"{url}/v1/videos/{r.json()['id']}", headers={"Authorization": f"Bearer {OTHER_KEY}"}
                                ).status_code == 200
    _idle(app)


class _Store:
    """The app's real store with one call made to fail or slow down (a locked database, a slow disk)."""

    def __init__(self, real, fail=(), slow_progress=0.0):
        self._real, self._fail, self._slow = real, fail, slow_progress

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if name in self._fail:
            def failing(*a, **k):
                import sqlite3

                raise sqlite3.OperationalError("database is locked")
            return failing
        if name in ("update", "progress") and self._slow:
            def slow(job_id, *args, **fields):
                if name == "progress" or "progress" in fields:
                    time.sleep(self._slow)
                return attr(job_id, *args, **fields)
            return slow
        return attr


@pytest.fixture
def store_swap(api):
    state = api[1].state.api
    real = state.store
    yield lambda **kw: setattr(state, "store", _Store(real, **kw))
    state.store = real


def test_a_store_failure_leaves_no_stream_behind(api, store_swap):
    url, app = api
    store_swap(fail=("create", "reserve", "count_active"))
    r = httpx.post(f"{url}/v1/videos", headers=H, json={"prompt": PROMPT, "num_frames": 330}, timeout=60)
    err = _error(r, 503, "store_unavailable")
    assert "database is locked" in err["message"]
    time.sleep(0.3)
    assert app.state.api.backend.metrics()["active_streams"] == 0  # was a stream running for no job


def test_delete_while_the_video_is_still_encoding(api, store_swap):
    url, app = api
    store_swap(slow_progress=0.4)  # the writer falls behind the generation (a job's chunks come at once)
    vid = httpx.post(f"{url}/v1/videos", headers=H, json={"prompt": PROMPT, "num_frames": 132},
                     timeout=60).json()["id"]
    backend = app.state.api.backend
    wait_for(lambda: backend.metrics()["active_streams"] == 0, timeout=30)  # all 4 chunks made
    assert httpx.get(f"{url}/v1/videos/{vid}", headers=H).json()["status"] == "in_progress"  # still encoding
    r = httpx.delete(f"{url}/v1/videos/{vid}", headers=H)
    assert r.status_code == 200 and r.json()["deleted"], r.text  # was a 409 and the job kept
    time.sleep(2.5)  # the writer has passed all its chunks by now
    _error(httpx.get(f"{url}/v1/videos/{vid}", headers=H), 404)
    videos = app.state.api.store.video_path(vid).parent
    assert not [p for p in videos.iterdir() if vid in p.name]


def test_a_client_gone_while_its_chunk_is_sent_stops_the_stream(api):
    """The sender meets the closed socket before the receive loop does: release() must stop the stream."""
    from starlette.websockets import WebSocketDisconnect

    from helios_deploy.api.realtime import Session

    url, app = api
    state = app.state.api

    class GoneSocket:  # a client that went away after session.started: every later send fails
        sent = []

        async def send_json(self, msg):
            if msg["type"] != "session.started":
                raise WebSocketDisconnect(1006)
            self.sent.append(msg)

        async def send_bytes(self, data):
            raise WebSocketDisconnect(1006)

    async def run():
        session = Session(GoneSocket(), state, "key-test")
        await session.start({"prompt": PROMPT, "num_frames": 330})
        await asyncio.wait_for(session.sender, 30)  # the sender ends at its first chunk's send

    asyncio.run(run())
    assert GoneSocket.sent and GoneSocket.sent[0]["type"] == "session.started"
    wait_for(lambda: state.backend.metrics()["active_streams"] == 0, timeout=10)  # was left running, unread
    assert not state.open_streams


def test_a_viewer_too_slow_is_told_and_stopped(api):
    url, app = api
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a viewer on a thin link
    sock.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    state = app.state.api
    state.crf = 0  # lossless: about 0.8 MB per chunk, so the socket's buffers fill within a few chunks
    try:
        with connect(_ws(url), sock=sock, max_queue=1) as ws:  # the client library holds one frame, no more
            ws.send(json.dumps({"type": "session.start", "prompt": PROMPT, "num_frames": 330, "size": "128x64"}))
            stream = state.backend.stream(json.loads(ws.recv(timeout=30))["stream_id"])
            # reads nothing while the chunks are made (0.34 s each, 0.4 MB each)
            progress = wait_for(lambda: (p := stream.progress())["status"] != "running" and p, timeout=60)
            msgs, closed = _read_all(ws)
    finally:
        state.crf = 23
    kinds = [m["type"] for m in msgs]
    assert progress["status"] == "stopped" and progress["chunks_done"] < 10, progress  # not buffered on
    assert "session.warning" in kinds or sum(k == "video.chunk_metadata" for k in kinds) < 10, kinds
    assert msgs[-1]["type"] == "error" and msgs[-1]["error"]["code"] == "slow_consumer", msgs[-1]
    assert "slower than the stream plays" in msgs[-1]["error"]["message"]
    assert getattr(closed, "rcvd", None) is not None and closed.rcvd.code == 1008, closed
    _idle(app)
    metrics = httpx.get(f"{url}/metrics", headers=H).text
    assert 'helios_api_refused_total{reason="slow_consumer"} 1.0' in metrics


def _read_all(ws):
    """Every text message until the server closes the socket, and the close."""
    msgs = []
    try:
        while True:
            m = ws.recv(timeout=10)
            if isinstance(m, str):
                msgs.append(json.loads(m))
    except Exception as e:  # noqa: BLE001 - the server's close
        return msgs, e


def test_encode_capacity_is_in_admission(api):
    from helios_deploy.api.fmp4 import ChunkEncoder, EncodeMeter

    url, app = api
    state = app.state.api
    size = tuple(state.backend.sizes[0])
    measured = EncodeMeter(workers=1)
    measured.admit("a", size, FPS)  # the first admission measures a chunk's encode
    import numpy as np

    frames = np.random.default_rng(1).integers(0, 256, (33, *size, 3), dtype=np.uint8)
    t = time.perf_counter()
    ChunkEncoder(fps=FPS).encode(frames)
    direct = time.perf_counter() - t
    assert 0 < measured.seconds(size) < 20 * direct + 0.05, (measured.seconds(size), direct)
    measured.close()
    real = state.encode
    state.encode = EncodeMeter(workers=1, seconds_per_chunk=0.2, size=size)  # 0.2 s of 0.34 per chunk: one stream
    try:
        with connect(_ws(url)) as a, connect(_ws(url), OTHER_KEY) as b:
            a.send(json.dumps({"type": "session.start", "prompt": PROMPT, "num_frames": 99}))
            assert json.loads(a.recv(timeout=30))["type"] == "session.started"
            b.send(json.dumps({"type": "session.start", "prompt": PROMPT, "num_frames": 33}))
            err = json.loads(b.recv(timeout=30))
            assert err["type"] == "error" and err["error"]["code"] == "over_capacity", err
            assert "H.264" in err["error"]["message"] and err["error"]["type"] == "rate_limit_error"
    finally:
        state.encode = real
    _idle(app)


def test_health_fails_when_the_worker_is_dead(artifacts, tmp_path):
    from helios_deploy.api import app as app_module

    app = make_app(artifacts, tmp_path / "jobs")
    with serving(app) as (url, app):
        for route in ("/health", "/health/live", "/health/ready"):
            r = httpx.get(url + route)
            assert r.status_code == 200 and r.json()["live"] and r.json()["ready"], r.text
        app.state.api.backend.scheduler.close()  # the worker thread ends: no stream can make progress
        wait_for(lambda: httpx.get(f"{url}/health/live").status_code == 503,
                 timeout=5 * app_module.PROBE_EVERY_S)  # was 200 forever
        r = httpx.get(f"{url}/health")
        assert r.status_code == 503 and "worker" in r.json()["detail"], r.text


def test_encode_time_is_charged_to_the_runners_admission(api):
    """In process on CPU the encoder threads take the runners' own cores: each stream's chunk costs the runners'
    chunk time plus its encode's seconds of one core spread over the cores (app.py -> InProcessBackend.
    count_encode). A second stream that fits by the runners' time alone (2 x 0.05 s per 0.34 s period) is refused
    once its encode is counted; without it both were admitted and then late together."""
    import os

    from helios_deploy.api.fmp4 import EncodeMeter
    from helios_deploy.runtime.live import StreamError

    url, app = api
    state, backend = app.state.api, app.state.api.backend
    sched, size, cores = backend.scheduler, tuple(backend.sizes[0]), len(os.sched_getaffinity(0))
    _idle(app)
    real = sched.overhead
    assert real is not None  # set by create_app: the runners are on this host's CPUs
    heavy = EncodeMeter(workers=1, seconds_per_chunk=0.15 * cores, size=size)  # 0.15 s of the runners' period
    try:
        assert backend.count_encode(heavy)
        first = backend.open(PROMPT, num_frames=330)
        assert abs(backend.metrics()["load"] - (0.05 + 0.15) / (33 / FPS)) < 1e-6, backend.metrics()
        with pytest.raises(StreamError) as refused:
            backend.open(PROMPT, num_frames=330)
        assert refused.value.code == "over_capacity"
        first.stop()
        sched.overhead = real
        both = [backend.open(PROMPT, num_frames=330) for _ in range(2)]  # the runners' time alone: both fit
        for s in both:
            s.stop()
    finally:
        heavy.close()
        sched.overhead = real
    from types import SimpleNamespace

    assert real(SimpleNamespace(size=size)) == (state.encode.seconds(size) or 0.0) / cores  # the API's own meter
    _idle(app)


def test_a_viewer_reading_at_half_speed_is_stopped(artifacts, tmp_path):
    """A viewer that reads every chunk, but at half the playback speed, is stopped (slow_consumer, 1008) long
    before its 20 chunks are made: on an idle host each read frees the next chunk's room, so no send blocks for 3
    periods and it is warned, then stopped once it has been behind (chunks made and not yet sent) for more than
    max_backlog_chunks periods; on a loaded host one send can wait that long, and it is stopped at once (16 KB below
    the app: a fraction of one 64x128 chunk, about 100 KB; the client library holds one message)."""
    fps = 48.0  # a 0.69 s period: the runners keep up on a busy host, so only the viewer falls behind
    app = make_app(artifacts, tmp_path / "jobs", fps=fps, send_buffer_bytes=16 << 10, max_frames=660)
    with serving(app) as (url, app):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        msgs, chunks, closed = [], 0, None
        with connect(_ws(url), sock=sock, max_queue=1) as ws:
            ws.send(json.dumps({"type": "session.start", "prompt": PROMPT, "num_frames": 660}))
            stream = app.state.api.backend.stream(json.loads(ws.recv(timeout=30))["stream_id"])
            try:
                while True:
                    m = ws.recv(timeout=30)
                    if isinstance(m, bytes):
                        chunks += 1
                        time.sleep(2 * 33 / fps)  # half speed
                    else:
                        msgs.append(json.loads(m))
            except Exception as e:  # noqa: BLE001 - the server's close
                closed = e
        kinds = [m["type"] for m in msgs]
        assert kinds[-1] == "error" and msgs[-1]["error"]["code"] == "slow_consumer", (kinds, msgs[-1])
        stop = msgs[-1]["error"]["message"]
        if "took over" not in stop:  # stopped as behind for too long: warned first
            assert "behind for" in stop, msgs[-1]
            warning = kinds.index("session.warning")
            assert msgs[warning]["code"] == "slow_consumer" and warning < len(kinds) - 1, msgs
        # else the viewer's socket stayed full while one send waited 3 periods (a loaded host delays the reader
        # further; measured: chunk 4's send, with 4 chunks sent within a period each): stopped at once, as a
        # warning would wait behind the bytes it has not read
        assert getattr(closed, "rcvd", None) is not None and closed.rcvd.code == 1008, closed
        assert stream.progress()["status"] == "stopped" and stream.progress()["chunks_done"] < 20
        assert chunks < 20
        _idle(app)


def test_the_server_negotiates_no_permessage_deflate():
    """serve()'s uvicorn settings turn permessage-deflate off: the chunks are H.264 (deflate does not shrink
    them), and a socket that negotiated it held a zlib compressor and deflated every chunk on the event loop.
    The client offers it (websockets does by default); the server's handshake must not accept it."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from websockets.sync.client import connect as ws_connect

    from helios_deploy.api.security import Limits
    from helios_deploy.api.serve import uvicorn_options
    from tests.api_helpers import free_port

    async def echo(ws):
        await ws.accept()
        await ws.send_bytes(await ws.receive_bytes())
        await ws.close()

    app = Starlette(routes=[WebSocketRoute("/ws", echo)])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **uvicorn_options(Limits())))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30)
        with ws_connect(f"ws://127.0.0.1:{port}/ws", compression="deflate") as ws:
            offered = ws.request.headers.get("Sec-WebSocket-Extensions") or ""
            ws.send(b"\0" * 1000)
            assert ws.recv(timeout=10) == b"\0" * 1000
        assert "permessage-deflate" in offered  # the client did ask for it
        assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
    finally:
        server.should_exit = True
        thread.join(timeout=30)


ARENAS_SCRIPT = """
import ctypes, sys, tempfile, threading
from helios_deploy.api.serve import bound_malloc_arenas
if sys.argv[1] == "bound":
    assert bound_malloc_arenas()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def work():  # ctypes lets go of the GIL: 8 threads allocate at once, as the server's threads do
    for _ in range(20000):
        libc.free(libc.malloc(200))
threads = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes, libc.fclose.argtypes = [ctypes.c_int, ctypes.c_void_p], [ctypes.c_void_p]
with tempfile.NamedTemporaryFile("r") as out:
    f = libc.fopen(out.name.encode(), b"w")
    libc.malloc_info(0, f)
    libc.fclose(f)
    print(out.read().count("<heap nr="))
"""


def test_the_server_bounds_its_malloc_arenas():
    """serve() caps glibc's malloc arenas (bound_malloc_arenas, first thing): with the default (8 per core) the
    server's threads spread over many arenas, each keeping what was freed in it (a 5-minute soak's server
    held 24 -> 35 MB freed but not returned, RSS growing while the memory in use stayed flat). Threads that
    allocate at once get new arenas without the cap and stay within it with it."""
    import subprocess
    import sys

    def heaps(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", ARENAS_SCRIPT, mode], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip())

    from helios_deploy.api.serve import MALLOC_ARENAS

    assert heaps("bound") <= MALLOC_ARENAS
    assert heaps("default") > MALLOC_ARENAS  # the same threads without the cap: the test can tell
