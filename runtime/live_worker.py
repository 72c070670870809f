"""The live scheduler's worker thread (runtime/live.py): the one thread that drives the pipeline's runners. It
runs the opens queued by ``open`` and the chunk jobs, nearest playback deadline first (a job's chunk in the
live streams' slack), delivers chunks, sheds the newest live stream when the runners fall behind, and keeps
what ``health()`` reports (worker alive, the runners' last and sticky errors)."""

from __future__ import annotations

import threading
import time

from ..errors import UserError
from .live_admission import batch_key
from .live_batch import run_lockstep
from .live_stream import LiveStream, Stopped, StreamError
from .stream_state import CHUNK_FRAMES

# a failure after which the device (CUDA context) fails every later call
_STICKY = ("cuda error", "cudaerror", "illegal memory access", "device-side assert", "unspecified launch failure",
           "cublas_status", "cudnn_status", "nccl error", "device lost", "ecc error")


class Worker:
    """Mixed into LiveScheduler: its worker loop and health."""

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

    def _main(self) -> None:
        self.pipe.bind(threading.get_ident())
        try:
            if self.chunk_seconds is None:
                self.set_measured(self.measure_chunk_seconds())
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


def _is_sticky(text: str) -> bool:
    low = text.lower()
    return any(k in low for k in _STICKY)
