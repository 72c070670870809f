"""Shared fixtures: one tiny checkpoint and one export per test session; reference comparisons are
computed once (session scope) and asserted by many tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, os.cpu_count() or 1))

# Small video size for tests: multiples of 64 (the real constraint); latent 8x16, stage 0 at 2x4.
HEIGHT, WIDTH = 64, 128
TEXT_LENGTH, MAX_TEXT_LENGTH = 16, 32


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from helios_deploy.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def artifacts(tiny_ckpt, tmp_path_factory) -> Path:
    """All four components exported from the tiny checkpoint (the audit runs in test_export)."""
    from helios_deploy.export.exporter.run import export_checkpoint

    out = tmp_path_factory.mktemp("arts") / "onnx"
    export_checkpoint(tiny_ckpt, out, height=HEIGHT, width=WIDTH, text_length=TEXT_LENGTH,
                      max_text_length=MAX_TEXT_LENGTH, run_audit=False, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def base_ckpt(tmp_path_factory) -> Path:
    """Helios-Base: HeliosPipeline, HeliosScheduler (one stage, UniPC), the same weights as tiny_ckpt."""
    from helios_deploy.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "base", seed=0, variant="base")


@pytest.fixture(scope="session")
def base_artifacts(base_ckpt, tmp_path_factory) -> Path:
    """All four components of the Base checkpoint (the VAE encoder for I2V)."""
    from helios_deploy.export.exporter.run import export_checkpoint

    out = tmp_path_factory.mktemp("arts") / "base"
    export_checkpoint(base_ckpt, out, height=HEIGHT, width=WIDTH, text_length=TEXT_LENGTH,
                      max_text_length=MAX_TEXT_LENGTH, run_audit=False, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def mid_ckpt(tmp_path_factory) -> Path:
    """Helios-Mid: HeliosPyramidPipeline with is_cfg_zero_star, HeliosScheduler over three stages."""
    from helios_deploy.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "mid", seed=0, variant="mid")


@pytest.fixture(scope="session")
def mid_artifacts(mid_ckpt, tmp_path_factory) -> Path:
    """The Mid checkpoint's text-to-video components (no VAE encoder: the Mid tests are T2V)."""
    from helios_deploy.export.exporter.run import export_checkpoint

    out = tmp_path_factory.mktemp("arts") / "mid"
    export_checkpoint(mid_ckpt, out, height=HEIGHT, width=WIDTH, text_length=TEXT_LENGTH, max_text_length=MAX_TEXT_LENGTH,
                      components=("transformer", "text_encoder", "vae_decoder"), run_audit=False, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def parity(tiny_ckpt, artifacts) -> dict:
    """The parity report of every exported component against the diffusers/transformers reference."""
    from helios_deploy.export.parity.report import parity_report

    return parity_report(tiny_ckpt, artifacts)


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
