"""The live scheduler under load and faults (issue 27): bounded per-stream chunk queues, stop drops what is
queued, stop of a job being read, request bounds, the worker as the only thread on the runners, close() that
says whether the worker stopped, jobs in the live streams' slack, admission with the amplified first chunk,
shedding the newest stream when the runners fall behind, the chunk time that follows the runs, health()."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from helios_deploy.errors import UserError

from .conftest import SIZES

PROMPT = "a red fox running through snow"


@pytest.fixture(scope="module")
def pipe(sizes_artifacts):
    from helios_deploy.runtime import Pipeline

    p = Pipeline.from_artifacts(sizes_artifacts, backend="onnxruntime", device="cpu")
    yield p
    p.close()


def scheduler(pipe, **kw):
    """Admission fixed and no shedding (this host is shared and slow) unless the test sets them."""
    from helios_deploy.runtime.live import LiveScheduler

    kw.setdefault("chunk_seconds", 0.05)
    kw.setdefault("shed_lateness", float("inf"))
    return LiveScheduler(pipe, **kw).start()


def wait_for(condition, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.02)


class SlowTransformer:
    """pipe._transformer made slower by ``delay`` seconds per call (a busier GPU), or failing; with ``fake`` it
    only sleeps and predicts zeros (a transformer whose time does not depend on this shared host's load)."""

    def __init__(self, pipe, delay: float = 0.0, error: Exception | None = None, fake: bool = False):
        self.pipe, self.delay, self.error, self.fake, self.real = pipe, delay, error, fake, pipe._transformer

    def __call__(self, feeds):
        if self.error is not None:
            raise self.error
        time.sleep(self.delay)
        return torch.zeros_like(feeds["hidden_states"]) if self.fake else self.real(feeds)

    def __enter__(self):
        self.pipe._transformer = self
        return self

    def __exit__(self, *exc):
        del self.pipe._transformer


def test_chunk_queue_is_bounded_and_stop_drops_it(pipe):
    """An unread job holds max_chunks_queued chunks and no more are made; reading one lets one more be made;
    stop drops the queued ones; a job whose chunks are all made but not read is stopped (not "finished")."""
    with scheduler(pipe, max_chunks_queued=2) as sched:
        s = sched.open(PROMPT, num_frames=33 * 8, seed=1, lead=float("inf"))
        wait_for(lambda: s.queued_chunks == 2)
        time.sleep(1.0)  # several chunk times: the worker would have made more
        assert s.chunks_done == 2 and sched.metrics()["queued_chunks"] == 2
        assert s.next(timeout=10).index == 0
        wait_for(lambda: s.chunks_done == 3)
        s.stop()
        assert s.next(timeout=5) is None and s.queued_chunks == 0  # chunks 1 and 2 were not delivered
        job = sched.open(PROMPT, num_frames=66, seed=2, lead=float("inf"))
        wait_for(lambda: job.status == "completed")
        sched.stop(job.id)  # DELETE while the job's chunks are still being read: stopped, not 409
        assert job.next(timeout=5) is None and job.status == "stopped"



def test_ended_streams_are_not_kept(pipe):
    """A long-running server ends thousands of streams: the scheduler remembers an ended stream's status (for
    the "finished" answer) but not the stream itself (its chunk queue, timings, callbacks: ~5 KB each, which
    grew the soak's server by megabytes); a completed job whose owner still reads it can still be stopped."""
    import gc
    import weakref

    from helios_deploy.runtime.live import StreamError

    with scheduler(pipe) as sched:
        refs = []
        for i in range(20):
            s = sched.open(PROMPT, num_frames=132, seed=i, cancelled=lambda: False)
            s.stop()
            refs.append(weakref.ref(s))
        stream_id = s.id
        del s
        gc.collect()
        assert [r for r in refs if r() is not None] == []
        with pytest.raises(StreamError) as e:
            sched.stream(stream_id)
        assert e.value.code == "finished" and "stopped" in str(e.value)
        job = sched.open(PROMPT, num_frames=66, seed=2, lead=float("inf"))
        wait_for(lambda: job.status == "completed")
        sched.stop(job.id)  # its owner holds it: still found, stopped, its chunks dropped
        assert job.next(timeout=5) is None and job.status == "stopped"
        with pytest.raises(StreamError, match="been stopped"):
            sched.stream(job.id)

def test_request_bounds_and_schedule_cache(pipe):
    from helios_deploy.runtime import settings
    from helios_deploy.runtime.scheduler import SCHEDULE_CACHE_SIZE, DMDScheduler

    for bad in (dict(pyramid_steps=(settings.MAX_PYRAMID_STEPS + 1, 1, 1)), dict(seed=-1),
                dict(seed=settings.MAX_SEED + 1), dict(seed=1.5)):
        with pytest.raises(UserError, match="pyramid steps|seed"):
            pipe.open_stream(PROMPT, 33, **bad)
    pipe.open_stream(PROMPT, 33, seed=settings.MAX_SEED, pyramid_steps=(settings.MAX_PYRAMID_STEPS, 1, 1))
    sched = DMDScheduler(pipe.scheduler.config)
    for n in range(1, 3 * SCHEDULE_CACHE_SIZE):
        sched.stage_schedule(n, 0, 0.5, False)
    assert len(sched._schedules) == SCHEDULE_CACHE_SIZE


def test_worker_is_the_only_thread_on_the_runners_and_close_reports(pipe):
    threads = []
    real = pipe.open_stream

    def recording(*a, **kw):
        threads.append(threading.current_thread().name)
        return real(*a, **kw)

    pipe.open_stream = recording
    image = np.random.default_rng(0).integers(0, 256, (*SIZES[0], 3), dtype=np.uint8)
    try:
        with scheduler(pipe) as sched:
            s = sched.open(PROMPT, num_frames=33, seed=1, image=image)  # the VAE encoder runs on the worker
            with pytest.raises(RuntimeError, match="worker only"):
                pipe.runner("transformer")  # this (test) thread may not drive them while the worker runs
            assert s.next(timeout=60).index == 0
            assert sched.close() is True and sched.stopped
    finally:
        del pipe.open_stream
    assert threads == ["helios-live"]
    pipe.runner("transformer")  # unbound again once the worker stopped
    with SlowTransformer(pipe, delay=1.5):
        sched = scheduler(pipe)
        sched.open(PROMPT, num_frames=33, seed=1)
        time.sleep(0.3)  # the worker is inside a transformer call
        assert sched.close(timeout=0.1) is False and sched.stopped is False  # the owner must not free the pipeline
        wait_for(lambda: not sched._thread.is_alive(), 30)


def chunk_time(pipe) -> float:
    """One chunk's time on this (shared, variably loaded) host, after a warm-up."""
    pipe.generate(PROMPT, num_frames=33, seed=0)
    t = time.perf_counter()
    pipe.generate(PROMPT, num_frames=33, seed=0)
    return time.perf_counter() - t


def job_seconds(pipe, live: int, fps: float, chunk: float, chunks: int) -> tuple[float, list[int]]:
    with scheduler(pipe, fps=fps, chunk_seconds=chunk) as sched:
        streams = [sched.open(PROMPT, num_frames=33 * 40, seed=10 + i) for i in range(live)]
        readers = [threading.Thread(target=lambda s=s: [None for _ in s], daemon=True) for s in streams]
        for r in readers:
            r.start()
        t = time.perf_counter()
        job = sched.open(PROMPT, num_frames=33 * chunks, seed=3, lead=float("inf"))
        n = sum(1 for _ in job)
        seconds = time.perf_counter() - t
        misses = [s.progress()["misses"] for s in streams]
    assert n == chunks
    return seconds, misses


def test_a_job_runs_in_the_slack_of_live_streams(pipe):
    """Beside two live streams well within capacity (the fps set so that they take a third of the runners on
    this shared host), a 4-chunk job runs in their slack: far sooner than one chunk per chunk period (4 periods),
    as when the worker slept until the next live deadline; the live streams stay on time."""
    chunk = chunk_time(pipe)
    period = 6 * chunk
    alone, _ = job_seconds(pipe, 0, 33 / period, chunk, 4)
    beside, misses = job_seconds(pipe, 2, 33 / period, chunk, 4)
    print(f"job of 4 chunks (chunk {chunk:.2f} s, period {period:.2f} s): alone {alone:.2f} s, "
          f"beside 2 live streams {beside:.2f} s")
    assert beside < 2 * period, (chunk, alone, beside)
    assert misses == [0, 0], misses


def test_admission_counts_the_amplified_first_chunk(pipe):
    from helios_deploy.runtime.live import StreamError

    period = 33 / 24.0
    with scheduler(pipe, chunk_seconds=0.4 * period, lead=0.0, first_chunk_budget=30.0) as sched:
        a = sched.open(PROMPT, num_frames=33 * 2, seed=1)
        with pytest.raises(StreamError) as e:  # 0.4 + 2 x 0.4 of the runners for its first chunk
            sched.open(PROMPT, num_frames=33 * 2, seed=2, amplify_first_chunk=True)
        assert e.value.code == "over_capacity" and sched.metrics()["refused_recent"] == 1
        b = sched.open(PROMPT, num_frames=33 * 2, seed=2)  # 0.4 + 0.4 fits
        a.stop()
        b.stop()


def test_runners_falling_behind_shed_the_newest_stream(pipe):
    """Three streams admitted at a chunk time the runners then do not keep (each call made slower): the newest
    streams are shed (StreamError "shed") and the oldest gets back on time, instead of all three being late."""
    from helios_deploy.runtime.live import LiveScheduler, StreamError

    assert LiveScheduler(pipe).shed_lateness == 33 / 24  # on by default with a measured chunk time
    assert LiveScheduler(pipe, chunk_seconds=0.05).shed_lateness == float("inf")  # off with a given one
    with SlowTransformer(pipe, delay=0.2, fake=True):  # a chunk: 3 calls of 0.2 s + the decoder
        period = 2.0 * chunk_time(pipe)  # one stream takes half the runners, three 150%
    with SlowTransformer(pipe, delay=0.2, fake=True), scheduler(pipe, fps=33 / period, chunk_seconds=0.1 * period,
                                                     shed_lateness=0.5 * period) as sched:
        streams = [sched.open(PROMPT, num_frames=33 * 9, seed=i) for i in range(3)]
        errors = [None] * 3

        def read(i):
            try:
                for _ in streams[i]:
                    pass
            except StreamError as e:
                errors[i] = e.code

        readers = [threading.Thread(target=read, args=(i,)) for i in range(3)]
        for r in readers:
            r.start()
        for r in readers:
            r.join(120)
        m = sched.metrics()
    assert errors[0] is None and streams[0].status == "completed"
    assert errors[2] == "shed" and m["shed"] >= 1
    # the oldest is on time again once the newest are shed: its last chunks are early (without shedding all
    # three fall further behind with every chunk, by half a period each). Not "half a period below its worst":
    # the nearest-deadline order serves the oldest first, so on an idle host its worst can be on time (CI: worst
    # +0.04 s, last -0.75 s). Not "its last 3 of 7": with one stream shed the other two need the runners' whole
    # time, so on a loaded host the oldest can stay late until the second is shed too (CI: +0.70, +0.65, +0.63
    # s at chunks 3-5, then -0.21 s); 9 chunks leave room for that
    late = streams[0].progress()["lateness_s"]
    assert len(late) == 9 and all(x < 0 for x in late[-2:]), (period, late)


def test_chunk_time_follows_the_runs(pipe):
    """A measured chunk time is the start-up figure moved toward each real chunk's run time (a moving average):
    checked against the run times the stream reports, so the host's load does not matter."""
    from helios_deploy.runtime.live_admission import EWMA

    with scheduler(pipe, chunk_seconds=None) as sched:
        measured = sched.chunk_seconds
        with SlowTransformer(pipe, delay=0.1):
            s = sched.open(PROMPT, num_frames=33 * 4, seed=1, lead=float("inf"))
            assert sum(1 for _ in s) == 4
        want = measured
        for seconds in s.progress()["chunk_seconds"]:
            want = (1 - EWMA) * want + EWMA * seconds
        assert sched.chunk_seconds == pytest.approx(want) and abs(want - measured) > 1e-3, (measured, want)



def test_admission_counts_the_spread_of_chunk_times(pipe):
    """Chunk times that alternate 0.1 and 0.3 s (average 0.2): admitted on the average, 6 streams fit a 1.375-s
    chunk period and a period whose chunks all run slow needs 1.8 s: a new stream's first chunk, which has no
    lead, is then late (measured in soaks: 0.31 s at load 0.96). Counted with the deviation, the streams
    admitted fit the period even at the slow figure; a fresh measured figure starts at twice its value."""
    from helios_deploy.runtime.live import LiveScheduler
    from helios_deploy.runtime.live_admission import batch_key
    from helios_deploy.runtime.live_stream import LiveStream

    sched = LiveScheduler(pipe, fps=24.0)  # not started: its books only
    sched.set_measured(0.2)

    def stream(seed):
        state = pipe.open_stream(PROMPT, 33 * 4, seed=seed)
        return LiveStream(sched, state, sched._weight(state), sched.lead, None)

    assert sched.chunk_cost(stream(0)) == pytest.approx(0.4)  # no run seen yet: 0.2 + 2 x 0.1
    key = batch_key(stream(0).state)
    for seconds in (0.1, 0.3) * 20:
        sched._observe(key, 1.0, 1, seconds)
    assert 0.17 < sched.chunk_seconds < 0.23 and 0.08 < sched.chunk_deviation < 0.12
    admitted = []
    with sched._lock:
        for i in range(10):
            s = stream(i)
            if not sched._admit(s):
                break
            sched._streams[s.id] = s
            admitted.append(s)
    assert len(admitted) * 0.3 <= sched.period, (len(admitted), sched.load())
    assert len(admitted) >= 2 and sched.capacity == len(admitted)

def test_health_reports_a_dead_worker_and_broken_runners(pipe):
    with scheduler(pipe) as sched:
        assert sched.health()["live"] is True and sched.health()["ready"] is True
        with SlowTransformer(pipe, error=RuntimeError("CUDA error: an illegal memory access was encountered")):
            s = sched.open(PROMPT, num_frames=33, seed=1)
            with pytest.raises(RuntimeError, match="illegal memory access"):
                s.next(timeout=60)
        h = sched.health()
        assert h["live"] is False and "illegal memory access" in h["detail"] and h["worker_alive"] is True
    assert sched.health()["live"] is False and sched.health()["worker_alive"] is False
    assert np.isfinite(sched.metrics()["load"])
