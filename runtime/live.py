"""Many live streams on one set of runners: chunk jobs scheduled by playback deadline.

A stream (one request) is a StreamState (runtime/stream_state.py) plus its timing (runtime/live_stream.py);
the scheduler's worker thread is the only thread that drives the runners: it opens streams (encodes I2V /
V2V inputs; the caller of ``open`` waits) and runs one chunk job at a time (or, with ``max_batch`` > 1, the
next chunks of several streams in lockstep with their transformer calls concatenated along the batch),
always the stream whose next chunk's playback deadline is nearest:

    deadline(k) = t0 + first_chunk_budget + k * 33 / fps

so a new stream gets its first chunk after about one chunk time, not after the others finish. A live chunk
is not started more than ``lead`` seconds before its deadline (a prompt change then shows within about
``lead`` of playback); a job (``lead=inf``: a video made as fast as the runners allow) also runs in the
slack: while the nearest live chunk is not due, the job's next chunk runs if it ends (at the measured chunk
time) before every live stream's latest start. Each stream holds at most ``max_chunks_queued`` chunks made
and not read: the worker makes none for a stream whose queue is full.

Admission: each stream takes (its chunk time) / (its chunk period) of the runners, its first chunk counted
with the extra steps of amplify_first_chunk; a stream that would take the load over 1 is refused at once
(``StreamError`` code ``over_capacity``) or, with ``queue=True``, waits until streams finish. The chunk time
follows the runs (a moving average per shape). When the runners fall behind anyway (a live chunk later
than ``shed_lateness``), the newest live stream is stopped (code ``shed``) so the others stay on time.

    sched = LiveScheduler(pipe).start()
    s = sched.open("a cat", num_frames=330, seed=0, failover=True)
    chunk = s.next()                 # Chunk(index, frames, snapshot) or None at the end
    s.set_prompt("a dog")            # from the next chunk not yet started; returns that index
    s.stop()
    t = sched.open(resume=chunk.snapshot)   # elsewhere: the same stream from its next chunk
    sched.drain()                    # every stream ends "moved" after its chunk in flight; .snapshot to resume
    sched.health(); sched.close()    # close() -> True once the worker stopped (then free the pipeline)
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from typing import Callable

from ..errors import UserError
from .live_admission import Admission, batch_key
from .live_batch import run_lockstep
from .live_stream import LiveStream, Stopped, StreamError, Timing  # noqa: F401 - Timing: public
from .stream_state import CHUNK_FRAMES, StreamState

DEFAULT_FPS = 24.0
MAX_CHUNKS_QUEUED = 3  # chunks made and not yet read, per stream
_STATUS_TEXT = {"stopped": "been stopped", "completed": "completed", "moved": "moved to another node",
                "shed": "been shed (the runners fell behind)"}


class LiveScheduler(Admission):
    """Runs the chunk jobs of every open stream on one Pipeline's runners, nearest playback deadline first.

    ``chunk_seconds``: the time of one chunk at the default size and settings on these runners (None:
    measured by ``start()`` on warm-up chunks, then followed as chunks run: a moving average of their run
    times per shape, so admission tracks what the runners really take; a given figure is kept); the capacity
    in real-time streams is chunk period / chunk time. ``max_streams`` caps it further. ``first_chunk_budget``
    (default: one chunk period) is the deadline of a stream's first chunk; ``lead`` (default: one chunk period)
    how far ahead of its deadline a chunk may be made. ``max_batch`` > 1 runs up to that many streams' chunks
    together (same size and settings) with one transformer call per step (the graphs' batch axis).
    ``max_chunks_queued``: chunks a stream may hold unread. ``shed_lateness`` (default: one chunk period): a
    live chunk this late sheds the newest live stream (at most one per chunk period)."""

    def __init__(self, pipe, fps: float = DEFAULT_FPS, chunk_seconds: float | None = None,
                 max_streams: int | None = None, queue: bool = False, first_chunk_budget: float | None = None,
                 lead: float | None = None, max_batch: int = 1, max_chunks_queued: int = MAX_CHUNKS_QUEUED,
                 shed_lateness: float | None = None):
        if not fps > 0 or (chunk_seconds is not None and not chunk_seconds > 0):
            raise UserError("fps and chunk time must be positive", found=f"fps {fps}, chunk time {chunk_seconds}")
        if max_batch < 1 or (max_streams is not None and max_streams < 1) or max_chunks_queued < 1:
            raise UserError("max_batch, max_streams and max_chunks_queued must be >= 1",
                            found=f"{max_batch}, {max_streams}, {max_chunks_queued}")
        self.pipe, self.fps, self.queue, self.max_batch = pipe, float(fps), queue, max_batch
        self.period = CHUNK_FRAMES / self.fps  # a chunk's playback time
        self.budget = self.period if first_chunk_budget is None else float(first_chunk_budget)
        self.lead = self.period if lead is None else float(lead)
        self.max_chunks_queued = max_chunks_queued
        self.shed_lateness = self.period if shed_lateness is None else float(shed_lateness)
        super().__init__(chunk_seconds, max_streams)
        self._streams: dict[str, LiveStream] = {}  # open: queued or running
        self._ended: collections.OrderedDict[str, LiveStream] = collections.OrderedDict()  # recent, for control
        self._opens: collections.deque = collections.deque()  # (function, Future): run by the worker
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._closed = False
        self.draining = False
        self.stopped = False  # the worker has ended (close() or a crash)
        self.last_error: str | None = None  # the last runner failure (type: message)
        self._sticky: str | None = None  # a failure that breaks every later call (a CUDA error)
        self._failures = 0  # chunk jobs failed in a row by the runners
        self._worker_error: BaseException | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> "LiveScheduler":
        """Start the worker (it measures the chunk time first when none was given) and return once it runs."""
        self._thread = threading.Thread(target=self._main, name="helios-live", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._worker_error is not None:
            raise self._worker_error
        return self

    def measure_chunk_seconds(self, repeats: int = 2) -> float:
        """Time of one chunk at the default size and settings: the mean of ``repeats`` runs after a first one
        that loads the runners (then followed by the moving average of real chunks). Worker thread only."""
        times = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            for _chunk in self.pipe.stream("warm-up", num_frames=CHUNK_FRAMES, seed=0):
                pass
            times.append(time.perf_counter() - t)
        return sum(times[1:]) / repeats

    def close(self, timeout: float = 60.0) -> bool:
        """End every stream ("stopped"), stop the worker; True when it stopped within ``timeout`` (only then
        may the owner free the pipeline: a worker still inside a runner call would drive freed sessions)."""
        with self._lock:
            self._closed = True
            for s in list(self._streams.values()):
                self._end(s, "stopped")
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout)
        self.stopped = self._thread is None or not self._thread.is_alive()
        return self.stopped

    def __enter__(self) -> "LiveScheduler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def health(self) -> dict:
        """For a liveness probe: ``live`` is false when the worker is dead or the runners are broken (a sticky
        error such as a CUDA failure, or 3 chunk jobs in a row failed by the runners); ``ready`` also needs
        the scheduler to admit streams (not closed, not draining)."""
        alive = self._thread is not None and self._thread.is_alive()
        broken = self._sticky is not None or self._failures >= 3
        live = alive and not broken
        if not alive:
            detail = "the live scheduler's worker is not running" + (
                f" (it died: {type(self._worker_error).__name__}: {self._worker_error})" if self._worker_error else "")
        elif broken:
            detail = f"the runners are broken: {self._sticky or self.last_error}"
        else:
            detail = "draining" if self.draining else "the live scheduler's worker runs"
        return {"live": live, "ready": live and not self.draining and not self._closed, "detail": detail,
                "worker_alive": alive, "last_error": self.last_error, "consecutive_failures": self._failures}

    # -- requests --------------------------------------------------------------------------------
    def open(self, prompt=None, num_frames: int = CHUNK_FRAMES, seed: int = 0, *, lead: float | None = None,
             cancelled: Callable[[], bool] | None = None, failover: bool = False, resume: bytes | None = None,
             **request) -> LiveStream:
        """Check and admit a stream (keywords as Pipeline.stream); its chunks are made from now on.

        ``resume``: a snapshot (a chunk's ``snapshot``, or a moved stream's): continues that stream, same id,
        from its next chunk (prompt, frames, seed and settings come from it; the others are ignored).
        ``failover``: each chunk carries ``snapshot``, the stream's state after it. ``lead=inf``: a job.
        Errors: UserError for a bad request or snapshot; StreamError over_capacity (full, unless ``queue``),
        draining, exists (the snapshot's stream is open here)."""
        self._check_open()
        if resume is not None:
            state, extra = self._on_worker(lambda: self.pipe.resume_stream(resume))
            stream_id = extra.get("id")
        else:
            state, stream_id = self._on_worker(lambda: self.pipe.open_stream(prompt, num_frames, seed, **request)), None
        stream = LiveStream(self, state, self._weight(state), self.lead if lead is None else float(lead), cancelled,
                            stream_id, failover)
        with self._lock:
            self._check_open()
            if stream.id in self._streams:
                raise StreamError("exists", f"stream {stream.id} is already open here")
            if not self._admit(stream):
                self._refused()
                raise StreamError("over_capacity", "over capacity: this server is serving all the real-time "
                                  "streams it can", found=self._load_text(stream),
                                  fix="retry later, or add a GPU / replica")
            self._ended.pop(stream.id, None)
            self._streams[stream.id] = stream
            self.totals["streams"] += 1
            self._lock.notify_all()
        return stream

    def _check_open(self) -> None:
        if self._thread is None or self._closed or self.stopped:
            raise UserError("the live scheduler is not running", fix="call start() first")
        if self.draining:
            raise StreamError("draining", "this scheduler is draining: it takes no new streams",
                              fix="open the stream on another node")

    def _on_worker(self, fn):
        """Run ``fn`` on the worker thread (the only one that drives the runners) and return its result."""
        if threading.current_thread() is self._thread:
            return fn()
        future: Future = Future()
        with self._lock:
            self._check_open()
            self._opens.append((fn, future))
            self._lock.notify_all()
        return future.result()

    def snapshot(self, stream_id: str) -> bytes:
        """The state of an open stream between chunks (none in flight: waits for the one running)."""
        with self._lock:
            s = self._find(stream_id)
            while s.running:
                self._lock.wait()
            if s.state is None:
                raise StreamError("finished", f"stream {stream_id} has ended")
            return self.pipe.snapshot(s.state, id=s.id)

    def stream(self, stream_id: str) -> LiveStream:
        with self._lock:
            return self._find(stream_id)

    def _find(self, stream_id: str) -> LiveStream:
        if stream_id in self._streams:
            return self._streams[stream_id]
        if stream_id in self._ended:
            raise StreamError("finished", f"stream {stream_id} has {_STATUS_TEXT.get(self._ended[stream_id].status, self._ended[stream_id].status)}",
                              fix="start a new stream")
        raise StreamError("not_found", f"no stream {stream_id!r}", fix="use the stream id the first response returned")

    def set_prompt(self, stream_id: str, prompt: str) -> int:
        """Change a stream's prompt from its next chunk not yet started; returns that chunk's index."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError("empty prompt", expected="a non-empty text prompt")
        with self._lock:
            s = self._find(stream_id)
            at = s.chunks_done + (1 if s.running else 0)
            if at >= s.num_chunks:
                raise StreamError("finished", f"stream {stream_id} has no chunk left to change "
                                  f"(all {s.num_chunks} made or in progress)")
            s.state.set_prompt(prompt, at)
            return at

    def stop(self, stream_id: str) -> None:
        """Stop a stream now: its state and unread chunks are freed at once; a chunk in flight is dropped at
        its next step. A stream whose chunks are all made but not all read (a job being read) stops too."""
        with self._lock:
            done = self._ended.get(stream_id)
            if done is not None and done.status == "completed" and done.queued_chunks:
                done.status = "stopped"
                done.discard()
                return
            self._end(self._find(stream_id), "stopped")
            self._lock.notify_all()

    def drain(self) -> int:
        """Stop admitting (open: StreamError "draining") and end every stream after its chunk in flight with
        status "moved" and ``snapshot`` set (its chunks already made are still read first). Returns how many
        streams are being moved."""
        with self._lock:
            self.draining = True
            streams = list(self._streams.values())
            for s in streams:
                if s.running:
                    s.moving = True
                else:
                    self._move(s)
            self._lock.notify_all()
        return len(streams)

    def _move(self, s: LiveStream, snapshot: bytes | None = None) -> None:
        """Under the lock, no chunk of ``s`` in flight: end it as moved, its snapshot kept."""
        s.snapshot = snapshot if snapshot is not None else self.pipe.snapshot(s.state, id=s.id)
        self.totals["moved"] += 1
        self._end(s, "moved")

    def _end(self, s: LiveStream, status: str, error: BaseException | None = None) -> None:
        """Under the lock: end a stream, free its share and admit queued streams."""
        if s.id not in self._streams:
            return
        del self._streams[s.id]
        self._ended[s.id] = s
        if len(self._ended) > 10_000:  # remember the recent ones only
            self._ended.popitem(last=False)
        s.end(status, error)
        self._lock.notify_all()
        for q in [x for x in self._streams.values() if x.status == "queued"]:  # in arrival order
            if not self._fits(q):
                break
            q.start(time.perf_counter(), self.period)

    def _chunk_read(self, s: LiveStream) -> None:
        with self._lock:
            s._unread = max(0, s._unread - 1)
            self._lock.notify_all()

    # -- the worker ------------------------------------------------------------------------------
    def _main(self) -> None:
        self.pipe.bind(threading.get_ident())
        try:
            if self.chunk_seconds is None:
                self.chunk_seconds = self.measure_chunk_seconds()
        except BaseException as e:  # noqa: BLE001 - start() raises it
            self._worker_error, self.stopped = e, True
            self.pipe.bind(None)
            self._started.set()
            return
        self._started.set()
        try:
            self._work()
        except BaseException as e:  # noqa: BLE001 - a bug in the worker: fail every stream, report it in health()
            self._worker_error = e
            self.last_error = f"worker died: {type(e).__name__}: {e}"
            with self._lock:
                for s in list(self._streams.values()):
                    self._end(s, "failed", StreamError("failed", f"the live scheduler failed: {e}"))
        finally:
            self.pipe.bind(None)
            with self._lock:
                self.stopped = True
                while self._opens:
                    self._opens.popleft()[1].set_exception(UserError("the live scheduler stopped"))

    def _work(self) -> None:
        while True:
            with self._lock:
                job = None
                while not self._closed:
                    if self._opens:
                        job = self._opens.popleft()
                        break
                    group, wait = self._pick()
                    if group:
                        break
                    self._lock.wait(timeout=wait)
                if self._closed:
                    return
                if job is None:
                    deadlines = [s.deadline(self.fps, self.budget) for s in group]
                    for s in group:
                        s.running = True
            if job is not None:
                fn, future = job
                try:
                    future.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - the caller of open() gets it
                    future.set_exception(e)
                continue
            self._run(group, deadlines)

    def _ready(self, s: LiveStream) -> bool:
        if s.status != "running" or s.running:
            return False
        if s.queued_chunks >= self.max_chunks_queued:
            s.reader_blocked = True
            return False
        return True

    def _pick(self) -> tuple[list[LiveStream], float | None]:
        """Under the lock: the streams to run next (nearest deadline first, plus up to max_batch - 1 that can
        share its transformer calls; or a job's chunk that fits in the slack before the live streams' latest
        starts), or none and the time to wait for the next to become eligible."""
        now = time.perf_counter()
        ready = sorted((s for s in self._streams.values() if self._ready(s)),
                       key=lambda s: s.deadline(self.fps, self.budget))
        if not ready:
            return [], None
        first = ready[0]
        wait = first.deadline(self.fps, self.budget) - first.lead - now
        if wait > 0:
            job = self._slack_job(ready, now)
            return ([job], None) if job is not None else ([], wait)
        group = [first]
        key = batch_key(first.state)
        for s in ready[1:]:
            if len(group) >= self.max_batch:
                break
            if batch_key(s.state) == key and s.deadline(self.fps, self.budget) - s.lead <= now:
                group.append(s)
        return group, None

    def _slack_job(self, ready: list[LiveStream], now: float) -> LiveStream | None:
        """A job whose next chunk ends before every live stream's latest start (EDF: the deadline minus the
        chunk times of it and every live chunk due before it)."""
        latest, work = float("inf"), 0.0
        for s in ready:
            if not s.is_job:
                work += self.chunk_cost(s)
                latest = min(latest, s.deadline(self.fps, self.budget) - work)
        for s in ready:
            if s.is_job and now + self.chunk_cost(s) <= latest:
                return s
        return None

    def _run(self, group: list[LiveStream], deadlines: list[float]) -> None:
        key = batch_key(group[0].state)
        weights = [s.weight * self._first_factor(s.state) for s in group]
        t = time.perf_counter()
        results = run_lockstep(self.pipe, [(s.state, s.cancelled) for s in group], Stopped)
        seconds = time.perf_counter() - t
        made = [s for s, (chunk, _) in zip(group, results) if chunk is not None]
        snapshots = {s.id: self.pipe.snapshot(s.state, id=s.id) for s in made
                     if (s.failover or s.moving) and s.state is not None}
        with self._lock:
            self._observe(key, sum(w for w, (c, _) in zip(weights, results) if c is not None), len(made), seconds)
            for s, deadline, (chunk, error) in zip(group, deadlines, results):
                s.running = False
                if s.id not in self._streams:  # stopped meanwhile: already ended
                    continue
                if isinstance(error, Stopped):
                    self._end(s, "stopped")
                elif error is not None:
                    self._runner_failed(error)
                    self._end(s, "failed", error)
                else:
                    self._delivered(s, chunk, seconds, deadline, snapshots.get(s.id))
            self._lock.notify_all()

    def _delivered(self, s: LiveStream, chunk, seconds: float, deadline: float, snapshot: bytes | None) -> None:
        self._failures = 0
        if s.failover:
            chunk.snapshot = snapshot
        blocked, s.reader_blocked = s.reader_blocked, False
        s.deliver(chunk, seconds, deadline)
        self._count(s)
        if s.chunks_done >= s.num_chunks:
            self._end(s, "completed")
        elif s.moving:
            self._move(s, snapshot)
        elif not s.is_job and not blocked and s.timing.lateness[-1] > self.shed_lateness:
            self._shed()

    def _runner_failed(self, error: BaseException) -> None:
        if isinstance(error, UserError):
            return  # a bad request, not the runners
        self._failures += 1
        self.last_error = f"{type(error).__name__}: {error}"
        if _is_sticky(self.last_error):
            self._sticky = self.last_error

    def _shed(self) -> None:
        """Under the lock: the runners fell behind; stop the newest live stream (one per chunk period) so the
        others get back on time, unless it is the only one."""
        live = [s for s in self._streams.values() if s.status == "running" and not s.is_job]
        now = time.perf_counter()
        if len(live) < 2 or now - self._last_shed < self.period:
            return
        victim = max(live, key=lambda s: s.timing.opened)
        self._last_shed = now
        self.totals["shed"] += 1
        self._end(victim, "shed", StreamError("shed", "stream stopped: the runners fell behind the streams they "
                                              "had admitted, and the newest streams are stopped first so the others "
                                              "stay on time", fix="open it again later, or on another node"))


_STICKY = ("cuda error", "cudaerror", "illegal memory access", "device-side assert", "unspecified launch failure",
           "cublas_status", "cudnn_status", "nccl error", "device lost", "ecc error")


def _is_sticky(text: str) -> bool:
    """A failure after which the device (CUDA context) fails every later call."""
    low = text.lower()
    return any(k in low for k in _STICKY)


def _batch_key(state: StreamState) -> tuple:  # kept for callers of the old name
    return batch_key(state)
