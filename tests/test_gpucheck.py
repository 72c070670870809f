"""`make gpu-check` (export/tensorrt/gpucheck.py) on this CPU host: it stops at once with the probe's one
message and writes no results; its reading of the gpu-marked tests' JUnit report runs here for real (every
test skips without a GPU, and a run where nothing passed does not count as passed). The full run needs a GPU."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from helios_deploy.export.tensorrt import gpucheck

TESTS = Path(__file__).resolve().parent


def test_gpu_check_fails_fast_with_one_message_without_gpu_or_tensorrt(tmp_path):
    out = tmp_path / "gpu-check.json"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "helios_deploy.export.tensorrt.gpucheck", "-o", str(out),
                           "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and time.monotonic() - t0 < 60
    assert proc.stderr.startswith("error: the tensorrt backend cannot run here") and "Traceback" not in proc.stderr
    assert "tensorrt" in proc.stderr and "GPU" in proc.stderr
    assert not out.exists() and not (tmp_path / "work" / "tiny").exists()  # nothing ran before the probe


def test_gpu_test_counts_come_from_the_junit_report(tmp_path):
    counts = gpucheck._pytest(TESTS, tmp_path)
    assert counts["tests"] > 0 and counts["skipped"] == counts["tests"]  # no GPU here: every gpu test skips
    assert counts["passed"] == 0 and counts["failed"] == [] and counts["exit_code"] == 0


def test_gpu_checks_are_a_list_each_answered_or_its_error_recorded(tmp_path):
    """The checks only a GPU settles (issue 28) are registered in order; another issue adds one with @check; a
    check that raises is recorded as not ok with its message, and the others still run."""
    from helios_deploy.errors import UserError
    from helios_deploy.export.tensorrt import gpuchecks as G

    assert [n for n, _ in G.CHECKS][:4] == ["refittable_every_point", "refit_three_groups", "fp8_scales_refittable",
                                            "fp32_tf32"]

    def bad(ctx):
        raise UserError("TensorRT refused it", fix="see docs/tensorrt.md")

    ctx = G.Context(tmp_path, tmp_path, export=None)
    out = G.run_checks(ctx, [("answer", lambda c: {"accepted": False}), ("bad", bad), ("after", lambda c: {"x": 1})])
    assert out["answer"] == {"ok": True, "accepted": False} and out["after"] == {"ok": True, "x": 1}
    assert out["bad"]["ok"] is False and out["bad"]["error"].startswith("TensorRT refused it")
    before = len(G.CHECKS)
    try:
        G.check("issue-30 variant")(lambda c: {})
        assert G.CHECKS[-1][0] == "issue-30 variant" and len(G.CHECKS) == before + 1
    finally:
        del G.CHECKS[before:]
