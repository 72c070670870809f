"""The trained tiny checkpoint (helios_deploy.checkpoints.trained) and one export of it, once per test session
(conftest imports these fixtures): test_trained, test_page_prompt_change and the FP8 / long-stream reports use
them. Exported at the tests' video size with room for the vocabulary's prompts (up to 20 tokens); a copy of the
export with its transformer quantized to FP8, calibrated on the vocabulary's prompts."""

from __future__ import annotations

from pathlib import Path

import pytest

TRAINED_TEXT_LENGTH, TRAINED_MAX_TEXT_LENGTH = 32, 64


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory) -> Path:
    from helios_deploy.checkpoints.trained import write_trained_checkpoint

    return write_trained_checkpoint(tmp_path_factory.mktemp("trained") / "ckpt")


@pytest.fixture(scope="session")
def trained_artifacts(trained_ckpt, tmp_path_factory) -> Path:
    from helios_deploy.export.exporter.run import export_checkpoint

    from tests.conftest import HEIGHT, WIDTH

    out = tmp_path_factory.mktemp("trained") / "onnx"
    export_checkpoint(trained_ckpt, out, height=HEIGHT, width=WIDTH, text_length=TRAINED_TEXT_LENGTH,
                      max_text_length=TRAINED_MAX_TEXT_LENGTH, run_audit=False, log=lambda m: None)
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
