"""Cluster.ranked without Triton: the ranking over capacity answers as two API replicas see them. Two replicas
do not see each other's opens until a node's answer counts them, so a stream moving off a node asks every node
afresh, and equal nodes are picked at random rather than the same one by every replica (the cluster tests
with real tritonservers cover the rest: tests/test_cluster.py)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from helios_deploy.api.cluster import Cluster
from helios_deploy.api.triton_stream import TritonStream
from helios_deploy.serving.node_connection import text_array

ADDRESSES = "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3"  # never dialled: every capacity answer is given here


def _replica(answers: dict[str, dict], asked: list) -> Cluster:
    cluster = Cluster(ADDRESSES, refresh_s=3600.0)
    for node in cluster.live():
        def capacity(ttl=cluster.capacity_ttl, node=node):
            asked.append((node.address, ttl))
            return dict(answers[node.address])

        node.capacity = capacity
    return cluster


def _answer(free: int, active: int = 0) -> dict:
    return {"capacity": 4, "active": active, "queued": 0, "free": free, "draining": False, "demand": active / 4}


def test_equal_nodes_are_picked_at_random_by_each_replica():
    answers = {"127.0.0.1:1": _answer(1, 3), "127.0.0.1:2": _answer(2, 2), "127.0.0.1:3": _answer(2, 2)}
    asked: list = []
    a, b = _replica(answers, asked), _replica(answers, asked)
    try:
        lost = next(n for n in a.live() if n.address == "127.0.0.1:1")
        firsts = {name: [r.ranked()[0].address for _ in range(40)] for name, r in (("a", a), ("b", b))}
        for name, picks in firsts.items():  # the freest two, each about half of the time (2**-39 to fail)
            assert set(picks) == {"127.0.0.1:2", "127.0.0.1:3"}, (name, picks)
        # more free room still wins every time; the node a stream leaves is never offered
        answers["127.0.0.1:3"] = _answer(3, 1)
        assert {a.ranked(exclude=(lost,))[0].address for _ in range(20)} == {"127.0.0.1:3"}
        assert all(n.address != lost.address for n in a.ranked(exclude=(lost,)))
    finally:
        a.close()
        b.close()


def test_a_moving_stream_asks_every_node_afresh():
    answers = {a: _answer(2, 2) for a in ADDRESSES.split(",")}
    asked: list = []
    cluster = _replica(answers, asked)
    try:
        lost = cluster.live()[0]
        cluster.ranked()
        assert {ttl for _, ttl in asked} == {cluster.capacity_ttl}  # a new stream: a cached answer will do
        asked.clear()
        t0 = time.monotonic()
        ranked = cluster.ranked(exclude=(lost,), reserve=True)
        assert time.monotonic() - t0 < 1.0
        # a move: only the other nodes, asked with no cache (another replica's moves a moment ago count)
        assert sorted(asked) == sorted((n.address, 0.0) for n in cluster.live() if n is not lost), asked
        assert ranked[0].taken() == 1 and all(n.taken() == 0 for n in ranked[1:])
    finally:
        cluster.close()


def test_a_moved_stream_keeps_its_viewers_deadline_with_or_without_a_state():
    """The open that moves a stream carries ``due_in``: seconds to its next chunk's playback deadline at the
    viewer (0 once late), for a resume and for a stream lost before its first chunk (opened again from its start
    under its id) alike; a job carries none."""
    backend = SimpleNamespace(failover=True, buffer=4, job_buffer=8, fps=24.0, prompt_log=None)
    period = 33 / 24
    s = TritonStream(backend, {"prompt": text_array("a fox")}, 3, True, "owner")
    assert "due_in" not in s._open_arrays()  # the first open: its viewer's clock starts at admission
    s.id, s._t0 = "a" * 32, time.perf_counter() - 0.5  # admitted 0.5 s ago on the node then lost
    arrays = s._open_arrays()
    assert "resume" not in arrays and arrays["stream_id"][0] == s.id.encode()
    assert abs(float(arrays["due_in"][0]) - (period - 0.5)) < 0.1, arrays["due_in"]  # chunk 0: t0 + one period
    s._t0 -= 10 * period
    assert float(s._open_arrays()["due_in"][0]) == 0.0  # already late: due now
    job = TritonStream(backend, {"prompt": text_array("a fox")}, 3, False, "owner")
    job.id, job._t0 = "b" * 32, time.perf_counter() - 0.5
    assert "due_in" not in job._open_arrays()
