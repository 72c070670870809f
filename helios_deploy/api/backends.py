"""What the API runs requests on, behind one interface: the in-process runtime (the live-stream scheduler
of runtime/live.py on this host's runners) or a Triton server (gRPC streaming through HeliosClient).

    backend = InProcessBackend.open("engines/demo/artifacts")      # or TritonBackend("host:8001")
    s = backend.open("a cat", num_frames=66, seed=0, height=None, width=None, image=None, **settings)
    s.id; s.next(timeout) -> Chunk | None; s.set_prompt(p) -> int; s.stop(); s.progress() -> dict
    backend.sizes        # ((height, width), ...) the default first
    backend.metrics()    # {"active_streams", "capacity", "load", ...}

A bad request is a UserError, a full server StreamError(code="over_capacity"), an unknown stream
StreamError(code="not_found"), the same on both backends.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time

import numpy as np

from ..errors import UserError
from ..runtime.live import StreamError


class InProcessBackend:
    name = "in-process"

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.sizes = tuple(scheduler.pipe.sizes)

    @classmethod
    def open_artifacts(cls, artifacts, backend: str = "onnxruntime", device: str = "cpu", fps: float = 24.0,
                       max_streams: int | None = None, chunk_seconds: float | None = None) -> "InProcessBackend":
        from ..runtime import Pipeline
        from ..runtime.live import LiveScheduler

        pipe = Pipeline.from_artifacts(artifacts, backend=backend, device=device)
        return cls(LiveScheduler(pipe, fps=fps, max_streams=max_streams, chunk_seconds=chunk_seconds,
                                 queue=False).start())

    def open(self, prompt: str, realtime: bool = True, **request):
        """A live stream (paced to playback), or with ``realtime=False`` a job: its chunks may be made as far
        ahead as the runners allow, still after any live stream's nearer deadline."""
        return self.scheduler.open(prompt, lead=None if realtime else float("inf"), **request)

    def stream(self, stream_id: str):
        return self.scheduler.stream(stream_id)

    def metrics(self) -> dict:
        return self.scheduler.metrics()

    def close(self) -> None:
        self.scheduler.close()
        self.scheduler.pipe.close()


_END = object()


class TritonStream:
    """One request to the Triton ``helios`` model, read by a thread into a queue (as LiveStream is). The
    server answers a stream it admits with its id at once, and one it refuses with an error: ``admitted``
    waits for either."""

    def __init__(self, backend: "TritonBackend", arrays: dict, num_chunks: int):
        from ..serving.client import HeliosClient

        self.id, self.num_chunks, self.status = secrets.token_hex(8), num_chunks, "running"
        self.chunks_done, self.error, self.first_chunk_latency = 0, None, None
        self._backend, self._stopped = backend, threading.Event()
        self._client = HeliosClient(backend.url, model=backend.model)  # its own: it records this stream's id
        self._out: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(arrays,), name=f"triton-{self.id}", daemon=True)
        self._thread.start()

    def _read(self, arrays: dict) -> None:
        t0 = time.perf_counter()
        chunks = self._client.stream_arrays(arrays)
        try:
            for chunk in chunks:
                if self._stopped.is_set():
                    break  # closing the generator cancels the request on the server
                self.first_chunk_latency = self.first_chunk_latency or time.perf_counter() - t0
                self.chunks_done += 1
                self._out.put(chunk)
            self.status = "stopped" if self._stopped.is_set() else "completed"
        except Exception as e:  # noqa: BLE001 - the stream's error goes to its reader
            self.error = _refusal(e)  # before the status: admitted() reads the status first
            self.status = "failed"
        finally:
            chunks.close()
            self._client.close()
            self._backend._ended(self)
            self._out.put(_END)

    def admitted(self, timeout: float) -> None:
        """Wait until the server has named the stream (admitted it); raise its refusal (bad request, over
        capacity) as the in-process backend would."""
        deadline = time.monotonic() + timeout
        while self._client.stream_id is None and self.status == "running":
            if time.monotonic() > deadline:
                self.stop()
                raise UserError(f"the Triton server did not start the stream within {timeout:g} s")
            time.sleep(0.005)
        if self.error is not None and self._client.stream_id is None:
            raise self.error

    def next(self, timeout: float | None = None):
        try:
            item = self._out.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"stream {self.id}: no chunk within {timeout:g} s") from None
        if item is _END:
            self._out.put(_END)
            if self.error is not None:
                raise self.error
            return None
        return item

    def set_prompt(self, prompt: str) -> int:
        """Through the ``helios_control`` model: from the stream's next chunk not yet started."""
        return self._client.set_prompt(self._client.stream_id, prompt)

    def stop(self) -> None:
        self._stopped.set()
        if self.status == "running" and self._client.stream_id is not None:
            try:  # at once on the server, not at the next chunk's arrival
                self._client.stop(self._client.stream_id)
            except UserError:
                pass  # it ended meanwhile
        self.status = "stopped"
        self._backend._ended(self)

    def progress(self) -> dict:
        return {"id": self.id, "status": self.status, "chunks_done": self.chunks_done, "num_chunks": self.num_chunks,
                "first_chunk_latency_s": self.first_chunk_latency, "misses": 0, "lateness_s": [],
                "error": None if self.error is None else str(self.error)}


def _refusal(e: Exception) -> Exception:
    """The server's over-capacity refusal as the scheduler's StreamError; anything else as it is."""
    if isinstance(e, UserError) and "over capacity" in (e.found or ""):
        return StreamError("over_capacity", "over capacity: the Triton server is serving all the real-time "
                           "streams it can", found=e.found, fix="retry later, or add a GPU / replica")
    return e


class TritonBackend:
    """Streams through a Triton server, which admits each stream by its capacity; ``max_streams`` caps the
    streams this API sends at once (None: no cap of its own)."""

    name = "triton"

    def __init__(self, url: str, model: str = "helios", max_streams: int | None = None,
                 admit_timeout: float = 60.0):
        from ..serving.client import HeliosClient

        self.url, self.model, self.max_streams, self.admit_timeout = url, model, max_streams, admit_timeout
        with HeliosClient(url, model=model) as client:
            client.check_ready()
            self.sizes = client.sizes()
        self._streams: dict[str, TritonStream] = {}
        self._lock = threading.Lock()
        self.totals = {"streams": 0, "refused": 0}

    def open(self, prompt: str, *, num_frames: int = 33, seed: int = 0, image=None, height=None, width=None,
             realtime: bool = True, **settings):
        from ..serving.client import request_arrays
        from ..model.sizes import check_size_exported

        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError("empty prompt", expected="a non-empty text prompt")
        h, w = check_size_exported(height or self.sizes[0][0], width or self.sizes[0][1], self.sizes)
        if image is not None:  # at the request's size, resized as the runtime does (the server's resize: none)
            from PIL import Image

            image = np.asarray(image.convert("RGB").resize((w, h), resample=Image.LANCZOS))
        arrays = request_arrays(prompt, image=image, height=h, width=w, num_frames=num_frames, seed=seed,
                                realtime=realtime, **{k: v for k, v in settings.items() if v is not None})
        with self._lock:
            if self.max_streams is not None and len(self._streams) >= self.max_streams:
                self.totals["refused"] += 1
                raise StreamError("over_capacity", "over capacity: this API's --max-streams are all streaming",
                                  found=f"{len(self._streams)} streams of {self.max_streams}",
                                  fix="retry later, or add a GPU / replica")
            stream = TritonStream(self, arrays, max(1, (num_frames + 32) // 33))
            self._streams[stream.id] = stream
        try:
            stream.admitted(self.admit_timeout)
        except StreamError:
            self.totals["refused"] += 1
            raise
        self.totals["streams"] += 1
        return stream

    def _ended(self, stream: TritonStream) -> None:
        with self._lock:
            self._streams.pop(stream.id, None)

    def stream(self, stream_id: str):
        with self._lock:
            if stream_id not in self._streams:
                raise StreamError("not_found", f"no stream {stream_id!r}")
            return self._streams[stream_id]

    def metrics(self) -> dict:
        """Active streams of this API; capacity and load are its --max-streams cap's (0 without one: the
        servers' own load is Triton's helios_live_load)."""
        with self._lock:
            active = len(self._streams)
        cap = self.max_streams or 0
        return {"active_streams": active, "capacity": cap, "load": active / cap if cap else 0.0, **self.totals}

    def close(self) -> None:
        for s in list(self._streams.values()):
            s.stop()
