"""TensorRT engines from the exported ONNX graphs: profiles, engine keys, the manifest's engine records.

Everything here is pure and runs on CPU (the TensorRT builder calls are in builder.py, the runner in
runtime/runners/tensorrt.py). Profiles come from the graph's spec (one per operating point, so each
pyramid stage gets kernels tuned for its own shape); an engine key records all an engine depends on
(graph, weights, profiles, settings, TensorRT, GPU) so a stale engine is refused with a message saying
what changed. Networks are strongly typed (TensorRT 11 removed the FP16/BF16/FP8/INT8 builder flags):
precision comes from the graph's dtypes and Q/DQ nodes, so ``BuildSettings.precision`` is only recorded.
TensorRT and the GPU are probed in a child process (export/tensorrt/probe.py).

Manifest section written by ``helios-deploy build`` and read by the TensorRT runner:
    components.<component>.engines.<graph name> = {
        "file": "model.<key[:16]>.engine",
        "key": {fields}, "digest": sha256 of the fields,
        "memory_budget": bytes all weights may take on the device, or null (not part of the key: only
                         weight streaming on/off changes the engine, the budget is applied at load),
        "report": {"engine_bytes", "engine_sha256" (the engine file itself, checked once per load), ...}}
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ...errors import UserError
from ...fsutil import sha256_file
from ...model.specs import GraphSpec, resolve_shape

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
    """Index of the profile to run ``shapes`` on, or None when no profile's [min, max] holds them. Of the profiles
    that hold them, the one whose opt shapes are nearest (exactly equal first): with ``build --max-batch`` a
    batch-1 point's profile also holds batch 2, and a batch-2 call must still run on the batch-2 point's profile,
    whose kernels were tuned for it."""
    best, best_cost = None, None
    for i, prof in enumerate(profile_shapes):
        if not all(len(shapes[n]) == len(lo) and all(a <= s <= b for s, a, b in zip(shapes[n], lo, hi))
                   for n, (lo, _, hi) in prof.items()):
            continue
        cost = sum(abs(s - o) for n, (_, opt, _) in prof.items() for s, o in zip(shapes[n], opt))
        if best_cost is None or cost < best_cost:
            best, best_cost = i, cost
    return best


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
    # bytes of device memory all of an engine's weights may take: set, the engine is built with weight
    # streaming (BuilderFlag.WEIGHT_STREAMING) and the runner keeps the weights TensorRT cannot stream plus
    # as many streamable ones as fit on the device, streaming the rest from host memory
    # (weight_streaming_budget below). Only on/off is part of the key.
    memory_budget: int | None = None
    timing_cache: str | None = None  # file loaded before and saved after the build (not part of the key)
    refittable: bool = False  # BuilderFlag.REFIT: `refit` can swap LoRA weights in place (export/tensorrt/refit.py)
    strip_weights: bool = False  # STRIP_PLAN + REFIT_IDENTICAL: a plan without weights, refitted from the ONNX at load
    tf32: bool = False  # fp32 builds only: allow TF32 matmuls (BuilderFlag.TF32, on by default in TensorRT)

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
        """The settings that change the engine: the timing cache only changes how long a build takes, and the
        budget's value only what the runner keeps on the device (weight streaming on/off changes the engine)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("timing_cache", "memory_budget", "tf32")
               and not (k in ("refittable", "strip_weights") and not v)}  # off: keys of older engines unchanged
        if self.precision == "fp32":  # engines built before TF32 was turned off had it on: their key differs
            out["tf32"] = self.tf32
        out["weight_streaming"] = self.memory_budget is not None
        return out


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


def engine_mode(entry: Mapping) -> str | None:
    """"refit", "strip" or None (built without --refittable / --strip-weights)."""
    settings = (entry.get("key") or {}).get("settings", {})
    return "strip" if settings.get("strip_weights") else "refit" if settings.get("refittable") else None


def engine_record(file: str, fields: Mapping, report: Mapping | None = None, memory_budget: int | None = None) -> dict:
    """The manifest entry for one engine (what engine_entry reads back); ``report`` is build_engine's, with the
    engine file's size and sha256 (a record without them is refused at load: check_engine_bytes)."""
    return {"file": file, "digest": key_digest(fields), "key": dict(fields), "memory_budget": memory_budget,
            "report": dict(report or {})}


def _engine_file_problem(entry: Mapping, size: int, digest) -> str | None:
    report = entry.get("report") or {}
    if "engine_sha256" not in report or "engine_bytes" not in report:
        return "the manifest records no size and sha256 for it (built by an older helios-deploy)"
    if size != report["engine_bytes"]:
        return f"{size} bytes, the build wrote {report['engine_bytes']}"
    found = digest()
    if found != report["engine_sha256"]:
        return f"sha256 {found[:12]}, the build wrote {report['engine_sha256'][:12]} (same size)"
    return None


def engine_file_problem(entry: Mapping, path: Path) -> str | None:
    """Why the engine file at ``path`` is not the one the build recorded, or None (size first, then sha256)."""
    if not path.is_file():
        return "missing"
    return _engine_file_problem(entry, path.stat().st_size, lambda: sha256_file(path))


def check_engine_bytes(entry: Mapping, data, path: Path) -> None:
    """Refuse engine bytes (as read for deserialisation, so what is checked is what is loaded) that are not
    the file the build wrote: a swapped or modified ``.engine`` with the right name."""
    problem = _engine_file_problem(entry, memoryview(data).nbytes, lambda: hashlib.sha256(data).hexdigest())
    if problem:
        raise UserError(f"the TensorRT engine {path} is not the one `build` recorded in the manifest",
                        found=problem, expected="the engine file as the build wrote it",
                        fix=f"rebuild it: {REBUILD}")


# ---------------------------------------------------------------------------------------------------
# What the runner reads from an engine


# TensorRT DataType member names (``.name``; str() of the enum differs between binding versions) -> numpy names
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
              "INT8": "int8", "UINT8": "uint8", "BOOL": "bool", "FP8": "float8_e4m3fn", "INT4": "int4",
              "FP4": "float4_e2m1fn"}


def trt_dtype(dtype) -> str:
    """The numpy name of a ``tensorrt.DataType`` member, from its ``.name``."""
    name = dtype.name
    return TRT_DTYPES.get(name, name.lower())


# ICudaEngine.get_engine_stat / EngineStat: absent from the 10.8.0 ICudaEngine member list, present in 10.14.1's
# (the releases in between were not checked), so it is only used from 10.14 on
ENGINE_STAT_SINCE = (10, 14)


def weight_sizes(trt, engine) -> tuple[int | None, int]:
    """(all weights or None, streamable weights) of a deserialised engine, in bytes. streamable_weights_size is
    TensorRT 10.1+ (the minimum the probe accepts); EngineStat.TOTAL_WEIGHTS_SIZE is read from 10.14 on."""
    from .probe import tensorrt_version

    total = None
    if tensorrt_version(trt.__version__)[:2] >= ENGINE_STAT_SINCE:
        total = int(engine.get_engine_stat(trt.EngineStat.TOTAL_WEIGHTS_SIZE))
    return total, int(engine.streamable_weights_size)


@contextlib.contextmanager
def mapped_engine(path: Path):
    """The engine file's bytes as a read-only memory map: hashing and deserialising read the page cache, so the
    host holds no second private copy of a multi-GB engine (the peak is TensorRT's own copy of the engine, plus
    file pages the kernel may drop at any time)."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            yield b""
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            yield data


def weight_streaming_budget(memory_budget: int | None, total_bytes: int | None,
                            streamable_bytes: int | None) -> tuple[int | None, str | None]:
    """(value for ``ICudaEngine.weight_streaming_budget_v2`` or None to leave every weight on the device,
    a warning or None).

    ``memory_budget`` (``build --memory-budget``) is what all the engine's weights may take on the device;
    weight_streaming_budget_v2 limits only the streamable ones, so the weights TensorRT cannot stream
    (TOTAL_WEIGHTS_SIZE - streamable_weights_size) come off it first. A budget below them cannot be met: one
    UserError. A TensorRT that does not report its total weights gets the budget as a streamable-weights
    budget, with a warning saying so."""
    if memory_budget is None:
        return None, None
    if streamable_bytes is None:
        return None, ("this TensorRT reports no streamable weights (ICudaEngine.streamable_weights_size): "
                      f"--memory-budget {memory_budget} is not applied and every weight stays on the device")
    if total_bytes is None:
        budget = min(int(memory_budget), streamable_bytes)
        return (None if budget >= streamable_bytes else budget), (
            "this TensorRT does not report the engine's total weights size (EngineStat.TOTAL_WEIGHTS_SIZE): "
            f"--memory-budget {memory_budget} is applied to the streamable weights only; the weights TensorRT "
            "cannot stream come on top of it")
    fixed = total_bytes - streamable_bytes
    if memory_budget < fixed:
        raise UserError(f"--memory-budget {memory_budget} is below the engine's weights TensorRT cannot stream",
                        found=f"{fixed} bytes of non-streamable weights ({total_bytes} in all, {streamable_bytes} "
                              "streamable)",
                        expected=f"a budget of at least {fixed} bytes (every byte above it keeps streamable weights "
                                 "on the device)",
                        fix=f"rebuild with a larger --memory-budget, or without it: {REBUILD}")
    budget = int(memory_budget) - fixed
    return (None if budget >= streamable_bytes else budget), None


