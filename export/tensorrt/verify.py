"""`verify`: every TensorRT engine against ONNX Runtime running the fp32 export, at every operating point,
and the whole pipeline on engines against the fp32 pipeline (PSNR per chunk). Needs a GPU.

Polygraphy's Comparator runs both sides over the same inputs (our runners wrapped as Polygraphy runners,
so the engines run exactly as the runtime runs them: per-stage profiles, torch CUDA tensors); the pass
criteria are the parity metrics (rel_l2 and cosine per operating point), with targets by the precision the
engine was built at.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ...artifacts import Artifacts
from ...errors import UserError
from .engines import engine_entry
from .probe import require_gpu_tensorrt
from ..parity.fp8 import FP8_COSINE, FP8_REL_L2
from ..parity.bf16 import BF16_REL_L2
from ..parity.compare import example_inputs, metrics
from ..parity.pipeline import PROMPT, PSNR_THRESHOLD, chunk_psnr


@dataclass(frozen=True)
class Target:
    rel_l2: float
    cosine: float


TARGETS = {
    "fp32": Target(1e-3, 0.9999),  # fp32 engines are built with TF32 off (builder.py; gpu-check measures both)
    "bf16": Target(BF16_REL_L2, 0.999),  # as the bf16 graphs against the reference on CPU (export/parity/bf16.py)
    "fp8": Target(FP8_REL_L2, FP8_COSINE),  # as the FP8 graphs on CPU (parity --precision fp8)
}
PSNR_TARGETS = {"fp32": 40.0, "bf16": PSNR_THRESHOLD, "fp8": PSNR_THRESHOLD}  # dB, peak 1.0, per 33-frame chunk


def graph_precision(manifest: dict, component: str, graph_name: str) -> str:
    """What an engine computes in: its build precision, but bf16 for the graphs of an fp8 build that have
    no FP8 graph (everything outside the quantized transformer)."""
    built = engine_entry(manifest, component, graph_name)["key"].get("settings", {}).get("precision", "fp32")
    if built == "fp8" and not (graph_name == "model" and manifest["components"][component].get("fp8")):
        return "bf16"
    return built


def _polygraphy_runner(runner, name: str):
    """One of our runners as a Polygraphy runner: numpy feeds in, numpy outputs out."""
    import torch
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class Adapter(BaseRunner):
        def activate_impl(self):
            runner.activate()

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for t in runner.graph.inputs:
                meta.add(t.name, np.dtype(t.dtype), [d if isinstance(d, int) else None for d in t.dims])
            return meta

        def infer_impl(self, feed_dict):
            feeds = {k: torch.from_numpy(np.ascontiguousarray(v)).to(runner.device) for k, v in feed_dict.items()}
            t0 = time.perf_counter()
            out = runner.infer(feeds)
            self.inference_time = time.perf_counter() - t0
            return OrderedDict((k, v.float().cpu().numpy()) for k, v in out.items())

        def deactivate_impl(self):
            runner.deactivate()

    return Adapter(name=name)


def compare_runners(reference, candidate, feeds: Sequence[dict], names: Sequence[str], target: Target) -> list[dict]:
    """Run both runners over ``feeds`` with Polygraphy's Comparator; one result per feed (named by
    ``names``), each output scored by rel_l2 and cosine against the reference's."""
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING  # not the feeds and outputs of every iteration
    ref = _polygraphy_runner(reference, "reference")
    cand = _polygraphy_runner(candidate, "candidate")
    results = Comparator.run([ref, cand], data_loader=list(feeds))
    rows = []
    for name, ref_it, cand_it in zip(names, results["reference"], results["candidate"]):
        scores = {out: metrics(cand_it[out], ref_it[out]) for out in ref_it.keys()}
        worst = max(scores.values(), key=lambda m: m["rel_l2"])
        passed = all(m["rel_l2"] <= target.rel_l2 and m["cosine"] >= target.cosine for m in scores.values())
        rows.append({"name": name, **worst, "outputs": scores, "passed": passed})
    return rows


def verify_graph(arts: Artifacts, component: str, graph, candidate, reference, precision: str,
                 seed: int = 0) -> dict:
    """One graph at every operating point it was built for."""
    spec = arts.spec(component)
    points = graph.operating_points
    feeds = [example_inputs(spec, graph, dict(p.dims), seed + i) for i, p in enumerate(points)]
    target = TARGETS[precision]
    rows = compare_runners(reference, candidate, feeds, [p.name for p in points], target)
    return {"precision": precision, "target": vars(target), "passed": all(r["passed"] for r in rows), "cases": rows}


# Few steps (the CPU reference of a 14B model is slow), guidance at the variant's default (so guided variants
# run their batch-2 engine profiles)
VERIFY_SETTINGS = {"base": {"num_inference_steps": 4}, "mid": {"pyramid_steps": (2, 2, 2)}, "distilled": {}}


def verify_pipeline(artifacts: Path, backend: str, device: str, precision: str, seed: int = 0,
                    frames: int = 66) -> dict:
    """The whole T2V video on the engines against the fp32 pipeline on ONNX Runtime (CPU), PSNR per chunk, at
    every exported size (``psnr_db_per_chunk``: all sizes' chunks in size order; ``per_size`` by size)."""
    from ...runtime import Pipeline

    ref_pipe = Pipeline.from_artifacts(artifacts, backend="onnxruntime", device="cpu")
    pipe = Pipeline.from_artifacts(artifacts, backend=backend, device=device)
    settings = VERIFY_SETTINGS[ref_pipe.variant.name]
    per_size, same_shapes = {}, True
    for h, w in ref_pipe.sizes:
        run = dict(num_frames=frames, seed=seed, output="float", height=h, width=w, **settings)
        ours, ref = pipe.generate(PROMPT, **run), ref_pipe.generate(PROMPT, **run)
        per_size[f"{h}x{w}"] = chunk_psnr(ours, ref)
        same_shapes = same_shapes and ours.shape == ref.shape
    chunks = [p for c in per_size.values() for p in c]
    threshold = PSNR_TARGETS[precision]
    return {"precision": precision, "threshold_psnr_db": threshold, "psnr_db_per_chunk": chunks, "per_size": per_size,
            "passed": same_shapes and all(p >= threshold for p in chunks)}


def verify(artifacts, components: Iterable[str] | None = None, device: str = "cuda", pipeline: bool = True,
           seed: int = 0) -> dict:
    """Every engine in the manifest against ONNX Runtime fp32, then the pipeline on engines."""
    from ...runtime.runners import make_runner

    index = int(device.split(":")[1]) if ":" in device else 0
    arts = Artifacts.open(artifacts)  # damaged artifacts are refused before anything else
    require_gpu_tensorrt(index)
    comps = list(components or [c for c in arts.components if arts.manifest["components"][c].get("engines")])
    if not comps:
        raise UserError(f"no TensorRT engines in {arts.root}", fix="run `helios-deploy build ARTIFACTS` first")
    report: dict = {"artifacts": str(arts.root), "components": {}}
    precisions = set()
    for c in comps:
        arts.require(c)
        arts.verify_files(c)
        graphs = {}
        for g in arts.spec(c).graphs:
            precision = graph_precision(arts.manifest, c, g.name)
            precisions.add(precision)
            candidate = make_runner("tensorrt", arts.root, arts.manifest, c, g, device)
            reference = make_runner("onnxruntime", arts.root, arts.manifest, c, g, "cpu")
            graphs[g.name] = verify_graph(arts, c, g, candidate, reference, precision, seed)
        report["components"][c] = graphs
    if pipeline:
        worst = max(precisions, key=list(TARGETS).index)
        report["pipeline"] = verify_pipeline(arts.root, "tensorrt", device, worst, seed)
    report["passed"] = all(g["passed"] for gs in report["components"].values() for g in gs.values()) and \
        report.get("pipeline", {"passed": True})["passed"]
    return report
