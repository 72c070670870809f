"""The embedded default job, on CPU: a tiny random-weight checkpoint made locally, exported to audited
ONNX, a two-chunk video generated from it by the runtime and written as mp4, and the whole pipeline
checked against diffusers' HeliosPyramidPipeline. Re-running reuses the checkpoint and replaces the rest."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .errors import UserError
from .tiny import ensure_tiny_checkpoint

DEMO_PROMPT = "A red car drives along a coastal road at sunset; waves crash on the rocks below."


def run_demo(out: str | Path, height: int = 64, width: int = 128, log=print) -> dict:
    from .export.parity.pipeline import run_pipeline_parity
    from .export.exporter.run import export_checkpoint
    from .runtime import Pipeline
    from .runtime.video_io import write_mp4

    out = Path(out)
    timings = {}
    t = time.perf_counter()
    ckpt = ensure_tiny_checkpoint(out / "checkpoint")
    timings["checkpoint_s"] = time.perf_counter() - t
    log(f"tiny checkpoint: {ckpt}")
    t = time.perf_counter()
    arts = out / "artifacts"
    manifest = export_checkpoint(ckpt, arts, height=height, width=width, text_length=64, max_text_length=128,
                                 force=True, log=log)  # audited: checker, session, parity per component
    timings["export_and_audit_s"] = time.perf_counter() - t
    for name, result in manifest["audit"].items():
        log(f"  {name:13s} audit passed, worst rel_l2 {max(c['rel_l2'] for c in result['cases']):.2e}")
    pipe = Pipeline.from_artifacts(arts)
    t = time.perf_counter()
    video = out / "demo.mp4"
    frames = write_mp4(video, (c.frames for c in pipe.stream(DEMO_PROMPT, num_frames=66, seed=0)))
    timings["generate_s"] = time.perf_counter() - t
    log(f"generated {frames} frames (two chunks) in {timings['generate_s']:.2f}s -> {video}")
    t = time.perf_counter()
    report = {"pipeline": run_pipeline_parity(ckpt, pipe), "timings": timings}
    timings["pipeline_parity_s"] = time.perf_counter() - t
    for c in report["pipeline"]["cases"]:
        log(f"  pipeline {c['name']:16s} max_abs_err {c['max_abs_err']:.2e} {'ok' if c['passed'] else 'FAIL'}")
    report_path = out / "parity.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    if not report["pipeline"]["passed"]:
        raise UserError("demo pipeline parity failed", found=f"see {report_path}")
    log(f"video:     {video}\nartifacts: {arts}\nmanifest:  {arts / 'manifest.json'}\nparity:    {report_path}")
    log("timings:   " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return report
