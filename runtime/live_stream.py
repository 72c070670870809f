"""One live stream as its owner sees it (runtime/live.py's LiveScheduler makes its chunks): chunks to read from a
bounded queue, its prompt to change, stop, progress, and after a drain its snapshot to resume elsewhere."""

from __future__ import annotations

import queue
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..errors import UserError
from .stream_state import CHUNK_FRAMES, StreamState

if TYPE_CHECKING:  # pragma: no cover
    from .live import LiveScheduler

_END = object()  # the last item of a stream's queue


class StreamError(UserError):
    """A live-stream request that cannot be served. ``code``: over_capacity (full), draining (the scheduler is
    being drained: open the stream elsewhere), not_found, finished, exists (a resume of a stream id already open
    here), shed (stopped because the runners fell behind: the newest streams go first so the others stay on
    time)."""

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
    """One stream: ``next()`` its chunks, ``set_prompt``, ``stop``, ``progress``.

    ``queued_chunks``: chunks made and not yet read (at most the scheduler's ``max_chunks_queued``: the worker
    makes no chunk for a stream whose queue is full, so a slow reader holds a few chunks, never more; an
    owner that sees it at the limit for long has a reader that cannot keep up). ``snapshot``: after a drain
    (status "moved"), the stream's state to resume elsewhere (LiveScheduler.open(resume=...)).
    ``failover``: every chunk carries ``chunk.snapshot``, the state after it."""

    def __init__(self, scheduler: "LiveScheduler", state: StreamState, weight: float, lead: float,
                 cancelled: Callable[[], bool] | None, stream_id: str | None = None, failover: bool = False):
        self.id = stream_id or uuid.uuid4().hex
        self.state: StreamState | None = state
        self.num_chunks = state.num_chunks
        self.weight, self.lead = weight, lead  # its chunk's work / a default chunk's; seconds a chunk may start early
        self.failover = failover
        self.status = "queued"
        self.error: BaseException | None = None
        self.running = False  # a chunk job of this stream is in flight
        self.moving = False  # drained: ends as "moved" after the chunk in flight
        self.reader_blocked = False  # a chunk was held back because the queue was full (not the runners' fault)
        self.chunks_done = state.next_index  # a resumed stream counts its earlier chunks
        self.snapshot: bytes | None = None
        self.timing = Timing(time.perf_counter())
        self._scheduler, self._cancelled = scheduler, cancelled
        self._out: queue.Queue = queue.Queue()
        self._unread = 0  # chunks in _out (changed under the scheduler's lock)

    @property
    def is_job(self) -> bool:
        """Made as fast as the runners allow (lead = inf), not paced to playback."""
        return self.lead == float("inf")

    @property
    def queued_chunks(self) -> int:
        return self._unread

    # -- the owner's side ------------------------------------------------------------------------
    def next(self, timeout: float | None = None):
        """The next Chunk, or None once the stream has ended (completed, stopped or moved); raises the stream's
        error if it failed or was shed (StreamError code "shed"), TimeoutError if nothing came within
        ``timeout`` seconds."""
        try:
            item = self._out.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"stream {self.id}: no chunk within {timeout:g} s") from None
        if item is _END:
            self._out.put(_END)  # every later call ends too
            if self.error is not None:
                raise self.error
            return None
        self._scheduler._chunk_read(self)
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
                "queued_chunks": self._unread, "first_chunk_latency_s": t.first_chunk_latency,
                "lateness_s": list(t.lateness), "misses": sum(1 for x in t.lateness if x > 0),
                "chunk_seconds": list(t.chunk_seconds), "error": None if self.error is None else str(self.error)}

    # -- the scheduler's side (under its lock) ---------------------------------------------------
    def start(self, now: float, period: float) -> None:
        """Admitted at ``now``: the next chunk's deadline counts from here (a resumed stream's too)."""
        self.status, self.timing.t0 = "running", now - self.chunks_done * period

    def deadline(self, fps: float, budget: float) -> float:
        return self.timing.t0 + budget + self.chunks_done * CHUNK_FRAMES / fps

    def cancelled(self) -> bool:
        return self.status != "running" or (self._cancelled is not None and self._cancelled())

    def deliver(self, chunk, seconds: float, deadline: float) -> None:
        now = time.perf_counter()
        t = self.timing
        if t.first_chunk_latency is None:
            t.first_chunk_latency = now - t.opened
        t.lateness.append(now - deadline)
        t.chunk_seconds.append(seconds)
        self.chunks_done += 1
        self._unread += 1
        self._out.put(chunk)

    def end(self, status: str, error: BaseException | None = None) -> None:
        """A stopped stream drops the chunks it has not read; the others are read first, then the end."""
        self.status, self.error, self.state = status, error, None  # the state (latents, generator) freed now
        if status == "stopped":
            self.discard()
        self._out.put(_END)

    def discard(self) -> None:
        while True:
            try:
                item = self._out.get_nowait()
            except queue.Empty:
                break
            if item is _END:
                self._out.put(_END)
                break
        self._unread = 0
