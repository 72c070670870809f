"""bf16 keeps what the trained tiny checkpoint's videos show (issue 29 item 5): the runtime's own sampler loop with
the text encoder, transformer and VAE decoder swapped for their bf16 lowerings, run in ONNX's reference evaluator
(ONNX Runtime's CPU provider has no bf16 convolution), shows each prompt's colour and direction exactly where the
fp32 runtime does. Two prompts x one seed here (each bf16 video takes about 10 s on one core, 9 s of it the
reference evaluator's VAE decoder); `bf16_report(..., adherence=True)` runs 20 x 2 (docs/quantize-and-build.md)."""

from __future__ import annotations

import shutil

import pytest

# trained_artifacts is conftest's session fixture (tests/trained_fixture.py): imported here, it would be a second
# fixture of this module, exporting the trained checkpoint a second time in the session.


@pytest.fixture(scope="module")
def trained_bf16(trained_artifacts, tmp_path_factory):
    """A copy of the trained export with bf16 graphs for the components a text-to-video run uses."""
    from helios_deploy.export.parity.bf16 import T2V_COMPONENTS
    from helios_deploy.export.transforms.lowering import lower_artifacts

    root = shutil.copytree(trained_artifacts, tmp_path_factory.mktemp("trained_bf16") / "arts")
    lower_artifacts(root, T2V_COMPONENTS, log=lambda m: None)
    return root


@pytest.mark.slow
def test_bf16_adherence_equals_fp32(trained_bf16):
    """The first two of the 20 adherence prompts (two colours, two directions), seed 0: fp32 shows both, and
    the bf16 graphs show the same (it fails on the random tiny checkpoint, whose fp32 videos show nothing, and
    on a broken bf16 graph)."""
    import torch

    from helios_deploy.artifacts import Artifacts
    from helios_deploy.export.parity.bf16 import bf16_adherence_report
    from helios_deploy.measure.adherence import default_prompts

    torch.set_num_threads(1)
    report = bf16_adherence_report(Artifacts.open(trained_bf16), prompts=default_prompts()[:2], seeds=(0,))
    fp32, bf16 = report["share"]["fp32"], report["share"]["bf16"]
    assert fp32["videos"] == 2 and fp32["matched"] == 2, (fp32, report["flips"])
    assert bf16["matched"] == fp32["matched"] and not report["flips"], (fp32, bf16, report["flips"])
    assert report["passed"]
