"""Many live streams on one set of runners: chunk jobs scheduled by playback deadline.

A stream (one request) is a StreamState (runtime/stream_state.py) plus its timing; the scheduler's worker
thread runs one chunk job at a time (or, with ``max_batch`` > 1, the next chunks of several streams in
lockstep with their transformer calls concatenated along the batch) and always takes the stream whose next
chunk's playback deadline is nearest:

    deadline(k) = t0 + first_chunk_budget + k * 33 / fps

so a new stream gets its first chunk after about one chunk time, not after the others finish. A chunk is
not started more than ``lead`` seconds before its deadline (a prompt change then shows within about
``lead`` of playback). Admission: each stream takes (its chunk time) / (its chunk period) of the runners;
a stream that would take the load over 1 is refused at once (``StreamError`` code ``over_capacity``) or,
with ``queue=True``, waits until streams finish.

    sched = LiveScheduler(pipe).start()
    s = sched.open("a cat", num_frames=330, seed=0)
    chunk = s.next()                 # Chunk(index, frames) or None at the end
    s.set_prompt("a dog")            # from the next chunk not yet started; returns that index
    s.stop()
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UserError
from .live_batch import run_lockstep
from .stream_state import CHUNK_FRAMES, StreamState

DEFAULT_FPS = 24.0
_END = object()  # the last item of a stream's queue


class StreamError(UserError):
    """A live-stream request that cannot be served: ``code`` is over_capacity, not_found or finished."""

    def __init__(self, code: str, message: str, **kwargs):
        super().__init__(message, **kwargs)
        self.code = code


class Stopped(Exception):
    """Raised inside a chunk job whose stream was stopped or whose client went away."""


@dataclass
class Timing:
    opened: float  # when the request arrived (perf_counter)
    t0: float | None = None  # when it was admitted: the deadlines count from here
    first_chunk_latency: float | None = None  # from ``opened`` to the first chunk decoded
    lateness: list[float] = field(default_factory=list)  # per chunk: decoded - deadline (negative: early)
    chunk_seconds: list[float] = field(default_factory=list)  # per chunk: its job's run time


class LiveStream:
    """One stream as its owner sees it: chunks to read, its prompt to change, stop, progress."""

    def __init__(self, scheduler: "LiveScheduler", state: StreamState, weight: float, lead: float,
                 cancelled: Callable[[], bool] | None):
        self.id = secrets.token_hex(8)
        self.state: StreamState | None = state
        self.num_chunks = state.num_chunks
        self.weight, self.lead = weight, lead  # its chunk's work / a default chunk's; seconds a chunk may start early
        self.status = "queued"
        self.error: BaseException | None = None
        self.running = False  # a chunk job of this stream is in flight
        self.chunks_done = 0
        self.timing = Timing(time.perf_counter())
        self._scheduler, self._cancelled = scheduler, cancelled
        self._out: queue.Queue = queue.Queue()

    # -- the owner's side ------------------------------------------------------------------------
    def next(self, timeout: float | None = None):
        """The next Chunk, or None once the stream has ended (completed or stopped); raises the stream's
        error if it failed, TimeoutError if nothing came within ``timeout`` seconds."""
        try:
            item = self._out.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"stream {self.id}: no chunk within {timeout:g} s") from None
        if item is _END:
            self._out.put(_END)  # every later call ends too
            if self.error is not None:
                raise self.error
            return None
        return item

    def __iter__(self):
        while (chunk := self.next()) is not None:
            yield chunk

    def set_prompt(self, prompt: str) -> int:
        return self._scheduler.set_prompt(self.id, prompt)

    def stop(self) -> None:
        self._scheduler.stop(self.id)

    def progress(self) -> dict:
        t = self.timing
        return {"id": self.id, "status": self.status, "chunks_done": self.chunks_done, "num_chunks": self.num_chunks,
                "first_chunk_latency_s": t.first_chunk_latency, "lateness_s": list(t.lateness),
                "misses": sum(1 for x in t.lateness if x > 0), "chunk_seconds": list(t.chunk_seconds),
                "error": None if self.error is None else str(self.error)}

    # -- the scheduler's side --------------------------------------------------------------------
    def deadline(self, fps: float, budget: float) -> float:
        return self.timing.t0 + budget + self.chunks_done * CHUNK_FRAMES / fps

    def cancelled(self) -> bool:
        return self.status == "stopped" or (self._cancelled is not None and self._cancelled())

    def deliver(self, chunk, seconds: float, deadline: float) -> None:
        now = time.perf_counter()
        t = self.timing
        if t.first_chunk_latency is None:
            t.first_chunk_latency = now - t.opened
        t.lateness.append(now - deadline)
        t.chunk_seconds.append(seconds)
        self.chunks_done += 1
        self._out.put(chunk)

    def end(self, status: str, error: BaseException | None = None) -> None:
        self.status, self.error, self.state = status, error, None  # the state (latents, generator) freed now
        self._out.put(_END)


class LiveScheduler:
    """Runs the chunk jobs of every open stream on one Pipeline's runners, nearest playback deadline first.

    ``chunk_seconds``: the time of one chunk at the default size and settings on these runners (None:
    measured by ``start()`` on a warm-up chunk, then followed as chunks run: a moving average of their run
    times, so admission tracks what the runners really take); the capacity in real-time streams is
    chunk period / chunk time. ``max_streams`` caps it further. ``first_chunk_budget`` (default: one chunk
    period) is the deadline of a stream's first chunk; ``lead`` (default: one chunk period) how far ahead
    of its deadline a chunk may be made. ``max_batch`` > 1 runs up to that many streams' chunks together
    (same size and settings) with one transformer call per step (the graphs' batch axis)."""

    def __init__(self, pipe, fps: float = DEFAULT_FPS, chunk_seconds: float | None = None,
                 max_streams: int | None = None, queue: bool = False, first_chunk_budget: float | None = None,
                 lead: float | None = None, max_batch: int = 1):
        if not fps > 0 or (chunk_seconds is not None and not chunk_seconds > 0):
            raise UserError("fps and chunk time must be positive", found=f"fps {fps}, chunk time {chunk_seconds}")
        if max_batch < 1 or (max_streams is not None and max_streams < 1):
            raise UserError("max_batch and max_streams must be >= 1", found=f"{max_batch}, {max_streams}")
        self.pipe, self.fps, self.queue, self.max_batch = pipe, float(fps), queue, max_batch
        self.period = CHUNK_FRAMES / self.fps  # a chunk's playback time
        self.budget = self.period if first_chunk_budget is None else float(first_chunk_budget)
        self.lead = self.period if lead is None else float(lead)
        self.chunk_seconds, self.max_streams = chunk_seconds, max_streams
        self._adapt = chunk_seconds is None  # a given chunk time is kept; a measured one follows the runs
        self._streams: dict[str, LiveStream] = {}  # open: queued or running
        self._ended: dict[str, str] = {}  # id -> final status, for clear errors on late control messages
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.totals = {"streams": 0, "refused": 0, "chunks": 0, "misses": 0, "first_chunk_latency_sum": 0.0,
                       "first_chunks": 0, "late_seconds": 0.0, "chunk_seconds_sum": 0.0}

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> "LiveScheduler":
        if self.chunk_seconds is None:
            self.chunk_seconds = self.measure_chunk_seconds()
        self._thread = threading.Thread(target=self._work, name="helios-live", daemon=True)
        self._thread.start()
        return self

    def measure_chunk_seconds(self, repeats: int = 2) -> float:
        """Time of one chunk at the default size and settings (the best of ``repeats`` after a first run that
        loads the runners)."""
        times = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            for _chunk in self.pipe.stream("warm-up", num_frames=CHUNK_FRAMES, seed=0):
                pass
            times.append(time.perf_counter() - t)
        return min(times[1:])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for s in list(self._streams.values()):
                self._end(s, "stopped")
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def __enter__(self) -> "LiveScheduler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests --------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Real-time streams at the default settings these runners hold."""
        whole = int(self.period / self.chunk_seconds) if self.chunk_seconds else 0
        return whole if self.max_streams is None else min(whole, self.max_streams)

    def load(self) -> float:
        return sum(s.weight for s in self._streams.values() if s.status == "running") * self.chunk_seconds / self.period

    def open(self, prompt, num_frames: int = CHUNK_FRAMES, seed: int = 0, *, lead: float | None = None,
             cancelled: Callable[[], bool] | None = None, **request) -> LiveStream:
        """Check and admit a stream (keywords as Pipeline.stream); its chunks are made from now on. A
        UserError for a bad request, StreamError("over_capacity") when full (unless ``queue``)."""
        if self._thread is None or self._closed:
            raise UserError("the live scheduler is not running", fix="call start() first")
        state = self.pipe.open_stream(prompt, num_frames, seed, **request)  # checks; encodes I2V/V2V inputs
        stream = LiveStream(self, state, self._weight(state), self.lead if lead is None else float(lead), cancelled)
        with self._lock:
            if not self._admit(stream):
                self.totals["refused"] += 1
                raise StreamError("over_capacity", "over capacity: this server is serving all the real-time "
                                  "streams it can", found=self._load_text(stream),
                                  fix="retry later, or add a GPU / replica")
            self._streams[stream.id] = stream
            self.totals["streams"] += 1
            self._lock.notify_all()
        return stream

    def _weight(self, state: StreamState) -> float:
        """A stream's chunk in default chunks: scaled by transformer calls per chunk and by the video area."""
        default = self.pipe.sampling()
        h, w = state.size
        dh, dw = self.pipe.sizes[0]
        calls = sum(state.sampling.steps) * (1 if state.sampling.guidance is None else 2)
        base_calls = sum(default.steps) * (1 if default.guidance is None else 2)
        return (calls / base_calls) * (h * w) / (dh * dw)

    def _fits(self, stream: LiveStream) -> bool:
        running = [s for s in self._streams.values() if s.status == "running"]
        if self.max_streams is not None and len(running) >= self.max_streams:
            return False
        return not running or self.load() + self._share(stream) <= 1.0 + 1e-9  # one stream always fits

    def _share(self, stream: LiveStream) -> float:
        return stream.weight * self.chunk_seconds / self.period

    def _admit(self, stream: LiveStream) -> bool:
        """Under the lock: admit a new stream now (running) or queue it (``queue``); False: refused."""
        if self._fits(stream) and not any(s.status == "queued" for s in self._streams.values()):
            stream.status, stream.timing.t0 = "running", time.perf_counter()
            return True
        return self.queue  # stays queued; admitted in order as streams end

    def _load_text(self, stream: LiveStream) -> str:
        running = sum(1 for s in self._streams.values() if s.status == "running")
        return (f"{running} streams at load {self.load():.2f} of 1.00; this one would add {self._share(stream):.2f} "
                f"(chunk {self.chunk_seconds:.3f} s per {self.period:.3f} s of video at {self.fps:g} fps)")

    def stream(self, stream_id: str) -> LiveStream:
        with self._lock:
            return self._find(stream_id)

    def _find(self, stream_id: str) -> LiveStream:
        if stream_id in self._streams:
            return self._streams[stream_id]
        if stream_id in self._ended:
            raise StreamError("finished", f"stream {stream_id} has {self._ended[stream_id]}",
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
        """Stop a stream now: its state is freed at once; a chunk in flight is dropped at its next step."""
        with self._lock:
            self._end(self._find(stream_id), "stopped")
            self._lock.notify_all()

    def _end(self, s: LiveStream, status: str, error: BaseException | None = None) -> None:
        """Under the lock: end a stream, free its share and admit queued streams."""
        if s.id not in self._streams:
            return
        del self._streams[s.id]
        self._ended[s.id] = {"stopped": "been stopped", "completed": "completed"}.get(status, status)
        if len(self._ended) > 10_000:  # remember the recent ones only
            self._ended.pop(next(iter(self._ended)))
        s.end(status, error)
        for q in [x for x in self._streams.values() if x.status == "queued"]:  # in arrival order
            if not self._fits(q):
                break
            q.status, q.timing.t0 = "running", time.perf_counter()

    # -- the worker ------------------------------------------------------------------------------
    def _pick(self) -> tuple[list[LiveStream], float | None]:
        """Under the lock: the streams to run next (nearest deadline first, plus up to max_batch - 1 that can
        share its transformer calls), or none and the time to wait for the next to become eligible."""
        now = time.perf_counter()
        ready = sorted((s for s in self._streams.values() if s.status == "running" and not s.running),
                       key=lambda s: s.deadline(self.fps, self.budget))
        if not ready:
            return [], None
        first = ready[0]
        wait = first.deadline(self.fps, self.budget) - first.lead - now
        if wait > 0:
            return [], wait
        group = [first]
        key = _batch_key(first.state)
        for s in ready[1:]:
            if len(group) >= self.max_batch:
                break
            if _batch_key(s.state) == key and s.deadline(self.fps, self.budget) - s.lead <= now:
                group.append(s)
        return group, None

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._closed:
                    group, wait = self._pick()
                    if group:
                        break
                    self._lock.wait(timeout=wait)
                if self._closed:
                    return
                deadlines = [s.deadline(self.fps, self.budget) for s in group]
                for s in group:
                    s.running = True
            self._run(group, deadlines)

    def _run(self, group: list[LiveStream], deadlines: list[float]) -> None:
        t = time.perf_counter()
        results = run_lockstep(self.pipe, [(s.state, s.cancelled) for s in group], Stopped)
        seconds = time.perf_counter() - t
        made = sum(s.weight for s, (chunk, _) in zip(group, results) if chunk is not None)
        with self._lock:
            if self._adapt and made:
                self.chunk_seconds = 0.8 * self.chunk_seconds + 0.2 * seconds / made
            for s, deadline, (chunk, error) in zip(group, deadlines, results):
                s.running = False
                if s.id not in self._streams:  # stopped meanwhile: already ended
                    continue
                if isinstance(error, Stopped):
                    self._end(s, "stopped")
                elif error is not None:
                    self._end(s, "failed", error)
                else:
                    s.deliver(chunk, seconds, deadline)
                    self._count(s)
                    if s.chunks_done >= s.num_chunks:
                        self._end(s, "completed")
            self._lock.notify_all()

    def _count(self, s: LiveStream) -> None:
        t, totals = s.timing, self.totals
        totals["chunks"] += 1
        totals["misses"] += t.lateness[-1] > 0
        totals["late_seconds"] += max(0.0, t.lateness[-1])
        totals["chunk_seconds_sum"] += t.chunk_seconds[-1]
        if s.chunks_done == 1:
            totals["first_chunks"] += 1
            totals["first_chunk_latency_sum"] += t.first_chunk_latency

    def metrics(self) -> dict:
        with self._lock:
            streams = list(self._streams.values())
            return {"active_streams": sum(s.status == "running" for s in streams),
                    "queued_streams": sum(s.status == "queued" for s in streams),
                    "capacity": self.capacity, "load": self.load(), "chunk_seconds": self.chunk_seconds,
                    "fps": self.fps, **self.totals}


def _batch_key(state: StreamState) -> tuple:
    """Streams whose next chunks run the same calls at the same shapes (and so can share them)."""
    s = state.sampling
    amplify = s.amplify_first_chunk and state.next_index == 0
    return state.size, s.steps, amplify, s.guidance is None, s.sampler

