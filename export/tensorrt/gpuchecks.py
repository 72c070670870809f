"""What only a GPU can settle (issue 28), run by `make gpu-check` (gpucheck.py) after its build / tests / verify.

Each check is one function in ``CHECKS`` (a list, so another issue adds its own with ``@check("name")``: the FP8
attention variant run of issue 30 is one); ``run_checks`` runs them all, each in its own try, and returns one
JSON-ready answer per check (``{"ok": bool, ...}``; a check that raised is ``{"ok": false, "error": ...}``).
docs/tensorrt.md says what to do with each outcome. GPU only: written against the TensorRT 10/11 Python API
(refit through export/tensorrt/refit.py, runs through the TensorRT runner), never run here.

- ``refit_three_groups``: a refittable transformer engine refitted, in at least three groups, to the weights of a
  second tiny checkpoint, against a fresh build of those weights (rel_l2 between the two engines' outputs);
- ``refittable_every_point``: a refittable build with one profile per operating point: whether TensorRT takes
  them (``accepted``) or refuses a profile (its message);
- ``fp8_scales_refittable``: which of an fp8 engine's weight scales (``*_scale`` initializers) the Refitter lists;
- ``fp32_tf32``: the fp32 transformer engine against ONNX Runtime with TF32 off and on (rel_l2 of each).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import UserError

CHECKS: list[tuple[str, Callable]] = []
FP8_PROMPT = "A cat and a dog baking a cake together in a kitchen."
FP8_KEEP = [r"^patch_", r"^condition_embedder\.", r"^proj_out/"]  # as the tests' tiny FP8 graphs


def check(name: str):
    """Register a GPU check (``fn(ctx) -> dict``) under ``name``; the checks run in registration order."""
    def register(fn):
        CHECKS.append((name, fn))
        return fn
    return register


@dataclass
class Context:
    workdir: Path
    artifacts: Path  # the fp32 export of the tiny checkpoint (gpucheck's)
    export: Callable  # export(checkpoint_seed, out, components) -> artifacts folder
    log: Callable = lambda m: None


def run_checks(ctx: Context, checks=None) -> dict:
    """Every check; its answer, or what it raised."""
    out = {}
    for name, fn in checks if checks is not None else CHECKS:
        try:
            out[name] = {"ok": True, **fn(ctx)}
        except Exception as e:  # noqa: BLE001 - every check's failure is an answer in the report
            message = e.render() if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            out[name] = {"ok": False, "error": message, "traceback": traceback.format_exc(limit=6)}
    return out


def _copy(ctx: Context, name: str) -> Path:
    dest = ctx.workdir / name
    shutil.rmtree(dest, ignore_errors=True)
    return Path(shutil.copytree(ctx.artifacts, dest))


def _build(root: Path, **settings) -> dict:
    from .build import build
    from .engines import BuildSettings

    build(root, ["transformer"], BuildSettings(opt_level=3, **settings), rebuild=True, log=lambda m: None)
    return json.loads((root / "manifest.json").read_text())["components"]["transformer"]["engines"]["model"]


def _outputs(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The transformer engine's output and ONNX Runtime's on the manifest's graph, at the first operating point."""
    import torch

    from ...artifacts import Artifacts
    from ...runtime.runners.tensorrt import TensorRTRunner
    from ..parity.compare import OrtGraph, example_inputs

    arts = Artifacts.open(root)
    spec = arts.spec("transformer")
    graph = spec.graph("model")
    feeds = example_inputs(spec, graph, graph.operating_points[0].dims, seed=0)
    runner = TensorRTRunner(root, arts.manifest, "transformer", graph, "cuda")
    runner.activate()
    try:
        got = runner.infer({k: torch.from_numpy(v).cuda() for k, v in feeds.items()})
    finally:
        runner.deactivate()
    ref = OrtGraph(root / "transformer" / arts.manifest["components"]["transformer"]["graphs"]["model"]["file"],
                   graph)(*[feeds[t.name] for t in graph.inputs])[0]
    return next(iter(got.values())).float().cpu().numpy(), ref


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@check("refittable_every_point")
def refittable_every_point(ctx: Context) -> dict:
    root = _copy(ctx, "refit-points")
    try:
        entry = _build(root, refittable=True)
    except UserError as e:
        return {"accepted": False, "message": e.render()}
    return {"accepted": True, "profiles": len(entry["key"]["profiles"])}


@check("refit_three_groups")
def refit_three_groups(ctx: Context) -> dict:
    import tensorrt as trt

    from .builder import write_atomic
    from .refit import refit_plan

    root, other = _copy(ctx, "refit-a"), ctx.export(1, ctx.workdir / "refit-b", ["transformer"])
    refitted = _build(root, refittable=True)
    fresh = _build(other)
    graph = json.loads((other / "manifest.json").read_text())["components"]["transformer"]["graphs"]["model"]
    from ..graphio import Graph

    names = list(Graph.load(other / "transformer" / graph["file"]).initializers())
    total = sum(Graph.load(other / "transformer" / graph["file"]).source(n).nbytes for n in names)
    plan = refit_plan(trt, root / "transformer" / refitted["file"], other / "transformer" / graph["file"], names,
                      group_bytes=max(1, total // 3))
    fresh_out, ref = _outputs(other)
    view = memoryview(plan)
    manifest = json.loads((other / "manifest.json").read_text())
    key = {**refitted["key"], "graph_sha256": graph["file_sha256"], "weights_sha256": graph["data_sha256"]}
    manifest["components"]["transformer"]["engines"]["model"] = {
        **refitted, "file": "refitted.engine", "key": key, "lora": fresh.get("lora", []),
        "report": {"engine_bytes": view.nbytes, "engine_sha256": hashlib.sha256(view).hexdigest()}}
    write_atomic(other / "transformer" / "refitted.engine", plan)
    del view, plan
    (other / "manifest.json").write_text(json.dumps(manifest))
    refit_out, _ = _outputs(other)
    return {"weights": len(names), "groups_at_least": 3, "rel_l2_refitted_vs_fresh": _rel_l2(refit_out, fresh_out),
            "rel_l2_fresh_vs_onnxruntime": _rel_l2(fresh_out, ref),
            "rel_l2_refitted_vs_onnxruntime": _rel_l2(refit_out, ref)}


@check("fp8_scales_refittable")
def fp8_scales_refittable(ctx: Context) -> dict:
    import tensorrt as trt

    from ..transforms.quantize import quantize_artifacts

    root = _copy(ctx, "fp8")
    prompts = ctx.workdir / "prompts.txt"
    prompts.write_text(FP8_PROMPT + "\n")
    quantize_artifacts(root, ["transformer"], prompts_file=prompts, keep=FP8_KEEP, chunks=1, seed=0,
                       log=lambda m: None)
    entry = _build(root, precision="fp8", refittable=True)
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine((root / "transformer" / entry["file"]).read_bytes())
    listed = set(trt.Refitter(engine, logger).get_all_weights())
    from ..graphio import Graph

    manifest = json.loads((root / "manifest.json").read_text())
    low = Graph.load(root / "transformer" / manifest["components"]["transformer"]["fp8"]["bf16"]["file"])
    scales = sorted(n for n in low.initializers() if n.endswith("_scale"))
    return {"weight_scales": len(scales), "refittable": sorted(set(scales) & listed),
            "not_refittable": sorted(set(scales) - listed)}


@check("fp32_tf32")
def fp32_tf32(ctx: Context) -> dict:
    out = {}
    for tf32 in (False, True):
        root = _copy(ctx, f"tf32-{str(tf32).lower()}")
        _build(root, tf32=tf32)
        ours, ref = _outputs(root)
        out[f"rel_l2_tf32_{'on' if tf32 else 'off'}"] = _rel_l2(ours, ref)
    from .verify import TARGETS

    out["fp32_target"] = TARGETS["fp32"].rel_l2
    return out
