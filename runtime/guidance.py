"""Classifier-free guidance as the reference pipelines apply it, with both branches in one transformer call
at batch 2 (the graphs have a dynamic batch): the conditional branch first, the unconditional second.

- CFG (HeliosPipeline, HeliosPyramidPipeline): uncond + scale * (cond - uncond).
- CFG-Zero* (HeliosPyramidPipeline with is_cfg_zero_star, Helios-Mid): the unconditional branch is scaled by
  the projection s* = <cond, uncond> / ||uncond||^2 per sample, and the first ``zero_steps + 1`` steps of
  stage 0 predict zero (``use_zero_init``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

Transformer = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class Guidance:
    scale: float
    cfg_zero_star: bool = False
    use_zero_init: bool = True
    zero_steps: int = 1

    def batch_inputs(self, fixed: Mapping[str, torch.Tensor], negative_embeds: torch.Tensor) -> dict:
        """The step-invariant inputs at batch 2: the prompt's and the negative prompt's embeddings, the
        rest repeated (made once per chunk)."""
        out = {k: torch.cat([v, v]) for k, v in fixed.items() if k != "encoder_hidden_states"}
        out["encoder_hidden_states"] = torch.cat([fixed["encoder_hidden_states"], negative_embeds])
        return out

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, stage: int, i: int) -> torch.Tensor:
        if not self.cfg_zero_star:
            return uncond + self.scale * (cond - uncond)
        if self.use_zero_init and stage == 0 and i <= self.zero_steps:
            return cond * 0.0
        alpha = optimized_scale(cond, uncond)
        return uncond * alpha + self.scale * (cond - uncond * alpha)


def optimized_scale(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """s* = <cond, uncond> / (||uncond||^2 + 1e-8) per sample, shaped to broadcast over [B, C, T, H, W]."""
    b = cond.shape[0]
    positive, negative = cond.reshape(b, -1).float(), uncond.reshape(b, -1).float()
    dot = torch.sum(positive * negative, dim=1, keepdim=True)
    squared_norm = torch.sum(negative ** 2, dim=1, keepdim=True) + 1e-8
    return (dot / squared_norm).view(b, *([1] * (cond.dim() - 1))).to(cond.dtype)


def predict_noise_steps(latents: torch.Tensor, timestep: torch.Tensor, fixed: Mapping[str, torch.Tensor],
                        guidance: Guidance | None, stage: int, i: int):
    """The model's prediction at ``latents`` [B, C, T, h, w] as a generator: it yields the transformer's feeds
    (batch B, or 2B with guidance: ``fixed`` and ``timestep`` already at 2B), is sent the transformer's output
    and returns the prediction (the two halves combined with guidance). A scheduler that runs several streams
    can so gather their feeds into one call (runtime/live.py); ``drive`` makes the calls one by one."""
    if guidance is None:
        return (yield {"hidden_states": latents, "timestep": timestep, **fixed})
    b = latents.shape[0]
    out = yield {"hidden_states": torch.cat([latents, latents]), "timestep": timestep, **fixed}
    return guidance.combine(out[:b], out[b:], stage, i)


def drive(steps, transformer: Transformer):
    """Run a generator of transformer feeds (predict_noise_steps, a sampler's chunk steps) to its end, one
    transformer call per feeds; returns the generator's value."""
    try:
        feeds = next(steps)
        while True:
            feeds = steps.send(transformer(feeds))
    except StopIteration as stop:
        return stop.value

