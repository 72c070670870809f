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
def export_patches(component: str):
    """All patches one component needs for export."""
    with contextlib.ExitStack() as stack:
        if component == "transformer":
            stack.enter_context(rope_without_autocast())
        yield
