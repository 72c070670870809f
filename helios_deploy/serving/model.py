"""The ``helios`` Triton model: a decoupled Python-backend model that runs helios_deploy.runtime in-process
and sends one response per 33-frame chunk as soon as it is decoded, then the final flag. Every stream of an
instance runs on one LiveScheduler (runtime/live.py): many streams per instance, chunk jobs by playback
deadline, admission by capacity. The first response of a stream carries its ``stream_id`` (chunk_index -1, no
frames), which ``helios_control`` (serving/control.py) takes to change its prompt, stop it or read its progress.

The repository's ``helios/1/model.py`` is a two-line shim importing TritonPythonModel from here, so the
model code is the installed helios-deploy's (the Python backend environment needs helios-deploy).

A bad request gets an error response (pb_utils.TritonError, INVALID_ARG) saying what is wrong and the
model keeps serving; an internal failure is logged with its traceback and answered with an error too. A
cancelled request (the client went away) is checked between denoising steps, and its stream stopped.
"""

from __future__ import annotations

import json
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from ..errors import UserError
from ..model.specs import COMPONENTS
from .configs import HELIOS_INPUTS, served_dims

try:  # only inside the Python backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - imported outside Triton (tests of parse_request, the docs)
    pb_utils = None

DEFAULTS = {"num_frames": 33, "seed": 0}  # the sampler settings' defaults are the checkpoint variant's
_NUMPY = {"bytes": np.object_, "uint8": np.uint8, "int32": np.int32, "int64": np.int64, "bool": np.bool_,
          "float32": np.float32}


def _check_tensor(name: str, value: np.ndarray, height: int, width: int) -> None:
    spec = next(t for t in HELIOS_INPUTS if t.name == name)
    if value.dtype != _NUMPY[spec.dtype] and not (spec.dtype == "bytes" and value.dtype.kind in "SU"):
        raise UserError(f"input {name!r} has data type {value.dtype}", expected=f"{spec.dtype} {list(spec.dims)}")
    dims = served_dims(spec, height, width)
    if value.ndim != len(dims) or any(d != -1 and s != d for s, d in zip(value.shape, dims)):
        raise UserError(f"input {name!r} has shape {list(value.shape)}",
                        expected=f"{list(dims)} ({spec.doc}; -1: any size)",
                        fix=f"the request is for {height}x{width}; resize to that size"
                        if name in ("image", "video") else None)


def _text(value: np.ndarray, name: str) -> str:
    raw = value.reshape(-1)[0]
    try:
        return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError as e:
        raise UserError(f"input {name!r} is not UTF-8", found=str(e)) from None


def _prompt(value: np.ndarray | None) -> str:
    if value is None or value.size != 1:
        raise UserError("the request has no prompt", expected="input 'prompt': one UTF-8 string (BYTES [1])")
    text = _text(value, "prompt")
    if not text.strip():
        raise UserError("input 'prompt' is empty", expected="a non-empty text prompt")
    return text


def _sampler_settings(values: Mapping[str, np.ndarray | None]) -> dict:
    """The optional sampler settings present in the request, as Pipeline.stream keywords (absent: None, so
    the checkpoint variant's defaults apply; a setting the variant lacks is refused by the pipeline)."""
    def scalar(name, cast):
        return None if values[name] is None else cast(values[name].reshape(-1)[0])

    steps = values["pyramid_steps"]
    if steps is not None and any(int(s) < 1 for s in steps):
        raise UserError(f"pyramid_steps {[int(s) for s in steps]} invalid", expected="positive integers per stage, e.g. [1, 1, 1]")
    return {"pyramid_steps": None if steps is None else tuple(int(s) for s in steps),
            "amplify_first_chunk": True if scalar("amplify_first_chunk", bool) else None,
            "num_inference_steps": scalar("num_inference_steps", int),
            "guidance_scale": scalar("guidance_scale", float),
            "negative_prompt": None if values["negative_prompt"] is None else _text(values["negative_prompt"],
                                                                                    "negative_prompt")}


def _size(values: Mapping[str, np.ndarray | None], check_size: Callable) -> tuple[int, int]:
    """The request's (height, width) through ``check_size`` (Pipeline.check_size: one of the exported sizes)."""
    for name in ("height", "width"):
        if values[name] is not None:
            _check_tensor(name, values[name], -1, -1)
    h, w = (None if values[n] is None else int(values[n].reshape(-1)[0]) for n in ("height", "width"))
    return check_size(h, w)


def parse_request(get: Callable[[str], np.ndarray | None], check_size: Callable, max_frames: int) -> dict:
    """Pipeline.stream keyword arguments from a request's tensors (``get(name)`` -> array or None);
    a UserError for anything the pipeline would reject, at a size not exported (``check_size``:
    Pipeline.check_size) or that does not fit the request's size."""
    values = {t.name: get(t.name) for t in HELIOS_INPUTS}
    height, width = _size(values, check_size)
    for name, value in values.items():
        if value is not None:
            _check_tensor(name, value, height, width)
    out = {"prompt": _prompt(values["prompt"]), "height": height, "width": width}
    out.update({k: values[k] for k in ("image", "video")})
    if out["image"] is not None and out["video"] is not None:
        raise UserError("the request has both 'image' and 'video'", expected="at most one (I2V or V2V)")
    if out["video"] is not None and out["video"].shape[0] < 1:
        raise UserError("input 'video' has no frames")
    n = int(values["num_frames"][0]) if values["num_frames"] is not None else DEFAULTS["num_frames"]
    if not 1 <= n <= max_frames:
        raise UserError(f"num_frames {n} is out of range", expected=f"1..{max_frames} (this repository's --max-frames)")
    out["realtime"] = True if values["realtime"] is None else bool(values["realtime"].reshape(-1)[0])
    out.update(num_frames=n, seed=int(values["seed"][0]) if values["seed"] is not None else DEFAULTS["seed"],
               **_sampler_settings(values))
    return out


def model_parameters(model_config: Mapping) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in (model_config.get("parameters") or {}).items()}


def resolve_device(device: str, instance_kind: str, device_id: str | int) -> str:
    """"auto": cuda:<the instance's GPU> for KIND_GPU instances, else cpu."""
    if device != "auto":
        return device
    return f"cuda:{device_id}" if str(instance_kind).upper() == "GPU" else "cpu"


def live_settings(params: Mapping[str, str]) -> dict:
    """LiveScheduler settings from the model's config parameters (``helios-deploy triton --max-streams ...``)."""
    def number(key, cast):
        value = params.get(key, "")
        return cast(value) if value not in ("", "auto") else None

    from ..runtime.live import DEFAULT_FPS

    return {"fps": number("fps", float) or DEFAULT_FPS, "chunk_seconds": number("chunk_seconds", float),
            "max_streams": number("max_streams", int), "queue": params.get("queue", "false") == "true",
            "max_batch": number("max_batch", int) or 1}


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        from ..runtime import Pipeline
        from ..runtime.live import LiveScheduler
        from .control import ControlServer, control_dir
        from .live_metrics import LiveMetrics

        config = json.loads(args["model_config"])
        params = model_parameters(config)
        root = Path(params["artifacts"])
        if not root.is_absolute():
            root = Path(args["model_repository"]) / root
        device = resolve_device(params.get("device", "auto"), args.get("model_instance_kind", "CPU"),
                                args.get("model_instance_device_id", 0))
        self.pipe = Pipeline.from_artifacts(root, backend=params.get("backend", "onnxruntime"), device=device,
                                            precision=params.get("precision", "fp32"))
        self.max_frames = int(params.get("max_frames", "660"))
        from .repository import lora_parameter

        served = lora_parameter(self.pipe.artifacts.manifest)  # the artifacts are the record of the fused adapters
        if params.get("lora", served) != served:
            pb_utils.Logger.log_warn(f"helios: the config's lora parameter ({params['lora']}) is not what the artifacts "
                                     f"hold ({served}): run `helios-deploy refit ARTIFACTS --repository REPO ...`")
        t0 = time.perf_counter()
        self._warm_up()
        # every stream of this instance runs on one scheduler (its own thread), nearest playback deadline first
        self.scheduler = LiveScheduler(self.pipe, **live_settings(params)).start()
        instance = args.get("model_instance_name", "helios_0")
        self.control = ControlServer(control_dir(args["model_repository"], params.get("control_dir")), instance,
                                     self.scheduler)
        self.metrics = LiveMetrics(pb_utils, self.scheduler, {"model": "helios", "instance": instance})
        import torch

        sizes = ", ".join(f"{h}x{w}" for h, w in self.pipe.sizes)
        pb_utils.Logger.log_info(f"helios: {root} on {device} ({params.get('backend')} {params.get('precision')}, "
                                 f"{sizes}, torch threads {torch.get_num_threads()}), runners ready in "
                                 f"{time.perf_counter() - t0:.1f}s; chunk {self.scheduler.chunk_seconds:.3f}s, "
                                 f"capacity {self.scheduler.capacity} real-time streams")

    def _warm_up(self) -> None:
        """Load every runner now, so the first request does not pay for session creation."""
        for component in COMPONENTS:
            if component in self.pipe.artifacts.components:
                for graph in self.pipe.artifacts.spec(component).graphs:
                    self.pipe.runner(component, graph.name)

    def execute(self, requests) -> None:
        """Open each request's stream and return at once: the scheduler makes the chunks, a thread per stream
        sends them (a decoupled model answers from any thread)."""
        for request in requests:
            self._open(request)
        return None

    def _open(self, request) -> None:
        from ..runtime.live import StreamError

        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            get = lambda name: _as_numpy(pb_utils.get_input_tensor_by_name(request, name))  # noqa: E731
            kwargs = parse_request(get, self.pipe.check_size, self.max_frames)
            lead = None if kwargs.pop("realtime") else float("inf")
            stream = self.scheduler.open(**kwargs, lead=lead, cancelled=sender.is_cancelled)
        except StreamError as e:
            return _send_quietly(sender, _error(e.render(), "UNAVAILABLE" if e.code == "over_capacity"
                                                else "INVALID_ARG"), final)
        except UserError as e:
            return _send_quietly(sender, _error(e.render(), "INVALID_ARG"), final)
        except Exception as e:  # an internal bug: log it, answer the request, keep serving
            pb_utils.Logger.log_error(f"helios: internal error\n{traceback.format_exc()}")
            return _send_quietly(sender, _error(f"internal error in the helios model: {type(e).__name__}: {e}",
                                                "INTERNAL"), final)
        height, width = kwargs["height"], kwargs["width"]
        threading.Thread(target=self._forward, args=(stream, sender, (0, height, width, 3)), daemon=True,
                         name=f"helios-stream-{stream.id}").start()

    def _forward(self, stream, sender, empty_shape) -> None:
        """Send the stream's id at once, then a response per chunk as it is decoded, then the final flag."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        sid = np.array([stream.id.encode()], dtype=np.object_)

        def response(frames, index):
            return pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("frames", np.ascontiguousarray(frames)),
                pb_utils.Tensor("chunk_index", np.array([index], dtype=np.int32)), pb_utils.Tensor("stream_id", sid)])

        try:
            sender.send(response(np.zeros(empty_shape, np.uint8), -1))
            for chunk in stream:
                sender.send(response(chunk.frames, chunk.index))
            if stream.status == "stopped" and sender.is_cancelled():
                pb_utils.Logger.log_info(f"helios: stream {stream.id}: request cancelled by the client; stopped")
        except UserError as e:
            return _send_quietly(sender, _error(e.render(), "INVALID_ARG"), final)
        except Exception as e:  # noqa: BLE001 - the stream failed, or the client went away while sending
            if sender.is_cancelled():
                pb_utils.Logger.log_info(f"helios: stream {stream.id}: request cancelled by the client; stopped")
            else:
                pb_utils.Logger.log_error(f"helios: stream {stream.id} failed\n{traceback.format_exc()}")
                return _send_quietly(sender, _error(f"internal error in the helios model: {type(e).__name__}: {e}",
                                                    "INTERNAL"), final)
            _stop_quietly(stream)
        _send_quietly(sender, None, final)

    def finalize(self) -> None:
        for part in ("metrics", "control", "scheduler"):
            if getattr(self, part, None) is not None:
                getattr(self, part).close()
        self.pipe = None


def _stop_quietly(stream) -> None:
    try:
        stream.stop()
    except UserError:  # already ended
        pass


def _as_numpy(tensor) -> np.ndarray | None:
    return None if tensor is None else tensor.as_numpy()


def _error(message: str, code: str):
    codes = getattr(pb_utils, "TritonError", None)
    code_value = getattr(codes, code, None)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code_value) if code_value is not None
                                      else pb_utils.TritonError(message))


def _send_quietly(sender, response, flags) -> None:
    """Send the last response; a client that has gone away makes this fail, which is fine."""
    try:
        sender.send(response, flags=flags) if response is not None else sender.send(flags=flags)
    except Exception as e:  # noqa: BLE001 - nothing left to tell a client that has gone
        pb_utils.Logger.log_warn(f"helios: could not send the final response: {e}")
