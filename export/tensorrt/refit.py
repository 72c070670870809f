"""`refit`: other LoRA adapters on built engines, without a rebuild.

1. The exported graphs of every component an old or a new adapter has weights for (transformer, text encoder)
   get new external data: every weight an old or a new adapter targets is re-fused from the checkpoint (W + the
   new deltas, export/exporter/lora.py), streamed one block at a time; the other weights are copied from the old
   data file; a bf16 version of the graph (``quantize --precision bf16``) is lowered again from it with its
   recorded recipe; an FP8 graph gets the changed weights quantized again (activation scales kept). Written to a
   work folder first.
2. Each engine built from those graphs (``build --refittable``) is deserialised from a memory map and only the
   weights that changed are set with ``trt.Refitter.set_named_weights`` (the ONNX parser names engine weights
   after the ONNX initializers; every weight as ``Weights(type, pointer, count)``), in groups of at most
   ``GROUP_BYTES``: each group is refitted, unset, and only then released, so host memory stays bounded; the plan
   is serialised again. A weight-stripped engine (``build --strip-weights``: STRIP_PLAN + REFIT_IDENTICAL) may
   only ever be refitted with the weights it was built from: refit leaves its record as it was (stale: the
   runner refuses it, ``build`` rebuilds it).
3. The new graphs, engines and manifest (adapters, graph hashes, engine keys) are moved into place together.

The TensorRT part needs a GPU (written against the TensorRT 10/11 Python API; tested on CPU against a fake).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Sequence

from ...artifacts import Artifacts, file_record, install
from ...checkpoints.checkpoint import Checkpoint
from ...errors import UserError
from ...fsutil import staging
from ..exporter.lora import Adapter, Fusion, adapter_components, plan_fusion
from ..exporter.modules import build_module
from ..graphio import Graph, digest, safetensors_source
from .builder import write_atomic
from .engines import REBUILD, engine_filename, engine_mode, key_digest, mapped_engine, source_entry

LORA_COMPONENTS = ("transformer", "text_encoder")  # the components adapters are fused into (export/exporter/lora.py)
PREFIX = "model."  # initializer names: the wrapper's attribute + the parameter path
GROUP_BYTES = 1 << 30  # changed weights held by the Refitter at once (each group refitted, unset, then released)


def check_refittable(arts: Artifacts, component: str) -> dict:
    """The component's engines, refused (one error) unless every one was built refittable or weight-stripped."""
    engines = arts.manifest["components"][component].get("engines") or {}
    problems = []
    for graph, entry in engines.items():
        if engine_mode(entry) is None:
            problems.append(f"{component}/{graph}: built without --refittable")
    if problems:
        raise UserError("these engines cannot be refitted", found="; ".join(problems),
                        expected="engines built with `build --refittable` or `--strip-weights`",
                        fix=f"rebuild them with --refittable (same --precision): {REBUILD} --refittable")
    return engines


def rewrite_graph(ckpt: Checkpoint, component: str, src: Path, dst: Path, fusion: Fusion,
                  old_targets: Sequence[str]) -> list[str]:
    """``src`` with every weight an old or new adapter targets re-fused from the checkpoint, saved to ``dst``
    (one tensor at a time); returns the names of the initializers that were rewritten."""
    import onnx_ir as ir

    graph, index = Graph.load(src), ckpt.index_for(component)
    touched = set(old_targets) | set(fusion.deltas)
    changed = []
    for name in list(graph.initializers()):
        local = name[len(PREFIX):] if name.startswith(PREFIX) else name
        if local not in touched:
            continue
        base = safetensors_source(index.folder / index.weight_map[local], local)
        fused = fusion.fused(local, base)
        graph.set_initializer(name, fused if fused.dtype == ir.DataType.FLOAT else _cast(base, ir.DataType.FLOAT))
        changed.append(name)
    missing = touched - {n[len(PREFIX):] for n in changed}
    if missing:
        raise RuntimeError(f"{src}: adapter targets without an initializer: {sorted(missing)[:4]}")
    graph.save(dst)
    return changed


def _cast(src, dtype):
    import onnx_ir as ir

    from ..graphio import cast

    return cast(src, ir.DataType(dtype))


def refit_plan(trt, engine_path: Path, onnx_path: Path, changed: Sequence[str], group_bytes: int | None = None):
    """The engine at ``engine_path`` with the weights ``changed`` replaced by ``onnx_path``'s (GPU), serialised
    again (an IHostMemory: write it with ``memoryview``, no bytes copy).

    Host memory: the file is deserialised from a read-only memory map (no private copy of it), the changed
    weights go to the one Refitter in groups of at most ``group_bytes``, and the engine is released before the
    caller writes the new plan: at most TensorRT's engine, one group and, at the end, the serialised plan.
    The Refitter reads every weight it holds at each ``refit_cuda_engine`` (IRefitter::refitCudaEngine: weights
    "can be unset and released ... after refitCudaEngine returns"; unsetNamedWeights: "Unset weights before
    releasing them"), so each group is unset after its refit and only then dropped. Every weight goes in as
    ``Weights(type, pointer, count)``: ``Weights(ndarray)`` would pin the array for the Refitter's whole life."""
    logger = trt.Logger(trt.Logger.WARNING)
    with mapped_engine(engine_path) as data:
        engine = trt.Runtime(logger).deserialize_cuda_engine(data)
    if engine is None:
        raise UserError("TensorRT could not load the engine to refit it", fix=f"rebuild it: {REBUILD}")
    refitter = trt.Refitter(engine, logger)
    refittable = set(refitter.get_all_weights())
    graph = Graph.load(onnx_path)
    names = [n for n in changed if n in refittable]
    if len(names) != len(changed):  # folded into other weights, or not refittable: the engine cannot take them
        raise UserError("the engine has no refittable weight for some changed ONNX weights",
                        found=", ".join(sorted(set(changed) - refittable)[:4]), fix=f"rebuild it: {REBUILD}")
    for group in _groups(graph, names, GROUP_BYTES if group_bytes is None else group_bytes):
        held: dict = {}  # name -> the array TensorRT reads at refit_cuda_engine: alive until unset
        for name in group:
            _set(trt, refitter, graph, name, held)
        _set_missing(trt, refitter, graph, held)
        _apply(refitter)
        for name in held:
            if not refitter.unset_named_weights(name):
                raise RuntimeError(f"TensorRT had no weights {name} to unset after the refit")
        held.clear()  # only now may the arrays go
    plan = engine.serialize()  # a refittable (not stripped) engine stays refittable (SerializationFlag docs)
    del refitter, engine  # TensorRT's engine is released before the plan is written
    return plan


def _groups(graph: Graph, names: Sequence[str], group_bytes: int) -> list[list[str]]:
    """``names`` in order, cut into groups of at most ``group_bytes`` (a larger weight is a group of its own)."""
    groups, size = [[]], 0
    for name in names:
        nbytes = graph.source(name).nbytes
        if groups[-1] and size + nbytes > group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return [g for g in groups if g]


def _set_missing(trt, refitter, graph: Graph, held: dict) -> None:
    """Weights TensorRT combined with the ones set at build time must be given again (IRefitter::getMissingWeights);
    each one given may combine with others, so ask again until nothing new is missing (a fixed point)."""
    initializers = graph.initializers()
    while True:
        missing = [m for m in refitter.get_missing_weights() if m in initializers and m not in held]
        if not missing:
            return
        for name in missing:
            _set(trt, refitter, graph, name, held)


# numpy / ml_dtypes names -> trt.DataType member names: every weight goes in as Weights(type, pointer, count)
_TRT_TYPES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "float8_e4m3fn": "FP8", "int8": "INT8",
              "int32": "INT32", "int64": "INT64"}


def _set(trt, refitter, graph: Graph, name: str, held: dict) -> int:
    """Hand ONNX weight ``name`` to the refitter by pointer; its array goes into ``held``, which must keep it alive
    until it is unset (TensorRT reads the memory at every refit_cuda_engine). Returns its bytes."""
    import numpy as np

    array = np.ascontiguousarray(graph.source(name).numpy())
    if array.dtype.name not in _TRT_TYPES:
        raise UserError(f"the weight {name} has a type the refitter does not take", found=array.dtype.name,
                        fix=f"rebuild the engine: {REBUILD}")
    held[name] = array
    weights = trt.Weights(getattr(trt.DataType, _TRT_TYPES[array.dtype.name]), array.ctypes.data, array.size)
    if not refitter.set_named_weights(name, weights):  # False: unknown name, other count or other type
        raise UserError(f"TensorRT refused the new weight {name}", found=f"{array.dtype.name} {list(array.shape)}",
                        fix=f"rebuild the engine: {REBUILD}")
    return array.nbytes


def _apply(refitter) -> None:
    missing = refitter.get_missing_weights()
    if missing:
        raise UserError("TensorRT needs more weights to refit this engine", found=", ".join(list(missing)[:4]),
                        fix=f"rebuild it: {REBUILD}")
    if not refitter.refit_cuda_engine():
        raise UserError("TensorRT could not refit the engine", found="see the TensorRT log above",
                        fix=f"rebuild it: {REBUILD}")


def refit_stripped(trt, logger, engine, onnx_path: Path) -> None:
    """Fill a weight-stripped engine with the weights of the ONNX file it was built from (runner, at load). Built
    with REFIT_IDENTICAL, it may only take those very weights: the caller checks the file's hashes against the
    engine key first (runtime/runners/tensorrt.py)."""
    refitter = trt.Refitter(engine, logger)
    parser = trt.OnnxParserRefitter(refitter, logger)
    if not parser.refit_from_file(str(onnx_path)):
        raise UserError(f"TensorRT could not refit the weight-stripped engine from {onnx_path}",
                        found="; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no errors",
                        fix=f"rebuild it: {REBUILD}")
    _apply(refitter)


def check_engine_lora(entry: dict, manifest: dict, component: str, name: str) -> None:
    """Refuse an engine whose weights were fused with other adapters than its component's graphs (runner)."""
    have = [(a["sha256"], a["scale"]) for a in entry.get("lora") or []]
    want = [(a["sha256"], a["scale"]) for a in manifest["components"][component].get("lora") or []]
    if have != want:
        raise UserError(f"the TensorRT engine for {name} holds other LoRA weights than the artifacts",
                        found=f"engine: {len(have)} adapter(s), manifest: {len(want)}",
                        fix="run `helios-deploy refit ARTIFACTS --lora ...` again, or rebuild the engine")


def refit_artifacts(artifacts, adapters: Sequence[Adapter], log=print) -> dict:
    """Replace the fused adapters of an export (and of its refittable engines) with ``adapters`` (none: the
    plain checkpoint weights). Every component an old or a new adapter has weights for is rewritten (the
    transformer, the text encoder); the others are untouched. Returns the manifest's "refit" record."""
    arts = Artifacts.open(artifacts)
    ckpt = Checkpoint.from_record(arts.manifest["checkpoint"])
    arts.check_checkpoint(ckpt.identity)
    fusions, engines = {}, {}
    for component in LORA_COMPONENTS:
        fusion = plan_fusion(adapters, build_module(ckpt, component, load_weights=False), component) \
            if component in arts.manifest["components"] else None
        old = (arts.manifest["components"].get(component) or {}).get("lora_targets") or []
        if fusion is not None and (fusion.deltas or old):
            arts.verify_files(component)
            fusions[component], engines[component] = fusion, check_refittable(arts, component)
    wanted = {c for a in adapters for c in adapter_components(a)}
    if wanted - set(fusions):
        raise UserError(f"the adapters have weights for {', '.join(sorted(wanted - set(fusions)))}, which these "
                        "artifacts do not hold", fix="export that component too, then refit")
    if any(engine_mode(e) == "refit" for es in engines.values() for e in es.values()):
        from .probe import require_gpu_tensorrt

        require_gpu_tensorrt()
    t0, record = time.perf_counter(), {"lora": [a.record() for a in adapters], "engines": {}, "components": [],
                                       "fuse_write_seconds": 0.0}
    with staging(arts.root, "refit") as tmp:
        moves, old_files = [], []
        for component, fusion in fusions.items():
            entry, folder = arts.manifest["components"][component], tmp / component
            folder.mkdir()
            for g in arts.spec(component).graphs:
                old, t1 = entry["graphs"][g.name], time.perf_counter()
                changed = rewrite_graph(ckpt, component, arts.root / component / old["file"], folder / old["file"],
                                        fusion, entry.get("lora_targets") or [])
                record["fuse_write_seconds"] = round(record["fuse_write_seconds"] + time.perf_counter() - t1, 3)
                entry["graphs"][g.name] = {**old, **file_record(folder, old["file"], old["data"])}
                moves += _moves(arts, component, folder, entry["graphs"][g.name])
                changed = {"fp32": changed, "bf16": _relower(arts, component, entry, g, folder, moves, log),
                           "fp8": _requantize(arts, component, entry, g, folder, changed, moves, log)}
                if g.name in engines[component]:
                    old_files.append(_refit_engine(arts, component, engines[component], g, folder, changed,
                                                   fusion, record, log))
            entry["lora_targets"] = fusion.targets()
            entry["lora"] = [a.record() for a in fusion.adapters]
            record["components"].append(component)
        arts.manifest["lora"] = record["lora"]
        record["seconds"] = round(time.perf_counter() - t0, 3)
        arts.manifest["refit"] = record
        install(arts.root, moves, arts.manifest)
    for path in old_files:
        if path is not None:
            path.unlink(missing_ok=True)
    return record


def _moves(arts: Artifacts, component: str, folder: Path, rec: dict) -> list[tuple[Path, Path]]:
    return [(folder / rec[k], arts.root / component / rec[k]) for k in ("data", "file")]


def _relower(arts: Artifacts, component: str, entry: dict, g, tmp: Path, moves: list, log) -> list[str] | None:
    """The graph's bf16 version (``quantize --precision bf16``), if there is one, lowered again from the new
    fp32 graph with its recorded recipe; returns the initializers whose bytes changed."""
    from ..transforms.lowering import write_lowered

    old = (entry.get("bf16") or {}).get(g.name)
    if not old:
        return None
    log(f"{component}/{old['file']}: lowering the new weights to bf16 ...")
    rec = write_lowered(tmp / entry["graphs"][g.name]["file"], tmp, old["file"], old["recipe"].get("keep_fp32", []))
    entry["bf16"][g.name] = {**old, **rec}
    moves += _moves(arts, component, tmp, rec)
    return _changed_initializers(arts.root / component / old["file"], tmp / old["file"])


def _changed_initializers(before_path: Path, after_path: Path) -> list[str]:
    """The initializers of ``after_path`` that ``before_path`` lacks or holds with other bytes."""
    before, after = Graph.load(before_path), Graph.load(after_path)
    return [n for n in after.initializers()
            if n not in before.initializers() or digest(after.source(n)) != digest(before.source(n))]


def _requantize(arts: Artifacts, component: str, entry: dict, g, folder: Path, changed: Sequence[str], moves: list,
                log) -> list[str] | None:
    """The component's FP8 graph (``quantize --precision fp8``), if there is one, with the weights that changed
    quantized again from the new fp32 graph, as ``quantize`` quantizes them: per output channel, each scale
    from the new weight's own maximum (export/transforms/qdq.py). The activation scales stay those the
    calibration measured on the weights before the refit (the manifest says so under ``fp8.refit``; re-run
    ``quantize --precision fp8`` to calibrate the new model). The graph's bf16 lowering for TensorRT is made
    again; returns the lowered graph's initializers whose bytes changed."""
    from ..transforms.lowering import write_lowered
    from ..transforms.prepare import prepare
    from ..transforms.qdq import FP8, column_amax, fp8_scale, fp8_weight
    from ..transforms.quantize import FP8_BF16_FILE, FP8_FILE

    old = entry.get("fp8")
    if not old or g.name != "model":
        return None
    log(f"{component}/{old['file']}: quantizing the changed weights to FP8 again ...")
    new = Graph.load(folder / entry["graphs"][g.name]["file"])
    transposes = {n.output[0]: n.input[0] for n in new.proto.graph.node if n.op_type == "Transpose"}
    prepared, touched = prepare(new), set(changed)
    touched |= {out for out, src in transposes.items() if src in touched}  # [N, K] weights folded to [K, N]
    graph = Graph.load(arts.root / component / old["file"])
    inits, count = graph.initializers(), 0
    for name in sorted(touched & set(inits)):
        src = prepared.source(name)
        if inits[name].data_type == FP8:
            scale = fp8_scale(column_amax(src))
            graph.set_initializer(name, fp8_weight(src, scale))
            graph.set_initializer(f"{name}_scale", scale)
            count += 1
        else:
            graph.set_initializer(name, _cast(src, inits[name].data_type))
    graph.save(folder / FP8_FILE)
    log(f"{component}/{FP8_FILE}: lowering to bf16 outside the FP8 layers ...")
    lowered = write_lowered(folder / FP8_FILE, folder, FP8_BF16_FILE)
    record = {**file_record(folder, FP8_FILE, FP8_FILE + ".data"), "bf16": {**old["bf16"], **lowered}}
    entry["fp8"] = {**old, **record, "refit": {"fp8_weights_requantized": count, "activation_scales":
                                               "from the calibration before the refit (re-run quantize to refresh)"}}
    moves += _moves(arts, component, folder, record) + _moves(arts, component, folder, record["bf16"])
    return _changed_initializers(arts.root / component / old["bf16"]["file"], folder / FP8_BF16_FILE)


def _refit_engine(arts: Artifacts, component: str, engines: dict, g, tmp: Path, changed: dict, fusion: Fusion,
                  record: dict, log) -> Path | None:
    """Refit one engine to the graph in ``tmp`` and write it under its new key's name; the old file's path (to
    remove once the manifest names the new one) or None when the name did not change."""
    entry = engines[g.name]
    precision = entry["key"].get("settings", {}).get("precision", "fp32")
    info = source_entry(arts.manifest, component, g.name, precision)
    changed = changed[precision] if changed.get(precision) is not None else changed["bf16"]
    old_path = arts.root / component / entry["file"]
    fields = {**entry["key"], "graph_sha256": info["file_sha256"], "weights_sha256": info["data_sha256"]}
    digest = key_digest(fields)
    new_file = engine_filename(g.file, digest)
    t0 = time.perf_counter()
    if engine_mode(entry) == "strip":
        # REFIT_IDENTICAL: TensorRT may only refit it with the weights it was built from. Its record keeps the old
        # key, so the runner refuses it as stale and `build` rebuilds it from the new graph.
        log(f"{component}/{g.name}: weight-stripped engine (REFIT_IDENTICAL) cannot take other weights: run "
            f"`helios-deploy build {arts.root}` to rebuild it")
        record["engines"][f"{component}/{g.name}"] = {"mode": "strip", "weights": 0, "rebuild": True,
                                                     "refit_seconds": 0.0}
        return None
    import tensorrt as trt

    log(f"{component}/{g.name}: refitting {len(changed)} weights ...")
    plan = refit_plan(trt, old_path, tmp / info["file"], changed)
    write_atomic(arts.root / component / new_file, plan)
    view = memoryview(plan)
    report = {**entry.get("report", {}), "engine_bytes": view.nbytes, "engine_sha256": hashlib.sha256(view).hexdigest()}
    del view, plan
    engines[g.name] = {**entry, "file": new_file, "key": fields, "digest": digest, "report": report,
                       "lora": [a.record() for a in fusion.adapters]}
    record["engines"][f"{component}/{g.name}"] = {"mode": "refit", "weights": len(changed),
                                                 "refit_seconds": round(time.perf_counter() - t0, 3)}
    return old_path if new_file != entry["file"] else None
