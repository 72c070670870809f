"""The pyramid sampler (Helios-Distilled and Helios-Mid), step by step as diffusers'
HeliosPyramidPipeline.__call__ runs it (same order, same names, same random draws): slice history, generate
chunk noise, downsample to stage 0, then per stage reset the scheduler, upsample + block-noise re-noise,
denoise (one transformer call per step, at batch 2 with guidance); update history. The scheduler's solver
makes the update: DMD (distilled), UniPC or Euler (HeliosScheduler, Mid).

Shapes: latents are [B, C, T, H, W]; ``h, w`` below are full latent sizes (video / 8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import UserError
from .guidance import Guidance, drive, predict_noise_steps
from .scheduler import calculate_shift

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
    """Bilinear halving with x2 amplitude, once per extra stage. The amplitude is applied once at the
    end: scaling by a power of two is exact and commutes with the (linear) resize, so the values are the
    reference's bit for bit, with one pass fewer."""
    if num_stages == 1:
        return latents
    h, w = latents.shape[3:]
    for _ in range(num_stages - 1):
        h, w = h // 2, w // 2
        latents = _per_frame(latents, lambda x, s=(h, w): F.interpolate(x, size=s, mode="bilinear"))
    return latents.mul_(2 ** (num_stages - 1))


class BlockNoise:
    """Correlated 2x2 block noise and the stage-start re-noising. The covariance is singular at
    gamma = 1/3 once rounded to fp32, so it is built and factored once in float64 (the reference's fp32
    Cholesky fails on CPU)."""

    def __init__(self, gamma: float, patch: tuple[int, int] = (2, 2)):
        if tuple(patch) != (2, 2):  # the pyramid upsamples 2x: one noise block per upsampled pixel
            raise UserError(f"unsupported transformer patch size {tuple(patch)} (height, width)",
                            expected="(2, 2), as every Helios checkpoint has")
        cov = torch.eye(4, dtype=torch.float64) * (1 + gamma) - torch.ones(4, 4, dtype=torch.float64) * gamma
        cov += torch.eye(4, dtype=torch.float64) * 1e-8
        self.L = torch.linalg.cholesky(cov).float()
        self._maps: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def renoise(self, low: torch.Tensor, alpha: float, beta: float, generator: torch.Generator) -> torch.Tensor:
        """alpha * nearest_2x(low) + beta * block_noise for ``low`` [B, C, T, h, w]; returns [B, C, T, 2h, 2w].

        The reference draws z [B*C*T*h*w, 4] (one row per 2x2 block), takes z @ L.T, lays the blocks
        out over the 2h x 2w grid and adds the upsampled latents. Both the block layout and the
        nearest upsampling are linear maps of a row of blocks, so with rows m = (b, c, t, i) and blocks
        j along the width, one GEMM each gives the result in place on the grid:
          out[m, (a, j, b)] = z[m, (j, k)] @ W[(j, k), (a, j, b)] + low[m, j] @ U[j, (a, j, b)],
        W = I_w (x) beta * L.T and U = I_w (x) alpha (block-diagonal). Each output sums exactly one
        non-zero term of U (alpha * low, exact) and the four of L.T; no permute or broadcast passes.
        Same draws as the reference, in the same order."""
        b, c, t, h, w = low.shape
        z = torch.randn(b * c * t * h, w * 4, generator=generator, device=generator.device)
        noise_map, up_map = self._linear_maps(w, alpha, beta, z.device)
        out = torch.addmm(torch.mm(low.reshape(-1, w), up_map), z, noise_map)
        return out.view(b, c, t, 2 * h, 2 * w)

    def _linear_maps(self, w: int, alpha: float, beta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (w, alpha, beta, device)
        if key not in self._maps:
            eye = torch.eye(w)
            blocks = (self.L.T * beta).view(4, 2, 2)  # [k, a, b]
            noise_map = torch.einsum("jJ,kab->jkaJb", eye, blocks).reshape(4 * w, 4 * w)
            up_map = torch.einsum("jJ,ab->jaJb", eye * alpha, torch.ones(2, 2)).reshape(w, 4 * w)
            self._maps[key] = noise_map.to(device), up_map.to(device)
        return self._maps[key]


def upsample_and_renoise(latents, stage: int, scheduler, noise: BlockNoise,
                         generator: torch.Generator) -> torch.Tensor:
    """Nearest 2x upsampling, then alpha * x + beta * block noise (the reference's "fix the stage")."""
    alpha, beta = scheduler.renoise_coefficients(stage)
    return noise.renoise(latents, alpha, beta, generator)


def stage_mu(latents: torch.Tensor, patch_size, config: dict) -> float:
    """Dynamic-shift mu from the token count of ``latents``. The reference computes it before the
    stage's upsampling, so stages 1 and 2 use the previous stage's size; kept for parity."""
    seq = (latents.shape[-1] * latents.shape[-2] * latents.shape[-3]) // math.prod(patch_size)
    return calculate_shift(seq, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                           config.get("base_shift", 0.5), config.get("max_shift", 1.15))


@dataclass
class ChunkRequest:
    prompt_embeds: torch.Tensor  # [B, L, D]
    steps: tuple[int, ...]  # per pyramid stage (Base: one entry, num_inference_steps)
    amplify: bool  # amplify_first_chunk and this is the first chunk
    guidance: Guidance | None = None  # None: one conditional call per step
    negative_embeds: torch.Tensor | None = None  # [B, L, D], with guidance
    sampler: str | None = None  # HeliosScheduler: unipc | euler (None: the checkpoint's scheduler_type)

    @property
    def batch_factor(self) -> int:
        return 1 if self.guidance is None else 2


def step_inputs(request: ChunkRequest, frame_indices: dict[str, torch.Tensor], history: dict[str, torch.Tensor]):
    """The transformer inputs that stay the same for every step of the chunk (at batch 2 with guidance)."""
    fixed = {"encoder_hidden_states": request.prompt_embeds, **frame_indices, **history}
    if request.guidance is None:
        return fixed
    return request.guidance.batch_inputs(fixed, request.negative_embeds)


def denoise_chunk(transformer, scheduler, block_noise: BlockNoise, state: ChunkState, request: ChunkRequest,
                  generator: torch.Generator, is_first_chunk: bool, patch_size, frame_indices: dict[str, torch.Tensor],
                  on_step=None) -> torch.Tensor:
    """All pyramid stages of one chunk; returns its 9 clean latent frames [B, C, 9, h, w]. ``scheduler`` is a
    DMDScheduler (distilled) or a FlowScheduler (HeliosScheduler, Mid)."""
    return drive(denoise_chunk_steps(scheduler, block_noise, state, request, generator, is_first_chunk, patch_size,
                                     frame_indices, on_step), transformer)


def denoise_chunk_steps(scheduler, block_noise: BlockNoise, state: ChunkState, request: ChunkRequest,
                        generator: torch.Generator, is_first_chunk: bool, patch_size,
                        frame_indices: dict[str, torch.Tensor], on_step=None):
    """denoise_chunk as a generator: yields each step's transformer feeds, is sent the output, returns the
    chunk's latents (see guidance.predict_noise_steps)."""
    fixed = step_inputs(request, frame_indices, slice_history(state, is_first_chunk))
    b, c, _, h, w = state.history.shape
    latents = downsample_to_stage0(generate_chunk_noise(generator, (b, c, 9, h, w)), len(request.steps))
    start_points = [latents]
    for stage, n in enumerate(request.steps):
        mu = stage_mu(latents, patch_size, scheduler.config)
        solver = scheduler.stage_solver(n, stage, mu, request.amplify, request.sampler)
        if stage > 0:
            latents = upsample_and_renoise(latents, stage, scheduler, block_noise, generator)
            start_points.append(latents)
        for i, timestep in enumerate(solver.model_timesteps(latents.device, b * request.batch_factor)):
            noise_pred = yield from predict_noise_steps(latents, timestep, fixed, request.guidance, stage, i)
            latents = solver.step(noise_pred, latents, start_points[stage])
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
