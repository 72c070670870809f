"""Shared fixtures: one tiny checkpoint and one export per test session; reference comparisons are
computed once (session scope) and asserted by many tests."""

from __future__ import annotations

import os
from fractions import Fraction
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
    from helios_deploy.export.run import export_checkpoint

    out = tmp_path_factory.mktemp("arts") / "onnx"
    export_checkpoint(tiny_ckpt, out, height=HEIGHT, width=WIDTH, text_length=TEXT_LENGTH,
                      max_text_length=MAX_TEXT_LENGTH, run_audit=False, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def parity(tiny_ckpt, artifacts) -> dict:
    """The parity report of every exported component against the diffusers/transformers reference."""
    from helios_deploy.export.run import parity_report

    return parity_report(tiny_ckpt, artifacts)


@pytest.fixture
def cholesky_float64(monkeypatch):
    """The reference pipeline factors the block-noise covariance with torch.linalg.cholesky in fp32,
    which fails on CPU (gamma = 1/3 makes it singular once rounded to fp32). Patch only that call, in
    the test, to factor the same matrix built in float64."""
    original = torch.linalg.cholesky

    def cholesky(a, *args, **kwargs):
        n = a.shape[-1]
        # recover the scheduler's gamma (1/3) from its fp32 rounding
        gamma = float(Fraction(float(-a[0, 1])).limit_denominator(1000))
        cov = torch.eye(n, dtype=torch.float64) * (1 + gamma) - torch.ones(n, n, dtype=torch.float64) * gamma
        cov += torch.eye(n, dtype=torch.float64) * 1e-8
        assert torch.allclose(cov.to(a.dtype), a, atol=1e-6), "not the block-noise covariance"
        return original(cov, *args, **kwargs).to(a.dtype)

    monkeypatch.setattr(torch.linalg, "cholesky", cholesky)


def run_cli(args, capsys):
    from helios_deploy.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err
