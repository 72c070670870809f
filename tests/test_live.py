"""Live streams in-process (runtime/live.py): interleaved streams get exactly their solo frames, deadline
order, admission, control of a running stream (a prompt change against the diffusers reference fed those
embeddings at that chunk boundary), stop and cancellation, and the `streams` command."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from helios_deploy.errors import UserError

from .conftest import SIZES, run_cli

PROMPT = "a red fox running through snow"


@pytest.fixture(scope="module")
def pipe(sizes_artifacts):
    from helios_deploy.runtime import Pipeline

    return Pipeline.from_artifacts(sizes_artifacts, backend="onnxruntime", device="cpu")


def scheduler(pipe, **kw):
    """Admission fixed (not measured on this shared host) and no shedding (a loaded host is slow) unless the
    test sets them. While it runs, only its worker may drive ``pipe``: references are made before or after."""
    from helios_deploy.runtime.live import LiveScheduler

    kw.setdefault("chunk_seconds", 0.05)
    kw.setdefault("shed_lateness", float("inf"))
    return LiveScheduler(pipe, **kw).start()


def video(stream) -> np.ndarray:
    return np.concatenate([c.frames for c in stream])


def test_interleaved_streams_equal_solo_streams_bitwise(pipe):
    """Three streams of different seeds, sizes, conditioning and prompt schedules run interleaved, chunk by
    chunk, on one set of runners: each gets exactly the frames it gets alone."""
    image = np.random.default_rng(0).integers(0, 256, (*SIZES[0], 3), dtype=np.uint8)
    requests = [dict(prompt=PROMPT, num_frames=99, seed=3),
                dict(prompt={0: PROMPT, 1: "a red car on a coastal road"}, num_frames=99, seed=4,
                     height=SIZES[1][0], width=SIZES[1][1]),
                dict(prompt="a lighthouse at night", num_frames=66, seed=5, image=image)]
    solo = [pipe.generate(**r) for r in requests]
    with scheduler(pipe, lead=1e9) as sched:
        streams = [sched.open(**r) for r in requests]
        got = [[] for _ in streams]

        def read(i):
            for c in streams[i]:
                got[i].append(c.frames)

        threads = [threading.Thread(target=read, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    for i, want in enumerate(solo):
        assert np.array_equal(np.concatenate(got[i]), want), f"stream {i} differs from its solo run"
    assert all(s.progress()["status"] == "completed" and s.state is None for s in streams)


def test_batched_transformer_calls_match_solo(pipe):
    """Three streams at the same size and settings share each transformer call (batch 3); the one with failover
    gets each chunk's snapshot from inside the batch."""
    solo = [pipe.generate(PROMPT, num_frames=66, seed=s) for s in (7, 8, 9)]
    calls = []
    real = pipe._transformer

    def counting(feeds):
        calls.append(feeds["hidden_states"].shape[0])
        return real(feeds)

    pipe._transformer = counting
    try:
        with scheduler(pipe, lead=1e9, max_batch=3) as sched:
            streams = [sched.open(PROMPT, num_frames=66, seed=s, failover=s == 8) for s in (7, 8, 9)]
            chunks = [list(s) for s in streams]
            got = [np.concatenate([c.frames for c in cs]) for cs in chunks]
    finally:
        del pipe._transformer
    assert 3 in calls  # at least one call carried all three streams
    from helios_deploy.runtime.stream_state import snapshot_meta

    assert [snapshot_meta(c.snapshot)["next_index"] for c in chunks[1]] == [1, 2]  # failover in a batch
    assert all(c.snapshot is None for c in chunks[0] + chunks[2])
    for g, w in zip(got, solo):
        assert np.abs(g.astype(np.int16) - w.astype(np.int16)).max() <= 1


def test_new_stream_gets_its_first_chunk_before_the_others_finish(pipe):
    """Four streams a few ms apart: each next chunk goes to the nearest playback deadline, so the last one's
    first chunk comes after about four chunk times, before the first stream has made its second chunk and far
    sooner than one whole stream (which is what it waited for when a request held the runners)."""
    chunks = 10
    t = time.perf_counter()
    pipe.generate(PROMPT, num_frames=33 * chunks, seed=0)
    whole = time.perf_counter() - t
    with scheduler(pipe) as sched:
        streams = []
        for seed in range(4):
            streams.append(sched.open(PROMPT, num_frames=33 * chunks, seed=seed))
            time.sleep(0.005)
        first = [s.next(timeout=120) for s in streams]
        done_by_first = streams[0].progress()["chunks_done"]
        latency = [s.progress()["first_chunk_latency_s"] for s in streams]
        for s in streams:
            s.stop()
    assert all(c is not None and c.index == 0 for c in first)
    assert done_by_first <= 2, done_by_first
    assert latency[-1] < 0.7 * whole, (latency, whole)


def test_admission_refuses_over_capacity_and_queues_by_option(pipe):
    from helios_deploy.runtime.live import StreamError

    with scheduler(pipe, max_streams=2) as sched:
        a, b = (sched.open(PROMPT, num_frames=66, seed=s) for s in (1, 2))
        with pytest.raises(StreamError) as e:
            sched.open(PROMPT, num_frames=33, seed=3)
        assert e.value.code == "over_capacity" and "2 streams" in e.value.render()
        assert video(a).shape[0] == 65 and video(b).shape[0] == 65  # the others are untouched
        assert sched.metrics()["refused"] == 1
    with scheduler(pipe, chunk_seconds=10.0) as sched:  # one 10 s chunk per 1.375 s: only one stream fits
        assert sched.capacity == 0
        a = sched.open(PROMPT, num_frames=33, seed=1)  # an idle scheduler always admits one
        with pytest.raises(StreamError):
            sched.open(PROMPT, num_frames=33, seed=2)
        a.stop()
    want = [pipe.generate(PROMPT, num_frames=33, seed=s) for s in (1, 2)]
    with scheduler(pipe, max_streams=1, queue=True) as sched:
        a = sched.open(PROMPT, num_frames=33, seed=1)
        b = sched.open(PROMPT, num_frames=33, seed=2)
        assert b.status == "queued"
        assert np.array_equal(video(a), want[0])
        assert np.array_equal(video(b), want[1])


def test_control_errors_do_not_touch_other_streams(pipe):
    from helios_deploy.runtime.live import StreamError

    want = pipe.generate(PROMPT, num_frames=66, seed=6)
    with scheduler(pipe) as sched:
        other = sched.open(PROMPT, num_frames=66, seed=6)
        with pytest.raises(StreamError) as e:
            sched.set_prompt("0123456789abcdef", "a dog")
        assert e.value.code == "not_found"
        with pytest.raises(UserError, match="empty prompt"):
            other.set_prompt("   ")
        with pytest.raises(UserError, match="empty prompt"):
            sched.open("", num_frames=33)
        done = sched.open(PROMPT, num_frames=33, seed=1)
        assert video(done).shape[0] == 33
        for call in (lambda: done.set_prompt("a dog"), done.stop, lambda: sched.stream(done.id)):
            with pytest.raises(StreamError) as e:
                call()
            assert e.value.code == "finished" and "completed" in e.value.render()
        assert np.array_equal(video(other), want)


def test_stop_and_cancel_free_the_stream_at_once(pipe):
    cancelled = threading.Event()
    with scheduler(pipe) as sched:
        s = sched.open(PROMPT, num_frames=33 * 20, seed=1)
        assert s.next(timeout=120).index == 0
        s.stop()
        assert s.state is None and s.progress()["status"] == "stopped"
        assert s.next(timeout=5) is None
        gone = sched.open(PROMPT, num_frames=33 * 20, seed=2, cancelled=cancelled.is_set)
        assert gone.next(timeout=120).index == 0
        cancelled.set()  # the client went away: dropped at its next denoising step
        while gone.next(timeout=120) is not None:
            pass
        assert gone.progress()["status"] == "stopped" and gone.progress()["chunks_done"] < 20
        assert sched.metrics()["active_streams"] == 0


@pytest.mark.slow
def test_prompt_change_mid_stream_equals_the_reference_fed_it_at_that_boundary(tiny_ckpt, pipe):
    """set_prompt on a running stream takes effect from its next chunk not yet started, exactly as diffusers'
    HeliosPyramidPipeline given the new prompt's embeddings at that chunk boundary (step-end callback)."""
    from helios_deploy.export.parity.pipeline import PipelineCase, reference_pipeline, reference_video

    new = "a red car on a coastal road"
    with scheduler(pipe) as sched:  # lead: one chunk period, so the change lands mid-stream
        s = sched.open(PROMPT, num_frames=99, seed=2, output="float")
        first = s.next(timeout=120)
        at = s.set_prompt(new)
        ours = np.concatenate([first.frames, video(s)])
    assert 1 <= at <= 2
    prompts = [PROMPT] * at + [new] * (3 - at)
    ref = reference_pipeline(tiny_ckpt, "distilled")
    expected = reference_video(ref, PipelineCase("live", frames=99), "distilled", *SIZES[0], pipe.text_length, 2,
                               prompts=prompts)
    assert ours.shape == expected.shape
    assert float(np.abs(ours - expected).max()) <= 1e-3
    unchanged = pipe.generate(PROMPT, num_frames=99, seed=2, output="float")
    assert float(np.abs(ours[33 * at:] - unchanged[33 * at:]).max()) > 1e-2  # the change did change the video


def test_streams_command_reports_each_stream(sizes_artifacts, tmp_path, capsys):
    out = tmp_path / "streams.json"
    code, stdout, err = run_cli(["streams", sizes_artifacts, "--concurrent", "2", "--chunks", "2",
                                 "--chunk-seconds", "0.05", "--json", out], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert [s["chunks"] for s in report["streams"]] == [2, 2]
    assert all(s["equal_to_solo"] is True and s["first_chunk_s"] > 0 for s in report["streams"])
    assert "= alone" in stdout and "True" in stdout
    code, _, err = run_cli(["streams", sizes_artifacts, "--concurrent", "0"], capsys)
    assert code == 1 and "--concurrent" in err
