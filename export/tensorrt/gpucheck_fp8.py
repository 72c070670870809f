"""gpu-check's run of each FP8 engine variant (issue 30), registered in gpuchecks.CHECKS as ``fp8_variants``.

For FP8 linears only, FP8 linears + attention (``quantize --fp8-attention``) and + VAE convolutions
(``--fp8-vae``), on the tiny export: quantize, build the transformer engine (``build --precision fp8``, strongly
typed from ``model.fp8.bf16.onnx``; with --fp8-vae the VAE decoder's engine too), run it at every operating point
against ONNX Runtime on the same FP8 graph (``model.fp8.onnx``: rel_l2, cosine, the FP8 targets of ``verify``), and
time it (median of REPEATS runs per pyramid stage; their sum is the transformer's time per 1,1,1 chunk; the
decoder's per chunk), so the first run on a GPU measures what each variant gains and costs on that GPU. The tiny
VAE has 8 and 16 channels: its convolutions are quantized at TensorRT's kernel floor (16), which Model
Optimizer's default (> 16) would not choose, so its timing says whether the FP8 kernels run, not their gain.
GPU only: written against the TensorRT 10/11 Python API through the project's runner, never run here.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from .gpuchecks import FP8_KEEP, FP8_PROMPT, Context, _build, _copy, check

VARIANTS = {"fp8": (False, False), "fp8+attn": (True, False), "fp8+attn+vae": (True, True)}  # (attention, vae)
TINY_VAE_MIN_CHANNELS = 16
REPEATS = 20


def _compare(root: Path, component: str = "transformer") -> dict:
    """The component's fp8 engine against ONNX Runtime's FP8 graph at every operating point, and its time."""
    import torch

    from ...artifacts import Artifacts
    from ...runtime.runners.tensorrt import TensorRTRunner
    from ..parity.compare import OrtGraph, example_inputs
    from ..parity.fp8 import FP8_COSINE, FP8_REL_L2

    arts = Artifacts.open(root)
    spec = arts.spec(component)
    graph = spec.graph("model")
    fp8_graph = OrtGraph(root / component / arts.manifest["components"][component]["fp8"]["file"], graph)
    runner = TensorRTRunner(root, arts.manifest, component, graph, "cuda")
    runner.activate()
    points = {}
    try:
        for i, point in enumerate(graph.operating_points):
            feeds = example_inputs(spec, graph, point.dims, seed=i)
            cuda = {k: torch.from_numpy(v).cuda() for k, v in feeds.items()}
            got = next(iter(runner.infer(cuda).values())).float().cpu().numpy()
            ref = fp8_graph(*[feeds[t.name] for t in graph.inputs])[0]
            times = []
            for _ in range(REPEATS):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                runner.infer(cuda)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            a, b = got.ravel().astype(np.float64), ref.ravel().astype(np.float64)
            rel = float(np.linalg.norm(a - b) / np.linalg.norm(b))
            cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
            points[point.name] = {"rel_l2": rel, "cosine": cos, "median_ms": 1e3 * statistics.median(times),
                                  "passed": rel <= FP8_REL_L2 and cos >= FP8_COSINE}
    finally:
        runner.deactivate()
    stages = [v["median_ms"] for k, v in points.items() if k.startswith("stage") and "batch" not in k]
    per_chunk = sum(stages) if component == "transformer" else min(v["median_ms"] for v in points.values())
    return {"points": points, f"{component}_ms_per_chunk" + ("_111" if component == "transformer" else ""): per_chunk,
            "passed": all(p["passed"] for p in points.values())}


def _build_vae(root: Path) -> dict:
    from .build import build
    from .engines import BuildSettings

    build(root, ["vae_decoder"], BuildSettings(opt_level=3, precision="fp8"), rebuild=True, log=lambda m: None)
    return json.loads((root / "manifest.json").read_text())["components"]["vae_decoder"]["engines"]["model"]


@check("fp8_variants")
def fp8_variants(ctx: Context) -> dict:
    from ..transforms.quantize import quantize_artifacts

    prompts = ctx.workdir / "fp8-prompts.txt"
    prompts.write_text(FP8_PROMPT + "\n")
    out = {}
    for name, (attention, vae) in VARIANTS.items():
        root = _copy(ctx, f"variant-{name.replace('+', '-')}")
        quantize_artifacts(root, ["transformer"], prompts_file=prompts, keep=FP8_KEEP, chunks=1, seed=0,
                           attention=attention, vae=vae, vae_min_channels=TINY_VAE_MIN_CHANNELS, log=lambda m: None)
        t0 = time.perf_counter()
        entry = _build(root, precision="fp8")
        out[name] = {"build_s": round(time.perf_counter() - t0, 2), "engine_bytes": entry.get("file_bytes"),
                     **_compare(root)}
        if vae:
            vae_entry = _build_vae(root)
            result = _compare(root, "vae_decoder")
            out[name]["vae_decoder"] = {"engine_bytes": vae_entry.get("file_bytes"), **result}
            out[name]["passed"] = out[name]["passed"] and result["passed"]
        manifest = json.loads((root / "manifest.json").read_text())
        out[name]["fp8_attentions"] = len((manifest["components"]["transformer"]["fp8"].get("attention") or {})
                                          .get("nodes", []))
    base, att = (out[v]["transformer_ms_per_chunk_111"] for v in ("fp8", "fp8+attn"))
    out["attention_speedup"] = base / att if att else None
    if not all(v["passed"] for k, v in out.items() if k in VARIANTS):
        raise AssertionError(f"an fp8 engine missed the FP8 targets against ONNX Runtime: {json.dumps(out)[:2000]}")
    return out
