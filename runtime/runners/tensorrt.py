"""TensorRT runner: one engine per graph, one execution context per operating point (optimization profile),
torch CUDA tensors bound by address, run on the runner's own CUDA stream.

Activation, with the runner's device current: the platform is probed in a child process, the engine key is
checked against this TensorRT / GPU, the engine file's size and sha256 against the build's record (on the bytes
that are then deserialised), the engine's tensors, dtypes and profiles against the spec; the weight-streaming
budget is set before any context exists (contexts size their memory by it), and one activation buffer, as large
as the largest profile needs, is allocated for all contexts (USER_MANAGED: every run is on the runner's stream,
so no two contexts ever use it at once).

Each distinct set of input shapes (an operating point, or another batch within a profile widened with
``build --max-batch``) gets its own context on first use: its profile selected and its input shapes set once,
the output shapes TensorRT computes checked against the spec's, the shared activation memory attached. With
``cuda_graph`` the point's context also gets fixed buffers, one warm-up run and a captured CUDA graph, and is
never touched again (a graph replays the context state and addresses it captured). The graph is captured into
a local and kept only when the capture succeeds; a capture that fails (a layer that cannot be captured) is
warned about once, its CUDA error cleared, and that point runs without a graph from then on (as trtexec does).
A batch that alternates within one profile therefore replays each shape's graph: nothing is captured twice.

TensorRT 10.1+ (the probe refuses older): ``set_optimization_profile_async`` raises RuntimeError on failure
(caught and re-raised naming the profile); ``update_device_memory_size_for_shapes`` returning 0 for a profile
that needs memory is an error. The engine file is read through a memory map: its size and sha256 are checked
on the bytes TensorRT then deserialises, and the host holds no private copy of them besides TensorRT's own.
Deactivation releases graphs, contexts, the activation memory and the engine with the runner's device current.

Streams: ``infer`` makes the runner's stream wait for the caller's current stream (the feeds the caller wrote),
enqueues there (never on the legacy default stream, where execute_async_v3 costs extra synchronisations),
then makes the caller's stream wait for the runner's and ``record_stream``s the outputs on the caller's stream
(the caching allocator must not hand their memory out again while the caller's work may still read them).
``infer`` and activation run with the runner's device current (a runner on cuda:1 while cuda:0 is current).

tensorrt is imported only inside ``_activate_impl``, so this module imports anywhere. All torch.cuda calls go
through ``TorchCuda`` (the CPU tests swap in a recording fake).

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

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from ...errors import UserError
from ...export.tensorrt.refit import check_engine_lora, engine_mode, refit_stripped
from ...fsutil import sha256_file
from ...export.tensorrt.engines import (REBUILD, audit_engine, check_engine_bytes, check_engine_key, describe_points,
                                        engine_entry, mapped_engine, select_profile, source_entry, trt_dtype,
                                        weight_sizes, weight_streaming_budget)
from ...export.tensorrt.probe import require_gpu_tensorrt
from ...model.specs import GraphSpec, bind_symbols, shapes_at
from .base import Runner

_TORCH = {"float32": torch.float32, "int64": torch.int64, "uint8": torch.uint8}


class TorchCuda:
    """Every torch.cuda call the runner makes."""

    available = staticmethod(torch.cuda.is_available)
    current_device = staticmethod(torch.cuda.current_device)
    device = staticmethod(torch.cuda.device)  # context manager: the current device inside
    current_stream = staticmethod(torch.cuda.current_stream)
    new_stream = staticmethod(torch.cuda.Stream)
    use_stream = staticmethod(torch.cuda.stream)  # context manager: the current stream inside
    new_graph = staticmethod(torch.cuda.CUDAGraph)

    @staticmethod
    def empty(shape, dtype, device) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    @staticmethod
    def on(x: torch.Tensor, device) -> bool:
        return x.device == device

    @staticmethod
    def to(x: torch.Tensor, device) -> torch.Tensor:
        return x.to(device)

    @staticmethod
    def record_stream(x: torch.Tensor, stream) -> None:
        x.record_stream(stream)

    @staticmethod
    def capture(graph, stream):
        return torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local")

    @staticmethod
    def clear_error() -> str:
        """Reset the CUDA runtime's last error after a failed capture (trtexec calls cudaGetLastError there too),
        so the next CUDA call does not report it; the error's name."""
        import ctypes

        for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
            try:
                lib = ctypes.CDLL(name)  # the copy torch loaded, if it is loaded
            except OSError:
                continue
            lib.cudaGetErrorName.restype = ctypes.c_char_p
            return lib.cudaGetErrorName(lib.cudaGetLastError()).decode()
        return "libcudart not found: error not cleared"


@dataclass
class _Point:
    """One optimization profile's own execution context, the input shapes set on it and its buffers."""

    profile: int
    context: object  # tensorrt.IExecutionContext
    key: tuple | None = None  # the input shapes set on the context
    out_shapes: dict | None = None
    inputs: dict | None = None  # static, cuda_graph only
    outputs: dict | None = None  # static, cuda_graph or reuse_outputs
    graph: object = None  # torch.cuda.CUDAGraph, captured from this context only
    no_graph: bool = False  # its capture failed: this point runs without a graph


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
    cuda = TorchCuda()

    def __init__(self, root: Path, manifest: dict, component: str, graph: GraphSpec, device: str, *,
                 cuda_graph: bool = False, reuse_outputs: bool = False, sync: bool = True):
        super().__init__(graph, component, device)
        if self.device.type != "cuda":
            raise UserError(f"the tensorrt backend runs on CUDA devices, not {device!r}",
                            fix="pass --device cuda, or use --backend onnxruntime on CPU")
        self.cuda_graph, self.reuse_outputs, self.sync = cuda_graph, reuse_outputs, sync
        self.entry = engine_entry(manifest, component, graph.name)
        self.manifest = manifest
        precision = self.entry["key"].get("settings", {}).get("precision", "fp32")
        self.graph_entry = source_entry(manifest, component, graph.name, precision)  # what it was built from
        self.path = Path(root) / component / self.entry["file"]
        if not self.path.is_file():
            raise UserError(f"the TensorRT engine {self.path} is missing", fix=f"rebuild it: {REBUILD}")
        self.names = [t.name for t in graph.inputs]
        self.dtypes = {t.name: _TORCH[t.dtype] for t in graph.tensors}
        self.captures = 0  # CUDA graphs captured (one per operating point unless shapes change in a profile)

    # -- activation ---------------------------------------------------------------------------------

    def _activate_impl(self) -> None:
        name = f"{self.component}/{self.graph.name}"
        platform = require_gpu_tensorrt(self.device.index or 0)
        if not self.cuda.available():
            raise UserError("the tensorrt backend needs a CUDA build of PyTorch",
                            found=f"torch {torch.__version__} without CUDA", fix="install torch built for CUDA")
        if self.device.index is None:
            self.device = torch.device("cuda", self.cuda.current_device())
            if self.device.index:
                platform = require_gpu_tensorrt(self.device.index)
        check_engine_key(self.entry["key"], runtime_key(self.entry["key"], platform, self.graph_entry), name)
        check_engine_lora(self.entry, self.manifest, self.component, name)
        import tensorrt as trt

        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with self.cuda.device(self.device):
            self._stream = self.cuda.new_stream(self.device)
            with mapped_engine(self.path) as data:  # what is checked is what is loaded; no private host copy
                check_engine_bytes(self.entry, data, self.path)
                engine = self._runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise UserError(f"TensorRT could not load {self.path}", found="see the TensorRT log above",
                                fix=f"rebuild it on this machine: {REBUILD}")
            if engine_mode(self.entry) == "strip":  # a plan without weights: refit from the ONNX it was built from
                self._refit_stripped(engine)
            self._audit(engine)
            self._apply_budget(engine)
            self._profile_memory = [int(engine.get_device_memory_size_for_profile_v2(i))
                                    for i in range(engine.num_optimization_profiles)]  # after the budget: depends on it
            with self.cuda.use_stream(self._stream):  # freed on the runner's stream, after its last run
                self._activations = self.cuda.empty((max(self._profile_memory),), torch.uint8, self.device)
        self._engine = engine
        self._points: dict[tuple, _Point] = {}  # input shapes -> their own context (and CUDA graph)

    def _refit_stripped(self, engine) -> None:
        """Refit a weight-stripped engine from the ONNX graph and weights it was built from. Built with
        REFIT_IDENTICAL, it may only take exactly those weights (NvInfer.h): the graph file and the weights file
        are both hashed and must be the ones the engine key records."""
        key = self.entry["key"]
        onnx_path = self.path.parent / self.graph_entry["file"]
        data = self.path.parent / self.graph_entry["data"]
        for path, want in ((onnx_path, key.get("graph_sha256")), (data, key.get("weights_sha256"))):
            if not path.is_file() or sha256_file(path) != want:
                raise UserError(f"the weight-stripped engine {self.path} can only be refitted from the files it was "
                                "built from (REFIT_IDENTICAL)",
                                found=f"{path} is missing or changed since the build",
                                fix=f"restore the artifacts, or rebuild the engine: {REBUILD}")
        refit_stripped(self._trt, self._logger, engine, onnx_path)

    def _audit(self, engine) -> None:
        """Check the engine's tensors, dtypes and profiles against the spec; keep the profile shapes."""
        io = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = "input" if engine.get_tensor_mode(name) == self._trt.TensorIOMode.INPUT else "output"
            io[name] = (mode, trt_dtype(engine.get_tensor_dtype(name)))
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

    def _apply_budget(self, engine) -> None:
        """The build's --memory-budget as weight_streaming_budget_v2, before any execution context exists."""
        total, streamable = weight_sizes(self._trt, engine)
        budget, warning = weight_streaming_budget(self.entry.get("memory_budget"), total, streamable)
        if warning:
            warnings.warn(f"{self.component}/{self.graph.name}: {warning}", stacklevel=2)
        if budget is not None:
            engine.weight_streaming_budget_v2 = budget
            if engine.weight_streaming_budget_v2 != budget:
                raise RuntimeError(f"TensorRT refused the weight streaming budget {budget} for {self.path}")
        self.weight_streaming_budget = budget

    def _deactivate_impl(self) -> None:
        """Graphs, buffers and contexts, then the activation memory, the engine and the runtime, all released
        with the runner's device current (CUDA frees on the device that is current)."""
        with self.cuda.device(self.device):
            self._stream.synchronize()  # nothing of the runner's is in flight when its memory goes
            for point in self._points.values():  # CUDA graphs and buffers first, then the contexts
                point.graph = point.inputs = point.outputs = None
                point.context = None
            self._points.clear()
            self._activations = None  # after every context that used it
            del self._engine
            del self._runtime

    # -- inference ----------------------------------------------------------------------------------

    def _infer_impl(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = tuple(tuple(feeds[n].shape) for n in self.names)
        with self.cuda.device(self.device):
            caller, ours = self.cuda.current_stream(self.device), self._stream
            ours.wait_stream(caller)  # the feeds the caller wrote are ready
            with self.cuda.use_stream(ours):
                point = self._point(key, ours)
                inputs = {n: self._on_device(feeds[n], ours) for n in self.names}
                graphed = self.cuda_graph and not point.no_graph
                outs = self._graph_run(point, inputs, ours) if graphed else self._run(point, inputs, ours)
            caller.wait_stream(ours)  # the caller's later work sees the outputs
            for y in outs.values():
                self.cuda.record_stream(y, caller)
            if self.sync:
                ours.synchronize()
        return outs

    def _point(self, key: tuple, stream) -> _Point:
        """The context for these input shapes: one per distinct shapes seen (on the profile select_profile picks),
        set up once and never changed, so a batch that alternates within one profile (``build --max-batch``)
        replays each shape's own CUDA graph instead of capturing again at every change. Contexts share the one
        activation buffer (USER_MANAGED; every run is on the runner's stream)."""
        point = self._points.get(key)
        if point is None:
            point = self._new_point(key, self._find_profile(key), stream)
            self._set_shapes(point, key)
        return point

    def _find_profile(self, key: tuple) -> int:
        shapes = dict(zip(self.names, key))
        index = select_profile(self.profile_shapes, shapes)
        if index is None:
            dims = bind_symbols(self.graph, shapes)
            raise UserError(f"the TensorRT engine for {self.component}/{self.graph.name} has no profile "
                            "for these shapes",
                            found=", ".join(f"{k}={v}" for k, v in dims.items()),
                            expected=f"one of the operating points it was built for: {describe_points(self.graph)}",
                            fix="run at a built operating point; another batch needs a build with a larger max "
                                "batch, another video size a re-export and a build")
        return index

    def _new_point(self, key: tuple, index: int, stream) -> _Point:
        """The profile's own context, its activation memory supplied by the runner (shared by all contexts)."""
        strategy = self._trt.ExecutionContextAllocationStrategy.USER_MANAGED
        context = self._engine.create_execution_context(strategy)
        if context is None:
            raise UserError(f"could not create a TensorRT execution context for {self.component}/{self.graph.name}",
                            found="see the TensorRT log above (out of GPU memory?)")
        try:  # the binding raises RuntimeError on failure (it does not return False)
            context.set_optimization_profile_async(index, stream.cuda_stream)
        except RuntimeError as e:
            point = self.graph.operating_points[index].name if index < len(self.graph.operating_points) else "?"
            raise RuntimeError(f"TensorRT refused optimization profile {index} ({point}) of {self.path} on a new "
                               f"execution context: {e}") from e
        point = self._points[key] = _Point(index, context)
        return point

    def _set_shapes(self, point: _Point, key: tuple) -> None:
        """Input shapes on the point's new context (once: a context's shapes never change), the output shapes
        TensorRT then computes checked against the buffers the spec sizes, the activation memory attached."""
        shapes = dict(zip(self.names, key))
        context = point.context
        for name, shape in shapes.items():
            if not context.set_input_shape(name, shape):
                raise RuntimeError(f"TensorRT refused shape {shape} for {name} in profile {point.profile}")
        out_shapes = shapes_at(self.graph, bind_symbols(self.graph, shapes), "outputs")
        wrong = [f"{n}: engine {list(got)}, spec {list(s)}" for n, s in out_shapes.items()
                 if (got := tuple(int(d) for d in context.get_tensor_shape(n))) != s]
        if wrong:
            at = ", ".join(f"{n}={list(s)}" for n, s in shapes.items())
            raise UserError(f"the TensorRT engine {self.path} computes other output shapes than the "
                            f"{self.component}/{self.graph.name} spec at {at}", found="; ".join(wrong),
                            fix=f"rebuild it: {REBUILD}")
        size = self._activations.numel()
        need = context.update_device_memory_size_for_shapes()
        if need == 0 and self._profile_memory[point.profile] > 0:  # 0 is how the call reports a failure
            raise RuntimeError(f"TensorRT reported no activation memory for profile {point.profile} of {self.path} "
                               f"at {key}, which needs {self._profile_memory[point.profile]} bytes: "
                               "update_device_memory_size_for_shapes failed (see the TensorRT log above)")
        if need > size:
            raise RuntimeError(f"TensorRT needs {need} bytes of activation memory for profile {point.profile} of "
                               f"{self.path}, more than the {size} the engine reported for its largest profile")
        context.set_device_memory(self._activations.data_ptr(), size)  # TensorRT 10.1+
        point.key, point.out_shapes = key, out_shapes
        point.inputs = point.outputs = point.graph = None  # no_graph stays: that context's layers cannot be captured

    def _on_device(self, x: torch.Tensor, stream) -> torch.Tensor:
        if self.cuda.on(x, self.device):
            self.cuda.record_stream(x, stream)  # the caller may free it while the runner's stream reads it
        else:
            x = self.cuda.to(x, self.device)  # on the runner's stream
        return x if x.is_contiguous() else x.contiguous()

    def _alloc(self, point: _Point) -> dict[str, torch.Tensor]:
        return {n: self.cuda.empty(s, self.dtypes[n], self.device) for n, s in point.out_shapes.items()}

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

    def _run(self, point: _Point, inputs: Mapping[str, torch.Tensor], stream) -> dict[str, torch.Tensor]:
        outs = self._outputs(point, inputs)
        self._bind(point.context, {**inputs, **outs})
        self._execute(point.context, stream.cuda_stream)
        return outs

    def _bind(self, context, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, x in tensors.items():
            if not context.set_tensor_address(name, x.data_ptr()):
                raise RuntimeError(f"TensorRT refused the address of {name} for {self.path}")

    def _execute(self, context, stream: int) -> None:
        if not context.execute_async_v3(stream):
            raise RuntimeError(f"TensorRT execution failed for {self.component}/{self.graph.name} "
                               "(see the TensorRT log above)")

    # -- CUDA graphs --------------------------------------------------------------------------------

    def _graph_run(self, point: _Point, inputs: Mapping[str, torch.Tensor], stream) -> dict[str, torch.Tensor]:
        """Copy the feeds into the point's static inputs and replay its graph. The first call at a point binds
        the static buffers once, runs once eagerly (which also flushes TensorRT's deferred shape work) and
        captures; nothing touches that context afterwards."""
        if point.graph is None:
            point.inputs = {n: self.cuda.empty(x.shape, x.dtype, self.device) for n, x in inputs.items()}
            point.outputs = self._alloc(point)
            self._copy_in(point, inputs)
            self._bind(point.context, {**point.inputs, **point.outputs})
            self._execute(point.context, stream.cuda_stream)  # this call's outputs
            point.graph = self._capture(point, stream)
        else:
            self._copy_in(point, inputs)
            point.graph.replay()
        outs = point.outputs
        return dict(outs) if self.reuse_outputs else {n: y.clone() for n, y in outs.items()}

    def _capture(self, point: _Point, stream):
        """The point's CUDA graph, or None when capture fails (a layer that cannot be captured): then a warning,
        the CUDA error cleared, and the point runs without a graph from now on, as trtexec does."""
        graph = self.cuda.new_graph()
        try:
            with self.cuda.capture(graph, stream):
                self._execute(point.context, stream.cuda_stream)
        except Exception as e:  # noqa: BLE001 - whatever the capture raised, the graph is unusable
            cleared = self.cuda.clear_error()
            point.no_graph, point.inputs = True, None
            name = self.graph.operating_points[point.profile].name
            warnings.warn(f"{self.component}/{self.graph.name} at {name}: CUDA graph capture failed ({e}; "
                          f"cudaGetLastError: {cleared}): this operating point runs without a CUDA graph", stacklevel=4)
            return None
        self.captures += 1
        return graph

    @staticmethod
    def _copy_in(point: _Point, feeds: Mapping[str, torch.Tensor]) -> None:
        for name, buf in point.inputs.items():
            buf.copy_(feeds[name], non_blocking=True)

