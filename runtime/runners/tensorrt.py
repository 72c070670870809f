"""TensorRT runner: one engine per graph, one optimization profile per operating point, torch CUDA
tensors bound by address and run on torch's current stream.

The engine comes from the manifest's ``engines`` section (written by ``helios-deploy build``); on
activation the platform is probed in a child process, the engine key is checked against the current
TensorRT / GPU, and the engine's tensors and profiles are audited against the spec. tensorrt is
imported only inside ``_activate_impl``, so this module imports anywhere.

Options:
    cuda_graph     capture one CUDA graph per operating point (after one warm-up run) and replay it;
                   feeds are copied into static input buffers.
    reuse_outputs  return the same output buffers for every call at an operating point (no copy, no
                   allocation): the caller must consume them before the next call at that point.
                   Off by default: the VAE keeps every step's output until it concatenates the chunk.
    sync           wait for the GPU after each call, so the runner's timings are GPU time (as ONNX
                   Runtime's); off lets the host run ahead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from ...errors import UserError
from ...export.tensorrt.engines import (REBUILD, audit_engine, check_engine_key, describe_points, engine_entry, source_entry,
                               select_profile, weight_streaming_budget)
from ...export.tensorrt.probe import require_gpu_tensorrt
from ...specs import GraphSpec, bind_symbols, shapes_at
from .base import Runner

_TORCH = {"float32": torch.float32, "int64": torch.int64, "uint8": torch.uint8}
_TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
               "INT8": "int8", "UINT8": "uint8", "BOOL": "bool", "FP8": "float8_e4m3fn"}


@dataclass
class _Point:
    """One concrete set of input shapes: its profile, output shapes and (lazily) static buffers."""

    profile: int
    shapes: dict[str, tuple[int, ...]]  # inputs
    out_shapes: dict[str, tuple[int, ...]]
    inputs: dict[str, torch.Tensor] | None = None  # static, cuda_graph only
    outputs: dict[str, torch.Tensor] | None = None  # static, cuda_graph or reuse_outputs
    graph: object = field(default=None, repr=False)  # torch.cuda.CUDAGraph


def runtime_key(recorded: Mapping, platform: Mapping, graph_entry: Mapping) -> dict:
    """The key as it would be now: this TensorRT and GPU, the graph and weights the manifest lists."""
    current = dict(recorded)
    current.update(tensorrt=platform.get("tensorrt"), gpu=platform.get("gpu"),
                   compute_capability=platform.get("compute_capability"))
    if "file_sha256" in graph_entry:
        current["graph_sha256"] = graph_entry["file_sha256"]
    if "data_sha256" in graph_entry:
        current["weights_sha256"] = graph_entry["data_sha256"]
    return current


class TensorRTRunner(Runner):
    backend = "tensorrt"

    def __init__(self, root: Path, manifest: dict, component: str, graph: GraphSpec, device: str, *,
                 cuda_graph: bool = False, reuse_outputs: bool = False, sync: bool = True):
        super().__init__(graph, component, device)
        if self.device.type != "cuda":
            raise UserError(f"the tensorrt backend runs on CUDA devices, not {device!r}",
                            fix="pass --device cuda, or use --backend onnxruntime on CPU")
        self.cuda_graph, self.reuse_outputs, self.sync = cuda_graph, reuse_outputs, sync
        self.entry = engine_entry(manifest, component, graph.name)
        precision = self.entry["key"].get("settings", {}).get("precision", "fp32")
        self.graph_entry = source_entry(manifest, component, graph.name, precision)  # what it was built from
        self.path = Path(root) / component / self.entry["file"]
        if not self.path.is_file():
            raise UserError(f"the TensorRT engine {self.path} is missing", fix=f"rebuild it: {REBUILD}")
        self.names = [t.name for t in graph.inputs]
        self.dtypes = {t.name: _TORCH[t.dtype] for t in graph.tensors}

    # -- activation ---------------------------------------------------------------------------------

    def _activate_impl(self) -> None:
        platform = require_gpu_tensorrt(self.device.index or 0)
        name = f"{self.component}/{self.graph.name}"
        check_engine_key(self.entry["key"], runtime_key(self.entry["key"], platform, self.graph_entry), name)
        if not torch.cuda.is_available():
            raise UserError("the tensorrt backend needs a CUDA build of PyTorch",
                            found=f"torch {torch.__version__} without CUDA", fix="install torch built for CUDA")
        import tensorrt as trt

        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if engine is None:
                raise UserError(f"TensorRT could not load {self.path}", found="see the TensorRT log above",
                                fix=f"rebuild it on this machine: {REBUILD}")
            self._audit(trt, engine)
            budget = weight_streaming_budget(self.entry["key"].get("settings", {}),
                                             getattr(engine, "streamable_weights_size", None))
            if budget is not None:  # before the context: it sizes its memory by the budget
                engine.weight_streaming_budget_v2 = budget
            context = engine.create_execution_context()
        if context is None:
            raise UserError(f"could not create a TensorRT execution context for {name}",
                            found="see the TensorRT log above (out of GPU memory?)")
        self._engine, self._context = engine, context
        self._points: dict[tuple, _Point] = {}
        self._active_profile: int | None = None
        self._active_key: tuple | None = None

    def _audit(self, trt, engine) -> None:
        """Check the engine's tensors, dtypes and profiles against the spec; keep the profile shapes."""
        io = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
            dtype = str(engine.get_tensor_dtype(name)).rsplit(".", 1)[-1]
            io[name] = (mode, _TRT_DTYPES.get(dtype, dtype.lower()))
        inputs = [n for n in self.names if io.get(n, ("",))[0] == "input"]
        self.profile_shapes = [
            {n: tuple(tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(n, i)) for n in inputs}
            for i in range(engine.num_optimization_profiles)
        ]
        problems = audit_engine(self.graph, io, self.profile_shapes)
        if problems:
            raise UserError(f"the TensorRT engine {self.path} does not match the "
                            f"{self.component}/{self.graph.name} spec",
                            found="\n    " + "\n    ".join(problems), fix=f"rebuild it: {REBUILD}")

    def _deactivate_impl(self) -> None:
        self._points.clear()  # CUDA graphs and static buffers first, then the context, then the engine
        del self._context
        del self._engine
        del self._runtime

    # -- inference ----------------------------------------------------------------------------------

    def _infer_impl(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = tuple(tuple(feeds[n].shape) for n in self.names)
        point = self._points.get(key) or self._new_point(key)
        feeds = {n: self._on_device(feeds[n]) for n in self.names}
        stream = torch.cuda.current_stream(self.device)
        self._select(point, key, stream.cuda_stream)
        if self.cuda_graph:
            outs = self._graph_run(point, feeds, stream)
        else:
            outs = self._outputs(point, feeds)
            self._bind({**feeds, **outs})
            self._execute(stream.cuda_stream)
        if self.sync:
            stream.synchronize()
        return outs

    def _new_point(self, key: tuple) -> _Point:
        shapes = dict(zip(self.names, key))
        dims = bind_symbols(self.graph, shapes)
        index = select_profile(self.profile_shapes, shapes)
        if index is None:
            raise UserError(f"the TensorRT engine for {self.component}/{self.graph.name} has no profile "
                            "for these shapes",
                            found=", ".join(f"{k}={v}" for k, v in dims.items()),
                            expected=f"one of the operating points it was built for: {describe_points(self.graph)}",
                            fix="run at a built operating point; another batch needs a build with a larger max "
                                "batch, another video size a re-export and a build")
        point = _Point(index, shapes, shapes_at(self.graph, dims, "outputs"))
        self._points[key] = point
        return point

    def _on_device(self, x: torch.Tensor) -> torch.Tensor:
        if x.device != self.device:
            x = x.to(self.device)
        return x if x.is_contiguous() else x.contiguous()

    def _select(self, point: _Point, key: tuple, stream: int) -> None:
        """Switch profile and input shapes when the operating point changes (host-side state)."""
        if key == self._active_key:
            return
        if point.profile != self._active_profile:
            if not self._context.set_optimization_profile_async(point.profile, stream):
                raise RuntimeError(f"TensorRT refused optimization profile {point.profile} for {self.path}")
            self._active_profile = point.profile
        for name, shape in point.shapes.items():
            if not self._context.set_input_shape(name, shape):
                raise RuntimeError(f"TensorRT refused shape {shape} for {name} in profile {point.profile}")
        self._active_key = key

    def _alloc(self, point: _Point) -> dict[str, torch.Tensor]:
        return {n: torch.empty(s, dtype=self.dtypes[n], device=self.device) for n, s in point.out_shapes.items()}

    def _outputs(self, point: _Point, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fresh outputs (from torch's caching allocator), or the point's own buffers with reuse_outputs
        unless an input lives in one of them (TensorRT must not read and write the same memory)."""
        if self.reuse_outputs:
            if point.outputs is None:
                point.outputs = self._alloc(point)
            taken = {x.data_ptr() for x in feeds.values()}
            if not any(y.data_ptr() in taken for y in point.outputs.values()):
                return point.outputs
        return self._alloc(point)

    def _bind(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, x in tensors.items():
            if not self._context.set_tensor_address(name, x.data_ptr()):
                raise RuntimeError(f"TensorRT refused the address of {name} for {self.path}")

    def _execute(self, stream: int) -> None:
        if not self._context.execute_async_v3(stream):
            raise RuntimeError(f"TensorRT execution failed for {self.component}/{self.graph.name} "
                               "(see the TensorRT log above)")

    # -- CUDA graphs --------------------------------------------------------------------------------

    def _graph_run(self, point: _Point, feeds: Mapping[str, torch.Tensor], stream) -> dict[str, torch.Tensor]:
        """Copy the feeds into the point's static inputs and replay its graph; the first call at a point
        runs once eagerly (which also flushes TensorRT's deferred shape work) and then captures."""
        if point.graph is None:
            point.inputs = {n: torch.empty_like(x) for n, x in feeds.items()}
            point.outputs = self._alloc(point)
            self._copy_in(point, feeds)
            self._bind({**point.inputs, **point.outputs})
            self._execute(stream.cuda_stream)
            point.graph = self._capture()
        else:
            self._copy_in(point, feeds)
            point.graph.replay()
        outs = point.outputs
        return dict(outs) if self.reuse_outputs else {n: y.clone() for n, y in outs.items()}

    @staticmethod
    def _copy_in(point: _Point, feeds: Mapping[str, torch.Tensor]) -> None:
        for name, buf in point.inputs.items():
            buf.copy_(feeds[name], non_blocking=True)

    def _capture(self):
        graph = torch.cuda.CUDAGraph()
        # torch captures on its own side stream (made current inside the block); TensorRT must enqueue there
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._execute(torch.cuda.current_stream(self.device).cuda_stream)
        return graph
