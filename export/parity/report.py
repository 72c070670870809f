"""`parity` as a library call: every exported graph (fp32, or the fp8 / bf16 graphs derived from it)
against the checkpoint's reference modules, and optionally the whole runtime against the reference pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from ...artifacts import Artifacts
from ...checkpoints.checkpoint import Checkpoint, revision_for
from ...errors import UserError
from ...model.sizes import video_sizes
from ..exporter.lora import manifest_adapters
from ..exporter.run import reference_loader
from .audit import format_table, open_sessions, parity_rows
from .compare import compare_component
from ...measure.memory import measure_peak


def graph_bytes(arts: Artifacts, component: str) -> int:
    """Bytes of the component's exported graphs (the fp32 weights a comparison runs)."""
    return sum(g.get("data_bytes", 0) + g.get("file_bytes", 0) for g in arts.manifest["components"][component]["graphs"].values())


def parity_report(checkpoint: str | Path, artifacts: str | Path, components: Iterable[str] | None = None,
                  seed: int = 0, pipeline: bool = False, precision: str = "fp32", revision: str | None = None,
                  chunks: int | None = None) -> dict:
    """Run every exported component against the reference; the report the `parity` command writes.
    With precision fp8: the quantized graphs instead (export/fp8_parity.py); bf16: the lowered graphs in
    ONNX's reference evaluator (export/parity/bf16.py). A Hub id ``checkpoint`` is resolved at ``revision``,
    or, when it is the repository the artifacts came from, at the commit their manifest records. ``chunks``:
    how many 33-frame chunks the pipeline cases run (default 2)."""
    arts = Artifacts.open(artifacts)
    ckpt = Checkpoint(checkpoint, revision_for(checkpoint, arts.manifest["checkpoint"], revision))
    arts.check_checkpoint(ckpt.identity)
    adapters = manifest_adapters(arts.manifest)  # the reference gets the LoRA adapters the export fused
    if precision == "fp8":
        from .fp8 import fp8_parity_report

        return fp8_parity_report(ckpt, arts, components, seed=seed, pipeline=pipeline, chunks=chunks, adapters=adapters)
    if precision == "bf16":
        from .bf16 import bf16_report

        if pipeline:
            raise UserError("--pipeline runs the runtime, which cannot run bf16 graphs on CPU",
                            fix="check bf16 engines with `helios-deploy verify` on the GPU")
        return bf16_report(ckpt.path, arts.root, components, seed=seed)
    report: dict = {"passed": True, "sizes": [list(v) for v in video_sizes(arts.manifest)], "components": {},
                    "problems": []}
    rows: list[tuple] = []
    for name in components or arts.components:
        spec = arts.spec(name)
        arts.verify_files(name)
        local: list[tuple] = []
        with measure_peak() as memory:
            report["components"][name] = compare_component(
                name, spec, lambda: open_sessions(arts.root, spec, local), lambda: reference_loader(ckpt, adapters)(name), seed=seed)
        local += parity_rows(name, report["components"][name])
        report["components"][name]["memory"] = {**memory, "graph_bytes": graph_bytes(arts, name)}
        rows += local
    if pipeline:
        from ...runtime import Pipeline
        from .pipeline import run_pipeline_parity

        report["pipeline"] = run_pipeline_parity(ckpt.path, Pipeline.from_artifacts(arts.root), seed=seed,
                                                 chunks=chunks, adapters=adapters)
        rows += [("pipeline", c["name"], "parity", f"max_abs_err {c['max_abs_err']:.2e} > 1e-3 (chunk "
                  f"{int(np.argmax(c['max_abs_err_per_chunk']))})")
                 for c in report["pipeline"]["cases"] if not c["passed"]]
    report["passed"] = not rows and all(c["passed"] for c in report["components"].values())
    report["problems"] = [list(r) for r in rows]
    if rows:
        report["table"] = format_table(rows)
    return report
