"""Many live streams on one set of runners: chunk jobs scheduled by playback deadline.

A stream (one request) is a StreamState (runtime/stream_state.py) plus its timing (runtime/live_stream.py);
the scheduler's worker thread is the only thread that drives the runners: it opens the streams that need a
runner (I2V / V2V inputs encoded; the caller of ``open`` waits) and runs one chunk job at a time (or, with ``max_batch`` > 1, the
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
follows the runs (a moving average per shape, plus twice the runs' moving mean deviation from it: a new
stream's first chunk has no lead to absorb an underestimate; runtime/live_admission.py). When the runners
fall behind anyway (a live chunk later than ``shed_lateness``), the newest live stream is stopped (code
``shed``) so the others stay on time.

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
import weakref
from concurrent.futures import Future
from typing import Callable, Sequence

from ..errors import UserError
from .live_admission import Admission, batch_key
from .live_worker import Worker
from .live_stream import LiveStream, Stopped, StreamError, Timing  # noqa: F401 - public names
from .stream_state import CHUNK_FRAMES, StreamState

DEFAULT_FPS = 24.0
MAX_CHUNKS_QUEUED = 3  # chunks made and not yet read, per stream
ENDED_KEPT = 10_000  # ended streams whose status is remembered (an id and a word each), for control answers
_STATUS_TEXT = {"stopped": "been stopped", "completed": "completed", "moved": "moved to another node",
                "shed": "been shed (the runners fell behind)"}


class LiveScheduler(Admission, Worker):
    """Runs the chunk jobs of every open stream on one Pipeline's runners, nearest playback deadline first.

    ``chunk_seconds``: the time of one chunk at the default size and settings on these runners (None:
    measured by ``start()`` on warm-up chunks, then followed as chunks run: a moving average of their run
    times per shape, so admission tracks what the runners really take; a given figure is kept); the capacity
    in real-time streams is chunk period / chunk time. ``max_streams`` caps it further. ``first_chunk_budget``
    (default: one chunk period) is the deadline of a stream's first chunk; ``lead`` (default: one chunk period)
    how far ahead of its deadline a chunk may be made. ``max_batch`` > 1 runs up to that many streams' chunks
    together (same size and settings) with one transformer call per step (the graphs' batch axis).
    ``max_chunks_queued``: chunks a stream may hold unread. ``shed_lateness``: a live chunk this late sheds the
    newest live stream (at most one per chunk period); default one chunk period when the chunk time is
    measured, none (inf) when ``chunk_seconds`` is given (a figure its owner vouches for, as tests do)."""

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
        if shed_lateness is None:  # a given chunk time is the owner's figure: no shedding unless asked for
            shed_lateness = self.period if chunk_seconds is None else float("inf")
        self.shed_lateness = float(shed_lateness)
        super().__init__(chunk_seconds, max_streams)
        self._streams: dict[str, LiveStream] = {}  # open: queued or running
        # ended streams: only their status is kept (recent ones, for control answers); the stream itself (its chunk
        # queue, timings, callbacks) lives on only while its owner holds it (e.g. a job's chunks still being read):
        # keeping thousands of ended LiveStreams grew a long-running server by a few KB per stream
        self._ended: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._ended_streams: weakref.WeakValueDictionary[str, LiveStream] = weakref.WeakValueDictionary()
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

    # -- requests --------------------------------------------------------------------------------
    def open(self, prompt=None, num_frames: int = CHUNK_FRAMES, seed: int = 0, *, lead: float | None = None,
             cancelled: Callable[[], bool] | None = None, failover: bool = False, resume: bytes | None = None,
             stream_id: str | None = None, due_in: float | None = None,
             prompt_changes: Sequence[tuple[int, str]] = (), **request) -> LiveStream:
        """Check and admit a stream (keywords as Pipeline.stream); its chunks are made from now on.

        ``resume``: a snapshot (a chunk's ``snapshot``, or a moved stream's): continues that stream, same id,
        from its next chunk (prompt, frames, seed and settings come from it; the others are ignored).
        ``failover``: each chunk carries ``snapshot``, the stream's state after it. ``lead=inf``: a job.
        ``stream_id``: the id of a stream opened again from its start (lost elsewhere before its first snapshot).
        ``due_in``: seconds until the next chunk is due (a moved stream keeps its viewer's playback deadline
        instead of a new first-chunk budget behind this scheduler's own streams).
        ``prompt_changes``: (from chunk, prompt) pairs made before this open (a stream opened again from its start,
        or resumed), applied in order to its state as set_prompt would have, before it is admitted.
        Errors: UserError for a bad request or snapshot; StreamError over_capacity (full, unless ``queue``),
        draining, exists (the snapshot's stream is open here)."""
        self._check_open()
        if resume is not None:  # no runner involved: read here
            state, extra = self.pipe.resume_stream(resume)
            stream_id = extra.get("id")
        else:
            def opener():
                return self.pipe.open_stream(prompt, num_frames, seed, **request)

            # I2V / V2V inputs are encoded by the VAE encoder's runner: on the worker (the caller waits up to the
            # chunk in flight); a text-to-video open touches no runner and is checked here, so a burst of new
            # streams does not wait one chunk per open
            encodes = request.get("image") is not None or request.get("video") is not None
            state = self._on_worker(opener) if encodes else opener()
        for at, text in prompt_changes or ():
            state.set_prompt(text, at)
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
            if due_in is not None and stream.status == "running":  # its next chunk due in due_in seconds
                stream.start(time.perf_counter() + max(0.0, float(due_in)) - self.budget, self.period)
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
            status = self._ended[stream_id]
            raise StreamError("finished", f"stream {stream_id} has {_STATUS_TEXT.get(status, status)}",
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
            done = self._ended_streams.get(stream_id)
            if done is not None and done.status == "completed" and done.queued_chunks:
                done.status = self._ended[stream_id] = "stopped"
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
        s.end(status, error)
        self._ended[s.id] = status
        self._ended_streams[s.id] = s
        if len(self._ended) > ENDED_KEPT:  # remember the recent ones only
            self._ended.popitem(last=False)
        self._lock.notify_all()
        for q in [x for x in self._streams.values() if x.status == "queued"]:  # in arrival order
            if not self._fits(q):
                break
            q.start(time.perf_counter(), self.period)

    def _chunk_read(self, s: LiveStream) -> None:
        with self._lock:
            s._unread = max(0, s._unread - 1)
            self._lock.notify_all()


def _batch_key(state: StreamState) -> tuple:  # the old name
    return batch_key(state)
