"""Shared by the API tests: a real uvicorn on a free loopback port, in a thread of the test process."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np

KEY = "test-key-0123456789abcdef"
OTHER_KEY = "other-key-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """Serve ``app`` with uvicorn on 127.0.0.1:<free port>; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           ws_max_size=1 << 20))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def psnr(a, b) -> float:
    import numpy as np

    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def make_app(artifacts, store, keys=(KEY, OTHER_KEY), max_streams=2, fps=24.0, **limits):
    """The app over the in-process backend of ``artifacts``. The chunk time is given (not measured) so the
    admission is the same on a busy machine: ``max_streams`` streams at once, the next one over capacity."""
    from helios_deploy.api.app import create_app
    from helios_deploy.api.backends import InProcessBackend
    from helios_deploy.api.jobs import JobStore
    from helios_deploy.api.security import Limits

    backend = InProcessBackend.open_artifacts(artifacts, max_streams=max_streams, chunk_seconds=0.05, fps=fps)
    settings = dict(max_body_bytes=1 << 20, max_frames=330, max_jobs_per_key=2, max_streams_per_key=2)
    settings.update(limits)
    return create_app(backend, store if hasattr(store, "get") else JobStore(store), keys=keys,
                      limits=Limits(**settings), fps=fps)


@contextlib.contextmanager
def serving(app):
    """``running(app)`` yielding (base URL, app); the app's backend is closed afterwards."""
    try:
        with running(app) as url:
            yield url, app
    finally:
        app.state.api.backend.close()


def reference_pipeline(artifacts):
    """The runtime the served frames are compared with: its own instance, not the server's (a fixture body)."""
    from helios_deploy.runtime import Pipeline

    p = Pipeline.from_artifacts(artifacts)
    yield p
    p.close()


def wait_for(check, timeout=60.0, every=0.05):
    """Poll ``check()`` until it returns something true; that value (AssertionError on time-out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {check}")


# -- comparing what the API serves with the runtime's frames ----------------------------------------
def decode_mp4(data: bytes, tmp_path: Path) -> np.ndarray:
    from helios_deploy.runtime.video_io import read_video

    path = tmp_path / f"v{len(list(tmp_path.iterdir()))}.mp4"
    path.write_bytes(data)
    return read_video(path)


def through_writer(frames: np.ndarray, tmp_path: Path) -> np.ndarray:
    """``frames`` through the project's mp4 writer and back: the codec's own loss on this content."""
    from helios_deploy.runtime.video_io import read_video, write_mp4

    path = tmp_path / "reference.mp4"
    write_mp4(path, [frames], fps=24)
    return read_video(path)


def assert_same_video(got: np.ndarray, want: np.ndarray, other: np.ndarray, tmp_path: Path) -> None:
    """``got`` is ``want`` through the codec: as close to it as ``want`` encoded directly (the tiny model's
    frames are noise-like, so H.264 at the writer's quality loses about 20 dB on them), and much closer to that
    encoding than to the encoding of another request's video (``other``)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    encoded = through_writer(want, tmp_path)
    near, bound = psnr(got, want), psnr(encoded, want)
    same, different = psnr(got, encoded), psnr(got, through_writer(other, tmp_path))
    assert near >= bound - 0.5, f"PSNR to the runtime's frames {near:.1f} dB, the codec alone {bound:.1f}"
    assert same > different + 6, f"PSNR to this request's encoding {same:.1f} dB, to another's {different:.1f}"



# -- the WebSocket --------------------------------------------------------------------------------
def connect(url, key=KEY, **kw):
    from websockets.sync.client import connect as ws_connect

    return ws_connect(url, additional_headers={"Authorization": f"Bearer {key}"} if key else None,
                      max_size=1 << 22, open_timeout=30, **kw)


def receive_stream(ws, on_chunk=None) -> tuple[dict, list[tuple[dict, bytes]], dict]:
    """(session.started, [(chunk metadata, fMP4 bytes)], the final message)."""
    started = json.loads(ws.recv(timeout=60))
    assert started["type"] == "session.started", started
    chunks = []
    while True:
        msg = json.loads(ws.recv(timeout=60))
        if msg["type"] != "video.chunk_metadata":
            return started, chunks, msg
        data = ws.recv(timeout=60)
        assert isinstance(data, bytes) and len(data) == msg["bytes"]
        chunks.append((msg, data))
        if on_chunk:
            on_chunk(msg)


def encoded(frames: np.ndarray) -> np.ndarray:
    """``frames`` through the stream's encoder at the server's settings and back: the codec's own loss."""
    from helios_deploy.api.fmp4 import ChunkEncoder, decode

    return decode(ChunkEncoder(fps=24.0, crf=23).encode(frames))


def assert_chunks_match(chunks, want: np.ndarray, other: np.ndarray, differ_from: int = 0) -> None:
    """Each piece decodes on its own to its chunk of ``want`` through the codec: as close as ``want`` encoded
    directly, and (from chunk ``differ_from`` on, where ``other`` differs) much closer to that than to
    ``other`` encoded."""
    from helios_deploy.api.fmp4 import decode

    start = 0
    for k, (meta, data) in enumerate(chunks):
        assert meta["chunk_index"] == k and data[4:8] == b"ftyp" and b"moof" in data and b"avc1" in meta["mime"].encode()
        got = decode(data)
        w, o = want[start:start + len(got)], other[start:start + len(got)]
        assert len(got) == meta["frames"] == len(w), (len(got), meta["frames"], len(w))
        near, bound = psnr(got, w), psnr(encoded(w), w)
        same, different = psnr(got, encoded(w)), psnr(got, encoded(o))
        assert near >= bound - 0.5, f"chunk {k}: {near:.1f} dB to the runtime's frames, the codec alone {bound:.1f}"
        assert k < differ_from or same > different + 6, f"chunk {k}: {same:.1f} dB to its encoding, {different:.1f} to another's"
        start += len(got)
    assert start == len(want)
