"""Failover state (issue 26, CLUSTER.md decision 6): a stream snapshotted after a chunk and resumed in a NEW
pipeline and LiveScheduler makes exactly the frames of the uninterrupted stream (prompt changes before and after
the snapshot included); drain ends every stream "moved" with its snapshot; bad snapshots are one clear error."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from helios_deploy.errors import UserError

PROMPT, SECOND, THIRD = "a red fox running through snow", "a red car on a coastal road", "a lighthouse at night"
FPS = 240.0  # a short chunk period keeps the tests short; the chunk order does not change the frames


@pytest.fixture(scope="module")
def pipes(sizes_artifacts):
    """Two pipelines on the same artifacts: the node a stream starts on and the one it resumes on."""
    from helios_deploy.runtime import Pipeline

    a = Pipeline.from_artifacts(sizes_artifacts, backend="onnxruntime", device="cpu")
    b = Pipeline.from_artifacts(sizes_artifacts, backend="onnxruntime", device="cpu")
    yield a, b
    a.close()
    b.close()


def scheduler(pipe, **kw):
    from helios_deploy.runtime.live import LiveScheduler

    kw.setdefault("chunk_seconds", 0.05)
    kw.setdefault("fps", FPS)
    kw.setdefault("shed_lateness", float("inf"))  # every chunk is "late" at this fps: nothing is shed here
    return LiveScheduler(pipe, **kw).start()


def frames(chunks) -> np.ndarray:
    return np.concatenate([c.frames for c in chunks])


def test_resumed_stream_equals_the_uninterrupted_one_bitwise(pipes):
    """Chunks 0-2 on node A (a prompt change at 1 or 2), snapshot after chunk 2, node A gone; the stream goes on
    in a new pipeline and scheduler from chunk 3 with the same id, and takes another prompt change there: every
    frame equals the stream made in one piece with those changes."""
    a, b = pipes
    with scheduler(a, max_chunks_queued=1) as sched:
        s = sched.open(PROMPT, num_frames=33 * 7, seed=11, failover=True)
        got = [s.next(timeout=120)]
        at_before = s.set_prompt(SECOND)
        while len(got) < 3:
            got.append(s.next(timeout=120))
        snapshot, stream_id = got[-1].snapshot, s.id
        s.stop()
    assert at_before <= 2 and all(isinstance(c.snapshot, bytes) for c in got)
    with scheduler(b, max_chunks_queued=1) as sched:
        r = sched.open(resume=snapshot)
        assert r.id == stream_id and r.chunks_done == 3 and r.num_chunks == 7
        got.append(r.next(timeout=120))
        at_after = r.set_prompt(THIRD)
        got.extend(r)
        assert r.progress()["status"] == "completed"
    assert [c.index for c in got] == list(range(7)) and 4 <= at_after <= 6
    want = a.generate({0: PROMPT, at_before: SECOND, at_after: THIRD}, num_frames=33 * 7, seed=11)
    assert np.array_equal(frames(got), want)


def test_drain_moves_every_stream_with_its_state(pipes):
    """A live stream and a job: drain() ends both after their chunk in flight as "moved", refuses new ones, and
    each resumes elsewhere to the frames it would have made."""
    from helios_deploy.runtime.live import StreamError

    a, b = pipes
    with scheduler(a, max_chunks_queued=1) as sched:
        live = sched.open(PROMPT, num_frames=33 * 3, seed=5)
        job = sched.open(SECOND, num_frames=33 * 3, seed=6, lead=float("inf"))
        first = [live.next(timeout=120), job.next(timeout=120)]
        assert sched.drain() == 2
        with pytest.raises(StreamError) as e:
            sched.open(PROMPT, num_frames=33)
        assert e.value.code == "draining"
        made = [[first[0], *live], [first[1], *job]]  # chunks made before the move are still read
        assert live.status == job.status == "moved" and sched.metrics()["moved"] == 2
        assert sched.health()["ready"] is False and sched.health()["live"] is True
    with scheduler(b) as other:
        resumed = [other.open(resume=live.snapshot), other.open(resume=job.snapshot, lead=float("inf"))]
        for chunks, r in zip(made, resumed):
            chunks.extend(r)
    assert np.array_equal(frames(made[0]), a.generate(PROMPT, num_frames=99, seed=5))
    assert np.array_equal(frames(made[1]), a.generate(SECOND, num_frames=99, seed=6))


def test_snapshot_is_safetensors_and_bad_ones_are_refused(pipes):
    """The format is self-describing (safetensors header + JSON, no pickle), its size is the history latents
    plus a few kB; damaged bytes, another model's state and another device's generator are one UserError; a
    resume of a stream already open is refused."""
    from helios_deploy.runtime.live import StreamError
    from helios_deploy.runtime.stream_state import StreamState, snapshot_meta

    a, _ = pipes
    state = a.open_stream(PROMPT, num_frames=66, seed=3)
    data = a.snapshot(state, id="abc")
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    assert set(header) - {"__metadata__"} >= {"history", "generator"}
    meta = snapshot_meta(data)
    assert meta["next_index"] == 0 and meta["extra"]["id"] == "abc" and meta["schedule"] == {"0": PROMPT}
    history = state.chunk_state.history
    assert len(data) - history.numel() * 4 < 16_384  # the rest: generator state, indices, metadata
    restored, extra = a.resume_stream(data)
    assert extra["id"] == "abc" and restored.num_frames == 66
    with scheduler(a, lead=0.0, first_chunk_budget=60.0) as sched:  # no chunk runs: the check only
        assert sched.open(resume=data).id == "abc"
        with pytest.raises(StreamError) as e:
            sched.open(resume=data)
        assert e.value.code == "exists"
    for bad in (b"", b"\x80\x04K\x01.", data[:100], data[:8] + b"[" + data[9:]):
        with pytest.raises(UserError, match="not a stream state|damaged"):
            a.resume_stream(bad)
    other = StreamState.restore(data).snapshot({"id": "abc", "model": "someone-else"})
    with pytest.raises(UserError, match="another model"):
        a.resume_stream(other)
    with pytest.raises(UserError, match="generator"):
        StreamState.restore(data, "meta")
