"""First-chunk latency of the runtime alone vs through the API's WebSocket (alternating rounds in one
process), and the fMP4 encode time of one chunk. Not a test (pytest does not collect it).

    .venv/bin/python tests/bench_api.py ARTIFACTS        # e.g. a tiny export at 64x128
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helios_deploy.api.fmp4 import ChunkEncoder  # noqa: E402
from helios_deploy.runtime import Pipeline  # noqa: E402
from tests.api_helpers import connect, make_app, serving  # noqa: E402


def encode_times(sizes=((64, 128), (384, 640)), repeats=5) -> None:
    for h, w in sizes:
        x = np.random.default_rng(0).integers(0, 255, (33, h, w, 3), dtype=np.uint8)
        enc = ChunkEncoder()
        enc.encode(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            data = enc.encode(x)
            times.append(time.perf_counter() - t)
        print(f"fMP4 encode of 33 frames at {h}x{w} (random): median {statistics.median(times) * 1000:.0f} ms, "
              f"{len(data) / 1e6:.2f} MB")


def first_chunk(artifacts: str, rounds: int = 8) -> None:
    pipe = Pipeline.from_artifacts(artifacts)
    next(iter(pipe.stream("warm-up", num_frames=33)))
    direct, through, inside = [], [], []
    with serving(make_app(artifacts, tempfile.mkdtemp())) as (url, _):
        ws_url = url.replace("http://", "ws://") + "/v1/realtime/video"
        for i in range(rounds):  # the runtime alone, then the same request through the API
            t = time.perf_counter()
            chunks = pipe.stream("a fox", num_frames=33, seed=i)
            next(chunks)
            chunks.close()
            d = time.perf_counter() - t
            with connect(ws_url) as ws:
                t = time.perf_counter()
                ws.send(json.dumps({"type": "session.start", "prompt": "a fox", "num_frames": 33, "seed": i}))
                json.loads(ws.recv())
                meta = json.loads(ws.recv())
                ws.recv()
                a = time.perf_counter() - t
                json.loads(ws.recv())
            if i:  # the first round loads the server's sessions
                direct.append(d), through.append(a), inside.append(meta["latency_s"])
    pipe.close()
    ms = lambda xs: f"{statistics.median(xs) * 1000:.0f} ms"  # noqa: E731
    print(f"first chunk, medians of {rounds - 1} alternating rounds: runtime alone {ms(direct)}; through the API's "
          f"WebSocket (start sent -> fMP4 received) {ms(through)} (inside the server {ms(inside)})")


if __name__ == "__main__":
    encode_times()
    first_chunk(sys.argv[1])
