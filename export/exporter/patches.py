"""Patches that make the reference modules exportable. Each is a scoped context manager that says
which error it avoids and for which library version; nothing is patched outside its ``with`` block."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def rope_without_autocast():
    """diffusers 0.42 ``HeliosRotaryPosEmbed.get_frequency_batched`` wraps its einsum in
    ``torch.autocast(device_type=pos.device.type, enabled=False)``; autocast rejects the meta device
    ("unsupported autocast device_type 'meta'") on which we export without weights. The einsum already
    runs in float32 during export (there is no ambient autocast), so the patched version drops only the
    context manager and computes the same values."""
    import torch
    from diffusers.models.transformers import transformer_helios as th

    original = th.HeliosRotaryPosEmbed.get_frequency_batched

    def get_frequency_batched(self, freqs_base, pos):
        freqs = torch.einsum("d,bthw->dbthw", freqs_base, pos)
        freqs = freqs.repeat_interleave(2, dim=0)
        return freqs.cos(), freqs.sin()

    th.HeliosRotaryPosEmbed.get_frequency_batched = get_frequency_batched
    try:
        yield
    finally:
        th.HeliosRotaryPosEmbed.get_frequency_batched = original


@contextlib.contextmanager
def cholesky_float64():
    """diffusers 0.42 ``HeliosPyramidPipeline.sample_block_noise`` factors the block-noise covariance
    with ``torch.linalg.cholesky`` in float32, which fails on CPU ("not positive-definite"): at
    gamma = 1/3 the matrix is singular once rounded to fp32 and its 1e-8 jitter is lost. While active,
    the same matrix is rebuilt and factored in float64 (gamma recovered from its fp32 entries); any other
    matrix is refused rather than silently changed. Used only to run the reference on CPU."""
    from fractions import Fraction

    import torch

    original = torch.linalg.cholesky

    def cholesky(a, *args, **kwargs):
        n = a.shape[-1]
        gamma = float(Fraction(float(-a[0, 1])).limit_denominator(1000))
        cov = torch.eye(n, dtype=torch.float64) * (1 + gamma) - torch.ones(n, n, dtype=torch.float64) * gamma
        cov += torch.eye(n, dtype=torch.float64) * 1e-8
        if not torch.allclose(cov.to(a.dtype), a, atol=1e-6):
            raise RuntimeError("cholesky_float64 patch applies only to the block-noise covariance")
        return original(cov, *args, **kwargs).to(a.dtype)

    torch.linalg.cholesky = cholesky
    try:
        yield
    finally:
        torch.linalg.cholesky = original


@contextlib.contextmanager
def contiguous_transformer_output(transformer):
    """diffusers 0.42 ``HeliosPyramidPipeline.__call__``'s CFG-Zero* branch calls ``.view(batch, -1)`` on the
    transformer's output, which is not contiguous on CPU: "view size is not compatible with input tensor's
    size and stride". While active, ``transformer``'s outputs are made contiguous (same values). Used only
    to run the reference on CPU."""
    original = transformer.forward

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(o.contiguous() if hasattr(o, "contiguous") else o for o in out)
        out.sample = out.sample.contiguous()
        return out

    transformer.forward = forward
    try:
        yield
    finally:
        del transformer.forward  # back to the class's forward


@contextlib.contextmanager
def export_patches(component: str):
    """All patches one component needs for export."""
    with contextlib.ExitStack() as stack:
        if component == "transformer":
            stack.enter_context(rope_without_autocast())
        yield
