"""What the API runs requests on, behind one interface: the in-process runtime (the live-stream scheduler
of runtime/live.py on this host's runners) or a set of Triton nodes (api/cluster.py, api/triton_stream.py).

    backend = InProcessBackend.open_artifacts("engines/demo/artifacts")   # or TritonBackend("h1:8001,h2:8001")
    s = backend.open("a cat", num_frames=66, seed=0, height=None, width=None, image=None, owner=OWNER, **settings)
    s.id; s.next(timeout) -> Chunk | None; s.set_prompt(p) -> int; s.stop(); s.progress() -> dict
    backend.steer(stream_id, "set_prompt" | "stop" | "progress", owner, prompt)   # by id, from any replica
    backend.sizes        # ((height, width), ...) the default first
    backend.metrics()    # {"active_streams", "capacity", "load", ...}
    backend.health()     # {"live": bool, "ready": bool, "detail": str}

A bad request is a UserError, a full server StreamError(code="over_capacity"), an unknown stream (or one of
another owner) StreamError(code="not_found"), the same on both backends. ``owner`` (cluster.owner_of(key
label)) is kept with each stream: steering by id answers only its owner.
"""

from __future__ import annotations

import collections
import threading
import time

import numpy as np

from ..errors import UserError
from ..runtime.live import StreamError
from .cluster import Cluster
from .triton_stream import TritonStream

ACTIONS = ("set_prompt", "stop", "progress")
_OWNERS_KEPT = 10_000


def _not_found(stream_id: str) -> StreamError:
    return StreamError("not_found", f"no stream {stream_id!r} for this key",
                       fix="use the stream_id that session.started returned, with the key that opened it")


def _check_action(action: str, prompt) -> None:
    if action not in ACTIONS:
        raise UserError(f"unknown action {action!r}", expected=" | ".join(ACTIONS))
    if action == "set_prompt" and (not isinstance(prompt, str) or not prompt.strip()):
        raise UserError("empty prompt", expected="a non-empty text prompt")


class InProcessBackend:
    name = "in-process"

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.sizes = tuple(scheduler.pipe.sizes)
        self._owners: collections.OrderedDict[str, str] = collections.OrderedDict()

    @classmethod
    def open_artifacts(cls, artifacts, backend: str = "onnxruntime", device: str = "cpu", fps: float = 24.0,
                       max_streams: int | None = None, chunk_seconds: float | None = None) -> "InProcessBackend":
        from ..runtime import Pipeline
        from ..runtime.live import LiveScheduler

        pipe = Pipeline.from_artifacts(artifacts, backend=backend, device=device)
        return cls(LiveScheduler(pipe, fps=fps, max_streams=max_streams, chunk_seconds=chunk_seconds,
                                 queue=False).start())

    def count_encode(self, encode) -> bool:
        """Charge each stream's H.264 encode (``encode``: the API's EncodeMeter) to its chunk cost in the
        scheduler's admission when the runners run on this host's CPUs: the encoder threads take those same
        cores. Unit: a chunk's encode is seconds of one core; the runners' chunk time is wall time on all the
        cores they share, so the encode adds (encode seconds) / cores to it. True when counted (CPU runners)."""
        import os

        device = getattr(getattr(self.scheduler, "pipe", None), "device", None)
        if getattr(device, "type", str(device)) != "cpu" or not hasattr(self.scheduler, "overhead"):
            return False
        cores = max(1, len(os.sched_getaffinity(0)))
        self.scheduler.overhead = lambda state: (encode.seconds(tuple(state.size)) or 0.0) / cores
        return True

    def open(self, prompt: str, realtime: bool = True, owner: str | None = None, **request):
        """A live stream (paced to playback), or with ``realtime=False`` a job: its chunks may be made as far
        ahead as the runners allow, still after any live stream's nearer deadline."""
        stream = self.scheduler.open(prompt, lead=None if realtime else float("inf"), **request)
        self._owners[stream.id] = owner or ""
        while len(self._owners) > _OWNERS_KEPT:
            self._owners.popitem(last=False)
        return stream

    def stream(self, stream_id: str):
        return self.scheduler.stream(stream_id)

    def steer(self, stream_id: str, action: str, owner: str | None, prompt: str | None = None) -> dict:
        """Change the prompt of, stop, or read the stream ``stream_id`` if ``owner`` opened it."""
        _check_action(action, prompt)
        if self._owners.get(stream_id) != (owner or ""):
            raise _not_found(stream_id)
        if action == "set_prompt":
            return {"stream_id": stream_id, "from_chunk": self.scheduler.set_prompt(stream_id, prompt)}
        if action == "stop":
            self.scheduler.stop(stream_id)
            return {"stream_id": stream_id, "stopped": True}
        return {"stream_id": stream_id, **self.scheduler.stream(stream_id).progress()}

    def metrics(self) -> dict:
        return self.scheduler.metrics()

    def health(self) -> dict:
        """The scheduler's own health (worker alive, runners working) when it reports one, else its worker."""
        health = getattr(self.scheduler, "health", None)
        if callable(health):
            h = dict(health())
            h.setdefault("ready", h.get("live", False))
            return {"live": bool(h.get("live")), "ready": bool(h.get("ready")), "detail": h.get("detail")}
        worker = getattr(self.scheduler, "_thread", None)
        alive = worker is not None and worker.is_alive() and not getattr(self.scheduler, "_closed", False)
        return {"live": alive, "ready": alive, "detail": "the live scheduler's worker runs" if alive
                else "the live scheduler's worker thread is dead: no stream can make progress"}

    def close(self) -> bool:
        """Stop the scheduler; free the runners only when its worker has stopped (a worker still inside a
        runner call would be left driving freed sessions). True when everything was freed."""
        stopped = self.scheduler.close()
        if stopped is None:  # a scheduler that does not report it: look at its worker
            worker = getattr(self.scheduler, "_thread", None)
            stopped = worker is None or not worker.is_alive()
        if not stopped:
            import logging

            logging.getLogger("helios_deploy.api").warning(
                "the live scheduler's worker did not stop in time: its runners are left to the process exit")
            return False
        self.scheduler.pipe.close()
        return True


class TritonBackend:
    """Streams through the Triton nodes at ``url`` (several addresses, comma-separated, or a DNS name that
    resolves to several; re-resolved every ``refresh_s``). Each node admits by its own capacity;
    ``max_streams`` caps what this API sends at once (None: no cap of its own). With ``failover``, each
    stream's snapshot travels with its chunks and a stream whose node is lost or drains continues elsewhere."""

    name = "triton"

    def __init__(self, url, model: str = "helios", max_streams: int | None = None, admit_timeout: float = 60.0,
                 failover: bool = False, fps: float = 24.0, lost_after: float = 10.0, job_lost_after: float = 60.0,
                 refresh_s: float = 10.0, buffer: int = 4, job_buffer: int = 8):
        self.model, self.max_streams, self.admit_timeout, self.failover = model, max_streams, admit_timeout, failover
        self.fps, self.lost_after, self.job_lost_after = fps, lost_after, job_lost_after
        self.buffer, self.job_buffer = buffer, job_buffer
        self.cluster = Cluster(url, model=model, refresh_s=refresh_s)
        self.url = ",".join(self.cluster.targets)
        ready = self.cluster.ready()
        if not ready:
            self.cluster.close()
            raise UserError(f"no Triton node at {self.url} has model {model!r} ready",
                            found=", ".join(n.address for n in self.cluster.live(True)),
                            fix="start the servers, and pass their gRPC addresses (default port 8001)")
        self.sizes = ready[0].sizes()
        self.prompt_log = None  # share_prompts(): the prompt changes recorded in the shared job store
        self._streams: dict[int, TritonStream] = {}
        self._lock = threading.Lock()
        self.totals = {"streams": 0, "refused": 0, "failovers": 0}
        self._closed = threading.Event()
        threading.Thread(target=self._watch, name="helios-stream-watchdog", daemon=True).start()

    def open(self, prompt: str, *, num_frames: int = 33, seed: int = 0, image=None, height=None, width=None,
             realtime: bool = True, owner: str | None = None, **settings):
        from ..model.sizes import check_size_exported
        from ..serving.client import request_arrays

        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError("empty prompt", expected="a non-empty text prompt")
        h, w = check_size_exported(height or self.sizes[0][0], width or self.sizes[0][1], self.sizes)
        if image is not None:  # at the request's size, resized as the runtime does (the server's resize: none)
            from PIL import Image

            image = np.asarray(image.convert("RGB").resize((w, h), resample=Image.LANCZOS))
        arrays = request_arrays(prompt, image=image, height=h, width=w, num_frames=num_frames, seed=seed,
                                realtime=realtime, **{k: v for k, v in settings.items() if v is not None})
        if owner:
            arrays["owner"] = np.array([owner.encode("utf-8")], dtype=np.object_)
        stream = TritonStream(self, arrays, max(1, (num_frames + 32) // 33), realtime, owner)
        with self._lock:
            if self.max_streams is not None and len(self._streams) >= self.max_streams:
                self.totals["refused"] += 1
                raise StreamError("over_capacity", "over capacity: this API's --max-streams are all streaming",
                                  found=f"{len(self._streams)} streams of {self.max_streams}",
                                  fix="retry later, or add a GPU / replica")
            self._streams[id(stream)] = stream
        try:
            stream.place()
        except UserError as e:
            self._ended(stream)
            if getattr(e, "code", None) in ("over_capacity", "draining"):
                self.totals["refused"] += 1
                if getattr(e, "code", None) == "draining":
                    raise StreamError("over_capacity", str(e), found=e.found, fix=e.fix) from None
            raise
        self.totals["streams"] += 1
        return stream

    def share_prompts(self, store) -> None:
        """Record every prompt change a node accepts through this replica in ``store`` (the job store the API
        replicas share), and read them back before a stream held here is resumed (api/prompt_log.py)."""
        from .prompt_log import PromptLog

        self.prompt_log = PromptLog(store)

    def record_prompt(self, stream_id: str, from_chunk: int, prompt: str) -> None:
        if self.prompt_log is not None:
            self.prompt_log.record(stream_id, from_chunk, prompt)  # never fails the change: logged when it cannot

    def _ended(self, stream: TritonStream) -> None:
        with self._lock:
            self._streams.pop(id(stream), None)
        if self.prompt_log is not None and stream.id is not None:
            self.prompt_log.ended(stream.id)

    def _local(self, stream_id: str) -> TritonStream | None:
        with self._lock:
            return next((s for s in self._streams.values() if s.id == stream_id), None)

    def stream(self, stream_id: str):
        s = self._local(stream_id)
        if s is None:
            raise StreamError("not_found", f"no stream {stream_id!r}")
        return s

    def steer(self, stream_id: str, action: str, owner: str | None, prompt: str | None = None) -> dict:
        """A stream held here is steered through its own node connection; any other is asked of every node
        (the one holding it for this owner answers)."""
        _check_action(action, prompt)
        s = self._local(stream_id)
        if s is not None:
            if s.owner != (owner or ""):
                raise _not_found(stream_id)
            if action == "set_prompt":
                return {"stream_id": stream_id, "from_chunk": s.set_prompt(prompt)}
            if action == "stop":
                s.stop()
                return {"stream_id": stream_id, "stopped": True}
            return {"stream_id": stream_id, **s.progress()}
        _node, answer = self.cluster.broadcast(action, stream_id, owner or "", prompt)
        if "error" in answer:
            error = answer["error"]
            raise StreamError(error.get("code", "not_found"), error.get("message") or f"stream {stream_id}")
        if action == "set_prompt":  # the replica holding the stream reads it back should the node's note be lost
            self.record_prompt(stream_id, int(answer["from_chunk"]), prompt)
        return answer

    def _watch(self) -> None:
        while not self._closed.wait(0.25):
            now = time.perf_counter()
            with self._lock:
                streams = list(self._streams.values())
            for s in streams:
                s.check(now)

    def metrics(self) -> dict:
        """Active streams of this API; capacity and load are its --max-streams cap's (0 without one: the
        nodes' own load is Triton's helios_live_load); ``cluster_demand`` from the nodes' capacity answers."""
        with self._lock:
            active = sum(s.status in ("running", "moving") for s in self._streams.values())
        cap = self.max_streams or 0
        return {"active_streams": active, "capacity": cap, "load": active / cap if cap else 0.0,
                "nodes": len(self.cluster.live()), "cluster_demand": self.cluster.demand(), **self.totals}

    def health(self) -> dict:
        """Live while this process runs; ready when at least one node's ``helios`` model is ready."""
        nodes = self.cluster.live(include_down=True)
        ready = self.cluster.ready()
        return {"live": True, "ready": bool(ready),
                "detail": f"{len(ready)} of {len(nodes)} Triton node(s) ready"
                          + ("" if ready else f" at {self.url}: none can serve")}

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            streams = list(self._streams.values())
        for s in streams:
            s.stop(timeout=2.0)
        self.cluster.close()
        if self.prompt_log is not None:
            self.prompt_log.close()
