"""Accuracy of the FP8 graphs on CPU: ONNX Runtime runs each quantized graph against the fp32 reference
modules (diffusers / transformers) at every parity case (cosine >= 0.99, rel_l2 <= 0.08), and with
``pipeline`` the FP8 runtime's whole video against diffusers' HeliosPyramidPipeline in fp32 (PSNR per
chunk)."""

from __future__ import annotations

from typing import Iterable

from ...artifacts import Artifacts
from ...checkpoints.checkpoint import Checkpoint
from ...errors import UserError
from .audit import format_table
from ...measure.memory import measure_peak
from ..exporter.run import reference_loader
from .compare import OrtGraph, compare_component

FP8_REL_L2 = 0.08
FP8_COSINE = 0.99


def verify_fp8_files(arts: Artifacts, component: str) -> dict:
    """The component's FP8 entry, after checking its files against the sha256 recorded by `quantize`."""
    entry = arts.manifest["components"][component].get("fp8")
    if not entry:
        raise UserError(f"{arts.root} has no FP8 graph for {component}",
                        fix=f"run `helios-deploy quantize {arts.root} --precision fp8` first")
    arts.verify_record(component, entry, "quantize")
    return entry


def _rows(component: str, result: dict) -> list[tuple]:
    return [(component, c["name"], "fp8 parity", f"cosine {c['cosine']:.6f} (>= {FP8_COSINE}), rel_l2 "
             f"{c['rel_l2']:.3e} (<= {FP8_REL_L2})") for c in result["cases"] if not c["passed"]]


def fp8_parity_report(ckpt: Checkpoint, arts: Artifacts, components: Iterable[str] | None = None, seed: int = 0,
                      pipeline: bool = False, chunks: int | None = None, adapters=()) -> dict:
    names = list(components or [c for c in arts.components if arts.manifest["components"][c].get("fp8")])
    if not names:
        verify_fp8_files(arts, "transformer")  # raises: nothing quantized yet
    report: dict = {"precision": "fp8", "passed": True, "components": {}, "problems": []}
    rows: list[tuple] = []
    for name in names:
        spec = arts.spec(name)
        arts.verify_files(name)
        entry = verify_fp8_files(arts, name)
        path = arts.root / name / entry["file"]
        with measure_peak() as memory:
            result = compare_component(name, spec, lambda: {"model": OrtGraph(path, spec.graph("model"))},
                                       lambda: reference_loader(ckpt, adapters)(name), seed=seed, threshold=FP8_REL_L2,
                                       precision="fp8", min_cosine=FP8_COSINE)
        result["memory"] = memory
        report["components"][name] = result
        rows += _rows(name, result)
    if pipeline:
        from ...runtime import Pipeline
        from .pipeline import run_pipeline_psnr

        report["pipeline"] = run_pipeline_psnr(ckpt.path, Pipeline.from_artifacts(arts.root, precision="fp8"), seed=seed,
                                               chunks=chunks, adapters=adapters)
        rows += [("pipeline", c["name"], "psnr", f"min chunk PSNR {min(c['psnr_db']):.2f} dB (>= "
                  f"{report['pipeline']['threshold_psnr_db']}), last - first chunk {c['drift_db']:+.2f} dB "
                  f"(>= -{report['pipeline']['max_drift_db']})") for c in report["pipeline"]["cases"] if not c["passed"]]
    report["passed"] = not rows
    report["problems"] = [list(r) for r in rows]
    if rows:
        report["table"] = format_table(rows)
    return report
