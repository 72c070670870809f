"""gRPC streaming client for the ``helios`` model (tritonclient.grpc, decoupled streaming).

    with HeliosClient("localhost:8001") as client:
        for chunk in client.stream("a cat", num_frames=66, seed=0):
            chunk.index, chunk.frames, chunk.seconds   # uint8 [T, H, W, 3], seconds since the request

One stream at a time per HeliosClient (a tritonclient gRPC client holds one stream); use one client
per concurrent generation. The server's first response carries the stream's id (``client.stream_id`` from
then on): ``set_prompt(stream_id, prompt)`` changes its prompt from the next chunk not yet started,
``stop(stream_id)`` ends it, ``progress(stream_id)`` reads it (the ``helios_control`` model; any client,
any process, may send these). Server errors, time-outs and connection failures become UserErrors. Leaving the loop early (break, an exception,
closing the generator) cancels the request on the server, which stops at its next denoising step.
"""

from __future__ import annotations

import queue
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from ..errors import UserError
from ..model.sizes import check_size_exported, parse_sizes
from .configs import CONTROL_INPUTS, HELIOS_INPUTS, HELIOS_OUTPUTS

CONTROL_MODEL = "helios_control"

_NUMPY = {"bytes": np.object_, "uint8": np.uint8, "int32": np.int32, "int64": np.int64, "bool": np.bool_,
          "float32": np.float32}


@dataclass
class StreamChunk:
    index: int
    frames: np.ndarray  # uint8 [T, H, W, 3]
    seconds: float  # since the request was sent


def request_arrays(prompt: str, *, image=None, video=None, height: int | None = None, width: int | None = None,
                   num_frames: int | None = None, seed: int | None = None,
                   pyramid_steps: Sequence[int] | None = None, amplify_first_chunk: bool | None = None,
                   num_inference_steps: int | None = None, guidance_scale: float | None = None,
                   negative_prompt: str | None = None, realtime: bool | None = None) -> dict:
    """The request's tensors as arrays of the dtypes the model declares (absent ones left out: the served
    checkpoint variant's defaults apply)."""
    values = {"prompt": [prompt.encode("utf-8")], "image": image, "video": video, "height": height, "width": width,
              "num_frames": num_frames,
              "seed": seed, "pyramid_steps": pyramid_steps, "amplify_first_chunk": amplify_first_chunk,
              "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
              "negative_prompt": None if negative_prompt is None else [negative_prompt.encode("utf-8")],
              "realtime": realtime}
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


def _server_error(error, model: str) -> UserError:
    text = str(error.message() if hasattr(error, "message") and callable(error.message) else error)
    return UserError(f"the Triton server refused or failed the {model} request", found=text.strip())


class HeliosClient:
    stream_id: str | None = None  # the current (or last) stream's id, from its first response
    def __init__(self, url: str, model: str = "helios", timeout: float | None = None):
        import tritonclient.grpc as grpcclient

        self.url, self.model, self.timeout = url, model, timeout
        try:
            self._client = grpcclient.InferenceServerClient(url)
        except Exception as e:  # noqa: BLE001 - tritonclient raises several kinds for a bad URL
            raise UserError(f"cannot create a gRPC client for {url}", found=str(e), fix="pass HOST:PORT, e.g. localhost:8001")
        self._grpc = grpcclient

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

    def stream(self, prompt: str, **request) -> Iterator[StreamChunk]:
        """Yield the chunks of one generation as they arrive (keywords as request_arrays)."""
        return self.stream_arrays(request_arrays(prompt, **request))

    def stream_arrays(self, arrays: Mapping[str, np.ndarray]) -> Iterator[StreamChunk]:
        """Send ``arrays`` as they are (Triton data types from their numpy dtypes); yield the chunks."""
        from tritonclient.utils import np_to_triton_dtype

        inputs = []
        for name, arr in arrays.items():
            t = self._grpc.InferInput(name, list(arr.shape), np_to_triton_dtype(np.dtype(arr.dtype)))
            t.set_data_from_numpy(arr)
            inputs.append(t)
        outputs = [self._grpc.InferRequestedOutput(t.name) for t in HELIOS_OUTPUTS]
        responses: queue.Queue = queue.Queue()
        self._client.start_stream(callback=lambda result, error: responses.put((result, error)),
                                  stream_timeout=self.timeout)
        done = False
        try:
            t0 = time.perf_counter()
            self._client.async_stream_infer(self.model, inputs, outputs=outputs, request_id=uuid.uuid4().hex,
                                            enable_empty_final_response=True)
            while not done:
                try:
                    result, error = responses.get(timeout=self.timeout)
                except queue.Empty:
                    raise UserError(f"no response from {self.url} within {self.timeout:g} s",
                                    fix="raise --timeout, or check the server's log") from None
                if error is not None:
                    done = True
                    raise _server_error(error, self.model)
                response = result.get_response()
                done = response.parameters["triton_final_response"].bool_param
                if result.as_numpy("stream_id") is not None:
                    self.stream_id = result.as_numpy("stream_id").reshape(-1)[0].decode()
                index = result.as_numpy("chunk_index")
                if index is not None and int(index[0]) >= 0:  # -1: the first response, the id only
                    yield StreamChunk(int(index[0]), result.as_numpy("frames"), time.perf_counter() - t0)
        finally:
            self._client.stop_stream(cancel_requests=not done)

    # -- control of a running stream (the helios_control model) ----------------------------------
    def set_prompt(self, stream_id: str, prompt: str) -> int:
        """The stream's prompt from its next chunk not yet started; returns that chunk's index."""
        return self._control(stream_id, "set_prompt", prompt)["from_chunk"]

    def stop(self, stream_id: str) -> None:
        self._control(stream_id, "stop")

    def progress(self, stream_id: str) -> dict:
        """{"status", "chunks_done", "num_chunks", "first_chunk_latency_s", "lateness_s", "misses", ...}"""
        return self._control(stream_id, "progress")

    def _control(self, stream_id: str, action: str, prompt: str | None = None) -> dict:
        import json

        from tritonclient.utils import InferenceServerException

        values = {"stream_id": stream_id, "action": action, "prompt": prompt}
        inputs = []
        for t in CONTROL_INPUTS:
            if values[t.name] is not None:
                arr = np.array([values[t.name].encode("utf-8")], dtype=np.object_)
                inputs.append(self._grpc.InferInput(t.name, [1], "BYTES"))
                inputs[-1].set_data_from_numpy(arr)
        try:  # a client of its own: this one's gRPC stream may be open on another thread
            with self._grpc.InferenceServerClient(self.url) as control:
                result = control.infer(CONTROL_MODEL, inputs, client_timeout=self.timeout)
        except InferenceServerException as e:
            raise _server_error(e, CONTROL_MODEL) from None
        return json.loads(result.as_numpy("result").reshape(-1)[0])

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "HeliosClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
