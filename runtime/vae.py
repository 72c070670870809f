"""Chunk-level VAE: the decoder's chunk graph, and the encoder's first/step graphs with the causal
cache as explicit tensors."""

from __future__ import annotations

import torch


def run_chunk(first, step, x: torch.Tensor, direction: str) -> torch.Tensor:
    """Run a whole chunk through two step functions that take and return tensors in spec order:
    decode: 1 latent frame per step; encode: 1 video frame, then 4 per step. The steps' outputs are
    joined along time."""
    first_n, step_n = (1, 1) if direction == "decode" else (1, 4)
    out, *cache = first(x[:, :, :first_n])
    outs = [out]
    for i in range(first_n, x.shape[2], step_n):
        out, *cache = step(x[:, :, i:i + step_n], *cache)
        outs.append(out)
    return torch.cat(outs, dim=2)


def runner_fn(runner):
    """A runner as a positional step function (inputs and outputs in spec order)."""
    names = [t.name for t in runner.graph.inputs]
    outs = [t.name for t in runner.graph.outputs]

    def call(*tensors):
        result = runner.infer(dict(zip(names, tensors)))
        return [result[n] for n in outs]

    return call


def to_unit(video: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] as the reference's postprocess (x / 2 + 0.5, clamped); 0.5 * x + 0.5 equals
    x / 2 + 0.5 bit for bit (the product is exact)."""
    return (video * 0.5 + 0.5).clamp_(0, 1)


def to_frames(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] in [-1, 1] -> uint8 [B, T, H, W, 3] as the reference pipeline's PIL conversion
    (x * 255 rounded half to even): what the chunk graph computes on the device (export/transforms/vae_chunk.py)."""
    return to_unit(video).mul_(255).round_().to(torch.uint8).permute(0, 2, 3, 4, 1)
