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
# Adherence (trained tiny checkpoint, helios_deploy.measure.adherence): the share of prompt x seed videos whose
# colour and direction are the prompt's may fall by at most this much against the fp32 runtime's (2 of 40).
ADHERENCE_MAX_DROP = 0.05


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


def adherence_report(arts: Artifacts, prompts=None, seeds=(0, 1), precision: str = "fp8", pipeline=None) -> dict:
    """The share of videos that show their prompt's colour and motion, fp32 runtime against ``precision``'s, on
    the same prompts x seeds; ``flips``: the videos whose verdict changed; passed: a drop <= ADHERENCE_MAX_DROP.
    ``pipeline``: makes the ``precision`` pipeline (default: the runtime's, ``Pipeline.from_artifacts``);
    ``seconds``: each precision's run."""
    import time

    from ...measure.adherence import adherence_share, default_prompts
    from ...runtime import Pipeline

    prompts = list(prompts) if prompts is not None else default_prompts()
    makers = {"fp32": lambda: Pipeline.from_artifacts(arts.root, precision="fp32"),
              precision: pipeline or (lambda: Pipeline.from_artifacts(arts.root, precision=precision))}
    shares, seconds = {}, {}
    for p, make in makers.items():
        t0 = time.perf_counter()
        pipe = make()
        shares[p] = adherence_share(pipe, prompts, seeds, output="float")
        pipe.close()
        seconds[p] = round(time.perf_counter() - t0, 1)
    flips = [{"prompt": a["prompt"], "seed": a["seed"], "fp32": a["match"], precision: b["match"]}
             for a, b in zip(shares["fp32"]["results"], shares[precision]["results"]) if a["match"] != b["match"]]
    drop = shares["fp32"]["share"] - shares[precision]["share"]
    return {"precision": precision, "videos": shares["fp32"]["videos"], "prompts": len(prompts), "seeds": list(seeds),
            "max_drop": ADHERENCE_MAX_DROP, "seconds": seconds,
            "share": {p: {k: v for k, v in r.items() if k != "results"} for p, r in shares.items()},
            "drop": drop, "flips": flips, "passed": drop <= ADHERENCE_MAX_DROP}


def fp8_parity_report(ckpt: Checkpoint, arts: Artifacts, components: Iterable[str] | None = None, seed: int = 0,
                      pipeline: bool = False, chunks: int | None = None, adapters=(), adherence: bool = False) -> dict:
    """``adherence``: also ``adherence_report`` (for checkpoints with the procedural vocabulary: the trained tiny
    one)."""
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
    if adherence:
        report["adherence"] = adherence_report(arts)
        a = report["adherence"]
        if not a["passed"]:
            rows.append(("pipeline", "adherence", "share", f"fp32 {a['share']['fp32']['share']:.2f} -> fp8 "
                         f"{a['share']['fp8']['share']:.2f} (drop <= {ADHERENCE_MAX_DROP})"))
    report["passed"] = not rows
    report["problems"] = [list(r) for r in rows]
    if rows:
        report["table"] = format_table(rows)
    return report
