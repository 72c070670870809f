"""Chunk-level VAE over the first/step graphs with the causal cache as explicit tensors."""

from __future__ import annotations

from typing import Sequence

import torch


def run_chunk(first, step, x: torch.Tensor, direction: str, into: torch.Tensor | None = None) -> torch.Tensor:
    """Run a whole chunk through two step functions that take and return tensors in spec order:
    decode: 1 latent frame per step; encode: 1 video frame, then 4 per step. The steps' outputs are
    joined along time (``into`` a buffer reused from chunk to chunk when given)."""
    first_n, step_n = (1, 1) if direction == "decode" else (1, 4)
    out, *cache = first(x[:, :, :first_n])
    outs = [out]
    for i in range(first_n, x.shape[2], step_n):
        out, *cache = step(x[:, :, i:i + step_n], *cache)
        outs.append(out)
    return torch.cat(outs, dim=2, out=into)


def runner_fn(runner):
    """A runner as a positional step function (inputs and outputs in spec order)."""
    names = [t.name for t in runner.graph.inputs]
    outs = [t.name for t in runner.graph.outputs]

    def call(*tensors):
        result = runner.infer(dict(zip(names, tensors)))
        return [result[n] for n in outs]

    return call


def decode_chunk(first, step, latents: torch.Tensor, latents_mean: Sequence[float],
                 latents_std: Sequence[float], into: torch.Tensor | None = None) -> torch.Tensor:
    """Un-normalise the 9 latent frames as the pipeline does and decode them to 33 frames [B, 3, 33, H, W]."""
    z = latents.shape[1]
    mean = torch.tensor(latents_mean, dtype=torch.float32).view(1, z, 1, 1, 1).to(latents.device)
    inv_std = 1.0 / torch.tensor(latents_std, dtype=torch.float32).view(1, z, 1, 1, 1).to(latents.device)
    return run_chunk(runner_fn(first), runner_fn(step), latents / inv_std + mean, "decode", into)
