"""Shared fixtures: one tiny checkpoint and one export per test session; reference comparisons are
computed once (session scope) and asserted by many tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.pg_fixture import pg_url, postgres_server  # noqa: F401 - the session's PostgreSQL (fixtures)
from tests.trained_fixture import trained_artifacts, trained_ckpt, trained_demo  # noqa: F401 - the trained tiny checkpoint

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, os.cpu_count() or 1))

# Small video size for tests: multiples of 64 (the real constraint); latent 8x16, stage 0 at 2x4.
HEIGHT, WIDTH = 64, 128
TEXT_LENGTH, MAX_TEXT_LENGTH = 16, 32


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from helios_deploy.checkpoints.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def artifacts(tiny_ckpt, tmp_path_factory) -> Path:
    """All four components exported from the tiny checkpoint (the audit runs in test_export)."""
    from helios_deploy.export.exporter.run import export_checkpoint

    out = tmp_path_factory.mktemp("arts") / "onnx"
    export_checkpoint(tiny_ckpt, out, height=HEIGHT, width=WIDTH, text_length=TEXT_LENGTH,
                      max_text_length=MAX_TEXT_LENGTH, run_audit=False, log=lambda m: None)
    return out


# Two sizes from one export (landscape and portrait): the same latent area, each stage's shape transposed.
SIZES = ((HEIGHT, WIDTH), (WIDTH, HEIGHT))


@pytest.fixture(scope="session")
def sizes_artifacts(tiny_ckpt, tmp_path_factory) -> Path:
    """All four components exported once for both SIZES (the audit runs in test_sizes, through parity)."""
    from helios_deploy.export.exporter.run import export_checkpoint

    out = tmp_path_factory.mktemp("arts") / "sizes"
    export_checkpoint(tiny_ckpt, out, sizes=SIZES, text_length=TEXT_LENGTH, max_text_length=MAX_TEXT_LENGTH,
                      run_audit=False, log=lambda m: None)
    return out


def export_variant(ckpt: Path, out: Path, donor_ckpt: Path, donor_artifacts: Path, reuse: tuple[str, ...]) -> Path:
    """Export ``ckpt``'s transformer (its graph depends on the variant) and take the ``reuse`` components from
    ``donor_artifacts``, an export of ``donor_ckpt`` with the same settings, after checking that the two
    checkpoints hold the same weights and configs for them (the tiny variants share them for a seed), so an
    export would write the same graphs. Saves the suite three VAE / text-encoder exports."""
    import json
    import shutil

    from helios_deploy.artifacts import Artifacts, write_manifest
    from helios_deploy.checkpoints.checkpoint import COMPONENT_FOLDER, Checkpoint
    from helios_deploy.export.exporter.run import export_checkpoint

    ours, donor = Checkpoint(ckpt).identity, Checkpoint(donor_ckpt).identity
    for c in reuse:
        folder = COMPONENT_FOLDER[c]
        files = {k: v for k, v in ours["files"].items() if k.startswith(folder + "/")}
        assert files and files == {k: v for k, v in donor["files"].items() if k.startswith(folder + "/")}, c
        assert ours["configs"][folder] == donor["configs"][folder], c
    export_checkpoint(ckpt, out, height=HEIGHT, width=WIDTH, text_length=TEXT_LENGTH, max_text_length=MAX_TEXT_LENGTH,
                      components=("transformer",), run_audit=False, log=lambda m: None)
    arts, source = Artifacts.open(out), Artifacts.open(donor_artifacts)
    for c in reuse:
        shutil.copytree(source.root / c, out / c)
        arts.manifest["components"][c] = json.loads(json.dumps(source.manifest["components"][c]))
        arts.verify_files(c)
    write_manifest(out, arts.manifest)
    return out


@pytest.fixture(scope="session")
def base_ckpt(tmp_path_factory) -> Path:
    """Helios-Base: HeliosPipeline, HeliosScheduler (one stage, UniPC), the same weights as tiny_ckpt."""
    from helios_deploy.checkpoints.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "base", seed=0, variant="base")


@pytest.fixture(scope="session")
def base_artifacts(base_ckpt, tiny_ckpt, artifacts, tmp_path_factory) -> Path:
    """All four components of the Base checkpoint (the VAE encoder for I2V)."""
    return export_variant(base_ckpt, tmp_path_factory.mktemp("arts") / "base", tiny_ckpt, artifacts,
                          ("text_encoder", "vae_decoder", "vae_encoder"))


@pytest.fixture(scope="session")
def mid_ckpt(tmp_path_factory) -> Path:
    """Helios-Mid: HeliosPyramidPipeline with is_cfg_zero_star, HeliosScheduler over three stages."""
    from helios_deploy.checkpoints.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "mid", seed=0, variant="mid")


@pytest.fixture(scope="session")
def mid_artifacts(mid_ckpt, tiny_ckpt, artifacts, tmp_path_factory) -> Path:
    """The Mid checkpoint's text-to-video components (the Mid tests are T2V)."""
    return export_variant(mid_ckpt, tmp_path_factory.mktemp("arts") / "mid", tiny_ckpt, artifacts,
                          ("text_encoder", "vae_decoder"))


@pytest.fixture(scope="session")
def parity(tiny_ckpt, artifacts) -> dict:
    """The parity report of every exported component against the diffusers/transformers reference."""
    from helios_deploy.export.parity.report import parity_report

    return parity_report(tiny_ckpt, artifacts)


# FP8 test recipe: the tiny transformer has 2 blocks, so the default recipe (first/last 3 blocks kept) would
# quantize nothing; this keep set leaves the blocks' linear layers in FP8.
FP8_KEEP = [r"^patch_", r"^condition_embedder\.", r"^proj_out/"]
FP8_PROMPTS = ["A cat and a dog baking a cake together in a kitchen.",
               "A drone shot over a snowy mountain ridge at sunrise."]


@pytest.fixture(scope="session")
def quantized(artifacts, tmp_path_factory) -> Path:
    """A copy of the tiny artifacts, quantized once (2 prompts from a file x 2 chunks)."""
    import shutil

    from helios_deploy.export.transforms.quantize import quantize_artifacts

    root = Path(shutil.copytree(artifacts, tmp_path_factory.mktemp("fp8") / "arts"))
    prompts = root.parent / "prompts.txt"
    prompts.write_text("\n".join(FP8_PROMPTS) + "\n\n")
    quantize_artifacts(root, ["transformer"], prompts_file=prompts, keep=FP8_KEEP, chunks=2, seed=0, log=lambda m: None)
    return root


@pytest.fixture(scope="session")
def quantized_attention(artifacts, tmp_path_factory) -> Path:
    """The same, with FP8 attention too (``quantize --fp8-attention``; issue 30)."""
    import shutil

    from helios_deploy.export.transforms.quantize import quantize_artifacts

    root = Path(shutil.copytree(artifacts, tmp_path_factory.mktemp("fp8att") / "arts"))
    quantize_artifacts(root, ["transformer"], prompts=FP8_PROMPTS, keep=FP8_KEEP, chunks=2, seed=0, log=lambda m: None,
                       attention=True)
    return root


@pytest.fixture
def cholesky_float64():
    """The reference pipeline's fp32 Cholesky fails on CPU; factor that one matrix in float64 while
    the test runs (helios_deploy.export.exporter.patches.cholesky_float64)."""
    from helios_deploy.export.exporter.patches import cholesky_float64

    with cholesky_float64():
        yield


def run_cli(args, capsys):
    from helios_deploy.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="session")
def server_env():
    """The Triton server environment (`make test` builds it): missing, the Triton tests fail, not skip."""
    from helios_deploy.errors import UserError
    from helios_deploy.serving.server import find_env

    try:
        return find_env()
    except UserError as e:
        problem = e.render()
    pytest.fail(f"the Triton server environment is missing (make test builds it):\n{problem}", pytrace=False)


@pytest.fixture(autouse=True)
def _server_log_on_failure(request):
    """Print the Triton server's log (tail) under the report of a failed test that used a ``server`` fixture."""
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed and "server" in request.fixturenames:
        server = request.getfixturevalue("server")
        if not callable(getattr(server, "log", None)):  # another kind of server fixture
            return
        log = server.log()
        print("---- tritonserver log (last 80 lines) ----\n" + "\n".join(log.splitlines()[-80:]))
