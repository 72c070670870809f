"""`helios-deploy streams`: N live streams at once on one set of runners, in-process (LiveScheduler) or
through a real tritonserver, started a few ms apart with different seeds. Per stream: first-chunk latency,
the median interval between chunks, each chunk's lateness against its playback deadline
(t_open + first-chunk budget + k x 33 / fps), misses, and whether its frames equal that stream generated
alone (sha256 of every chunk, so memory stays flat at any size)."""

from __future__ import annotations

import hashlib
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError

PROMPT = "a paper boat drifting down a rainy street"


@dataclass
class StreamRecord:
    seed: int
    stream_id: str = ""
    arrivals: list[float] = field(default_factory=list)  # seconds since the stream was opened, per chunk
    hashes: list[str] = field(default_factory=list)
    lateness: list[float] = field(default_factory=list)
    error: str | None = None
    equal_to_solo: bool | None = None

    def summary(self) -> dict:
        gaps = [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]
        return {"seed": self.seed, "stream_id": self.stream_id, "chunks": len(self.arrivals),
                "first_chunk_s": self.arrivals[0] if self.arrivals else None,
                "median_interval_s": statistics.median(gaps) if gaps else None,
                "misses": sum(x > 0 for x in self.lateness), "max_lateness_s": max(self.lateness, default=None),
                "equal_to_solo": self.equal_to_solo, "error": self.error}


def chunk_hash(frames) -> str:
    return hashlib.sha256(frames.tobytes()).hexdigest()


def _consume(record: StreamRecord, chunks, t0: float, deadline) -> None:
    try:
        for k, chunk in enumerate(chunks):
            now = time.perf_counter()
            record.arrivals.append(now - t0)
            record.lateness.append(now - deadline(k))
            record.hashes.append(chunk_hash(chunk.frames))
    except UserError as e:
        record.error = e.render()


def _run_threads(records, start) -> None:
    """``start(record)`` opens one stream and consumes it; streams are started 5 ms apart, one thread each."""
    threads = []
    for r in records:
        threads.append(threading.Thread(target=start, args=(r,), daemon=True))
        threads[-1].start()
        time.sleep(0.005)
    for t in threads:
        t.join()


def via_api(pipe, records, chunks: int, settings: dict) -> dict:
    from ..runtime.live import LiveScheduler

    sched = LiveScheduler(pipe, **settings).start()
    period = sched.period

    def start(r: StreamRecord) -> None:
        t0 = time.perf_counter()
        try:
            s = sched.open(PROMPT, num_frames=33 * chunks, seed=r.seed)
        except UserError as e:
            r.error = e.render()
            return
        r.stream_id = s.id
        _consume(r, s, t0, lambda k: t0 + sched.budget + k * period)

    try:
        _run_threads(records, start)
        return sched.metrics()
    finally:
        sched.close()


def via_triton(artifacts, records, chunks: int, settings: dict, env=None) -> dict:
    from ..serving.client import HeliosClient
    from ..serving.live_metrics import read_metrics
    from ..serving.repository import RepoOptions, write_repository
    from ..serving.server import LocalServer, find_env

    env = env or find_env()
    opts = RepoOptions(max_frames=33 * chunks, reference=True, **{k: v for k, v in settings.items() if k != "lead"})
    period = 33 / opts.fps
    with tempfile.TemporaryDirectory(prefix="helios-streams-") as tmp:
        repo = Path(tmp) / "repo"
        write_repository(artifacts, repo, opts, log=lambda m: None)
        with LocalServer(env, repo, Path(tmp) / "tritonserver.log") as server:

            def start(r: StreamRecord) -> None:
                with HeliosClient(server.grpc_url, timeout=600) as client:
                    t0 = time.perf_counter()
                    _consume(r, client.stream(PROMPT, num_frames=33 * chunks, seed=r.seed), t0,
                             lambda k: t0 + period + k * period)
                    r.stream_id = client.stream_id or ""

            _run_threads(records, start)
            time.sleep(1.5)  # the model publishes its metrics every second
            return read_metrics(server.metrics_url)


def run_streams(artifacts, concurrent: int, chunks: int, via: str = "api", seed: int = 0, compare: bool = True,
                **settings) -> dict:
    """Run ``concurrent`` streams of ``chunks`` chunks (seeds seed, seed+1, ...); the report as a dict.
    ``settings``: LiveScheduler keywords (fps, chunk_seconds, max_streams, queue, max_batch, lead)."""
    from ..runtime import Pipeline

    if concurrent < 1 or chunks < 1:
        raise UserError("--concurrent and --chunks must be >= 1", found=f"{concurrent}, {chunks}")
    if via == "cluster":  # nodes and API replicas in their own processes: measure/cluster_streams.py
        from .cluster_streams import run_cluster

        return run_cluster(artifacts, concurrent, chunks, seed=seed, compare=compare, **settings)
    if via not in ("api", "triton"):
        raise UserError(f"unknown --via {via!r}", expected="api, triton or cluster")
    pipe = Pipeline.from_artifacts(artifacts)
    records = [StreamRecord(seed + i) for i in range(concurrent)]
    t = time.perf_counter()
    server = via_api(pipe, records, chunks, settings) if via == "api" else via_triton(artifacts, records, chunks, settings)
    wall = time.perf_counter() - t
    solo_seconds = None
    if compare:  # each stream alone, in-process (the Triton model runs the same runtime)
        for r in records:
            if r.error is None:
                t1 = time.perf_counter()
                r.equal_to_solo = [chunk_hash(c.frames) for c in pipe.stream(PROMPT, num_frames=33 * chunks,
                                                                             seed=r.seed)] == r.hashes
                solo_seconds = time.perf_counter() - t1
    pipe.close()
    return {"via": via, "concurrent": concurrent, "chunks": chunks, "settings": settings, "wall_s": wall,
            "solo_stream_s": solo_seconds, "server": server, "streams": [r.summary() for r in records],
            "records": [asdict(r) for r in records]}


def format_report(report: dict) -> str:
    lines = [f"{report['concurrent']} streams x {report['chunks']} chunks via {report['via']}: "
             f"{report['wall_s']:.2f}s wall" + (f", one stream alone {report['solo_stream_s']:.2f}s"
                                                 if report["solo_stream_s"] else ""),
             f"{'stream':>6} {'seed':>5} {'first chunk':>12} {'median interval':>16} {'misses':>7} "
             f"{'max late':>9} {'= alone':>8}"]
    for i, s in enumerate(report["streams"]):
        if s["error"]:
            lines.append(f"{i:>6} {s['seed']:>5} refused/failed: {s['error'].splitlines()[0]}")
            continue
        interval = "-" if s["median_interval_s"] is None else f"{s['median_interval_s']:.3f}s"
        lines.append(f"{i:>6} {s['seed']:>5} {s['first_chunk_s']:>11.3f}s {interval:>16} {s['misses']:>7} "
                     f"{s['max_lateness_s']:>8.3f}s {str(s['equal_to_solo']):>8}")
    server = report["server"]
    if report["via"] == "api":
        lines.append(f"scheduler: chunk {server['chunk_seconds']:.3f}s, capacity {server['capacity']} streams at "
                     f"{server['fps']:g} fps, {server['chunks']} chunks, {server['misses']} misses, "
                     f"{server['refused']} refused")
    else:
        lines.append("server metrics: " + ", ".join(f"{k} {v:g}" for k, v in sorted(server.items())))
    return "\n".join(lines)
