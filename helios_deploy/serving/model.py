"""The ``helios`` Triton model: a decoupled Python-backend model that runs helios_deploy.runtime in-process.
ONE instance per node (instance_group count 1) holds a Node (serving/node.py): one LiveScheduler per device
(``--gpus 0,1``: one per GPU; else the CPU), new streams placed by free capacity.

Two kinds of request, both on the node's ordinary gRPC stream (docs/serving.md has the protocol):
- an open (no ``action``): the first response carries the node-made ``stream_id`` (chunk_index -1, no frames),
  then one response per 33-frame chunk as soon as it is decoded (with ``failover``: plus ``state``, the stream's
  snapshot after that chunk), then the final flag. A drained stream's last response says ``{"moved": true}``
  in ``control`` and carries ``state``. An open with ``resume`` continues a snapshot's stream; one with
  ``stream_id`` (and ``prompt_changes``) starts again a stream lost before its first snapshot.
  A prompt change the node accepts for the stream (from any caller) adds a response ``control`` =
  {"stream_id", "prompt", "from_chunk"} on the stream's own channel, before the chunk it applies from.
- a control request (``action``: set_prompt, stop, progress, capacity, drain): exactly one response, a JSON
  document in ``control``, with the final flag.
A refused or bad open is answered like a control request: ``control`` = {"error": {"code", "message"}} with the
final flag (code over_capacity, draining, bad_request or internal), so every answer names its request id and
many requests can share one gRPC stream. The model keeps serving after any bad request; an internal failure is
logged with its traceback. A cancelled request (the client went away) is stopped at its next denoising step.

The repository's ``helios/1/model.py`` is a two-line shim importing TritonPythonModel from here, so the
model code is the installed helios-deploy's (the Python backend environment needs helios-deploy).
"""

from __future__ import annotations

import json
import threading
import time
import traceback
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import UserError
from ..model.specs import COMPONENTS
from .node import Node, error_answer
from .requests import control_request, due_in_request, failover_request, parse_request, prompt_changes_request

try:  # only inside the Python backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - imported outside Triton (tests of the request parsing, the docs)
    pb_utils = None


def model_parameters(model_config: Mapping) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in (model_config.get("parameters") or {}).items()}


def node_devices(device: str, gpus: str) -> list[str]:
    """One device per scheduler: ``device`` "auto" -> cuda:<g> for each GPU in ``gpus`` ("0,1"), else ["cpu"];
    otherwise ``device`` itself, comma-separated (e.g. "cpu,cpu": two schedulers on the CPU)."""
    if device not in ("", "auto"):
        return [d.strip() for d in device.split(",") if d.strip()]
    listed = [g.strip() for g in (gpus or "").split(",") if g.strip()]
    return [f"cuda:{g}" for g in listed] or ["cpu"]


def live_settings(params: Mapping[str, str]) -> dict:
    """LiveScheduler settings from the model's config parameters (``helios-deploy triton --max-streams ...``)."""
    def number(key, cast):
        value = params.get(key, "")
        return cast(value) if value not in ("", "auto") else None

    from ..runtime.live import DEFAULT_FPS

    return {"fps": number("fps", float) or DEFAULT_FPS, "chunk_seconds": number("chunk_seconds", float),
            "max_streams": number("max_streams", int), "queue": params.get("queue", "false") == "true",
            "max_batch": number("max_batch", int) or 1}


def _artifacts_root(params: Mapping[str, str], model_repository: str) -> Path:
    root = Path(params["artifacts"])
    return root if root.is_absolute() else Path(model_repository) / root


def _json_tensor(name: str, value) -> "pb_utils.Tensor":
    return pb_utils.Tensor(name, np.array([json.dumps(value).encode()], dtype=np.object_))


def _bytes_tensor(name: str, value: bytes) -> "pb_utils.Tensor":
    return pb_utils.Tensor(name, np.array([value], dtype=np.object_))


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        from .live_metrics import LiveMetrics

        config = json.loads(args["model_config"])
        params = model_parameters(config)
        root = _artifacts_root(params, args["model_repository"])
        devices = node_devices(params.get("device", "auto"), params.get("gpus", ""))
        self.max_frames = int(params.get("max_frames", "660"))
        t0 = time.perf_counter()
        schedulers = [self._scheduler(root, params, device) for device in devices]
        self.node = Node(schedulers, devices)
        self.pipe = schedulers[0].pipe  # the served sizes (check_size) are every scheduler's
        instance = args.get("model_instance_name", "helios_0")
        self.metrics = LiveMetrics(pb_utils, self.node, {"model": "helios", "instance": instance})
        import torch

        sizes = ", ".join(f"{h}x{w}" for h, w in self.pipe.sizes)
        per = "; ".join(f"{d}: chunk {s.chunk_seconds:.3f}s, capacity {s.capacity}" for d, s in zip(devices, schedulers))
        pb_utils.Logger.log_info(f"helios: {root} on {', '.join(devices)} ({params.get('backend')} "
                                 f"{params.get('precision')}, {sizes}, torch threads {torch.get_num_threads()}), "
                                 f"ready in {time.perf_counter() - t0:.1f}s; {per}")

    def _scheduler(self, root: Path, params: Mapping[str, str], device: str):
        """A Pipeline on ``device`` with every runner loaded, and its LiveScheduler (started: measured)."""
        from ..runtime import Pipeline
        from ..runtime.live import LiveScheduler
        from .repository import lora_parameter

        pipe = Pipeline.from_artifacts(root, backend=params.get("backend", "onnxruntime"), device=device,
                                       precision=params.get("precision", "fp32"))
        served = lora_parameter(pipe.artifacts.manifest)  # the artifacts are the record of the fused adapters
        if params.get("lora", served) != served:
            pb_utils.Logger.log_warn(f"helios: the config's lora parameter ({params['lora']}) is not what the artifacts "
                                     f"hold ({served}): run `helios-deploy refit ARTIFACTS --repository REPO ...`")
        for component in COMPONENTS:  # load every runner now: the first request does not pay for it
            if component in pipe.artifacts.components:
                for graph in pipe.artifacts.spec(component).graphs:
                    pipe.runner(component, graph.name)
        return LiveScheduler(pipe, **live_settings(params)).start()

    def execute(self, requests) -> None:
        """Answer each control request at once; open each stream and return (a thread per stream sends its
        chunks: a decoupled model answers from any thread)."""
        for request in requests:
            sender = request.get_response_sender()
            get = lambda name, r=request: _as_numpy(pb_utils.get_input_tensor_by_name(r, name))  # noqa: E731
            try:
                control = control_request(get)
            except UserError as e:
                _answer(sender, error_answer("bad_request", e.render()))
                continue
            if control["action"] is not None:
                _answer(sender, self.node.control(**control))
            else:
                self._open(get, sender, control["owner"], control["stream_id"])
        return None

    def _open(self, get, sender, owner: str, stream_id: str | None = None) -> None:
        from ..runtime.live import StreamError

        try:
            failover, resume = failover_request(get)
            if resume is not None:  # the snapshot holds the prompt schedule, size, settings and position
                kwargs = {"resume": resume}
                realtime = get("realtime")
                lead = None if realtime is None or bool(realtime.reshape(-1)[0]) else float("inf")
            else:
                kwargs = parse_request(get, self.pipe.check_size, self.max_frames)
                lead = None if kwargs.pop("realtime") else float("inf")
            if failover:
                kwargs["failover"] = True
            if resume is None and stream_id:  # opened again from its start elsewhere: the id it had
                kwargs["stream_id"] = stream_id
            due = due_in_request(get)  # a moved stream's next chunk: due at its viewer's playback deadline
            if due is not None:
                kwargs["due_in"] = due
            changes = prompt_changes_request(get)  # ... and the prompt changes made before, applied before admission
            if changes:
                kwargs["prompt_changes"] = changes
            stream = self.node.open(owner=owner, **kwargs, lead=lead, cancelled=sender.is_cancelled)
        except StreamError as e:
            return _answer(sender, error_answer(e.code, e.render()))
        except UserError as e:
            return _answer(sender, error_answer("bad_request", e.render()))
        except Exception as e:  # an internal bug: log it, answer the request, keep serving
            pb_utils.Logger.log_error(f"helios: internal error\n{traceback.format_exc()}")
            return _answer(sender, error_answer("internal", f"internal error in the helios model: "
                                                            f"{type(e).__name__}: {e}"))
        height, width = getattr(stream.state, "size", None) or self.pipe.sizes[0]
        self.node.sending(+1)
        sender = _LockedSender(sender)  # the stream's thread and prompt changes (node.watch) both send on it
        def note(document: dict) -> None:
            sender.send(pb_utils.InferenceResponse(output_tensors=[_bytes_tensor("stream_id", stream.id.encode()),
                                                                   _json_tensor("control", document)]))

        self.node.watch(stream.id, note)
        threading.Thread(target=self._forward, args=(stream, sender, (0, height, width, 3), failover, note),
                         daemon=True, name=f"helios-stream-{stream.id}").start()

    def _forward(self, stream, sender, empty_shape, failover: bool, note) -> None:
        try:
            self._send_stream(stream, sender, empty_shape, failover)
        finally:
            self.node.unwatch(stream.id, note)
            self.node.sending(-1)

    def _send_stream(self, stream, sender, empty_shape, failover: bool) -> None:
        """Send the stream's id at once, then a response per chunk as it is decoded, then the final flag (a
        moved stream: a last response with {"moved": true} and its state)."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        sid = _bytes_tensor("stream_id", stream.id.encode())
        opened = {"stream_id": stream.id, "device": self.node.device_of(stream.id), "next_chunk": stream.chunks_done}
        try:
            sender.send(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("frames", np.zeros(empty_shape, np.uint8)),
                pb_utils.Tensor("chunk_index", np.array([-1], dtype=np.int32)), sid, _json_tensor("control", opened)]))
            if stream.chunks_done:
                pb_utils.Logger.log_info(f"helios: stream {stream.id} resumed at chunk {stream.chunks_done}")
            resumed = stream.chunks_done > 0
            for chunk in stream:
                if resumed:
                    pb_utils.Logger.log_info(f"helios: stream {stream.id}: chunk {chunk.index} made after its resume")
                    resumed = False
                tensors = [pb_utils.Tensor("frames", np.ascontiguousarray(chunk.frames)),
                           pb_utils.Tensor("chunk_index", np.array([chunk.index], dtype=np.int32)), sid]
                if failover and getattr(chunk, "snapshot", None) is not None:
                    tensors.append(_bytes_tensor("state", chunk.snapshot))
                sender.send(pb_utils.InferenceResponse(output_tensors=tensors))
            if stream.status == "moved":
                return self._moved(stream, sender, sid)
            if stream.status == "stopped":
                pb_utils.Logger.log_info(f"helios: stream {stream.id}: " + ("request cancelled by the client; stopped"
                                         if sender.is_cancelled() else "stopped by a stop request"))
        except UserError as e:  # the stream's own error: shed (StreamError), a bad prompt change...
            return _answer(sender, error_answer(getattr(e, "code", "bad_request"), e.render()))
        except Exception as e:  # noqa: BLE001 - the stream failed, or the client went away while sending
            if sender.is_cancelled():
                pb_utils.Logger.log_info(f"helios: stream {stream.id}: request cancelled by the client; stopped")
            else:
                pb_utils.Logger.log_error(f"helios: stream {stream.id} failed\n{traceback.format_exc()}")
                return _answer(sender, error_answer("internal", f"internal error in the helios model: "
                                                                f"{type(e).__name__}: {e}"))
            _stop_quietly(stream)
        _send_quietly(sender, None, final)

    def _moved(self, stream, sender, sid) -> None:
        """A drained stream's last response: where it stopped and its snapshot (the API resumes it elsewhere)."""
        snapshot = stream.snapshot
        note = {"moved": True, "stream_id": stream.id, "next_chunk": stream.chunks_done}
        tensors = [sid, _json_tensor("control", note)]
        if snapshot is not None:
            tensors.append(_bytes_tensor("state", snapshot))
        pb_utils.Logger.log_info(f"helios: stream {stream.id} moved after {stream.chunks_done} chunks (drain)")
        _send_quietly(sender, pb_utils.InferenceResponse(output_tensors=tensors),
                      pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self) -> None:
        for part in ("metrics", "node"):
            if getattr(self, part, None) is not None:
                getattr(self, part).close()
        self.pipe = None


class _LockedSender:
    """A request's response sender shared by two threads: one response at a time, none after the final one."""

    def __init__(self, sender):
        self._sender, self._lock, self._final = sender, threading.Lock(), False

    def send(self, response=None, flags: int = 0) -> None:
        with self._lock:
            if self._final:
                raise RuntimeError("the stream's final response was sent")
            self._final = bool(flags)
            self._sender.send(response, flags=flags) if response is not None else self._sender.send(flags=flags)

    def is_cancelled(self) -> bool:
        return self._sender.is_cancelled()


def _stop_quietly(stream) -> None:
    try:
        stream.stop()
    except UserError:  # already ended
        pass


def _as_numpy(tensor) -> np.ndarray | None:
    return None if tensor is None else tensor.as_numpy()


def _answer(sender, document: dict) -> None:
    """One JSON response in ``control`` with the final flag: a control request's answer or an open's refusal."""
    _send_quietly(sender, pb_utils.InferenceResponse(output_tensors=[_json_tensor("control", document)]),
                  pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def _send_quietly(sender, response, flags) -> None:
    """Send the last response; a client that has gone away makes this fail, which is fine."""
    try:
        sender.send(response, flags=flags) if response is not None else sender.send(flags=flags)
    except Exception as e:  # noqa: BLE001 - nothing left to tell a client that has gone
        pb_utils.Logger.log_warn(f"helios: could not send the final response: {e}")
