"""`make gpu-check`: the GPU smoke run for a person with one NVIDIA GPU (H100 first), in minutes.

    python -m helios_deploy.export.tensorrt.gpucheck [-o gpu-check.json] [--workdir DIR] [--tests tests]

On a host with TensorRT >= 10.1 and a GPU it: writes the tiny random-weight checkpoint, exports it (64x128, text
length 16), builds the tiny fp32 engines (`build`), runs the gpu-marked tests (tests/test_tensorrt_gpu.py, in a
child pytest with a JUnit report) and `verify` (every engine against ONNX Runtime at every operating point, then
the pipeline's PSNR), then the checks only a GPU settles (gpuchecks.py: refit in three groups against a fresh
build, a refittable build with every operating point, which FP8 weight scales are refittable, fp32 with TF32 off
and on), and writes ONE JSON: the platform, each step's seconds and outcome (an error message where it failed;
later steps still run when they can), the build and verify reports, the pytest counts and failures, each check's
answer under ``checks``, and ``passed``. Without TensorRT or a GPU it stops before anything else with the probe's one message (exit 1).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

from ...errors import UserError
from . import gpucheck_fp8  # noqa: F401 - registers gpuchecks' fp8_variants check (issue 30)
from .gpuchecks import Context, run_checks
from .probe import require_gpu_tensorrt

HEIGHT, WIDTH, TEXT_LENGTH, MAX_TEXT_LENGTH = 64, 128, 16, 32  # as the tests' tiny artifacts (tests/conftest.py)


def _step(results: dict, name: str, fn):
    """Run one step; record its seconds and outcome; its value, or None when it raised."""
    t0 = time.perf_counter()
    try:
        value = fn()
        results["steps"].append({"name": name, "seconds": round(time.perf_counter() - t0, 2), "ok": True})
        return value
    except Exception as e:  # noqa: BLE001 - every failure goes into the report, the run goes on
        message = e.render() if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        results["steps"].append({"name": name, "seconds": round(time.perf_counter() - t0, 2), "ok": False,
                                 "error": message, "traceback": traceback.format_exc(limit=8)})
        return None


def _pytest(tests: Path, workdir: Path) -> dict:
    """The gpu-marked tests in a child pytest; counts and failures from its JUnit report."""
    report = workdir / "gpu-tests.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(tests / "test_tensorrt_gpu.py"),
                           f"--junitxml={report}"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          cwd=tests.parent)
    if not report.is_file():
        raise RuntimeError(f"pytest wrote no report (exit {proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failures = [{"test": case.get("name"), "message": (bad.get("message") or "")[:2000]}
                for case in suite.iter("testcase") for bad in case if bad.tag in ("failure", "error")]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "exit_code": proc.returncode, "failed": failures}


def run(out: Path, workdir: Path, tests: Path) -> dict:
    """Every step on this GPU; the results (also written to ``out``). UserError at once without TensorRT / GPU."""
    platform = require_gpu_tensorrt()
    from ...checkpoints.tiny import write_tiny_checkpoint
    from ..exporter.run import export_checkpoint
    from .build import build
    from .engines import BuildSettings
    from .verify import verify

    results: dict = {"platform": {k: platform[k] for k in ("tensorrt", "gpu", "compute_capability")}, "steps": []}
    ckpt = _step(results, "tiny checkpoint", lambda: write_tiny_checkpoint(workdir / "tiny", seed=0, force=True))
    arts = workdir / "artifacts"
    if ckpt is not None:
        _step(results, "export", lambda: export_checkpoint(ckpt, arts, height=HEIGHT, width=WIDTH,
                                                           text_length=TEXT_LENGTH, max_text_length=MAX_TEXT_LENGTH,
                                                           force=True, run_audit=False, log=lambda m: None))
    if arts.is_dir():
        plan = _step(results, "build", lambda: build(arts, settings=BuildSettings(opt_level=3), log=lambda m: None))
        results["build"] = _engine_reports(arts) if plan is not None else None
    results["gpu_tests"] = _step(results, "gpu tests", lambda: _pytest(tests, workdir))
    if results.get("build"):
        results["verify"] = _step(results, "verify", lambda: verify(arts, device="cuda"))
    if arts.is_dir():  # what only a GPU settles (gpuchecks.py): one answer per check
        results["checks"] = _step(results, "gpu checks", lambda: run_checks(Context(workdir, arts, _exporter(workdir))))
    verified, tested = results.get("verify") or {}, results.get("gpu_tests") or {}
    checks = results.get("checks") or {}
    results["passed"] = (all(s["ok"] for s in results["steps"]) and verified.get("passed") is True
                         and tested.get("passed", 0) > 0 and tested["failures"] == 0 and tested["errors"] == 0
                         and bool(checks) and all(c["ok"] for c in checks.values()))
    out.write_text(json.dumps(results, indent=2, default=str))
    return results


def _exporter(workdir: Path):
    """export(seed, out, components): the tiny checkpoint of ``seed`` exported as gpu-check exports it."""
    def export(seed: int, out: Path, components) -> Path:
        from ...checkpoints.tiny import write_tiny_checkpoint
        from ..exporter.run import export_checkpoint

        ckpt = write_tiny_checkpoint(workdir / f"tiny-{seed}", seed=seed, force=True)
        export_checkpoint(ckpt, out, height=HEIGHT, width=WIDTH, text_length=TEXT_LENGTH, components=components,
                          max_text_length=MAX_TEXT_LENGTH, force=True, run_audit=False, log=lambda m: None)
        return Path(out)
    return export


def _engine_reports(arts: Path) -> dict:
    manifest = json.loads((arts / "manifest.json").read_text())
    return {f"{c}/{g}": record.get("report") for c, entry in manifest["components"].items()
            for g, record in (entry.get("engines") or {}).items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m helios_deploy.export.tensorrt.gpucheck", description=__doc__.split("\n")[0])
    p.add_argument("-o", "--out", type=Path, default=Path("gpu-check.json"), help="the results (default gpu-check.json)")
    p.add_argument("--workdir", type=Path, default=None, help="where the checkpoint, artifacts and engines go "
                                                              "(default: a temporary folder, removed afterwards)")
    p.add_argument("--tests", type=Path, default=Path(__file__).resolve().parents[2] / "tests",
                   help="the checkout's tests folder (for the gpu-marked tests)")
    args = p.parse_args(argv)
    try:
        if args.workdir is None:
            with tempfile.TemporaryDirectory(prefix="helios-gpu-check-") as tmp:
                results = run(args.out, Path(tmp), args.tests)
        else:
            args.workdir.mkdir(parents=True, exist_ok=True)
            results = run(args.out, args.workdir, args.tests)
    except UserError as e:
        print(f"error: {e.render()}", file=sys.stderr)
        return 1
    failed = [s["name"] for s in results["steps"] if not s["ok"]]
    print(f"{'passed' if results['passed'] else 'FAILED'}: {args.out}" + (f" (failed: {', '.join(failed)})" if failed else ""))
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
