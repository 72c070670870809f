"""The live scheduler's books (runtime/live.py): what a stream's chunk costs on these runners, the load of the
admitted streams, admission, and the counters its metrics report.

A stream's chunk costs its weight (transformer calls x video area, relative to a default chunk; doubled steps
for a first chunk with amplify_first_chunk) x the default chunk time, plus ``overhead``: other work its chunk
costs on the runners' cores (the API's H.264 encode, when the runners run on the API host's CPUs). When the chunk time was measured (not
given), each shape's cost then follows its real runs (a moving average of the seconds per stream-chunk of that
shape), and the default chunk time too: admission and the slack given to jobs track what the runners take
now, not what two idle warm-up chunks took.

A cost is the moving average plus DEVIATIONS x the moving mean deviation of the runs from it (as TCP's
retransmission timer does with round-trip times; the deviation starts at half the first figure and follows
the runs). The average alone was not enough: a new stream's first chunk has no lead (its deadline is one
chunk period after admission, behind the chunks already due), so it absorbs every error of the estimate,
and chunk times on CPU runners beside the API's own work vary by a third around their average (soak on 2
cores: 5 to 95 % of chunk times 0.20 to 0.57 s). Admitted on the average, a stream taking the load to
0.96 missed its first chunk by 0.31 s when the chunks before it ran 25 % over it."""

from __future__ import annotations

import collections
import time

from .stream_state import StreamState

EWMA = 0.3  # weight of the newest run in a moving average
DEVIATIONS = 2.0  # a chunk's cost: its moving average + this many moving mean deviations
REFUSAL_WINDOW = 60.0  # seconds a refusal counts in refused_recent (demand)


def batch_key(state: StreamState) -> tuple:
    """Streams whose next chunks run the same calls at the same shapes (and so can share them)."""
    s = state.sampling
    amplify = s.amplify_first_chunk and state.next_index == 0
    return state.size, s.steps, amplify, s.guidance is None, s.sampler


class Admission:
    """Mixed into LiveScheduler (which holds ``pipe``, ``period``, ``_streams``, ``_lock``, ``queue``)."""

    def __init__(self, chunk_seconds: float | None, max_streams: int | None):
        self.chunk_seconds, self.max_streams = chunk_seconds, max_streams
        self._adapt = chunk_seconds is None  # a given chunk time is kept; a measured one follows the runs
        # seconds per chunk of other work on the runners' own cores for a stream (StreamState -> float), e.g. the
        # API host's H.264 encode of its chunks when the runners are on its CPUs: added to every chunk's cost
        self.overhead = None
        self._cost: dict[tuple, float] = {}  # batch key -> moving average of seconds per stream-chunk
        self._dev: dict[tuple, float] = {}  # batch key -> moving mean deviation of its runs from that average
        self.chunk_deviation = 0.0  # of the default chunk time (0 for a given one; set when it is measured)
        self._refusals: collections.deque[float] = collections.deque(maxlen=100_000)
        self._last_shed = float("-inf")
        self.totals = {"streams": 0, "refused": 0, "chunks": 0, "misses": 0, "first_chunk_latency_sum": 0.0,
                       "first_chunks": 0, "late_seconds": 0.0, "chunk_seconds_sum": 0.0, "shed": 0, "moved": 0}

    # -- costs -----------------------------------------------------------------------------------
    def _weight(self, state: StreamState) -> float:
        """A stream's steady chunk in default chunks: scaled by transformer calls per chunk and the video area."""
        default = self.pipe.sampling()
        h, w = state.size
        dh, dw = self.pipe.sizes[0]
        calls = sum(state.sampling.steps) * (1 if state.sampling.guidance is None else 2)
        base_calls = sum(default.steps) * (1 if default.guidance is None else 2)
        return (calls / base_calls) * (h * w) / (dh * dw)

    @staticmethod
    def _first_factor(state: StreamState | None) -> float:
        """amplify_first_chunk runs each stage's steps twice on chunk 0."""
        return 2.0 if state is not None and state.sampling.amplify_first_chunk and state.next_index == 0 else 1.0

    def chunk_cost(self, s) -> float:
        """Seconds the stream's next chunk may take on these runners (measured for its shape when known): the
        moving average plus DEVIATIONS x its moving mean deviation."""
        extra = self.overhead(s.state) if self.overhead is not None and s.state is not None else 0.0
        if self._adapt and s.state is not None and batch_key(s.state) in self._cost:
            key = batch_key(s.state)
            return self._cost[key] + DEVIATIONS * self._dev[key] + extra
        return s.weight * self._first_factor(s.state) * self._default_chunk() + extra

    def _default_chunk(self) -> float:
        return (self.chunk_seconds or 0.0) + DEVIATIONS * self.chunk_deviation

    def set_measured(self, chunk_seconds: float) -> None:
        """The start-up figure (warm-up chunks); its deviation starts at half of it and then follows the runs."""
        self.chunk_seconds, self.chunk_deviation = chunk_seconds, chunk_seconds / 2

    def _observe(self, key: tuple, weights: float, made: int, seconds: float) -> None:
        """Under the lock, after a chunk job of ``made`` streams (``weights``: their chunks in default chunks)."""
        if not made or not self._adapt:
            return
        per = seconds / made
        if key not in self._cost:
            self._cost[key], self._dev[key] = per, per / 2
        else:
            self._dev[key] = (1 - EWMA) * self._dev[key] + EWMA * abs(per - self._cost[key])
            self._cost[key] = (1 - EWMA) * self._cost[key] + EWMA * per
        if weights:
            self.chunk_deviation = (1 - EWMA) * self.chunk_deviation + EWMA * abs(seconds / weights - self.chunk_seconds)
            self.chunk_seconds = (1 - EWMA) * self.chunk_seconds + EWMA * seconds / weights

    # -- admission -------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Real-time streams at the default settings these runners hold (at the chunk's cost, deviation counted)."""
        whole = int(self.period / self._default_chunk()) if self.chunk_seconds else 0
        return whole if self.max_streams is None else min(whole, self.max_streams)

    def load(self) -> float:
        """The admitted streams' share of the runners (their next chunks' costs per chunk period)."""
        return sum(self.chunk_cost(s) for s in self._streams.values() if s.status == "running") / self.period

    def _share(self, stream) -> float:
        return self.chunk_cost(stream) / self.period

    def _fits(self, stream) -> bool:
        running = [s for s in self._streams.values() if s.status == "running"]
        if self.max_streams is not None and len(running) >= self.max_streams:
            return False
        return not running or self.load() + self._share(stream) <= 1.0 + 1e-9  # one stream always fits

    def _admit(self, stream) -> bool:
        """Under the lock: admit a new stream now (running) or queue it (``queue``); False: refused."""
        if self._fits(stream) and not any(s.status == "queued" for s in self._streams.values()):
            stream.start(time.perf_counter(), self.period)
            return True
        return self.queue  # stays queued; admitted in order as streams end

    def _refused(self) -> None:
        self.totals["refused"] += 1
        self._refusals.append(time.monotonic())

    def refused_recent(self, window: float = REFUSAL_WINDOW) -> int:
        """Refusals in the last ``window`` seconds (a refused viewer stays demand for a while)."""
        since = time.monotonic() - window
        return sum(1 for t in self._refusals if t >= since)

    def _load_text(self, stream) -> str:
        running = sum(1 for s in self._streams.values() if s.status == "running")
        return (f"{running} streams at load {self.load():.2f} of 1.00; this one would add {self._share(stream):.2f} "
                f"(chunk {self.chunk_seconds:.3f} s +- {self.chunk_deviation:.3f} per {self.period:.3f} s of video at "
                f"{self.fps:g} fps)")

    # -- counters --------------------------------------------------------------------------------
    def _count(self, s) -> None:
        t, totals = s.timing, self.totals
        totals["chunks"] += 1
        totals["misses"] += t.lateness[-1] > 0
        totals["late_seconds"] += max(0.0, t.lateness[-1])
        totals["chunk_seconds_sum"] += t.chunk_seconds[-1]
        if len(t.lateness) == 1:
            totals["first_chunks"] += 1
            totals["first_chunk_latency_sum"] += t.first_chunk_latency

    def metrics(self) -> dict:
        """active_streams, queued_streams (waiting for admission), queued_chunks (made, unread), capacity, load,
        chunk_seconds, fps, draining, refused_recent (last 60 s) and the totals (streams, refused, shed, moved,
        chunks, misses, ...)."""
        with self._lock:
            streams = list(self._streams.values())
            return {"active_streams": sum(s.status == "running" for s in streams),
                    "queued_streams": sum(s.status == "queued" for s in streams),
                    "queued_chunks": sum(s.queued_chunks for s in streams),
                    "capacity": self.capacity, "load": self.load(), "chunk_seconds": self.chunk_seconds,
                    "chunk_deviation": self.chunk_deviation,
                    "fps": self.fps, "draining": self.draining, "refused_recent": self.refused_recent(),
                    **self.totals}
