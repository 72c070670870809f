"""gRPC streaming client for the ``helios`` model of one node (tritonclient.grpc, decoupled streaming).

    with HeliosClient("localhost:8001") as client:
        for chunk in client.stream("a cat", num_frames=66, seed=0):
            chunk.index, chunk.frames, chunk.seconds   # uint8 [T, H, W, 3], seconds since the request
            client.set_prompt(client.stream_id, "a dog")   # from the stream's next chunk not yet started

A HeliosClient is one gRPC connection to one node and one bidirectional stream on it, which every request
shares (serving/connection.py): any number of streams at once (each ``stream`` generator reads its own), and the
control requests (``set_prompt``, ``stop``, ``progress``, ``capacity``, ``drain``), which go in band to the same
``helios`` model over the same connection, so they reach the node that holds the stream (docs/serving.md). A
stream's id comes in its first response (``client.stream_id``: the last opened). ``owner`` (the API: sha256 hex
of the API key) is sent with every request: a node answers control only for streams opened with the same owner.

Each stream holds at most ``max_buffered`` chunks unread: a reader that falls further behind gets a UserError
and its stream is stopped on the node. Leaving the loop early (break, an exception, closing the generator) stops
the stream on the node; ``close()`` cancels every open request. A refused open raises StreamError (code
over_capacity or draining), a drained stream StreamMoved (with its state, to resume it on another node), a lost
node StreamError("unavailable"); other server errors, time-outs and connection failures are UserErrors.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from ..errors import UserError
from ..model.sizes import check_size_exported, parse_sizes
from .configs import HELIOS_INPUTS, HELIOS_OUTPUTS
from .connection import ERROR, Connection

_NUMPY = {"bytes": np.object_, "uint8": np.uint8, "int32": np.int32, "int64": np.int64, "bool": np.bool_,
          "float32": np.float32}
MAX_BUFFERED = 8  # chunks a stream may hold unread before it is stopped


@dataclass
class StreamChunk:
    index: int
    frames: np.ndarray  # uint8 [T, H, W, 3]
    seconds: float  # since the request was sent
    state: bytes | None = None  # with failover: the stream's snapshot after this chunk


class StreamMoved(UserError):
    """The node drained: the stream stopped after chunk ``next_chunk - 1``; open it elsewhere with
    ``resume=state`` (the same id, the next chunk)."""

    def __init__(self, stream_id: str, next_chunk: int, state: bytes | None):
        super().__init__(f"stream {stream_id} moved: its node is draining (shutting down)",
                         found=f"stopped before chunk {next_chunk}",
                         fix="open it on another node with resume=<its state>")
        self.stream_id, self.next_chunk, self.state = stream_id, next_chunk, state


def request_arrays(prompt: str, *, image=None, video=None, height: int | None = None, width: int | None = None,
                   num_frames: int | None = None, seed: int | None = None,
                   pyramid_steps: Sequence[int] | None = None, amplify_first_chunk: bool | None = None,
                   num_inference_steps: int | None = None, guidance_scale: float | None = None,
                   negative_prompt: str | None = None, realtime: bool | None = None, failover: bool | None = None,
                   resume: bytes | None = None, due_in: float | None = None) -> dict:
    """The request's tensors as arrays of the dtypes the model declares (absent ones left out: the served
    checkpoint variant's defaults apply). ``resume``: a snapshot (a moved stream's ``state``) to continue;
    ``due_in``: seconds until its next chunk is due at the viewer."""
    values = {"prompt": [prompt.encode("utf-8")], "image": image, "video": video, "height": height, "width": width,
              "num_frames": num_frames,
              "seed": seed, "pyramid_steps": pyramid_steps, "amplify_first_chunk": amplify_first_chunk,
              "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
              "negative_prompt": None if negative_prompt is None else [negative_prompt.encode("utf-8")],
              "realtime": realtime, "failover": failover,
              "resume": None if resume is None else np.array([resume], dtype=np.object_), "due_in": due_in}
    out = {}
    for t in HELIOS_INPUTS:
        v = values[t.name]
        if v is None:
            continue
        arr = np.asarray(v)
        if t.name in ("image", "video") and arr.dtype != np.uint8:  # never rescale pixels silently
            raise UserError(f"{t.name} must be a uint8 RGB array", found=f"{arr.dtype} {list(arr.shape)}",
                            fix="convert with (x * 255).round().astype(np.uint8), or pass a file")
        out[t.name] = arr.astype(_NUMPY[t.dtype]) if arr.ndim else np.array([v], dtype=_NUMPY[t.dtype])
    return out


class HeliosClient:
    stream_id: str | None = None  # the last opened stream's id, from its first response
    last_state: bytes | None = None  # with failover: the last snapshot received

    def __init__(self, url: str, model: str = "helios", timeout: float | None = None, owner: str = "",
                 max_buffered: int = MAX_BUFFERED):
        import tritonclient.grpc as grpcclient

        self.url, self.model, self.timeout, self.owner, self.max_buffered = url, model, timeout, owner, max_buffered
        try:
            self._client = grpcclient.InferenceServerClient(url)
        except Exception as e:  # noqa: BLE001 - tritonclient raises several kinds for a bad URL
            raise UserError(f"cannot create a gRPC client for {url}", found=str(e), fix="pass HOST:PORT, e.g. localhost:8001")
        self._grpc = grpcclient
        self._conn = Connection(self._client, self._stop_abandoned)

    def check_ready(self) -> None:
        try:
            ready = self._client.is_model_ready(self.model)
        except Exception as e:  # noqa: BLE001 - InferenceServerException or a gRPC error
            raise UserError(f"cannot reach a Triton server at {self.url}", found=str(e).strip().splitlines()[0],
                            fix="start the server, and pass its gRPC address (default port 8001)") from None
        if not ready:
            raise UserError(f"model {self.model!r} is not ready on {self.url}", fix="check the server's log")

    def sizes(self) -> tuple[tuple[int, int], ...]:
        """The (height, width) sizes the served model takes, the default first: its config's ``sizes``
        parameter (a repository from before several sizes: the image dims)."""
        config = self._client.get_model_config(self.model, as_json=True)["config"]
        listed = (config.get("parameters") or {}).get("sizes", {}).get("string_value")
        if listed:
            return parse_sizes(listed)
        dims = next(i["dims"] for i in config["input"] if i["name"] == "image")
        return ((int(dims[0]), int(dims[1])),)

    def video_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """The request's (height, width): one the served model takes (None: its default), else one UserError."""
        sizes = self.sizes()
        if height is None and width is None:
            return sizes[0]
        return check_size_exported(height, width, sizes)

    # -- streams ---------------------------------------------------------------------------------
    def stream(self, prompt: str, **request) -> Iterator[StreamChunk]:
        """Yield the chunks of one generation as they arrive (keywords as request_arrays)."""
        return self.stream_arrays(request_arrays(prompt, **request))

    def _send(self, arrays: Mapping[str, np.ndarray], max_buffered: int | None):
        from tritonclient.utils import np_to_triton_dtype

        arrays = dict(arrays)
        if self.owner and "owner" not in arrays:
            arrays["owner"] = np.array([self.owner.encode()], dtype=np.object_)
        inputs = []
        for name, arr in arrays.items():
            t = self._grpc.InferInput(name, list(arr.shape), np_to_triton_dtype(np.dtype(arr.dtype)))
            t.set_data_from_numpy(arr)
            inputs.append(t)
        outputs = [self._grpc.InferRequestedOutput(t.name) for t in HELIOS_OUTPUTS]
        return self._conn.send(self.model, inputs, outputs, max_buffered)

    def _take(self, pending):
        try:
            kind, value, final = pending.take(self.timeout)
        except Exception:  # queue.Empty
            raise UserError(f"no response from {self.url} within {self.timeout:g} s",
                            fix="raise --timeout, or check the server's log") from None
        if kind == ERROR:
            raise value
        return value, final

    def stream_arrays(self, arrays: Mapping[str, np.ndarray]) -> Iterator[StreamChunk]:
        """Send ``arrays`` as they are (Triton data types from their numpy dtypes); yield the chunks."""
        t0 = time.perf_counter()
        pending = self._send(arrays, self.max_buffered)
        done = False
        try:
            while not done:
                result, done = self._take(pending)
                control = _control_document(result)
                if control is not None and "error" in control:
                    raise _refusal(control["error"])
                if result.as_numpy("stream_id") is not None:
                    self.stream_id = result.as_numpy("stream_id").reshape(-1)[0].decode()
                state = result.as_numpy("state")
                state = None if state is None else bytes(state.reshape(-1)[0])
                if state is not None:
                    self.last_state = state
                if control is not None and control.get("moved"):
                    raise StreamMoved(control["stream_id"], int(control["next_chunk"]), state)
                index = result.as_numpy("chunk_index")
                if index is not None and int(index[0]) >= 0:  # -1: the first response, the id only
                    yield StreamChunk(int(index[0]), result.as_numpy("frames"), time.perf_counter() - t0, state)
        finally:
            if not done:  # the reader left early: stop the stream on the node (in band)
                self._conn.forget(pending)
                pending.abandoned = True
                if pending.stream_id is not None:
                    self._stop_abandoned(pending)

    def _stop_abandoned(self, pending) -> None:
        """Stop a stream whose reader is gone (left the loop, or fell behind); its answer is not waited for."""
        if pending.stream_id is None:
            return  # stopped when its first response names it
        try:
            self._send(self._control_arrays("stop", pending.stream_id, None), None)
        except UserError:
            pass  # the node is gone: so is the stream

    # -- control (in band: requests to the same model over this connection) ------------------------
    def set_prompt(self, stream_id: str, prompt: str) -> int:
        """The stream's prompt from its next chunk not yet started; returns that chunk's index."""
        return self._checked("set_prompt", stream_id, prompt)["from_chunk"]

    def stop(self, stream_id: str) -> None:
        self._checked("stop", stream_id)

    def progress(self, stream_id: str) -> dict:
        """{"status", "chunks_done", "num_chunks", "first_chunk_latency_s", "lateness_s", "misses", ...}"""
        return self._checked("progress", stream_id)

    def capacity(self) -> dict:
        """{"capacity", "active", "queued", "free", "draining", "demand", "schedulers": [...]} of the node."""
        return self._checked("capacity")

    def drain(self) -> dict:
        """Stop the node admitting; its streams end after their current chunk as moved. {"draining", "streams"}."""
        return self._checked("drain")

    def unload(self) -> str | None:
        """Ask Triton to unload the model (Triton's repository API over this gRPC connection): its readiness
        (``/v2/models/<model>/ready``, a Kubernetes readiness probe) fails at once and Triton refuses new
        requests, while the requests in flight (drained streams' last responses) finish. None when asked; else
        why not (the server runs without explicit model control: its repository has no load_models.txt)."""
        try:
            self._client.unload_model(self.model)
        except Exception as e:  # noqa: BLE001 - tritonclient's InferenceServerException: say why
            return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None

    def control(self, action: str, stream_id: str | None = None, prompt: str | None = None) -> dict:
        """One control request; the node's JSON answer as it is (an error as {"error": {"code", "message"}})."""
        pending = self._send(self._control_arrays(action, stream_id, prompt), None)
        try:
            result, final = self._take(pending)
            while not final:  # one document, then the final flag (an empty final response: nothing)
                _, final = self._take(pending)
        finally:
            self._conn.forget(pending)
        document = _control_document(result)
        if document is None:
            raise UserError(f"the node at {self.url} sent no control answer", fix="is it serving helios-deploy's model?")
        return document

    def _checked(self, action: str, stream_id: str | None = None, prompt: str | None = None) -> dict:
        answer = self.control(action, stream_id, prompt)
        if "error" in answer:
            raise _refusal(answer["error"])
        return answer

    def _control_arrays(self, action: str, stream_id: str | None, prompt: str | None) -> dict:
        values = {"action": action, "stream_id": stream_id, "prompt": prompt}
        return {k: np.array([v.encode("utf-8")], dtype=np.object_) for k, v in values.items() if v is not None}

    def close(self) -> None:
        self._conn.close()
        self._client.close()

    def __enter__(self) -> "HeliosClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _control_document(result) -> dict | None:
    raw = result.as_numpy("control")
    return None if raw is None else json.loads(raw.reshape(-1)[0])


def _refusal(error: dict) -> UserError:
    """A node's {"code", "message"} as StreamError(code) (over_capacity, draining, not_found, finished, ...);
    bad_request and internal as plain UserErrors."""
    from ..runtime.live import StreamError

    code, message = error.get("code", "internal"), error.get("message", "")
    if code in ("bad_request", "bad_action", "internal"):
        return UserError("the Triton server refused or failed the request", found=message)
    return StreamError(code, message)


def load_conditioning(image: str | Path | None, video: str | Path | None, height: int, width: int):
    """Image / video files -> uint8 arrays at the served size, resized as the pipeline does (Lanczos), so
    the server's own resize is the identity and the result equals a local `generate`."""
    from PIL import Image

    from ..runtime.conditioning import load_image, load_video

    def fit(frame):
        return np.asarray(frame.convert("RGB").resize((width, height), resample=Image.LANCZOS))

    if image is not None:
        return fit(load_image(image, height, width)), None
    if video is not None:
        return None, np.stack([fit(f) for f in load_video(video)])
    return None, None
