"""The node side in process (serving/node.py over real LiveSchedulers on the tiny artifacts, no Triton): placement
by free capacity across a node's schedulers, a refusal passed to the next, the demand figure, owners, every
control answer, and a drain whose moved streams resume on another scheduler with the frames the uninterrupted
stream has. The same node behind a real tritonserver: tests/test_live_triton.py and tests/test_drain.py.
Also: no import circle inside helios_deploy/serving."""

from __future__ import annotations

import time

import numpy as np
import pytest

PROMPT = "a red fox running through snow"
OWNER = "ab" * 32


@pytest.fixture(scope="module")
def node(artifacts):
    """Two schedulers of one stream each (a node with two "GPUs"), a controllable clock for the demand window."""
    from helios_deploy.runtime import Pipeline
    from helios_deploy.runtime.live import LiveScheduler
    from helios_deploy.serving.node import Node

    clock = [1000.0]
    schedulers = [LiveScheduler(Pipeline.from_artifacts(artifacts), chunk_seconds=0.05, max_streams=1).start()
                  for _ in range(2)]
    n = Node(schedulers, ["gpu-a", "gpu-b"], clock=lambda: clock[0])
    n.clock = clock
    yield n
    n.close()


@pytest.fixture(scope="module")
def pipe(artifacts):
    from helios_deploy.runtime import Pipeline

    return Pipeline.from_artifacts(artifacts)


def test_placement_refusal_to_the_next_scheduler_and_demand(node):
    from helios_deploy.runtime.live import StreamError

    a = node.open(owner=OWNER, prompt=PROMPT, num_frames=33 * 20, seed=1)
    b = node.open(owner=OWNER, prompt=PROMPT, num_frames=33 * 20, seed=2)  # the first scheduler is full: the next
    assert {node.device_of(a.id), node.device_of(b.id)} == {"gpu-a", "gpu-b"}
    cap = node.control("capacity")
    assert (cap["capacity"], cap["active"], cap["free"], cap["demand"]) == (2, 2, 0, 1.0)
    assert cap["live"] is True and [d["device"] for d in cap["schedulers"]] == ["gpu-a", "gpu-b"]
    with pytest.raises(StreamError) as e:  # both refuse: the node refuses, and the refusal is demand for 60 s
        node.open(prompt=PROMPT, num_frames=33, seed=3)
    assert e.value.code == "over_capacity"
    assert node.control("capacity")["demand"] == 1.5 and node.metrics()["demand"] == 1.5
    node.clock[0] += 61
    assert node.control("capacity")["demand"] == 1.0
    for s in (a, b):
        node.control("stop", s.id, owner=OWNER)
    assert node.control("capacity")["active"] == 0
    c = node.open(prompt=PROMPT, num_frames=33, seed=4)  # room again: the most free first (both free: the first)
    assert node.device_of(c.id) == "gpu-a"
    list(c)


def test_control_answers_owners_and_errors(node):
    s = node.open(owner=OWNER, prompt=PROMPT, num_frames=33 * 20, seed=5)
    s.next()
    other, unknown = node.control("progress", s.id, owner="someone else"), node.control("progress", "f" * 32, owner=OWNER)
    assert other["error"]["code"] == unknown["error"]["code"] == "not_found"  # another's stream: as if unknown
    assert other["error"]["message"] == unknown["error"]["message"].replace("f" * 32, s.id)
    assert node.control("stop", s.id)["error"]["code"] == "not_found"  # no owner given: not the owner
    progress = node.control("progress", s.id, owner=OWNER)
    assert progress["status"] == "running" and progress["failure"] is None and "error" not in progress
    notes = []
    node.watch(s.id, notes.append)  # the stream's own channel (the model sends each note on it)
    at = node.control("set_prompt", s.id, owner=OWNER, prompt="a red car")
    assert at["from_chunk"] >= 1 and at["stream_id"] == s.id
    assert notes == [{"stream_id": s.id, "prompt": "a red car", "from_chunk": at["from_chunk"]}]
    assert node.control("set_prompt", s.id, owner=OWNER, prompt=" ")["error"]["code"] == "bad_request"
    assert node.control("set_prompt", s.id, owner="someone else", prompt="a cat")["error"]["code"] == "not_found"
    assert len(notes) == 1  # neither a refused change nor another owner's is announced
    node.watch(s.id, None)
    assert node.control("rewind", s.id, owner=OWNER)["error"]["code"] == "bad_action"
    assert node.control("progress", None)["error"]["code"] == "bad_request"
    assert node.control("stop", s.id, owner=OWNER) == {"stream_id": s.id, "stopped": True}
    assert node.control("progress", s.id, owner=OWNER)["error"]["code"] == "finished"


def test_requests_parse_control_and_failover_inputs():
    from helios_deploy.errors import UserError
    from helios_deploy.serving.requests import control_request, due_in_request, failover_request

    def getter(values):
        return lambda name: values.get(name)

    text = lambda v: np.array([v], dtype=np.object_)  # noqa: E731
    got = control_request(getter({"action": text(b"set_prompt"), "stream_id": text(b"x"), "prompt": text(b"a dog")}))
    assert got == {"action": "set_prompt", "stream_id": "x", "owner": "", "prompt": "a dog"}
    assert control_request(getter({"prompt": text(b"a cat")}))["action"] is None  # an open
    assert failover_request(getter({"failover": np.array([True]), "resume": text(b"\x00snap")})) == (True, b"\x00snap")
    with pytest.raises(UserError, match="not UTF-8"):
        control_request(getter({"action": text(b"\xff")}))
    with pytest.raises(UserError, match="one snapshot"):
        failover_request(getter({"resume": np.array([b"a", b"b"], dtype=np.object_)}))
    assert due_in_request(getter({})) is None
    assert due_in_request(getter({"due_in": np.array([-2.5], np.float32)})) == 0.0  # late: due now
    with pytest.raises(UserError, match="finite"):
        due_in_request(getter({"due_in": np.array([np.nan], np.float32)}))


def test_requests_parse_prompt_changes():
    """Input prompt_changes (an open's changes made before it, JSON [[from_chunk, prompt], ...]) in its order;
    anything else one clear bad request naming the input."""
    import json

    from helios_deploy.errors import UserError
    from helios_deploy.serving.requests import prompt_changes_request

    def parse(value):
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        return prompt_changes_request(lambda name: np.array([raw], dtype=np.object_) if name == "prompt_changes"
                                      else None)

    assert prompt_changes_request(lambda name: None) is None
    assert parse([[2, "a cat"], [1, "a dog"]]) == [(2, "a cat"), (1, "a dog")]  # the order they were applied in
    assert parse([]) == []
    bad = [b"[[1, ", {"1": "a dog"}, [[1]], [[1, "a dog", 3]], [["1", "a dog"]], [[1.5, "a dog"]], [[True, "a dog"]],
           [[-1, "a dog"]], [[1, 7]], [[1, " "]], [1, "a dog"], b"\xff"]
    for value in bad:
        with pytest.raises(UserError, match="prompt_changes"):
            parse(value)
    with pytest.raises(UserError, match="prompt_changes"):
        prompt_changes_request(lambda name: np.array([b"[]", b"[]"], dtype=np.object_))


def test_drain_moves_streams_and_they_resume_with_the_uninterrupted_frames(artifacts, pipe):
    """Drain ends each stream after its chunk in flight as moved with its snapshot; the snapshot opened on another
    node (here: a fresh scheduler) continues it, same id, and the frames equal the stream run without a drain."""
    from helios_deploy.runtime import Pipeline
    from helios_deploy.runtime.live import LiveScheduler, StreamError
    from helios_deploy.serving.node import Node

    node = Node([LiveScheduler(Pipeline.from_artifacts(artifacts), chunk_seconds=0.05).start()])
    other = Node([LiveScheduler(Pipeline.from_artifacts(artifacts), chunk_seconds=0.05).start()])
    try:
        s = node.open(owner=OWNER, prompt=PROMPT, num_frames=33 * 4, seed=7)
        first = [s.next().frames]
        assert node.control("drain") == {"draining": True, "streams": 1}
        first += [c.frames for c in s]  # the chunks made before the move are still read
        assert s.status == "moved" and s.snapshot
        assert node.control("capacity")["draining"] is True
        with pytest.raises(StreamError) as e:
            node.open(prompt=PROMPT, num_frames=33, seed=1)
        assert e.value.code == "draining"
        t = other.open(owner=OWNER, resume=s.snapshot, due_in=0.0)  # its viewer waits: due now, not in a period
        sched = other.schedulers[0]
        assert t.deadline(sched.fps, sched.budget) <= time.perf_counter() + 0.05, "the resumed chunk is not due now"
        assert t.id == s.id and t.chunks_done == len(first)
        rest = [c.frames for c in t]
        assert len(first) + len(rest) == 4
        assert np.array_equal(np.concatenate(first + rest), pipe.generate(PROMPT, num_frames=33 * 4, seed=7))
        # a stream lost before its first state is opened again from its start under the id it had (steered by it)
        again = other.open(owner=OWNER, prompt=PROMPT, num_frames=33, seed=1, stream_id="f" * 32)
        assert again.id == "f" * 32 and other.control("progress", "f" * 32, OWNER)["stream_id"] == "f" * 32
        assert other.control("stop", "f" * 32, OWNER)["stopped"] is True
        # ... with the prompt changes made before it was lost, applied in their order before its first chunk
        changed = other.open(owner=OWNER, prompt=PROMPT, num_frames=66, seed=1, stream_id="d" * 32,
                             prompt_changes=[(0, "a red car"), (1, "a blue boat")])
        assert changed.id == "d" * 32
        frames = np.concatenate([c.frames for c in changed])
        assert np.array_equal(frames, pipe.generate({0: "a red car", 1: "a blue boat"}, num_frames=66, seed=1))
        assert not np.array_equal(frames, pipe.generate(PROMPT, num_frames=66, seed=1))
    finally:
        node.close()
        other.close()


def test_no_import_circle_in_serving():
    """serving/server.py <-> service.py and control.py <-> model.py were circles; none is left."""
    import grimp

    graph = grimp.build_graph("helios_deploy")
    modules = {m for m in graph.modules if m.startswith("helios_deploy.serving.")}
    edges = {m: {i for i in graph.find_modules_directly_imported_by(m) if i in modules} for m in modules}
    state: dict[str, int] = {}

    def cycle_from(m, path):
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return path + [m, n]
            if n not in state and (found := cycle_from(n, path + [m])):
                return found
        state[m] = 2
        return None

    for m in sorted(modules):
        if m not in state:
            found = cycle_from(m, [])
            assert found is None, " -> ".join(found)
    assert "helios_deploy.serving.control" not in modules and len(modules) >= 10
