"""TensorRT engines from the exported ONNX graphs: profiles, engine keys, the platform probe, the build.

All but ``build_engine`` is pure and runs on CPU. Profiles come from the graph's spec (one per operating
point, so each pyramid stage gets kernels tuned for its own shape); an engine key records all an engine
depends on (graph, weights, profiles, settings, TensorRT, GPU) so a stale engine is refused with a
message saying what changed. Networks are strongly typed (TensorRT 11 removed the FP16/BF16/FP8/INT8
builder flags): precision comes from the graph's dtypes and Q/DQ nodes, so ``BuildSettings.precision``
is only recorded. TensorRT and the GPU are probed in a child process (export/tensorrt/probe.py).

Manifest section written by ``helios-deploy build`` and read by the TensorRT runner:
    components.<component>.engines.<graph name> = {"file": "model.<key[:16]>.engine", "key": {fields},
                                                   "digest": sha256 of the fields, "report": {...}}
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ...errors import UserError
from ...fsutil import sha256_file
from ...specs import GraphSpec, resolve_shape

PRECISIONS = ("fp32", "bf16", "fp8")
REBUILD = "helios-deploy build ARTIFACTS --rebuild"
Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


# ---------------------------------------------------------------------------------------------------
# Optimization profiles, derived from the spec


def profiles(graph: GraphSpec, max_batch: int | None = None) -> list[Profile]:
    """One profile per operating point, in spec order: min = opt = max = the point's input shapes.

    With ``max_batch`` the batch axis may grow from the point's batch up to ``max_batch`` (max only;
    kernels stay tuned for the point's own shape).
    """
    if max_batch is not None:
        lo, hi = graph.ranges.get("batch", (1, 1))
        if "batch" not in graph.ranges or not lo <= max_batch <= hi:
            raise UserError(f"max batch {max_batch} is outside the exported batch range of {graph.name}",
                            expected=f"{lo}..{hi}", fix="pass a max batch inside the range, or re-export")
    out = []
    for point in graph.operating_points:
        dims = dict(point.dims)
        top = {**dims, "batch": max(max_batch, dims["batch"])} if max_batch else dims
        out.append({t.name: (resolve_shape(t, dims), resolve_shape(t, dims), resolve_shape(t, top))
                    for t in graph.inputs})
    return out


def select_profile(profile_shapes: Sequence[Profile], shapes: Mapping[str, Sequence[int]]) -> int | None:
    """Index of the first profile whose [min, max] holds every input shape, or None."""
    for i, prof in enumerate(profile_shapes):
        if all(len(shapes[n]) == len(lo) and all(a <= s <= b for s, a, b in zip(shapes[n], lo, hi))
               for n, (lo, _, hi) in prof.items()):
            return i
    return None


def describe_points(graph: GraphSpec) -> str:
    return "; ".join(f"{p.name} ({', '.join(f'{k}={v}' for k, v in p.dims.items())})" for p in graph.operating_points)


def audit_engine(graph: GraphSpec, io: Mapping[str, tuple[str, str]], profile_shapes: Sequence[Profile]) -> list[str]:
    """Every way an engine's tensors (name -> (input|output, dtype)) and profiles differ from the spec."""
    problems = []
    spec_io = {t.name: ("input", t.dtype) for t in graph.inputs}
    spec_io.update({t.name: ("output", t.dtype) for t in graph.outputs})
    for name, want in spec_io.items():
        if name not in io:
            problems.append(f"{name}: missing from the engine")
        elif tuple(io[name]) != want:
            problems.append(f"{name}: engine {' '.join(io[name])}, spec {' '.join(want)}")
    problems += [f"{name}: in the engine, not in the spec" for name in io if name not in spec_io]
    expected = profiles(graph)
    if len(profile_shapes) != len(expected):
        problems.append(f"{len(profile_shapes)} optimization profiles, expected {len(expected)} "
                        f"(one per operating point: {describe_points(graph)})")
        return problems
    for point, got, want in zip(graph.operating_points, profile_shapes, expected):
        for name, (_, opt, _) in want.items():
            if name in got and tuple(got[name][1]) != opt:
                problems.append(f"profile {point.name}: {name} opt shape {list(got[name][1])}, expected {list(opt)}")
    return problems


# ---------------------------------------------------------------------------------------------------
# Build settings and engine keys


@dataclass(frozen=True)
class BuildSettings:
    precision: str = "fp32"  # recorded only: the strongly typed network takes its types from the graph
    opt_level: int = 4  # IBuilderConfig.builder_optimization_level, 0..5
    workspace: int | None = None  # bytes, MemoryPoolType.WORKSPACE (scratch per layer at run time)
    # bytes of device memory an engine's weights may take: set, the engine is built with weight streaming
    # (BuilderFlag.WEIGHT_STREAMING, strongly typed networks only) and the runner streams the weights above
    # the budget from host memory (ICudaEngine.weight_streaming_budget_v2)
    memory_budget: int | None = None
    timing_cache: str | None = None  # file loaded before and saved after the build (not part of the key)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}", expected=", ".join(PRECISIONS))
        if not 0 <= self.opt_level <= 5:
            raise UserError(f"optimization level {self.opt_level} is outside 0..5", fix="pass --opt-level 4")
        for name in ("workspace", "memory_budget"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"{name} must be a positive number of bytes", found=str(value))

    def key(self) -> dict:
        """The settings that change the engine (the timing cache only changes how long a build takes)."""
        return {k: v for k, v in asdict(self).items() if k != "timing_cache"}


KEY_LABELS = {
    "graph_sha256": "ONNX graph", "weights_sha256": "weights", "profiles": "optimization profiles",
    "settings": "build settings", "tensorrt": "TensorRT version", "gpu": "GPU",
    "compute_capability": "compute capability",
}


def key_fields(graph_sha256: str, weights_sha256: str | None, profile_list: Sequence[Profile],
               settings: BuildSettings | Mapping, trt_version: str | None, gpu_name: str | None,
               compute_capability: str | None) -> dict:
    """Everything an engine depends on, as plain JSON values (what the manifest records)."""
    fields = {
        "graph_sha256": graph_sha256, "weights_sha256": weights_sha256, "profiles": profile_list,
        "settings": settings.key() if isinstance(settings, BuildSettings) else dict(settings),
        "tensorrt": trt_version, "gpu": gpu_name, "compute_capability": compute_capability,
    }
    return json.loads(json.dumps(fields))  # tuples -> lists, as they come back from the manifest


def key_digest(fields: Mapping) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def engine_key(onnx_path: str | Path, data_path: str | Path | None, profile_list: Sequence[Profile],
               settings: BuildSettings | Mapping, trt_version: str | None, gpu_name: str | None,
               compute_capability: str | None) -> str:
    """sha256 over the graph and weights files, the profiles, the settings, TensorRT and the GPU."""
    weights = sha256_file(Path(data_path)) if data_path and Path(data_path).is_file() else None
    return key_digest(key_fields(sha256_file(Path(onnx_path)), weights, profile_list, settings,
                                 trt_version, gpu_name, compute_capability))


def engine_filename(graph_file: str, key: str) -> str:
    return f"{Path(graph_file).stem}.{key[:16]}.engine"


def _short(field: str, value) -> str:
    if field.endswith("sha256") or value is None:
        return str(value)[:12]
    if field == "profiles" and isinstance(value, list):  # count + the first input's opt shapes
        first = next(iter(value[0]), None) if value and isinstance(value[0], Mapping) else None
        shapes = ", ".join("x".join(map(str, p[first][1])) for p in value if first in p) if first else ""
        return f"{len(value)} profiles" + (f" ({first} {shapes})" if shapes else "")
    return str(value)


def key_changes(recorded: Mapping, current: Mapping) -> list[str]:
    """One line per key field that differs: what it was, what it is now."""
    lines = []
    for field, label in KEY_LABELS.items():
        old, new = recorded.get(field), current.get(field)
        if old == new:
            continue
        if field == "settings" and isinstance(old, Mapping) and isinstance(new, Mapping):
            diff = [f"{k} {old.get(k)} -> {new.get(k)}" for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k)]
            lines.append(f"{label}: {', '.join(diff)}")
        elif _short(field, old) == _short(field, new):
            lines.append(f"{label}: same count, other shapes")
        else:
            lines.append(f"{label}: {_short(field, old)} -> {_short(field, new)}")
    return lines


def check_engine_key(recorded: Mapping, current: Mapping, name: str = "engine") -> None:
    """Refuse an engine whose recorded key differs from the current one, naming what changed."""
    changes = key_changes(recorded, current)
    if changes:
        what = ", ".join(line.split(":")[0] for line in changes)
        raise UserError(f"the TensorRT engine for {name} is stale: {what} changed since it was built",
                        found="; ".join(changes),
                        expected="the graph, weights, settings, TensorRT and GPU it was built with",
                        fix=f"rebuild the engine: {REBUILD}")


def engine_entry(manifest: Mapping, component: str, graph_name: str) -> dict:
    """The manifest's record of one graph's engine, or a UserError saying to run build."""
    engines = manifest.get("components", {}).get(component, {}).get("engines") or {}
    entry = engines.get(graph_name)
    if not entry or "file" not in entry or "key" not in entry:
        built = ", ".join(f"{component}/{g}" for g in engines) or "none"
        raise UserError(f"no TensorRT engine for {component}/{graph_name}; run helios-deploy build",
                        found=f"engines in the manifest: {built}",
                        fix="helios-deploy build ARTIFACTS (on the GPU that will run it), then use --backend tensorrt")
    return dict(entry)


def source_entry(manifest: Mapping, component: str, graph_name: str, precision: str) -> dict:
    """The manifest's record ({file, data, file_sha256, data_sha256}) of the ONNX graph an engine of this
    precision is built from. A strongly typed network takes its precision from the graph, so: fp32 builds
    from the export; bf16 from the lowered graphs (`quantize --precision bf16`); fp8 from the FP8 graph of
    `quantize --precision fp8` lowered to bf16 outside its Q/DQ layers (transformer), and from the bf16
    graphs for the rest."""
    comp = manifest["components"][component]
    if precision == "fp32":
        return dict(comp["graphs"][graph_name])
    if precision == "fp8" and graph_name == "model" and (component == "transformer" or comp.get("fp8")):
        if not comp.get("fp8"):
            raise UserError(f"no FP8 graph for {component}",
                            fix="run `helios-deploy quantize ARTIFACTS --precision fp8` first")
        if not comp["fp8"].get("bf16"):
            raise UserError(f"the FP8 graph of {component} has not been lowered to bf16 for TensorRT",
                            fix="re-run `helios-deploy quantize ARTIFACTS --precision fp8`")
        return dict(comp["fp8"]["bf16"])
    lowered = (comp.get("bf16") or {}).get(graph_name)
    if not lowered:
        raise UserError(f"no bf16 graph for {component}/{graph_name} (a {precision} engine is bf16 outside FP8 "
                        "layers, and a strongly typed network takes its precision from the graph)",
                        fix="run `helios-deploy quantize ARTIFACTS --precision bf16` first")
    return dict(lowered)


def engine_record(file: str, fields: Mapping, report: Mapping | None = None) -> dict:
    """The manifest entry for one engine (what engine_entry reads back)."""
    return {"file": file, "digest": key_digest(fields), "key": dict(fields), "report": dict(report or {})}


# ---------------------------------------------------------------------------------------------------
# The build (GPU only; thin calls into the TensorRT API)


def _network_flags(trt) -> int:
    """Strongly typed: a flag on TensorRT 10, always on (flag deprecated, ignored) from TensorRT 11."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None or int(trt.__version__.split(".")[0]) >= 11:
        return 0
    return 1 << int(flag)


def _parse(trt, builder, logger, onnx_path: Path, graph: GraphSpec):
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so external weights beside it are found
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UserError(f"TensorRT could not parse {onnx_path}", found="; ".join(errors[:5]) or "no parser errors",
                        fix="check the graph with `polygraphy inspect model`, or re-export")
    names = sorted(network.get_input(i).name for i in range(network.num_inputs))
    if names != sorted(t.name for t in graph.inputs):
        raise UserError(f"{onnx_path} has other inputs than the {graph.name} spec", found=", ".join(names),
                        expected=", ".join(t.name for t in graph.inputs), fix="re-export the artifacts")
    return network, parser


def _configure(trt, builder, graph: GraphSpec, settings: BuildSettings, max_batch: int | None):
    config = builder.create_builder_config()
    config.builder_optimization_level = settings.opt_level
    if settings.workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace)
    if settings.memory_budget:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    for prof in profiles(graph, max_batch):
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    if settings.timing_cache:
        path = Path(settings.timing_cache)
        cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
        if not config.set_timing_cache(cache, False):  # from another TensorRT / GPU: start afresh
            config.set_timing_cache(config.create_timing_cache(b""), False)
    return config


def write_atomic(path: Path, data) -> None:
    """Write to a temporary file beside ``path`` and move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _inspect(trt, logger, plan, n_profiles: int) -> dict:
    """Device memory and weight sizes, where this TensorRT version exposes them."""
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        return {}
    by_profile = getattr(engine, "get_device_memory_size_for_profile_v2", None) or \
        getattr(engine, "get_device_memory_size_for_profile", None)
    stat = getattr(trt, "EngineStat", None)
    return {
        "device_memory_bytes": getattr(engine, "device_memory_size_v2", getattr(engine, "device_memory_size", None)),
        "device_memory_bytes_by_profile": [by_profile(i) for i in range(n_profiles)] if by_profile else None,
        "weights_bytes": engine.get_engine_stat(stat.TOTAL_WEIGHTS_SIZE)
        if stat is not None and hasattr(engine, "get_engine_stat") else None,
        "streamable_weights_bytes": getattr(engine, "streamable_weights_size", None),
    }


def build_engine(onnx_path: str | Path, graph: GraphSpec, out_path: str | Path, settings: BuildSettings,
                 max_batch: int | None = None, inspect: bool = True) -> dict:
    """Build ``graph`` into a strongly typed engine with one profile per operating point; returns a report."""
    import tensorrt as trt

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, onnx_path, graph)
    config = _configure(trt, builder, graph, settings, max_batch)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT could not build an engine from {onnx_path}", found="see the TensorRT log above",
                        fix="raise --workspace, or lower --opt-level")
    seconds = time.perf_counter() - t0
    if settings.timing_cache:
        write_atomic(Path(settings.timing_cache), config.get_timing_cache().serialize())
    write_atomic(out_path, plan)
    report = {"engine": out_path.name, "engine_bytes": out_path.stat().st_size, "build_seconds": round(seconds, 2),
              "profiles": len(graph.operating_points), "tensorrt": trt.__version__}
    if inspect:
        report.update(_inspect(trt, logger, plan, len(graph.operating_points)))
    if settings.memory_budget:
        report["weight_streaming_budget_bytes"] = settings.memory_budget
    return report


def weight_streaming_budget(settings: Mapping, streamable_bytes: int | None) -> int | None:
    """The budget to set on an engine built with weight streaming: the build's --memory-budget when the
    streamable weights exceed it, else None (keep all weights on the device)."""
    budget = settings.get("memory_budget")
    if not budget or streamable_bytes is None or streamable_bytes <= budget:
        return None
    return int(budget)
