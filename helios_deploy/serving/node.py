"""One Triton node's streams: a LiveScheduler per device (GPU, or the CPU) behind one ``helios`` model instance,
placement of new streams inside the node, ownership, and the answers to control requests.

    node = Node([LiveScheduler(pipe_gpu0).start(), LiveScheduler(pipe_gpu1).start()], devices=["cuda:0", "cuda:1"])
    stream = node.open(owner="9f86d0...", prompt="a cat", num_frames=330, seed=0)   # a LiveStream
    node.control("set_prompt", stream.id, owner="9f86d0...", prompt="a dog")      # -> {"stream_id", "from_chunk"}
    node.control("capacity")   # -> {"capacity", "active", "queued", "free", "draining", "demand", "schedulers"}

Placement: a new stream goes to the scheduler with the most free capacity (its real-time streams minus its
active ones; then the lower load); a scheduler that refuses it (over capacity) passes it to the next, so one
full GPU never refuses while another of the node has room, and each GPU's capacity is measured once, by its
own scheduler. Only when every scheduler refuses is the stream refused (StreamError over_capacity), and that
refusal counts as demand for 60 s (``demand``: (active + queued + refused in the last 60 s) / capacity, which
passes 1 when more is asked than the node holds).

Ownership: the ``owner`` given at open (the API passes the sha256 hex of the API key) is kept with the stream;
a control request is answered only when its owner matches, else exactly as an unknown id (not_found), so a
caller can ask every node by id and learn nothing about others' streams.

Prompt changes reach the stream's own response channel: ``watch(stream_id, listener)`` (the model registers one
per stream it answers) gets ``{"stream_id", "prompt", "from_chunk"}`` for every change the node accepts, from
any caller, before the caller's answer and in the order the changes apply, so whoever holds the stream's
failover state can fold into it a change made after its last snapshot (api/triton_stream.py).

Answers are JSON-able dicts; an error is ``{"error": {"code", "message"}}`` with code not_found, finished,
bad_request or bad_action, and no other answer has an ``error`` key (a stream's progress names its failure
``failure``); docs/serving.md has the protocol.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable, Sequence

from ..errors import UserError
from ..runtime.live import StreamError
from .configs import ACTIONS

REFUSAL_WINDOW = 60.0  # seconds a refused open counts as demand
_REMEMBERED = 10_000  # stream ids whose owner (and scheduler) the node remembers after they end


def error_answer(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


class Node:
    """The schedulers of one node (one per device) and the owners of their streams; thread-safe."""

    def __init__(self, schedulers: Sequence, devices: Sequence[str] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if not schedulers:
            raise UserError("a node needs at least one scheduler")
        self.schedulers = list(schedulers)
        self.devices = list(devices or [f"scheduler{i}" for i in range(len(self.schedulers))])
        self.draining = False
        self._clock = clock
        self._lock = threading.Lock()
        self._streams: collections.OrderedDict[str, tuple[str, int]] = collections.OrderedDict()  # id -> (owner, i)
        self._refused: collections.deque[float] = collections.deque()
        self._sending = 0  # streams whose responses are still being sent (their last one not yet)
        self._listeners: dict[str, Callable[[dict], None]] = {}  # stream id -> its prompt-change listener
        self._steering = threading.Lock()  # prompt changes: applied and announced one at a time, in order

    # -- opening ---------------------------------------------------------------------------------
    def _free(self, i: int) -> tuple[float, float]:
        m = self.schedulers[i].metrics()
        return m["capacity"] - m["active_streams"] - m["queued_streams"], -m["load"]

    def placement_order(self) -> list[int]:
        """Scheduler indices, the one with the most free capacity first."""
        return sorted(range(len(self.schedulers)), key=self._free, reverse=True)

    def open(self, owner: str = "", **request):
        """Open a stream (keywords as LiveScheduler.open, among them ``due_in`` for a resume, ``stream_id`` for a
        stream opened again from its start and ``prompt_changes`` for the changes made before) on the scheduler
        with the most free capacity, the next one on a refusal; StreamError draining / over_capacity when no
        scheduler takes it."""
        if self.draining:
            raise StreamError("draining", "this node is draining (shutting down): it takes no new streams",
                              fix="open the stream on another node")
        refusal = None
        for i in self.placement_order():
            try:
                stream = self.schedulers[i].open(**request)
            except StreamError as e:
                if e.code != "over_capacity":
                    raise
                refusal = e
                continue
            self._remember(stream.id, owner, i)
            return stream
        with self._lock:
            self._refused.append(self._clock())
        raise refusal

    def _remember(self, stream_id: str, owner: str, index: int) -> None:
        with self._lock:
            self._streams[stream_id] = (owner, index)
            while len(self._streams) > _REMEMBERED:
                self._streams.popitem(last=False)

    def device_of(self, stream_id: str) -> str | None:
        with self._lock:
            entry = self._streams.get(stream_id)
        return None if entry is None else self.devices[entry[1]]

    def watch(self, stream_id: str, listener: Callable[[dict], None] | None) -> None:
        """``listener(note)`` is called with ``{"stream_id", "prompt", "from_chunk"}`` for each prompt change the
        node accepts for the stream (None: no more)."""
        with self._lock:
            if listener is None:
                self._listeners.pop(stream_id, None)
            else:
                self._listeners[stream_id] = listener

    def unwatch(self, stream_id: str, listener: Callable[[dict], None]) -> None:
        """Remove ``listener`` if it is still the stream's (a stream resumed here since has its own)."""
        with self._lock:
            if self._listeners.get(stream_id) is listener:
                del self._listeners[stream_id]

    def _set_prompt(self, scheduler, stream_id: str, prompt: str) -> dict:
        """Apply the change, then tell the stream's own channel (before the caller is answered)."""
        with self._steering:
            at = scheduler.set_prompt(stream_id, prompt)
            with self._lock:
                listener = self._listeners.get(stream_id)
            if listener is not None:
                try:
                    listener({"stream_id": stream_id, "prompt": prompt, "from_chunk": at})
                except Exception:  # noqa: BLE001 - the stream's channel is gone: nobody holds its state
                    pass
        return {"stream_id": stream_id, "from_chunk": at}

    # -- control ---------------------------------------------------------------------------------
    def control(self, action: str, stream_id: str | None = None, owner: str = "", prompt: str | None = None) -> dict:
        """One control request's answer (a JSON-able dict; errors as ``{"error": {...}}``, never raised)."""
        if action not in ACTIONS:
            return error_answer("bad_action", f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
        if action == "capacity":
            return self.capacity()
        if action == "drain":
            return {"draining": True, "streams": self.drain()}
        if not stream_id:
            return error_answer("bad_request", f"action {action} needs input 'stream_id'")
        with self._lock:
            entry = self._streams.get(stream_id)
        if entry is None or entry[0] != (owner or ""):
            return error_answer("not_found", f"no stream {stream_id!r} on this node")
        scheduler = self.schedulers[entry[1]]
        try:
            if action == "set_prompt":
                return self._set_prompt(scheduler, stream_id, prompt or "")
            if action == "stop":
                scheduler.stop(stream_id)
                return {"stream_id": stream_id, "stopped": True}
            progress = scheduler.stream(stream_id).progress()
            progress["failure"] = progress.pop("error", None)  # "error" is reserved for an error answer
            return {"stream_id": stream_id, **progress}
        except StreamError as e:
            return error_answer(e.code, e.render())
        except UserError as e:
            return error_answer("bad_request", e.render())

    # -- capacity, demand, drain -----------------------------------------------------------------
    def refused_recent(self) -> int:
        now = self._clock()
        with self._lock:
            while self._refused and self._refused[0] < now - REFUSAL_WINDOW:
                self._refused.popleft()
            return len(self._refused)

    def capacity(self) -> dict:
        """{"capacity": real-time streams the node holds (sum over its schedulers), "active", "queued",
        "free": capacity - active, "draining", "demand", "streams": streams whose last response is not yet sent
        (a drain is complete at 0), "live": every scheduler's worker runs and its runners work (LiveScheduler.health),
        "schedulers": [per device]}."""
        per = [s.metrics() for s in self.schedulers]
        capacity = sum(m["capacity"] for m in per)
        active = sum(m["active_streams"] for m in per)
        queued = sum(m["queued_streams"] for m in per)
        health = [s.health() if hasattr(s, "health") else {"live": True, "detail": ""} for s in self.schedulers]
        with self._lock:
            streams = self._sending
        return {"capacity": capacity, "active": active, "queued": queued, "free": capacity - active,
                "draining": self.draining, "demand": self._demand(capacity, active, queued), "streams": streams,
                "live": all(h["live"] for h in health),
                "schedulers": [{"device": d, "capacity": m["capacity"], "active": m["active_streams"],
                                "queued": m["queued_streams"], "load": m["load"], "chunk_seconds": m["chunk_seconds"],
                                "live": h["live"], "detail": h["detail"]}
                               for d, m, h in zip(self.devices, per, health)]}

    def _demand(self, capacity: int, active: int, queued: int) -> float:
        """(active + queued + refused in the last 60 s) / capacity; a node whose runners are slower than real
        time still takes one stream, so its capacity counts as 1."""
        return (active + queued + self.refused_recent()) / max(capacity, 1)

    def metrics(self) -> dict:
        """The schedulers' metrics summed (scheduler.metrics() keys), with ``load`` averaged and
        ``demand`` / ``draining`` added: what serving/live_metrics.py publishes."""
        per = [s.metrics() for s in self.schedulers]
        out = {k: sum(m[k] for m in per) for k in per[0] if isinstance(per[0][k], (int, float)) and k != "fps"}
        out["load"] = sum(m["load"] for m in per) / len(per)
        out["chunk_seconds"] = max(m["chunk_seconds"] or 0.0 for m in per)
        out["demand"] = self._demand(out["capacity"], out["active_streams"], out["queued_streams"])
        out["draining"] = float(self.draining)
        return out

    def drain(self) -> int:
        """Stop admitting; each open stream ends after its current chunk with status "moved" and its snapshot
        (LiveScheduler.drain). Returns how many streams are being moved."""
        self.draining = True
        return sum(s.drain() for s in self.schedulers)

    def sending(self, delta: int) -> None:
        """The model counts the streams it is still answering (+1 at open, -1 after the last response)."""
        with self._lock:
            self._sending += delta

    def close(self) -> None:
        for s in self.schedulers:
            s.close()
