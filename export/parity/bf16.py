"""Accuracy of the bf16 graphs on CPU. ONNX Runtime's CPU provider has no bf16 convolution, so the lowered
graphs run in ONNX's reference evaluator (``onnx.reference``), which computes each op in the graph's own
dtypes, against the diffusers / transformers modules in fp32. ``adherence``: the runtime's own sampler loop with
the text encoder, transformer and VAE decoder swapped for their bf16 graphs (same evaluator) against the fp32
runtime, by what the videos show (helios_deploy.measure.adherence; the trained tiny checkpoint's vocabulary)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from ...errors import UserError
from ...model.specs import GraphSpec

BF16_REL_L2 = 0.05  # parity of a bf16 graph against the fp32 reference (bf16 has an 8-bit mantissa)
# the graphs a text-to-video pipeline runs (the VAE encoder only conditions I2V / V2V)
T2V_COMPONENTS = ("text_encoder", "transformer", "vae_decoder")


class ReferenceGraph:
    """A graph run by ONNX's reference evaluator (for dtypes ONNX Runtime's CPU provider lacks, bf16);
    called like parity.OrtGraph: arrays in spec order in, arrays out."""

    def __init__(self, path: Path, graph: GraphSpec):
        from onnx.reference import ReferenceEvaluator

        self.graph = graph
        self.evaluator = ReferenceEvaluator(str(path))

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        feeds = {t.name: a for t, a in zip(self.graph.inputs, arrays)}
        return [np.asarray(y, dtype=np.float32) for y in self.evaluator.run([t.name for t in self.graph.outputs], feeds)]


def reference_runner(path: Path, graph: GraphSpec, component: str):
    """A runtime runner (runners/base.py protocol) around ReferenceGraph: how the pipeline's own sampler loop
    runs a lowered bf16 graph on CPU (``Pipeline.set_runner``)."""
    import torch

    from ...runtime.runners.base import Runner

    class ReferenceRunner(Runner):
        backend = "onnx.reference"

        def _activate_impl(self) -> None:
            self.run = ReferenceGraph(path, graph)

        def _infer_impl(self, feeds):  # outputs keep the spec's dtype (the VAE decoder's frames are uint8)
            arrays = {t.name: feeds[t.name].detach().contiguous().numpy() for t in graph.inputs}
            outs = self.run.evaluator.run([t.name for t in graph.outputs], arrays)
            return {t.name: torch.from_numpy(np.asarray(o, dtype=t.dtype)) for t, o in zip(graph.outputs, outs)}

    return ReferenceRunner(graph, component, "cpu").activate()


def _lowered(arts, name: str) -> dict:
    """The component's bf16 records (graph name -> record), their files checked against the manifest."""
    lowered = arts.manifest["components"][name].get("bf16")
    if not lowered:
        raise UserError(f"no bf16 graphs for {name}", fix="run `helios-deploy quantize ARTIFACTS --precision bf16`")
    for record in lowered.values():
        arts.verify_record(name, record)
    return lowered


def bf16_pipeline(arts):
    """A fresh fp32 runtime Pipeline whose text encoder, transformer and VAE decoder graphs are the bf16 ones,
    run in ONNX's reference evaluator (``Pipeline.set_runner``): the pipeline's own sampler loop in bf16."""
    from ...runtime import Pipeline

    pipe = Pipeline.from_artifacts(arts.root)
    for name in T2V_COMPONENTS:
        for graph, record in _lowered(arts, name).items():
            pipe.set_runner(name, graph, reference_runner(arts.root / name / record["file"],
                                                          arts.spec(name).graph(graph), name))
    return pipe


def bf16_adherence_report(arts, prompts=None, seeds=(0, 1)) -> dict:
    """fp8.adherence_report for bf16: the fp32 runtime (ONNX Runtime) against ``bf16_pipeline`` (each bf16 video
    takes 9-15 s on one core at the tests' 64x128: the reference evaluator's VAE decoder is 9 s of it)."""
    from .fp8 import adherence_report

    report = adherence_report(arts, prompts, seeds, precision="bf16", pipeline=lambda: bf16_pipeline(arts))
    report["graphs"] = {"fp32": "onnxruntime", "bf16": f"onnx.reference: {', '.join(T2V_COMPONENTS)} bf16"}
    return report


def bf16_report(checkpoint, artifacts, components: Iterable[str] | None = None, seed: int = 0,
                adherence: bool = False) -> dict:
    """Every lowered graph (reference evaluator) against the fp32 reference modules at every parity
    case; the same report shape as the fp32 parity. ``adherence``: also ``bf16_adherence_report`` (20 prompts x
    2 seeds; for checkpoints with the procedural vocabulary: the trained tiny one), which must pass too."""
    from ...artifacts import Artifacts
    from ...checkpoints.checkpoint import Checkpoint
    from .reference import reference_module
    from .compare import compare_component

    ckpt = Checkpoint(checkpoint)
    arts = Artifacts.open(artifacts)
    arts.check_checkpoint(ckpt.identity)
    report: dict = {"precision": "bf16", "components": {}}
    for name in components or arts.components:
        spec = arts.spec(name)
        lowered = _lowered(arts, name)
        folder = arts.root / name
        result = compare_component(name, spec, lambda: {g.name: ReferenceGraph(folder / lowered[g.name]["file"], g)
                                                        for g in spec.graphs},
                                   lambda: reference_module(ckpt, name), seed=seed, threshold=BF16_REL_L2)
        report["components"][name] = {**result, "precision": "bf16"}
    report["passed"] = all(c["passed"] for c in report["components"].values())
    if adherence:
        report["adherence"] = bf16_adherence_report(arts)
        report["passed"] = report["passed"] and report["adherence"]["passed"]
    return report
