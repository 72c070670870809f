"""Accuracy of the bf16 graphs on CPU. ONNX Runtime's CPU provider has no bf16 convolution, so the lowered
graphs run in ONNX's reference evaluator (``onnx.reference``), which computes each op in the graph's own
dtypes, against the diffusers / transformers modules in fp32."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from ...errors import UserError
from ...model.specs import GraphSpec

BF16_REL_L2 = 0.05  # parity of a bf16 graph against the fp32 reference (bf16 has an 8-bit mantissa)


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


def bf16_report(checkpoint, artifacts, components: Iterable[str] | None = None, seed: int = 0) -> dict:
    """Every lowered graph (reference evaluator) against the fp32 reference modules at every parity
    case; the same report shape as the fp32 parity."""
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
        lowered = arts.manifest["components"][name].get("bf16")
        if not lowered:
            raise UserError(f"no bf16 graphs for {name}", fix="run `helios-deploy quantize ARTIFACTS --precision bf16`")
        folder = arts.root / name
        for record in lowered.values():
            arts.verify_record(name, record)
        result = compare_component(name, spec, lambda: {g.name: ReferenceGraph(folder / lowered[g.name]["file"], g)
                                                        for g in spec.graphs},
                                   lambda: reference_module(ckpt, name), seed=seed, threshold=BF16_REL_L2)
        report["components"][name] = {**result, "precision": "bf16"}
    report["passed"] = all(c["passed"] for c in report["components"].values())
    return report
