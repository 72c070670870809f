"""One stream (live, or a video job) served by the Triton nodes of a Cluster, as the API reads it: the same
interface as the runtime's LiveStream (next / set_prompt / stop / progress), with failover inside.

The stream is placed on the node with the most free capacity (a refusal moves it to the next), and stays
there. With failover on, every chunk response carries the stream's snapshot (``state``); the latest one is
kept here. When the node is lost (its connection breaks, it fails the stream, or no chunk comes within
``lost_after`` seconds) or drains the stream (``{"moved": true}``), the stream is opened again on another
node with ``resume`` = that snapshot: same id, the next chunk, the same prompt schedule. The reader of
``next()`` never notices but for the wait; ``nodes`` lists where the stream ran, in order.

Prompt changes: the node announces every change it accepts for the stream on the stream's own channel
(``{"stream_id", "prompt", "from_chunk"}``, whichever API replica made it), in the order they apply; they are
kept here and sent with a resume (or with a stream's open from its start, lost before its first snapshot) as
``prompt_changes``, which the next node applies to the stream's state before admission, so a change made after the
last snapshot (through this replica or another) applies at the same chunk there. The replica that gets a node's
answer to a change also records it in the shared job store (api/prompt_log.py); before a resume the changes
recorded there that no note told are added, so a change whose note died with the node is not lost either.

Chunks wait in a bounded buffer (``buffer`` chunks): a reader that falls that far behind ends the stream with
StreamError("too_slow") instead of growing memory (the node's reader thread, shared by all of its streams,
must never block).
"""

from __future__ import annotations

import collections
import json
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from ..runtime.live import StreamError
from ..serving.node_connection import NodeUnavailable, Reply, text_array
from .cluster import Node
from .prompt_log import missing

CHUNK_FRAMES = 33
STOP_TIMEOUT = 5.0
PROMPT_NOTE_WAIT = 1.0  # seconds set_prompt waits for the node's own note of the change on the stream's channel


@dataclass
class Chunk:
    index: int
    frames: np.ndarray  # uint8 [T, H, W, 3]
    seconds: float  # since the stream was opened


class _Buffer:
    """A bounded chunk buffer whose end mark always fits."""

    def __init__(self, limit: int):
        self.limit, self.items, self.ended = limit, collections.deque(), False
        self.cond = threading.Condition()

    def put(self, chunk) -> bool:
        with self.cond:
            if len(self.items) >= self.limit:
                return False
            self.items.append(chunk)
            self.cond.notify_all()
            return True

    def end(self) -> None:
        with self.cond:
            self.ended = True
            self.cond.notify_all()

    def get(self, timeout: float | None):
        with self.cond:
            if not self.cond.wait_for(lambda: self.items or self.ended, timeout):
                raise TimeoutError
            return self.items.popleft() if self.items else None


@dataclass
class _Attempt:
    """The stream's request on one node."""

    node: Node
    admitted: threading.Event = field(default_factory=threading.Event)
    request_id: str = ""
    stream_id: str | None = None
    refusal: Exception | None = None
    done: bool = False


class TritonStream:
    def __init__(self, backend, arrays: dict, num_chunks: int, realtime: bool, owner: str | None):
        self.id: str | None = None
        self.num_chunks, self.realtime, self.owner = num_chunks, realtime, owner or ""
        self.status, self.error = "opening", None
        self.nodes: list[str] = []
        self.failovers, self.chunks_done = 0, 0
        self.reasons: list[str] = []  # why each failover happened
        self.timeline: list[dict] = []  # per failover, wall-clock times (time.time()): lost, tried, admitted, chunk
        self.first_chunk_latency: float | None = None
        self.lateness: list[float] = []
        self.gaps: list[float] = []  # seconds between consecutive chunks' arrivals
        self._backend, self._arrays = backend, arrays
        self._opened = time.perf_counter()
        self._t0: float | None = None  # admission on the first node: the deadlines count from here
        self._last = time.perf_counter()  # the last sign of life (admission or chunk)
        self._out = _Buffer(backend.buffer if realtime else backend.job_buffer)
        self._lock = threading.Lock()
        self._attempt: _Attempt | None = None
        self._state: bytes | None = None  # the snapshot after chunk chunks_done - 1
        self._prompts: list[tuple[int, str]] = []  # (from chunk, prompt) in the order applied (re-applied on resume)
        self._noted = threading.Condition(self._lock)

    # -- placement -------------------------------------------------------------------------------
    def place(self, exclude: tuple = ()) -> None:
        """Open (or, with a snapshot, resume) the stream on the node with the most free capacity that takes it;
        the node's refusal (over capacity, draining, unreachable) moves it to the next. Raises the last refusal,
        or a bad request's UserError at once."""
        arrays = self._open_arrays()
        self._mark("placing")
        nodes = self._backend.cluster.ranked(exclude, reserve=True)
        self._mark("ranked", ",".join(n.address for n in nodes))
        if not nodes:
            raise StreamError("over_capacity", "no Triton node can take the stream: none answers, or all drain",
                              found=", ".join(n.address for n in self._backend.cluster.live(True)) or "no nodes",
                              fix="retry later, or add a node")
        refusals = []
        for i, node in enumerate(nodes):
            try:
                self._try(node, arrays, reserved=i == 0)
                return
            except StreamError as e:
                if e.code not in ("over_capacity", "draining"):
                    raise
                refusals.append(f"{node.address}: {e.code}")
            except NodeUnavailable as e:
                refusals.append(f"{node.address}: {e.what}")
        raise StreamError("over_capacity", f"over capacity: every Triton node ({len(nodes)}) refused the stream",
                          found="; ".join(refusals), fix="retry later, or add a node")

    def _open_arrays(self) -> dict:
        """The open's inputs: the first open's; a stream lost before its first chunk: again from its start under its
        id with the prompt changes made meanwhile; else a resume of the last snapshot with the changes made after it.
        Either way with the changes recorded in the shared store that no note told this replica."""
        arrays = dict(self._arrays)
        if self._backend.failover:
            arrays["failover"] = np.array([True])
        if self.id is None:
            return arrays
        self._merge_recorded()
        with self._lock:
            prompts = list(self._prompts)
        if self._state is None:  # lost before its first chunk: again from its start,
            arrays["stream_id"] = text_array(self.id)  # under the id its viewer and the other replicas know
        else:
            arrays["resume"] = text_array(self._state)
        if prompts:  # applied by the node before admission, as set_prompt did on the lost node (those already in
            arrays["prompt_changes"] = text_array(json.dumps([[at, p] for at, p in prompts]))  # the state: no change)
        if self.realtime and self._t0 is not None:  # either way its viewer's playback deadline goes with it
            due = self.deadline(self.chunks_done) - time.perf_counter()
            arrays["due_in"] = np.array([max(0.0, due)], dtype=np.float32)
        return arrays

    def _merge_recorded(self) -> None:
        """Add the prompt changes recorded in the shared store (by whichever replica got the node's answer) that no
        note on the stream's channel told this replica: one whose note died with the node (api/prompt_log.py)."""
        log = self._backend.prompt_log
        recorded = log.changes(self.id) if log is not None else None
        if recorded:
            with self._noted:
                self._prompts.extend(missing(self._prompts, recorded))

    def _try(self, node: Node, arrays: dict, reserved: bool = False) -> None:
        try:
            self._try_on(node, arrays, reserved)
        except UserError as e:
            self._mark("tried", f"{node.address}: {getattr(e, 'code', None) or type(e).__name__}")
            raise

    def _mark(self, event: str, detail: str | None = None) -> None:
        """A failover's moment (wall clock, comparable across processes) in ``timeline``."""
        if self.timeline and self.status == "moving":
            entry = self.timeline[-1]
            if event == "tried":
                entry.setdefault("refused", []).append([detail, time.time()])
            else:
                entry[event], entry[event + "_node"] = time.time(), detail

    def _try_on(self, node: Node, arrays: dict, reserved: bool) -> None:
        """``reserved``: placement already counted this open on ``node`` (Cluster.ranked(reserve=True))."""
        attempt = _Attempt(node)
        with self._lock:
            self._attempt = attempt
        if not reserved:
            node.reserve()  # counted in placement until the node's capacity answer shows it: a burst spreads
        try:
            attempt.request_id = node.send(arrays, lambda reply: self._on_reply(attempt, reply))
            admitted = attempt.admitted.wait(self._backend.admit_timeout)
        finally:
            node.settle(admitted=bool(attempt.stream_id) and attempt.refusal is None)
        if not admitted:
            node.forget(attempt.request_id)
            raise NodeUnavailable(f"the Triton node {node.address} did not start the stream within "
                                  f"{self._backend.admit_timeout:g} s")
        if attempt.refusal is not None:
            raise attempt.refusal
        self._mark("admitted", node.address)
        with self._lock:
            self.id = self.id or attempt.stream_id
            self.nodes.append(node.address)
            self.status = "running" if self.status in ("opening", "moving") else self.status
            now = time.perf_counter()
            self._t0 = self._t0 or now
            self._last = now
        if self.status == "stopped":  # stopped while it was moving: not on the new node either
            self._stop_on(node)
            node.forget(attempt.request_id)

    # -- replies (on the node's reader thread: never block) ----------------------------------------
    def _on_reply(self, attempt: _Attempt, reply: Reply) -> None:
        if not attempt.admitted.is_set():
            return self._on_opening(attempt, reply)
        if attempt is not self._attempt or attempt.done:
            return  # an earlier node's late answer
        if reply.kind == "response":
            note = reply.json("control") or {}
            index = reply.output("chunk_index")
            if index is not None and int(index.reshape(-1)[0]) >= 0:
                self._deliver(attempt, int(index.reshape(-1)[0]), reply)
            elif "from_chunk" in note and "prompt" in note:
                self._note_prompt(int(note["from_chunk"]), note["prompt"])
            elif note.get("moved"):
                attempt.node.drained()
                self._keep_state(reply)
                self._lose(attempt, "the node drained the stream (moved)")
            elif "error" in note:
                self._lose(attempt, f"the node failed the stream: {note['error'].get('message')}")
        elif reply.kind == "final":
            attempt.done = True
            self._end("completed" if self.chunks_done >= self.num_chunks else "stopped")
        else:  # error / lost
            self._lose(attempt, reply.message or reply.kind)

    def _on_opening(self, attempt: _Attempt, reply: Reply) -> None:
        if reply.kind == "response":
            note = reply.json("control") or {}
            if "error" in note:
                attempt.refusal = _refusal(note["error"], attempt.node)
            else:
                attempt.stream_id = reply.text("stream_id") or note.get("stream_id")
            if attempt.refusal is not None or attempt.stream_id is not None:
                attempt.done = attempt.refusal is not None
                attempt.admitted.set()
        else:
            attempt.refusal = attempt.refusal or NodeUnavailable(
                f"the Triton node {attempt.node.address} failed the open", found=reply.message or reply.kind)
            attempt.done = True
            attempt.admitted.set()

    def _note_prompt(self, at: int, prompt: str) -> None:
        with self._noted:
            self._prompts.append((at, prompt))
            self._noted.notify_all()

    def _keep_state(self, reply: Reply) -> None:
        state = reply.output("state")
        if state is not None and state.size:
            raw = state.reshape(-1)[0]
            self._state = raw if isinstance(raw, bytes) else bytes(raw)

    def _deliver(self, attempt: _Attempt, index: int, reply: Reply) -> None:
        if index < self.chunks_done:
            return  # already delivered before a resume
        now = time.perf_counter()
        chunk = Chunk(index, reply.output("frames"), now - self._opened)
        if not self._out.put(chunk):
            self.error = StreamError("too_slow", f"stream {self.id}: the reader fell {self._out.limit} chunks behind",
                                     fix="read the stream as fast as it plays (a slow connection?)")
            attempt.done = True
            threading.Thread(target=self._stop_on, args=(attempt.node,), daemon=True).start()
            return self._end("failed")
        self._keep_state(reply)
        if self.timeline and "chunk" not in self.timeline[-1]:
            self.timeline[-1]["chunk"], self.timeline[-1]["chunk_index"] = time.time(), index
        if self.first_chunk_latency is None:
            self.first_chunk_latency = now - self._opened
        else:
            self.gaps.append(now - self._last)
        if self.realtime:
            self.lateness.append(now - self.deadline(index))
        self.chunks_done, self._last = index + 1, now

    def deadline(self, index: int) -> float:
        """Chunk ``index``'s playback deadline: admission + a first-chunk budget of one chunk-time + k chunk-times."""
        period = CHUNK_FRAMES / self._backend.fps
        return self._t0 + period + index * period

    # -- failover ----------------------------------------------------------------------------------
    def _lose(self, attempt: _Attempt, reason: str) -> None:
        with self._lock:
            if attempt is not self._attempt or attempt.done or self.status not in ("running",):
                return
            attempt.done, self.status = True, "moving"
            self.timeline.append({"reason": reason, "lost": time.time(), "from": attempt.node.address})
        attempt.node.forget(attempt.request_id)
        threading.Thread(target=self._failover, args=(attempt, reason), name=f"helios-failover-{self.id}",
                         daemon=True).start()

    def _failover(self, attempt: _Attempt, reason: str) -> None:
        if not self._backend.failover or (self._state is None and self.chunks_done > 0):
            self.error = StreamError("node_lost", f"stream {self.id}: its Triton node {attempt.node.address} was lost",
                                     found=reason, fix="serve with --failover to continue streams on another node")
            return self._end("failed")
        self.reasons.append(reason)
        if attempt.node.up and "moved" not in reason:  # alive but silent: stop its copy before going on
            self._stop_on(attempt.node, timeout=2.0)
        try:
            self.place(exclude=(attempt.node,))
        except UserError as e:
            self.error = StreamError("node_lost", f"stream {self.id}: no other Triton node took it over after "
                                     f"{reason}", found=e.render())
            return self._end("failed")
        self.failovers += 1
        self._backend.totals["failovers"] += 1

    def check(self, now: float) -> None:
        """The backend's watchdog: a running stream with no chunk for ``lost_after`` seconds (jobs:
        ``job_lost_after``) counts its node as lost."""
        limit = self._backend.lost_after if self.realtime else self._backend.job_lost_after
        attempt = self._attempt
        if self.status == "running" and attempt is not None and now - self._last > limit:
            self._lose(attempt, f"no chunk within {limit:g} s")

    # -- the reader's side -------------------------------------------------------------------------
    def next(self, timeout: float | None = None):
        try:
            chunk = self._out.get(timeout)
        except TimeoutError:
            raise TimeoutError(f"stream {self.id}: no chunk within {timeout:g} s") from None
        if chunk is None and self.error is not None:
            raise self.error
        return chunk

    def __iter__(self):
        while (chunk := self.next()) is not None:
            yield chunk

    def _end(self, status: str) -> None:
        with self._lock:
            if self.status in ("completed", "stopped", "failed"):
                return
            self.status = status
        self._out.end()
        self._backend._ended(self)

    def _control(self, action: str, prompt: str | None = None, timeout: float = STOP_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while self.status in ("moving", "opening") and time.monotonic() < deadline:
            time.sleep(0.02)  # a failover in progress: the stream is about to be on its next node
        attempt = self._attempt
        if attempt is None or self.id is None:
            raise StreamError("not_found", f"stream {self.id} is not running")
        answer = attempt.node.control(action, self.id, self.owner, prompt,
                                      timeout=max(0.1, deadline - time.monotonic()))
        if "error" in answer:
            raise StreamError(answer["error"].get("code", "not_found"), answer["error"].get("message", ""))
        return answer

    def set_prompt(self, prompt: str) -> int:
        """The prompt from the stream's next chunk not yet started (on its node); that chunk's index."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError("empty prompt", expected="a non-empty text prompt")
        with self._noted:
            seen = len(self._prompts)
        at = int(self._control("set_prompt", prompt)["from_chunk"])
        self._backend.record_prompt(self.id, at, prompt)  # in the shared store: the holder may be another replica
        with self._noted:  # the node's note comes before its answer; a node that sends none: keep the answer
            if not self._noted.wait_for(lambda: (at, prompt) in self._prompts[seen:], PROMPT_NOTE_WAIT):
                self._prompts.append((at, prompt))
        return at

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """End the stream now; the node is told within ``timeout`` seconds or not at all (never blocks longer)."""
        if self.status in ("completed", "stopped", "failed"):
            return
        attempt = self._attempt
        self._end("stopped")
        if attempt is not None and not attempt.done:
            attempt.done = True
            self._stop_on(attempt.node, timeout)
            attempt.node.forget(attempt.request_id)

    def _stop_on(self, node: Node, timeout: float = STOP_TIMEOUT) -> None:
        try:
            node.control("stop", self.id, self.owner, timeout=timeout)
        except UserError:
            pass  # unreachable or already ended: nothing left to stop

    def progress(self) -> dict:
        return {"id": self.id, "status": self.status, "chunks_done": self.chunks_done, "num_chunks": self.num_chunks,
                "first_chunk_latency_s": self.first_chunk_latency, "lateness_s": list(self.lateness),
                "misses": sum(1 for x in self.lateness if x > 0), "nodes": list(self.nodes),
                "failovers": self.failovers, "failover_reasons": list(self.reasons),
                "failover_timeline": [dict(t) for t in self.timeline],
                "max_gap_s": max(self.gaps, default=None),
                "state_bytes": None if self._state is None else len(self._state),
                "error": None if self.error is None else str(self.error)}


def _refusal(error: dict, node: Node) -> Exception:
    """A node's answer to a refused open: over capacity / draining as StreamError, a bad request as UserError."""
    code, message = error.get("code", "internal"), error.get("message", "")
    if code in ("over_capacity", "draining"):
        return StreamError(code, f"over capacity: the Triton node {node.address} refused the stream ({code})",
                           found=message.splitlines()[0] if message else None, fix="retry later, or add a node")
    if code == "bad_request":
        return UserError("the Triton node refused the request", found=message)
    return NodeUnavailable(f"the Triton node {node.address} failed the open ({code})", found=message)
