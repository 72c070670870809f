"""The TensorRT builder calls (GPU only; thin calls into the TensorRT 10.x / 11.x Python API).

ONNX -> strongly typed network -> serialized engine, one optimization profile per operating point, a
persistent timing cache. The plan is written to disk with its size and sha256 (the runner checks both once per
load), and everything the build held (builder, network, the parser that owns the ONNX weights, config, plan) is
released before the engine is deserialised again for its memory report: for the 14B transformer each of those
is the size of the model in host memory.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

from ...errors import UserError
from ...fsutil import PARTIAL, clean_stale_partials, deferred_signals
from ...model.specs import GraphSpec
from .engines import BuildSettings, mapped_engine, profiles, weight_sizes
from .probe import require_supported_tensorrt, tensorrt_version


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _network_flags(trt) -> int:
    """Strongly typed: a flag on TensorRT 10, always on (flag deprecated, ignored) from TensorRT 11."""
    if tensorrt_version(trt.__version__)[:1] >= (11,):
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


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


def _timing_cache(config, path: Path, log):
    """The timing cache from ``path`` attached to ``config``; an empty one, with a warning, when the file is
    unreadable (truncated: ``create_timing_cache`` may return None) or from another TensorRT / GPU
    (``set_timing_cache`` returns False). The cache must outlive the build: it is kept by the config."""
    data = path.read_bytes() if path.is_file() else b""
    cache = None
    if data:
        try:
            cache = config.create_timing_cache(data)
        except Exception as e:  # noqa: BLE001 - some bindings raise on a corrupt cache instead of returning None
            log(f"warning: TensorRT could not read the timing cache {path} ({type(e).__name__}: {e})")
        if cache is None:
            log(f"warning: the timing cache {path} is unreadable (truncated or corrupt): starting from an empty "
                "cache; it is rewritten after this build")
    if cache is not None and config.set_timing_cache(cache, False):
        return cache
    if cache is not None:
        log(f"warning: the timing cache {path} is from another TensorRT version or GPU: starting from an empty "
            "cache; it is rewritten after this build")
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, False):
        raise RuntimeError("TensorRT could not create an empty timing cache")
    return cache


# TensorRT minor versions whose documentation warns that BuilderFlag.REFIT can drop a GEMM's bias even when the
# engine is never refitted (issue 28, finding 5): every Helios linear layer has a bias, so --refittable is refused
REFIT_DROPS_BIAS = ((11, 3),)


def refit_flags(trt, settings: BuildSettings) -> list:
    """REFIT for --refittable; STRIP_PLAN + REFIT_IDENTICAL for --strip-weights (TensorRT >= 10). REFIT_IDENTICAL
    promises TensorRT the plan is only ever refitted with the weights it was built from (NvInfer.h: other weights
    are undefined behaviour): the runner refits it from the ONNX file only while that file's bytes are the build's
    (the engine key's graph and weights hashes), and `refit` leaves such an engine stale for `build` to rebuild."""
    flags = []
    if settings.refittable:
        if tensorrt_version(trt.__version__)[:2] in REFIT_DROPS_BIAS:
            raise UserError(f"TensorRT {trt.__version__} cannot build refittable engines for Helios",
                            found="its documentation warns that BuilderFlag.REFIT can drop a GEMM's bias even "
                                  "without a refit, and every Helios linear layer has one",
                            expected="a TensorRT other than 11.3.x for --refittable (docs/tensorrt.md)",
                            fix="build without --refittable (a LoRA switch is then `refit` + `build`), or use "
                                "another TensorRT")
        flags.append(trt.BuilderFlag.REFIT)
    if settings.strip_weights:
        names = ("STRIP_PLAN", "REFIT_IDENTICAL")
        if not all(hasattr(trt.BuilderFlag, n) for n in names):
            raise UserError(f"TensorRT {trt.__version__} cannot build weight-stripped plans",
                            expected="TensorRT 10 or newer (BuilderFlag.STRIP_PLAN, REFIT_IDENTICAL)",
                            fix="drop --strip-weights, or upgrade TensorRT")
        flags += [getattr(trt.BuilderFlag, n) for n in names]
    return flags


def _add_profiles(trt, builder, config, graph: GraphSpec, max_batch: int | None, refit: bool) -> None:
    """One profile per operating point. ``add_optimization_profile`` returns the profile's index, or -1 when
    TensorRT refuses it (IBuilderConfig::addOptimizationProfile: a refittable network may be limited to one
    profile): refused, the build stops with one message instead of building an engine with fewer profiles."""
    for point, prof in zip(graph.operating_points, profiles(graph, max_batch)):
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.items():
            profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(profile) < 0:
            why = (" (TensorRT's documentation allows a refittable engine one optimization profile; `make "
                   "gpu-check` records what this TensorRT does)" if refit else "")
            raise UserError(f"TensorRT {trt.__version__} refused the optimization profile of operating point "
                            f"{point.name} of {graph.name}{why}",
                            found=f"{len(graph.operating_points)} operating points, one profile each",
                            fix="build without --refittable / --strip-weights (refit then needs a rebuild)"
                            if refit else "check the shapes against the spec, or re-export")


def _configure(trt, builder, graph: GraphSpec, settings: BuildSettings, max_batch: int | None, log):
    config = builder.create_builder_config()
    config.builder_optimization_level = settings.opt_level
    if settings.workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace)
    if settings.memory_budget is not None:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    if settings.precision == "fp32" and not settings.tf32:
        # TF32 is on by default (BuilderFlag.TF32, kept in 11.x): fp32 engines would run their matmuls with a
        # 10-bit mantissa, outside verify's fp32 target; BuildSettings(tf32=True) allows it (in the engine key; gpu-check builds both)
        config.clear_flag(trt.BuilderFlag.TF32)
    for flag in refit_flags(trt, settings):
        config.set_flag(flag)
    _add_profiles(trt, builder, config, graph, max_batch, settings.refittable or settings.strip_weights)
    if settings.timing_cache:
        _timing_cache(config, Path(settings.timing_cache), log)
    return config


def write_atomic(path: Path, data) -> None:
    """Write to a hidden ``.NAME.partial-PID-*`` file beside ``path`` (those left by a killed build are removed
    first) and move it into place, with SIGINT/SIGTERM held off during the move."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{PARTIAL}{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
        with deferred_signals():
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _build_plan(trt, logger, onnx_path: Path, graph: GraphSpec, settings: BuildSettings, max_batch: int | None,
                log):
    """The serialized engine. The builder, network, parser (it owns the ONNX weights) and config live in this
    frame only: they are released when it returns, before anything else is loaded."""
    builder = trt.Builder(logger)
    network, parser = _parse(trt, builder, logger, onnx_path, graph)
    config = _configure(trt, builder, graph, settings, max_batch, log)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT could not build an engine from {onnx_path}", found="see the TensorRT log above",
                        fix="raise --workspace, or lower --opt-level")
    if settings.timing_cache:
        write_atomic(Path(settings.timing_cache), config.get_timing_cache().serialize())
    del network, parser  # the network first: the parser owns the weights it points at
    return plan


def _write_plan(path: Path, plan) -> dict:
    """Write the serialized engine atomically; its size and sha256 as the manifest records them."""
    digest, size = hashlib.sha256(plan).hexdigest(), memoryview(plan).nbytes
    write_atomic(path, plan)
    return {"engine_bytes": size, "engine_sha256": digest}


def _inspect(trt, logger, path: Path, n_profiles: int) -> dict:
    """Device memory and weight sizes (TensorRT 10.1+ queries; the total weights from 10.14), from the engine read
    back from disk through a memory map (no private host copy of its bytes besides TensorRT's own)."""
    runtime = trt.Runtime(logger)
    with mapped_engine(path) as data:
        engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        return {}
    total, streamable = weight_sizes(trt, engine)
    return {
        "device_memory_bytes": int(engine.device_memory_size_v2),
        "device_memory_bytes_by_profile": [int(engine.get_device_memory_size_for_profile_v2(i))
                                           for i in range(n_profiles)],
        "weights_bytes": total,
        "streamable_weights_bytes": streamable,
    }


def build_engine(onnx_path: str | Path, graph: GraphSpec, out_path: str | Path, settings: BuildSettings,
                 max_batch: int | None = None, inspect: bool = True, log=_stderr) -> dict:
    """Build ``graph`` into a strongly typed engine with one profile per operating point; returns a report
    with the engine file's size and sha256 (engine_bytes, engine_sha256) and, with ``inspect``, its memory."""
    import tensorrt as trt

    require_supported_tensorrt(trt.__version__)
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    logger = trt.Logger(trt.Logger.WARNING)
    t0 = time.perf_counter()
    plan = _build_plan(trt, logger, onnx_path, graph, settings, max_batch, log)
    seconds = time.perf_counter() - t0
    report = {"engine": out_path.name, **_write_plan(out_path, plan), "build_seconds": round(seconds, 2),
              "profiles": len(graph.operating_points), "tensorrt": trt.__version__,
              "weight_streaming": settings.memory_budget is not None}
    del plan  # the only reference left: the engine is on disk now
    if inspect:
        report.update(_inspect(trt, logger, out_path, len(graph.operating_points)))
    return report
