"""The distilled pyramid sampler, step by step as diffusers' HeliosPyramidPipeline.__call__ runs it
(same order, same names, same random draws): slice history, generate chunk noise, downsample to stage
0, then per stage reset the scheduler, upsample + block-noise re-noise, denoise; update history.

Shapes: latents are [B, C, T, H, W]; ``h, w`` below are full latent sizes (video / 8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .scheduler import DMDScheduler, calculate_shift, dmd_step

HISTORY_SIZES = (16, 2, 1)  # long, mid, short (the short history also carries the 1-frame prefix)


@dataclass
class ChunkState:
    history: torch.Tensor  # [B, C, T_hist, h, w] float32, the last frames (19 once a chunk is done)
    image_latents: torch.Tensor | None  # the first-frame prefix, [B, C, 1, h, w]


def slice_history(state: ChunkState, is_first_chunk: bool) -> dict[str, torch.Tensor]:
    """The three history inputs of the transformer, from the last 19 history frames."""
    long, mid, short1 = state.history[:, :, -sum(HISTORY_SIZES):].split(list(HISTORY_SIZES), dim=2)
    if state.image_latents is None and is_first_chunk:
        prefix = torch.zeros_like(short1[:, :, :1])
    else:
        prefix = state.image_latents
    return {"latents_history_short": torch.cat([prefix, short1], dim=2),
            "latents_history_mid": mid, "latents_history_long": long}


def generate_chunk_noise(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """[B, C, 9, h, w], drawn on the generator's device (as the reference's randn_tensor does)."""
    return torch.randn(shape, generator=generator, dtype=torch.float32, device=generator.device)


def _per_frame(latents: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply a 2-D resize to every frame. The reference moves time next to batch ([B*T, C, H, W]); a 2-D
    resize treats every channel alone, so [B, C*T, H, W] (a view, no transpose copies) gives the same
    values."""
    b, c, t = latents.shape[:3]
    x = fn(latents.reshape(b, c * t, *latents.shape[3:]))
    return x.reshape(b, c, t, *x.shape[2:])


def downsample_to_stage0(latents: torch.Tensor, num_stages: int) -> torch.Tensor:
    """Bilinear halving with x2 amplitude, once per extra stage."""
    h, w = latents.shape[3:]
    for _ in range(num_stages - 1):
        h, w = h // 2, w // 2
        latents = _per_frame(latents, lambda x, s=(h, w): F.interpolate(x, size=s, mode="bilinear") * 2)
    return latents


class BlockNoise:
    """Correlated 2x2 block noise. Its covariance is singular at gamma = 1/3 once rounded to fp32,
    so it is built and factored once in float64 (the reference's fp32 Cholesky fails on CPU)."""

    def __init__(self, gamma: float, patch: tuple[int, int] = (2, 2)):
        self.ph, self.pw = patch
        n = self.ph * self.pw
        cov = torch.eye(n, dtype=torch.float64) * (1 + gamma) - torch.ones(n, n, dtype=torch.float64) * gamma
        cov += torch.eye(n, dtype=torch.float64) * 1e-8
        self.L = torch.linalg.cholesky(cov).float()
        self._factor_t: dict[torch.device, torch.Tensor] = {}  # L.T on each device that draws

    def sample(self, generator: torch.Generator, b: int, c: int, t: int, h: int, w: int) -> torch.Tensor:
        ph, pw = self.ph, self.pw
        device = generator.device
        if device not in self._factor_t:
            self._factor_t[device] = self.L.T.to(device)
        z = torch.randn(b * c * t * (h // ph) * (w // pw), ph * pw, generator=generator, device=device)
        noise = (z @ self._factor_t[device]).view(b, c, t, h // ph, w // pw, ph, pw)
        return noise.permute(0, 1, 2, 3, 5, 4, 6).reshape(b, c, t, h, w)


def upsample_and_renoise(latents, stage: int, scheduler: DMDScheduler, noise: BlockNoise,
                         generator: torch.Generator) -> torch.Tensor:
    """Nearest 2x upsampling, then alpha * x + beta * block noise (the reference's "fix the stage")."""
    h, w = latents.shape[3] * 2, latents.shape[4] * 2
    latents = _per_frame(latents, lambda x: F.interpolate(x, size=(h, w), mode="nearest"))
    alpha, beta = scheduler.renoise_coefficients(stage)
    b, c, t = latents.shape[:3]
    return alpha * latents + beta * noise.sample(generator, b, c, t, h, w)


def stage_mu(latents: torch.Tensor, patch_size, config: dict) -> float:
    """Dynamic-shift mu from the token count of ``latents``. The reference computes it before the
    stage's upsampling, so stages 1 and 2 use the previous stage's size; kept for parity."""
    seq = (latents.shape[-1] * latents.shape[-2] * latents.shape[-3]) // math.prod(patch_size)
    return calculate_shift(seq, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                           config.get("base_shift", 0.5), config.get("max_shift", 1.15))


@dataclass
class ChunkRequest:
    prompt_embeds: torch.Tensor  # [B, L, D]
    steps: tuple[int, ...]  # per pyramid stage
    amplify: bool  # amplify_first_chunk and this is the first chunk


def denoise_chunk(transformer, scheduler: DMDScheduler, block_noise: BlockNoise, state: ChunkState,
                  request: ChunkRequest, generator: torch.Generator, is_first_chunk: bool,
                  patch_size, frame_indices: dict[str, torch.Tensor], on_step=None) -> torch.Tensor:
    """All pyramid stages of one chunk; returns its 9 clean latent frames [B, C, 9, h, w]."""
    # the inputs that stay the same for every step of the chunk
    fixed = {"encoder_hidden_states": request.prompt_embeds, **frame_indices, **slice_history(state, is_first_chunk)}
    b, c, _, h, w = state.history.shape
    latents = downsample_to_stage0(generate_chunk_noise(generator, (b, c, 9, h, w)), len(request.steps))
    start_points = [latents]
    for stage, n in enumerate(request.steps):
        mu = stage_mu(latents, patch_size, scheduler.config)
        schedule = scheduler.stage_schedule(n, stage, mu, request.amplify)
        if stage > 0:
            latents = upsample_and_renoise(latents, stage, scheduler, block_noise, generator)
            start_points.append(latents)
        timesteps = schedule.timesteps.to(device=latents.device, dtype=torch.int64)  # truncated, as the model sees them
        for i in range(len(timesteps)):
            flow = transformer({"hidden_states": latents, "timestep": timesteps[i].expand(b), **fixed})
            latents = dmd_step(flow, latents, schedule, i, start_points[stage])
            if on_step is not None:
                on_step(stage, i)
    return latents


def update_history(state: ChunkState, latents: torch.Tensor, is_first_chunk: bool) -> None:
    """Append the chunk's latents. Only the last sum(HISTORY_SIZES) frames are ever read, so only they are
    kept: the reference's history grows by 9 frames a chunk for the whole stream (2.2 MB a chunk at
    384x640), which a long-running stream cannot afford."""
    if is_first_chunk and state.image_latents is None:
        state.image_latents = latents[:, :, 0:1]
    keep = sum(HISTORY_SIZES) - latents.shape[2]
    state.history = torch.cat([state.history[:, :, -keep:], latents], dim=2)
