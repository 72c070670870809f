"""The trained tiny checkpoint (helios_deploy.checkpoints.trained), `helios-deploy demo` run once and its export,
once per test session (conftest imports these fixtures): test_demo, test_trained, test_bf16_adherence and
test_page_prompt_change use them. The export is the demo's (audited, at the tests' video size, room for the
vocabulary's prompts: up to 20 tokens), so the session exports the trained checkpoint once; a copy of it with its
transformer quantized to FP8, calibrated on the vocabulary's prompts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory) -> Path:
    from helios_deploy.checkpoints.trained import write_trained_checkpoint

    return write_trained_checkpoint(tmp_path_factory.mktemp("trained") / "ckpt")


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory) -> dict:
    """`helios-deploy demo -o OUT` as `make demo` runs it (a child process, its terminal captured): the trained
    checkpoint, its audited export (OUT/artifacts, 64x128, text length 64 of up to 128), the mp4 and strip,
    adherence, and the whole pipeline against diffusers (OUT/parity.json, the report run_demo returns).
    test_demo checks the run; test_trained asserts its pipeline parity; its export is ``trained_artifacts``."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    proc = subprocess.run([sys.executable, "-m", "helios_deploy.cli", "demo", "-o", str(out)], capture_output=True,
                          text=True, timeout=3600)
    report = out / "parity.json"
    return {"out": out, "returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr,
            "report": json.loads(report.read_text()) if report.is_file() else None}


@pytest.fixture(scope="session")
def trained_artifacts(trained_demo) -> Path:
    """The demo's export of the trained checkpoint (audited; the tests only read it)."""
    out = trained_demo["out"] / "artifacts"
    if not (out / "manifest.json").is_file():
        pytest.fail(f"the demo wrote no export (exit {trained_demo['returncode']}):\n{trained_demo['stderr'][-4000:]}",
                    pytrace=False)
    return out


@pytest.fixture(scope="session")
def trained_fp8(trained_artifacts, tmp_path_factory) -> Path:
    """A copy of ``trained_artifacts`` with the FP8 transformer (``quantize``: 8 of the 20 adherence prompts x
    2 chunks through the fp32 pipeline; every block FP8, as the other tiny FP8 fixtures)."""
    import shutil

    from helios_deploy.export.transforms.quantize import quantize_artifacts
    from helios_deploy.measure.adherence import default_prompts
    from tests.conftest import FP8_KEEP

    root = Path(shutil.copytree(trained_artifacts, tmp_path_factory.mktemp("trained_fp8") / "arts"))
    quantize_artifacts(root, ["transformer"], prompts=default_prompts()[:8], keep=FP8_KEEP, chunks=2, seed=0,
                       log=lambda m: None)
    return root
