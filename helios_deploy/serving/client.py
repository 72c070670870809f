"""gRPC streaming client for the ``helios`` model of one node (decoupled streaming).

    with HeliosClient("localhost:8001") as client:
        for chunk in client.stream("a cat", num_frames=66, seed=0):
            chunk.index, chunk.frames, chunk.seconds   # uint8 [T, H, W, 3], seconds since the request
            client.set_prompt(client.stream_id, "a dog")   # from the stream's next chunk not yet started

A HeliosClient is one gRPC connection to one node and one bidirectional stream on it, which every request
shares (serving/node_connection.py): any number of streams at once (each ``stream`` generator reads its own), and the
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

import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from ..errors import UserError
from ..model.sizes import check_size_exported
from .configs import HELIOS_INPUTS
from .node_connection import NodeConnection, Reply, ReplyQueue, control_arrays, text_array

_NUMPY = {"bytes": np.object_, "uint8": np.uint8, "int32": np.int32, "int64": np.int64, "bool": np.bool_,
          "float32": np.float32}
MAX_BUFFERED = 8  # chunks a stream may hold unread before it is stopped
READY_TIMEOUT = 10.0  # seconds check_ready waits for the node's answer


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
        v = values.get(t.name)  # an input with no keyword here (e.g. the API's prompt_changes): left out
        if v is None:
            continue
        arr = np.asarray(v)
        if t.name in ("image", "video") and arr.dtype != np.uint8:  # never rescale pixels silently
            raise UserError(f"{t.name} must be a uint8 RGB array", found=f"{arr.dtype} {list(arr.shape)}",
                            fix="convert with (x * 255).round().astype(np.uint8), or pass a file")
        out[t.name] = arr.astype(_NUMPY[t.dtype]) if arr.ndim else np.array([v], dtype=_NUMPY[t.dtype])
    return out


class _Request:
    """One request of a HeliosClient: its replies (a ReplyQueue, bounded for a stream) and, for a stream, its id
    from the first response, so that it can be stopped when its reader falls behind or leaves."""

    def __init__(self, client: "HeliosClient", max_buffered: int | None):
        self.client, self.id, self.stream_id, self.abandoned = client, "", None, False
        self.replies = ReplyQueue(max_buffered, on_response=self._named, on_overflow=self.stop)

    def _named(self, reply: Reply) -> None:
        if self.stream_id is None and (sid := reply.text("stream_id")) is not None:
            self.stream_id = sid
            if self.abandoned:  # the reader left before the stream was named: stop it now
                self.leave()

    def leave(self) -> None:
        """The reader is gone: no more replies, and the stream (once named) is stopped on the node."""
        self.abandoned = True
        if self.stream_id is not None:
            self.client._node.forget(self.id)
            self.stop()

    def stop(self) -> None:
        """Stop the stream on the node (in band); its answer is not waited for."""
        if self.stream_id is None:
            return  # stopped when its first response names it
        try:
            self.client._send(control_arrays("stop", self.stream_id), None)
        except UserError:
            pass  # the client is closed: so is the stream


class HeliosClient:
    stream_id: str | None = None  # the last opened stream's id, from its first response
    last_state: bytes | None = None  # with failover: the last snapshot received

    def __init__(self, url: str, model: str = "helios", timeout: float | None = None, owner: str = "",
                 max_buffered: int = MAX_BUFFERED):
        self.url, self.model, self.timeout, self.owner, self.max_buffered = url, model, timeout, owner, max_buffered
        try:
            self._node = NodeConnection(url, model)
        except Exception as e:  # noqa: BLE001 - grpc raises several kinds for a bad address
            raise UserError(f"cannot create a gRPC client for {url}", found=str(e), fix="pass HOST:PORT, e.g. localhost:8001")
        self._closed = False

    def check_ready(self) -> None:
        if not self._node.model_ready(timeout=READY_TIMEOUT):  # NodeUnavailable (a UserError): not reached
            raise UserError(f"model {self.model!r} is not ready on {self.url}", fix="check the server's log")

    def sizes(self) -> tuple[tuple[int, int], ...]:
        """The (height, width) sizes the served model takes, the default first: its config's ``sizes``
        parameter (a repository from before several sizes: the image dims)."""
        return self._node.sizes()

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

    def _send(self, arrays: Mapping[str, np.ndarray], max_buffered: int | None) -> _Request:
        if self._closed:
            raise UserError("this client is closed", fix="use a new HeliosClient")
        arrays = dict(arrays)
        if self.owner and "owner" not in arrays:
            arrays["owner"] = text_array(self.owner)
        request = _Request(self, max_buffered)
        request.id = self._node.send(arrays, request.replies)
        return request

    def _take(self, request: _Request) -> Reply:
        """The request's next response or final reply; its error, a lost node or a fallen-behind reader raised."""
        try:
            reply = request.replies.take(self.timeout)
        except queue.Empty:
            raise UserError(f"no response from {self.url} within {self.timeout:g} s",
                            fix="raise --timeout, or check the server's log") from None
        if reply.kind == "error":
            raise UserError("the Triton server refused or failed the request", found=reply.message)
        if reply.kind == "lost":
            raise _unavailable(reply.message)
        if reply.kind == "overflow":
            raise UserError(f"the reader fell behind: {request.replies.max_buffered} chunks of stream "
                            f"{request.stream_id} were waiting to be read",
                            fix="read chunks as they come (or raise max_buffered); the stream was stopped")
        return reply

    def stream_arrays(self, arrays: Mapping[str, np.ndarray]) -> Iterator[StreamChunk]:
        """Send ``arrays`` as they are (Triton data types from their numpy dtypes); yield the chunks."""
        t0 = time.perf_counter()
        request = self._send(arrays, self.max_buffered)
        done = False
        try:
            while not done:
                reply = self._take(request)
                if reply.kind == "final":
                    done = True
                    continue
                control = reply.json("control")
                if control is not None and "error" in control:
                    done = True  # refused: no stream to stop
                    raise _refusal(control["error"])
                if reply.text("stream_id") is not None:
                    self.stream_id = reply.text("stream_id")
                state = reply.output("state")
                state = None if state is None else bytes(state.reshape(-1)[0])
                if state is not None:
                    self.last_state = state
                if control is not None and control.get("moved"):
                    done = True  # the node ended the stream itself
                    raise StreamMoved(control["stream_id"], int(control["next_chunk"]), state)
                index = reply.output("chunk_index")
                if index is not None and int(index[0]) >= 0:  # -1: the first response, the id only
                    yield StreamChunk(int(index[0]), reply.output("frames"), time.perf_counter() - t0, state)
        finally:
            if not done:  # the reader left early: stop the stream on the node (in band)
                request.leave()

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
        return self._node.unload()

    def control(self, action: str, stream_id: str | None = None, prompt: str | None = None) -> dict:
        """One control request; the node's JSON answer as it is (an error as {"error": {"code", "message"}})."""
        request = self._send(control_arrays(action, stream_id, prompt=prompt), None)
        document = None
        try:
            while (reply := self._take(request)).kind != "final":  # one document, then the final flag
                document = document or reply.json("control")
        finally:
            self._node.forget(request.id)
        if document is None:
            raise UserError(f"the node at {self.url} sent no control answer", fix="is it serving helios-deploy's model?")
        return document

    def _checked(self, action: str, stream_id: str | None = None, prompt: str | None = None) -> dict:
        answer = self.control(action, stream_id, prompt)
        if "error" in answer:
            raise _refusal(answer["error"])
        return answer

    def close(self) -> None:
        """Cancel every request still open on the stream (the node stops them) and end the connection."""
        self._closed = True
        self._node.close()

    def __enter__(self) -> "HeliosClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unavailable(reason: str) -> UserError:
    from ..runtime.live import StreamError

    return StreamError("unavailable", "lost the connection to the node", found=reason.strip().splitlines()[0]
                       if reason.strip() else "the gRPC stream ended", fix="the node may be down: try another node")


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
