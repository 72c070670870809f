"""The API in front of several real Triton nodes (the CPU tritonserver, each started by the service wrapper
on its own loopback ports, serving the tiny artifacts): placement by free capacity, a refusal moving on to the
next node, the demand metric passing 1, steering by id through another API replica, and failover: a node killed
with -9 or drained with SIGTERM mid-stream, its streams (and a job) continuing elsewhere with the frames of
the uninterrupted stream.

The nodes are shared by the module (each holds 2 real-time streams); the failover tests run last and each
takes one node away."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from tests.api_helpers import KEY, OTHER_KEY, connect, reference_pipeline, running, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")]
PROMPT = "A red fox running through fresh snow at sunrise."
NEW = "A red fox jumping into a snow drift."
THIRD = "A grey wolf walking across a frozen lake."


@pytest.fixture(scope="module")
def nodes(server_env, artifacts, tmp_path_factory):
    from helios_deploy.measure.nodes import LocalNodes

    with LocalNodes(artifacts, tmp_path_factory.mktemp("cluster"), count=3, max_streams=2, chunk_seconds=0.05) as n:
        yield n


@pytest.fixture(scope="module")
def pipe(artifacts):
    yield from reference_pipeline(artifacts)


def backend(nodes, **kw):
    return backend_at(",".join(n.grpc_url for n in nodes.nodes if n.alive()), **kw)


def backend_at(urls, **kw):
    from helios_deploy.api.backends import TritonBackend

    return TritonBackend(urls, **kw)


def assert_frames_equal(chunks, want):
    """Every chunk equals its part of the uninterrupted run within 1 uint8 level."""
    got = np.concatenate([c.frames for c in chunks])
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16)).max()
    assert diff <= 1, f"max difference {diff} levels"


def fill(node_url, count, owner="filler"):
    """``count`` long streams opened on one node directly (ids returned), so it has no room left."""
    from helios_deploy.serving.node_connection import NodeConnection as Node
    from helios_deploy.serving.client import request_arrays

    node, ids = Node(node_url), []
    for _ in range(count):
        got, arrays = threading.Event(), request_arrays(PROMPT, num_frames=330, seed=9)
        arrays["owner"] = np.array([owner.encode()], dtype=np.object_)
        box = {}

        def handler(reply, box=box, got=got):
            if reply.kind == "response" and "id" not in box:
                box["id"] = reply.text("stream_id")
                got.set()

        node.send(arrays, handler)
        assert got.wait(60)
        ids.append(box["id"])
    return node, ids


def test_placement_by_capacity_refusal_moves_on_and_demand_passes_one(nodes):
    from helios_deploy.api.cluster import Cluster
    from helios_deploy.api.metrics import Metrics
    from helios_deploy.runtime.live import StreamError
    from helios_deploy.serving.live_metrics import read_metrics

    b = backend(nodes, admit_timeout=30)
    b.cluster.capacity_ttl = 60.0  # stale on purpose: the first-ranked node looks free when it is full
    # opens placed at the same moment (a lost node's streams resuming) spread: each ranking reserves its pick
    picks = [b.cluster.ranked(reserve=True)[0] for _ in range(3)]
    assert len(set(picks)) == 3, [n.address for n in picks]
    for n in picks:
        n.settle(admitted=False)
    first = b.cluster.ranked()[0]
    filler, ids = fill(first.address, 2)
    try:
        stream = b.open(PROMPT, num_frames=330, seed=1)  # the full node refuses it: it lands on the next
        assert stream.nodes and stream.nodes[0] != first.address, stream.nodes
        b.cluster.capacity_ttl = 0.0
        more = [b.open(PROMPT, num_frames=330, seed=s) for s in (2, 3, 4)]  # then by free capacity
        placed = [s.nodes[0] for s in [stream] + more]
        assert first.address not in placed and sorted(placed.count(a) for a in set(placed)) == [2, 2], placed
        with pytest.raises(StreamError) as refused:  # 6 streams fill 3 nodes of 2: one more is refused
            b.open(PROMPT, num_frames=330, seed=5)
        assert refused.value.code == "over_capacity"
        demand = Cluster(b.url).demand()
        assert demand > 1, demand  # (6 active + 1+ refused) / 6
        published = Metrics(SimpleNamespace(counts=dict), b).render().decode()
        value = float(next(line.split()[1] for line in published.splitlines()
                           if line.startswith("helios_cluster_demand ")))
        assert value > 1, published  # the API's own /metrics carries the cluster's demand
        time.sleep(1.5)  # the nodes publish their gauge every second
        gauges = [read_metrics(n.metrics_url).get("helios_live_demand", 0.0) for n in nodes.nodes]
        assert max(gauges) > 1, gauges
        for s in [stream] + more:
            s.stop()
    finally:
        for sid in ids:
            filler.control("stop", sid, "filler")
        filler.close()
        b.close()


@pytest.fixture(scope="module")
def replicas(nodes, tmp_path_factory):
    """Two API replicas (their own processes' worth: own backend, own store) in front of the same nodes."""
    from contextlib import ExitStack

    from helios_deploy.api.app import create_app
    from helios_deploy.api.jobs import JobStore
    from helios_deploy.api.security import Limits

    with ExitStack() as stack:
        urls, backends = [], []
        for i in range(2):
            b = backend(nodes)
            backends.append(b)
            app = create_app(b, JobStore(tmp_path_factory.mktemp(f"jobs{i}")), keys=(KEY, OTHER_KEY),
                             limits=Limits(max_streams_per_key=4))
            urls.append(stack.enter_context(running(app)))
        yield urls
        for b in backends:
            b.close()


def test_every_stream_steered_by_id_through_the_other_replica(replicas, pipe):
    import httpx

    from helios_deploy.api.fmp4 import decode
    from tests.api_helpers import encoded

    viewer, director = replicas
    h = {"Authorization": f"Bearer {KEY}"}
    results = [None] * 3

    def watch(i):
        chunks, changed, end = [], None, None
        with connect(viewer.replace("http://", "ws://") + "/v1/realtime/video") as ws:
            ws.send(json.dumps({"type": "session.start", "prompt": PROMPT, "num_frames": 99, "seed": 10 + i}))
            started = json.loads(ws.recv(timeout=120))
            assert started["type"] == "session.started", started
            sid = started["stream_id"]
            r = httpx.post(f"{director}/v1/realtime/streams/{sid}/interaction", json={"prompt": NEW},
                           headers={"Authorization": f"Bearer {OTHER_KEY}"}, timeout=30)
            assert r.status_code == 404, r.text  # another key cannot steer it, nor learn that it exists
            r = httpx.post(f"{director}/v1/realtime/streams/{sid}/interaction", json={"prompt": NEW}, headers=h,
                           timeout=30)
            assert r.status_code == 200, r.text
            changed = r.json()["from_chunk"]
            progress = httpx.get(f"{director}/v1/realtime/streams/{sid}", headers=h, timeout=30).json()
            assert progress["stream_id"] == sid and progress["num_chunks"] == 3, progress
            while end is None:
                msg = json.loads(ws.recv(timeout=120))
                if msg["type"] == "video.chunk_metadata":
                    chunks.append(decode(ws.recv(timeout=120)))
                elif msg["type"] != "session.prompt_updated":
                    end = msg
        results[i] = (changed, chunks, end)

    threads = [threading.Thread(target=watch, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (changed, chunks, end) in enumerate(results):
        assert end["type"] == "session.completed", end
        assert 0 <= changed <= 2
        want = pipe.generate({0: PROMPT, changed: NEW}, num_frames=99, seed=10 + i)
        for k, got in enumerate(chunks):
            ref = encoded(want[33 * k:33 * (k + 1)])
            assert np.abs(got.astype(np.int16) - ref.astype(np.int16)).max() <= 1, (i, k)
    # stop by id through the other replica: the viewer's socket is told
    with connect(viewer.replace("http://", "ws://") + "/v1/realtime/video") as ws:
        ws.send(json.dumps({"type": "session.start", "prompt": PROMPT, "num_frames": 330}))
        sid = json.loads(ws.recv(timeout=120))["stream_id"]
        r = httpx.post(f"{director}/v1/realtime/streams/{sid}/stop", headers=h, timeout=30)
        assert r.status_code == 200 and r.json()["stopped"], r.text
        while (msg := json.loads(ws.recv(timeout=120)))["type"] in ("video.chunk_metadata",):
            ws.recv(timeout=120)
        assert msg["type"] in ("session.stopped", "session.completed"), msg
        assert msg["progress"]["chunks_done"] < 10, msg


def read_all(streams):
    """A reader thread per stream (as viewers read): {id(stream): [(chunk, arrival)]}; join() waits for all."""
    got = {id(s): [] for s in streams}

    def read(s):
        try:
            while (c := s.next(120)) is not None:
                got[id(s)].append((c, time.perf_counter()))
        except Exception as e:  # noqa: BLE001 - checked by the test through the stream's status
            got[id(s)].append((e, time.perf_counter()))

    threads = [threading.Thread(target=read, args=(s,), daemon=True) for s in streams]
    for t in threads:
        t.start()
    return got, lambda: [t.join(300) for t in threads]


@pytest.fixture(scope="module")
def spare(server_env, artifacts, tmp_path_factory):
    """One more node, of 1 real-time stream, that queues what it cannot take: a stream opened behind its filler
    is admitted (it has its id) and waits with no chunk made. The tests below pause or kill it."""
    from helios_deploy.measure.nodes import LocalNodes

    with LocalNodes(artifacts, tmp_path_factory.mktemp("spare"), count=1, max_streams=1, chunk_seconds=0.05,
                    queue=True) as n:
        yield n.nodes[0]


def open_on(b, url, prompt, owner, **request):
    """A live stream of backend ``b`` placed on the node at ``url`` (the others left out of its placement)."""
    from helios_deploy.api.triton_stream import TritonStream
    from helios_deploy.serving.client import request_arrays

    arrays = request_arrays(prompt, realtime=True, **request)
    arrays["owner"] = np.array([owner.encode()], dtype=np.object_)
    s = TritonStream(b, arrays, (request["num_frames"] + 32) // 33, True, owner)
    with b._lock:  # the backend's own, as b.open makes it: its watchdog checks it, close() stops it
        b._streams[id(s)] = s
    s.place(exclude=tuple(n for n in b.cluster.live() if n.address != url))
    return s


def open_direct(url, arrays):
    """A stream opened on one node directly, read to its end: (its chunks' frames, its control documents)."""
    from helios_deploy.serving.node_connection import NodeConnection

    node, done, frames, notes = NodeConnection(url), threading.Event(), [], []

    def handler(reply):
        if reply.kind == "response":
            index = reply.output("chunk_index")
            if index is not None and int(index.reshape(-1)[0]) >= 0:
                frames.append(reply.output("frames"))
            elif reply.json("control") is not None:
                notes.append(reply.json("control"))
        else:
            done.set()

    try:
        node.send(arrays, handler)
        assert done.wait(120), "the stream did not end"
    finally:
        node.close()
    return frames, notes


def test_a_change_whose_note_died_with_the_node_comes_from_the_shared_store(nodes, spare, pipe, pg_url, tmp_path):
    """Replica A holds a stream on the spare node; replica B steers it by id and records the node's answer in the
    PostgreSQL job store both share; the node's note of that change never reaches A (swallowed here: what a kill -9
    between the node's note and its answer does); the node goes silent (SIGSTOP) before the chunk the change applies
    from, and A moves the stream (its watchdog). A's snapshot predates the change, so only the store has it: the
    resumed stream takes it at the same chunk, and its rows go when it ends."""
    import os
    import signal

    from helios_deploy.api.store_pg import PostgresStore
    from helios_deploy.runtime.stream_state import snapshot_meta

    owner, urls = "ef" * 32, ",".join([spare.grpc_url] + [n.grpc_url for n in nodes.nodes if n.alive()])
    stores = [PostgresStore(pg_url, videos=tmp_path / "videos", start=False) for _ in range(2)]
    a, b = backend_at(urls, failover=True, lost_after=30.0), backend_at(urls)
    a.share_prompts(stores[0])
    b.share_prompts(stores[1])
    paused = False
    try:
        s = open_on(a, spare.grpc_url, PROMPT, owner, num_frames=132, seed=60)
        s._note_prompt = lambda at, prompt: None  # the note is lost on its way to A
        got, join = read_all([s])
        wait_for(lambda: len(got[id(s)]) >= 1, timeout=60)
        at = b.steer(s.id, "set_prompt", owner, NEW)["from_chunk"]
        os.killpg(spare.server_pid, signal.SIGSTOP)
        paused = True
        time.sleep(0.3)  # what the node sent before it stopped has arrived
        held = snapshot_meta(s._state)["schedule"]
        assert s.chunks_done <= at < 4 and NEW not in held.values() and not s._prompts, (s.chunks_done, at, held)
        assert a.prompt_log.changes(s.id) == [(at, NEW)]  # B's record, read by A
        a.lost_after = 0.5  # the silent node is lost now (the watchdog), not in 30 s
        wait_for(lambda: len(s.nodes) == 2, timeout=30)
        a.lost_after = 30.0
        os.killpg(spare.server_pid, signal.SIGCONT)
        paused = False
        join()
        assert s.status == "completed" and s.nodes[0] == spare.grpc_url != s.nodes[1], s.progress()
        want = pipe.generate({0: PROMPT, at: NEW}, num_frames=132, seed=60)
        plain = pipe.generate(PROMPT, num_frames=132, seed=60)  # what the resume from A's snapshot alone makes
        assert not np.array_equal(want[33 * at:], plain[33 * at:])
        assert_frames_equal([c for c, _t in got[id(s)]], want)
        wait_for(lambda: b.prompt_log.changes(s.id) == [], timeout=10)  # the stream ended: its rows are gone
    finally:
        if paused:
            os.killpg(spare.server_pid, signal.SIGCONT)
        a.close()
        b.close()
        for store in stores:
            store.close()


def test_a_stream_lost_before_its_first_chunk_is_opened_again_with_its_prompt_changes(nodes, spare, pipe):
    """A stream lost before its first chunk (no state yet) is opened again from its start under its id, and with
    the prompt changes made meanwhile (input prompt_changes): here one made through another replica while the
    stream waited in the spare node's queue (so accepted from chunk 0), then the node killed with -9. The frames
    are the changed stream's, not the first prompt's. A node opening a kept id with changes from chunks 1 and 2
    gives the frames of that schedule; a bad list is a bad request."""
    from helios_deploy.serving.client import request_arrays
    from helios_deploy.serving.node_connection import text_array

    owner, urls = "cd" * 32, ",".join([spare.grpc_url] + [n.grpc_url for n in nodes.nodes if n.alive()])
    filler, _ids = fill(spare.grpc_url, 1)
    b, director = backend_at(urls, failover=True, lost_after=30.0), backend_at(urls)
    try:
        s = open_on(b, spare.grpc_url, PROMPT, owner, num_frames=99, seed=50)
        at = director.steer(s.id, "set_prompt", owner, NEW)["from_chunk"]
        assert at == 0 and s.nodes == [spare.grpc_url], (at, s.nodes)
        wait_for(lambda: (0, NEW) in s._prompts, timeout=10)  # the node's note on the stream's own channel
        assert s.chunks_done == 0 and s.progress()["state_bytes"] is None  # queued: no chunk, no state
        spare.kill()
        got, join = read_all([s])
        join()
        assert s.status == "completed" and s.failovers == 1 and s.nodes[1] != spare.grpc_url, s.progress()
        want = pipe.generate({0: NEW}, num_frames=99, seed=50)  # {0: PROMPT, at: NEW} with at = 0
        assert not np.array_equal(want, pipe.generate(PROMPT, num_frames=99, seed=50))
        assert_frames_equal([c for c, _t in got[id(s)]], want)
    finally:
        filler.close()
        b.close()
        director.close()
    node = next(n for n in nodes.nodes if n.alive()).grpc_url
    arrays = request_arrays(PROMPT, num_frames=99, seed=51)
    arrays["stream_id"] = text_array("e" * 32)
    arrays["prompt_changes"] = text_array(json.dumps([[2, THIRD], [1, NEW], [2, THIRD]]))
    frames, notes = open_direct(node, arrays)
    assert notes[0]["stream_id"] == "e" * 32, notes
    assert_frames_equal([SimpleNamespace(frames=f) for f in frames],
                        pipe.generate({0: PROMPT, 1: NEW, 2: THIRD}, num_frames=99, seed=51))
    arrays["prompt_changes"] = text_array(json.dumps([[1, NEW], [-1, THIRD]]))
    frames, notes = open_direct(node, arrays)
    assert not frames and notes[0]["error"]["code"] == "bad_request", notes
    assert "prompt_changes" in notes[0]["error"]["message"], notes


def test_kill_9_of_a_node_mid_stream_continues_frame_exact(nodes, pipe):
    """Streams and a job on a node killed with -9 go on elsewhere from their last chunk: the same frames as
    the uninterrupted run, the next chunk within 2 chunk-times, nothing lost. One stream has its prompt changed
    through another API replica (by id: the nodes are asked) and its node is killed right after accepting the
    change, before the chunk the change applies from reached the replica holding the stream: that replica learnt
    the change on the stream's own channel, so the resumed stream takes the new prompt from the same chunk."""
    owner = "ab" * 32
    # lost_after 30: a kill shows as a broken connection, not as the watchdog (which a starved CI host may fire)
    b, director = backend(nodes, failover=True, lost_after=30.0), backend(nodes)
    try:
        live = [b.open(PROMPT, num_frames=198, seed=20 + i, owner=owner) for i in range(3)]
        job = b.open(PROMPT, num_frames=198, seed=30, realtime=False, owner=owner)
        got, join = read_all(live + [job])
        wait_for(lambda: len(got[id(live[0])]) >= 1, timeout=60)
        at = director.steer(live[0].id, "set_prompt", owner, NEW)["from_chunk"]
        held = live[0].chunks_done
        victim = live[0].nodes[0]
        nodes.by_url(victim).kill()
        lost_at = time.perf_counter()
        # a second change through the other replica while the stream is between nodes: it waits for the resume
        # and takes effect on the new node (was a 404 when the director had already marked the node down)
        at2 = director.steer(live[0].id, "set_prompt", owner, THIRD)["from_chunk"]
        assert held <= at <= at2 < 6, (held, at, at2)  # killed before the chunk the change applies from arrived
        join()
        for s in [s for s in live if victim in s.nodes]:  # every live stream of the killed node, not just one
            after = [t for _c, t in got[id(s)] if t > lost_at]
            assert after and after[0] - lost_at <= 2 * 33 / 24, \
                f"the next chunk came {after[0] - lost_at:.2f} s after the kill: {s.progress()['failover_timeline']}"
        assert live[0].failovers == 1 and live[0].nodes[0] == victim and live[0].nodes[1] != victim, live[0].nodes
        once = pipe.generate({0: PROMPT, at: NEW}, num_frames=198, seed=20)
        changed = pipe.generate({0: PROMPT, at: NEW, at2: THIRD} if at2 != at else {0: PROMPT, at: THIRD},
                                num_frames=198, seed=20)
        plain = pipe.generate(PROMPT, num_frames=198, seed=20)
        assert not np.array_equal(once[33 * at:], plain[33 * at:])  # the change shows in the frames
        assert not np.array_equal(changed[33 * at2:], once[33 * at2:])  # and so does the one during the failover
        for i, s in enumerate(live):
            assert s.status == "completed", (s.error, s.reasons, s.nodes)
            want = changed if i == 0 else pipe.generate(PROMPT, num_frames=198, seed=20 + i)
            assert_frames_equal([c for c, _t in got[id(s)]], want)
        assert job.status == "completed", job.progress()
        assert_frames_equal([c for c, _t in got[id(job)]], pipe.generate(PROMPT, num_frames=198, seed=30))
        moved = [s for s in live + [job] if victim in s.nodes]
        assert all(s.failovers == 1 for s in moved), [s.progress() for s in moved]
    finally:
        b.close()
        director.close()


READY_BOUND = 4.0  # seconds from SIGTERM to a failing readiness probe: Kubernetes' own (period 2 s x 2 failures);
# the wrapper answers in 0.2-1.1 s on a loaded host, importing its client only when the signal comes


def readiness_path() -> str:
    """The path deploy/triton.yaml's readiness probe asks the Triton pod (the test probes that very path)."""
    import yaml

    from tests.test_api_deploy import DEPLOY

    docs = yaml.safe_load_all((DEPLOY / "triton.yaml").read_text())
    deploy = next(d for d in docs if d and d["kind"] == "Deployment")
    return deploy["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"]


def http_status(url: str) -> int:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return 0


def test_sigterm_drains_a_node_and_its_streams_move(nodes, pipe):
    """SIGTERM to a node's wrapper: its readiness (the probe deploy/triton.yaml gives Kubernetes) fails within
    READY_BOUND seconds while its streams move on to other nodes, with the uninterrupted frames, and it exits."""
    b = backend(nodes, failover=True, lost_after=30.0)  # a drain shows as the moved answer, not as the watchdog
    try:
        streams = [b.open(PROMPT, num_frames=198, seed=40 + i) for i in range(2)]
        prompt_at = streams[0].set_prompt(NEW)
        got, join = read_all(streams)
        wait_for(lambda: len(got[id(streams[0])]) >= 1, timeout=60)
        drained = nodes.by_url(streams[0].nodes[0])
        probe = f"http://127.0.0.1:{drained.http_port}{readiness_path()}"
        assert http_status(probe) == 200
        drained.drain()
        t0 = time.perf_counter()
        wait_for(lambda: http_status(probe) != 200, timeout=10, every=0.05)
        not_ready_in = time.perf_counter() - t0
        assert not_ready_in <= READY_BOUND, f"readiness still green {not_ready_in:.2f} s into the drain"
        join()
        assert streams[0].failovers == 1 and len(streams[0].nodes) == 2, streams[0].progress()
        wait_for(lambda: not drained.alive(), timeout=60)  # the node exits once its streams have moved
        want = [pipe.generate({0: PROMPT, prompt_at: NEW}, num_frames=198, seed=40),
                pipe.generate(PROMPT, num_frames=198, seed=41)]
        for s, w in zip(streams, want):
            assert s.status == "completed", (s.error, s.reasons, s.nodes)
            assert_frames_equal([c for c, _t in got[id(s)]], w)
    finally:
        b.close()


def test_drain_by_command_fails_readiness_like_sigterm(nodes, capsys):
    """`helios-deploy stream-control NODE --drain` (no SIGTERM: the server keeps running) unloads the model, so
    the node's readiness probe fails within READY_BOUND seconds, as a SIGTERM drain does."""
    from helios_deploy.cli import main

    node = next(n for n in nodes.nodes if n.alive())
    probe = f"http://127.0.0.1:{node.http_port}{readiness_path()}"
    assert http_status(probe) == 200
    t0 = time.perf_counter()
    assert main(["stream-control", node.grpc_url, "--drain"]) == 0
    wait_for(lambda: http_status(probe) != 200, timeout=10, every=0.05)
    assert time.perf_counter() - t0 <= READY_BOUND, "readiness still green after the drain command"
    answer = json.loads(capsys.readouterr().out)
    assert answer["draining"] is True and answer["unloading"] is True, answer
    assert node.alive()  # drained, not stopped


def test_steering_by_id_in_process(artifacts, tmp_path, pipe):
    """The same HTTP steering with the in-process backend: only the key that opened the stream steers it."""
    import httpx

    from tests.api_helpers import assert_chunks_match, make_app, serving

    h, other = {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {OTHER_KEY}"}
    with serving(make_app(artifacts, tmp_path / "jobs")) as (url, _app):
        with connect(url.replace("http://", "ws://") + "/v1/realtime/video") as ws:
            ws.send(json.dumps({"type": "session.start", "prompt": PROMPT, "num_frames": 99, "seed": 6}))
            answers = {}

            def steer(meta):
                if meta["chunk_index"] == 0:
                    sid = answers["sid"]
                    answers["other"] = httpx.post(f"{url}/v1/realtime/streams/{sid}/interaction", headers=other,
                                                  json={"prompt": NEW}).status_code
                    answers["unknown"] = httpx.get(f"{url}/v1/realtime/streams/nope", headers=h).status_code
                    answers["empty"] = httpx.post(f"{url}/v1/realtime/streams/{sid}/interaction", headers=h,
                                                  json={"prompt": " "}).status_code
                    answers["set"] = httpx.post(f"{url}/v1/realtime/streams/{sid}/interaction", headers=h,
                                                json={"prompt": NEW}).json()
                    answers["progress"] = httpx.get(f"{url}/v1/realtime/streams/{sid}", headers=h).json()

            started = json.loads(ws.recv(timeout=60))
            answers["sid"] = started["stream_id"]
            chunks = []
            while (msg := json.loads(ws.recv(timeout=60)))["type"] in ("video.chunk_metadata", "session.prompt_updated"):
                if msg["type"] == "video.chunk_metadata":
                    chunks.append((msg, ws.recv(timeout=60)))
                    steer(msg)
            assert msg["type"] == "session.completed", msg
        assert answers["other"] == 404 and answers["unknown"] == 404 and answers["empty"] == 400, answers
        assert answers["progress"]["stream_id"] == answers["sid"] and answers["progress"]["num_chunks"] == 3
        at = answers["set"]["from_chunk"]
        assert 1 <= at <= 2, answers
        assert_chunks_match(chunks, pipe.generate({0: PROMPT, at: NEW}, num_frames=99, seed=6),
                            pipe.generate(PROMPT, num_frames=99, seed=6), at)
