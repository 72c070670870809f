"""`helios-deploy streams ARTIFACTS --via cluster`: a cluster on this host, measured as a viewer sees it.

Starts ``nodes`` real tritonservers (each through the service wrapper, measure/nodes.py) on loopback ports and
2 API replicas in front of them (`helios-deploy api --triton A,B,C --failover`, own processes; a PostgreSQL
``store`` they share, else one SQLite folder each: streams need no shared store), then runs N streams through
the WebSocket, stream i on replica i % 2, each given a new prompt after its first chunk through the OTHER
replica's HTTP steering by id. Optionally kills a node (-9) or drains one (SIGTERM to its wrapper) once a stream
has received ``kill_node_at`` / ``drain_node_at`` chunks: the node holding the most streams.

Per stream: ``node`` (each node it ran on, in order), ``failovers``, ``gap_seconds`` (longest wait between two
chunks), ``prompt_changed`` (the chunk from which the change applies shows the new prompt: it equals the
changed reference and differs from the unchanged one), ``equal_to_uninterrupted`` (every chunk, decoded, equals
the same stream made alone in this process with the same prompt change and encoded the same way, within 1
level), ``completed``. For the run: streams per node, the peak of the cluster's demand metric, chunks lost.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..serving.server import free_port

PROMPT = "a paper boat drifting down a rainy street"
NEW_PROMPT = "a paper boat sailing on a sunny lake"


@dataclass
class ClusterRecord:
    seed: int
    stream_id: str = ""
    replica: int = 0
    node: list[str] = field(default_factory=list)
    failovers: int = 0
    arrivals: list[float] = field(default_factory=list)
    pieces: list[bytes] = field(default_factory=list, repr=False)
    indexes: list[int] = field(default_factory=list)
    from_chunk: int | None = None
    prompt_changed: bool | None = None
    equal_to_uninterrupted: bool | None = None
    completed: bool = False
    state_bytes: int | None = None  # the last snapshot's size (failover state carried per chunk)
    failover_reasons: list[str] = field(default_factory=list)
    failover_timeline: list[dict] = field(default_factory=list)  # the API's per-failover moments (wall clock)
    arrivals_wall: list[float] = field(default_factory=list)  # time.time() of each chunk at the viewer
    steer_error: str | None = None  # the prompt change through the other replica failed
    error: str | None = None

    def summary(self) -> dict:
        gaps = [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]
        return {"seed": self.seed, "stream_id": self.stream_id, "replica": self.replica, "node": self.node,
                "failovers": self.failovers, "chunks": len(self.arrivals), "gap_seconds": max(gaps, default=None),
                "from_chunk": self.from_chunk, "prompt_changed": self.prompt_changed,
                "equal_to_uninterrupted": self.equal_to_uninterrupted, "completed": self.completed,
                "state_bytes": self.state_bytes, "failover_reasons": self.failover_reasons,
                "steer_error": self.steer_error, "error": self.error}


class Replica:
    """`helios-deploy api --triton ... --failover` in its own process on a free loopback port."""

    def __init__(self, urls: list[str], key: str, store: str, log_path: Path, fps: float, streams: int,
                 videos: Path | None = None):
        self.port, self.log_path, self.key = free_port(), log_path, key
        cmd = [sys.executable, "-m", "helios_deploy.cli", "api", "--triton", ",".join(urls), "--failover",
               "--port", str(self.port), "--api-key", key, "--store", store, "--fps", str(fps),
               "--max-streams-per-key", str(streams), "--max-frames", "3300"]
        if videos is not None:  # a PostgreSQL store needs the video folder every replica shares
            cmd += ["--videos", str(videos)]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError("an API replica exited", found=self.log_path.read_text(errors="replace")[-2000:])
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise UserError(f"the API replica on port {self.port} was not ready within {timeout:g} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _post(url: str, key: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body or {}).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _watch(record: ClusterRecord, replicas: list[Replica], key: str, chunks: int, progress: dict) -> None:
    """One viewer: its stream through replica ``record.replica``, the prompt changed through the other one."""
    from websockets.sync.client import connect

    viewer, director = replicas[record.replica], replicas[1 - record.replica]
    steering = None
    try:
        with connect(viewer.url.replace("http://", "ws://") + "/v1/realtime/video", max_size=1 << 26,
                     additional_headers={"Authorization": f"Bearer {key}"}, open_timeout=60) as ws:
            ws.send(json.dumps({"type": "session.start", "prompt": PROMPT, "num_frames": 33 * chunks,
                                "seed": record.seed}))
            started = json.loads(ws.recv(timeout=300))
            if started.get("type") != "session.started":
                record.error = json.dumps(started)
                return
            record.stream_id, t0 = started["stream_id"], time.perf_counter()
            while True:
                msg = json.loads(ws.recv(timeout=300))
                if msg["type"] == "video.chunk_metadata":
                    record.pieces.append(ws.recv(timeout=300))
                    record.arrivals.append(time.perf_counter() - t0)
                    record.arrivals_wall.append(time.time())
                    record.indexes.append(msg["chunk_index"])
                    progress["max_chunks"] = max(progress["max_chunks"], len(record.pieces))
                    if steering is None:  # on its own thread: the viewer keeps reading (its gaps are its own)
                        steering = threading.Thread(target=_steer, args=(record, director, key), daemon=True)
                        steering.start()
                elif msg["type"] in ("session.completed", "session.stopped"):
                    p = msg.get("progress") or {}
                    record.node, record.failovers = p.get("nodes", []), p.get("failovers", 0)
                    record.state_bytes = p.get("state_bytes")
                    record.failover_reasons = p.get("failover_reasons", [])
                    record.failover_timeline = p.get("failover_timeline", [])
                    record.completed = msg["type"] == "session.completed" and len(record.pieces) == chunks
                    return
                elif msg["type"] == "error":
                    record.error = json.dumps(msg.get("error"))
                    return
    except Exception as e:  # noqa: BLE001 - reported per stream
        record.error = f"{type(e).__name__}: {e}"
    finally:
        if steering is not None:
            steering.join(60)


def _steer(record: ClusterRecord, director: Replica, key: str) -> None:
    """The stream's prompt change through the other replica (a failed change is reported)."""
    try:
        answer = _post(f"{director.url}/v1/realtime/streams/{record.stream_id}/interaction", key,
                       {"prompt": NEW_PROMPT})
        record.from_chunk = int(answer["from_chunk"])
    except OSError as e:
        record.steer_error = f"{type(e).__name__}: {e}"
        record.prompt_changed = False


def _fault(nodes, replicas, records, at: int | None, kind: str, progress: dict, done: threading.Event,
           out: dict) -> None:
    """Once a stream has ``at`` chunks: kill -9 or drain the node holding the most streams (each stream's node
    as the replica holding it reports: GET /v1/realtime/streams/{id})."""
    if at is None:
        return
    while not done.is_set() and progress["max_chunks"] < at:
        time.sleep(0.02)
    if done.is_set():
        return
    held: dict[str, int] = {}
    for r in records:
        if r.stream_id:
            try:
                p = _get(f"{replicas[r.replica].url}/v1/realtime/streams/{r.stream_id}", replicas[r.replica].key)
            except OSError:
                continue
            if p.get("nodes"):
                held[p["nodes"][-1]] = held.get(p["nodes"][-1], 0) + 1
    busiest = max(held, key=held.get) if held else nodes.urls[0]
    node = nodes.by_url(busiest)
    at_wall = time.time()
    node.kill() if kind == "kill" else node.drain()
    out.update(kind=kind, node=busiest, at_chunk=at, streams_on_it=held.get(busiest, 0), at_wall=at_wall)


def _get(url: str, key: str) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _compare(records: list[ClusterRecord], artifacts, chunks: int, fps: float, crf: int) -> None:
    """Each stream against itself made alone (prompt change at the same chunk), encoded as the API does."""
    from ..api.fmp4 import ChunkEncoder, decode
    from ..runtime import Pipeline

    pipe, encoder = Pipeline.from_artifacts(artifacts), ChunkEncoder(fps=fps, crf=crf)

    def equal(piece: bytes, frames: np.ndarray) -> bool:
        got, want = decode(piece), decode(encoder.encode(frames))
        return got.shape == want.shape and int(np.abs(got.astype(np.int16) - want.astype(np.int16)).max()) <= 1

    try:
        for r in records:
            if not r.pieces:
                continue
            n = 33 * chunks
            schedule = {0: PROMPT} if r.from_chunk is None else {0: PROMPT, r.from_chunk: NEW_PROMPT}
            want = pipe.generate(schedule, num_frames=n, seed=r.seed)
            parts = [want[33 * k:33 * (k + 1)] for k in range(chunks)]
            r.equal_to_uninterrupted = len(r.pieces) == chunks and all(equal(p, w) for p, w in zip(r.pieces, parts))
            k = r.from_chunk
            if k is not None and k < len(r.pieces):
                plain = pipe.generate(PROMPT, num_frames=n, seed=r.seed)[33 * k:33 * (k + 1)]
                r.prompt_changed = equal(r.pieces[k], parts[k]) and not equal(r.pieces[k], plain)
    finally:
        pipe.close()


def run_cluster(artifacts, concurrent: int, chunks: int, nodes: int = 3, kill_node_at: int | None = None,
                drain_node_at: int | None = None, seed: int = 0, store: str | None = None, fps: float = 24.0,
                chunk_seconds: float | None = None, max_streams: int | None = None, crf: int = 23,
                compare: bool = True) -> dict:
    from .nodes import LocalNodes

    if kill_node_at is not None and drain_node_at is not None:
        raise UserError("pass --kill-node-at or --drain-node-at, not both")
    if nodes < 2 and (kill_node_at is not None or drain_node_at is not None):
        raise UserError("a node can only be lost with --nodes 2 or more")
    shared = bool(store and store.startswith("postgresql://"))
    records = [ClusterRecord(seed + i, replica=i % 2) for i in range(concurrent)]
    fault_at, kind = (kill_node_at, "kill") if kill_node_at is not None else (drain_node_at, "drain")
    with tempfile.TemporaryDirectory(prefix="helios-cluster-") as tmp:
        tmp = Path(tmp)
        options = {"fps": fps, "chunk_seconds": chunk_seconds, "max_streams": max_streams, "max_frames": 33 * chunks}
        with LocalNodes(artifacts, tmp, count=nodes, **options) as local:
            key = secrets.token_hex(16)
            replicas = [Replica(local.urls, key, store if shared else str(tmp / f"store{i}"), tmp / f"api{i}.log",
                                fps, concurrent, videos=tmp / "videos" if shared else None) for i in range(2)]
            try:
                run = _run(local, replicas, records, chunks, fault_at, kind)
            finally:
                for r in replicas:
                    r.stop()
    if compare:
        _compare(records, artifacts, chunks, fps, crf)
    per_node: dict[str, int] = {}
    for r in records:
        for address in r.node:
            per_node[address] = per_node.get(address, 0) + 1
    admitted = [r for r in records if r.stream_id]
    return {"via": "cluster", "nodes": nodes, "concurrent": concurrent, "chunks": chunks, **run,
            "store": "postgresql (shared)" if shared else "sqlite, one per replica (no PostgreSQL URL given)",
            "streams_per_node": per_node, "chunks_lost": sum(chunks - len(set(r.indexes)) for r in admitted),
            "refused": len(records) - len(admitted), "streams": [r.summary() for r in records],
            "records": [{k: v for k, v in asdict(r).items() if k != "pieces"} for r in records]}


def _run(local, replicas: list[Replica], records: list[ClusterRecord], chunks: int, fault_at, kind: str) -> dict:
    """The viewers (a thread each, 5 ms apart), the fault injector and the demand sampler; until all end."""
    from ..api.cluster import Cluster

    key = replicas[0].key
    cluster = Cluster(local.urls)
    try:
        for r in replicas:
            r.wait_ready()
        progress, done, fault, demand = {"max_chunks": 0}, threading.Event(), {}, [0.0]
        helpers = [threading.Thread(target=_fault, args=(local, replicas, records, fault_at, kind, progress, done, fault),
                                    daemon=True),
                   threading.Thread(target=_sample_demand, args=(cluster, done, demand), daemon=True)]
        for h in helpers:
            h.start()
        t = time.perf_counter()
        viewers = [threading.Thread(target=_watch, args=(r, replicas, key, chunks, progress), daemon=True)
                   for r in records]
        for v in viewers:
            v.start()
            time.sleep(0.005)
        for v in viewers:
            v.join()
        wall = time.perf_counter() - t
        done.set()
        for h in helpers:
            h.join()
        return {"wall_s": wall, "fault": fault or None, "demand_peak": demand[0]}
    finally:
        cluster.close()


def _sample_demand(cluster, done: threading.Event, peak: list) -> None:
    while not done.wait(0.25):
        try:
            peak[0] = max(peak[0], cluster.demand() or 0.0)
        except Exception:  # noqa: BLE001 - a node going away mid-sample
            pass


def format_cluster_report(report: dict) -> str:
    fault = report["fault"]
    lines = [f"{report['concurrent']} streams x {report['chunks']} chunks on {report['nodes']} nodes, 2 API replicas "
             f"({report['store']}): {report['wall_s']:.1f}s wall"
             + (f"; {fault['kind']} of {fault['node']} ({fault['streams_on_it']} streams) at chunk {fault['at_chunk']}"
                if fault else ""),
             f"{'stream':>6} {'seed':>5} {'nodes':>24} {'failovers':>9} {'gap':>7} {'prompt':>7} {'= alone':>8} "
             f"{'completed':>9}"]
    for i, s in enumerate(report["streams"]):
        if s["error"] and not s["node"]:
            lines.append(f"{i:>6} {s['seed']:>5} refused/failed: {s['error'][:90]}")
            continue
        ports = ",".join(a.rsplit(":", 1)[1] for a in s["node"])
        gap = "-" if s["gap_seconds"] is None else f"{s['gap_seconds']:.2f}s"
        lines.append(f"{i:>6} {s['seed']:>5} {ports:>24} {s['failovers']:>9} {gap:>7} {str(s['prompt_changed']):>7} "
                     f"{str(s['equal_to_uninterrupted']):>8} {str(s['completed']):>9}")
    lines.append(f"streams per node: {report['streams_per_node']}; demand peak {report['demand_peak']:.2f}; "
                 f"chunks lost {report['chunks_lost']}; refused {report['refused']}")
    return "\n".join(lines)
