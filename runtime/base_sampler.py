"""The one-stage sampler of Helios-Base, step by step as diffusers' HeliosPipeline.__call__ runs a chunk
(same order, same names, same random draws): slice history, prepare latents (noise at the full latent
size, no pyramid), reset the scheduler (set_timesteps with the pipeline's sigmas and mu), denoise
(UniPC or Euler; one transformer call per step, at batch 2 with guidance). History is updated by the
caller exactly as for the pyramid sampler (sampler.update_history).
"""

from __future__ import annotations

import math

import torch

from .flow_scheduler import FlowScheduler
from .guidance import drive, predict_noise_steps
from .sampler import ChunkRequest, ChunkState, generate_chunk_noise, slice_history, step_inputs
from .scheduler import calculate_shift


def chunk_mu(latents: torch.Tensor, patch_size, config: dict) -> float:
    """Dynamic-shift mu from the chunk's token count at the full latent size (the same for every chunk)."""
    seq = latents.shape[-3] * latents.shape[-2] * latents.shape[-1] // math.prod(patch_size)
    return calculate_shift(seq, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                           config.get("base_shift", 0.5), config.get("max_shift", 1.15))


def denoise_chunk_base(transformer, scheduler: FlowScheduler, block_noise, state: ChunkState, request: ChunkRequest,
                       generator: torch.Generator, is_first_chunk: bool, patch_size,
                       frame_indices: dict[str, torch.Tensor], on_step=None) -> torch.Tensor:
    """One chunk of HeliosPipeline; returns its 9 clean latent frames [B, C, 9, h, w]. Same signature as the
    pyramid sampler's denoise_chunk (``block_noise`` and ``request.amplify`` are pyramid settings, unused)."""
    return drive(denoise_chunk_base_steps(scheduler, block_noise, state, request, generator, is_first_chunk,
                                          patch_size, frame_indices, on_step), transformer)


def denoise_chunk_base_steps(scheduler: FlowScheduler, block_noise, state: ChunkState, request: ChunkRequest,
                             generator: torch.Generator, is_first_chunk: bool, patch_size,
                             frame_indices: dict[str, torch.Tensor], on_step=None):
    """denoise_chunk_base as a generator of transformer feeds (see sampler.denoise_chunk_steps)."""
    fixed = step_inputs(request, frame_indices, slice_history(state, is_first_chunk))
    b, c, _, h, w = state.history.shape
    latents = generate_chunk_noise(generator, (b, c, 9, h, w))  # prepare_latents
    (num_inference_steps,) = request.steps
    schedule = scheduler.chunk_schedule(num_inference_steps, chunk_mu(latents, patch_size, scheduler.config))
    solver = scheduler.solver(schedule, request.sampler)
    # HeliosPipeline passes the float timestep (it does not truncate it as the pyramid pipeline does)
    for i, timestep in enumerate(solver.model_timesteps(latents.device, b * request.batch_factor, torch.float32)):
        noise_pred = yield from predict_noise_steps(latents, timestep, fixed, request.guidance, 0, i)
        latents = solver.step(noise_pred, latents)
        if on_step is not None:
            on_step(0, i)
    return latents
