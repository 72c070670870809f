"""The embedded default job: a tiny random-weight checkpoint made locally, exported and checked for
parity on CPU. Re-running reuses the checkpoint and replaces the artifacts."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .errors import UserError
from .tiny import ensure_tiny_checkpoint


def run_demo(out: str | Path, height: int = 64, width: int = 128, log=print) -> dict:
    from .export.run import export_checkpoint, parity_report

    out = Path(out)
    t0 = time.perf_counter()
    ckpt = ensure_tiny_checkpoint(out / "checkpoint")
    log(f"tiny checkpoint: {ckpt}")
    arts = out / "artifacts"
    # the parity step below is the export's audit, so the export itself skips it
    manifest = export_checkpoint(ckpt, arts, height=height, width=width, text_length=64, max_text_length=128,
                                 force=True, run_audit=False, log=log)
    report = parity_report(ckpt, arts)
    report_path = out / "parity.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    for name, comp in report["components"].items():
        worst = max(c["rel_l2"] for c in comp["cases"])
        log(f"  {name:13s} {'PASS' if comp['passed'] else 'FAIL'}  worst rel_l2 {worst:.2e} over {len(comp['cases'])} cases")
    if not report["passed"]:
        raise UserError("demo parity failed", found=f"see {report_path}")
    log(f"artifacts: {arts}\nmanifest:  {arts / 'manifest.json'}\nparity:    {report_path}")
    log(f"done in {time.perf_counter() - t0:.0f}s (export {manifest['timings']['export_seconds']:.0f}s)")
    return report
