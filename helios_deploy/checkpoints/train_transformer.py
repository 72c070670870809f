"""The trained tiny checkpoint's transformer: the tiny HeliosTransformer3DModel trained on the VAE's latents
of procedural videos, called exactly as the runtime's distilled sampler calls it (helios_deploy.runtime's
denoise_chunk_steps: history latents sliced as the pipeline slices them, chunk noise downsampled to stage 0,
each pyramid stage's DMD timestep, the stages' up-sampling and block-noise re-noising).

A teacher stands in for the model inside the real sampler loop: at each call it answers the flow that makes
the DMD step land on the clean chunk (at that stage's resolution), so the sampler runs as it would with a
perfect model and yields the feeds the model must learn to answer; in half the steps the model itself answers
stages 0 and 1 (no gradient), so later stages also learn from what the model makes. The loss is the x0 error
of the model's answer to each stage's feeds. Chunks 0, 1 and 2 of three-chunk videos are trained (history: the previous chunks'
latents, the first frame as prefix); a video changes colour at a chunk boundary now and then, and its
caption with it, so the next chunk follows the prompt rather than the history.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..model.specs import frame_indices
from ..runtime.sampler import BlockNoise, ChunkRequest, ChunkState, HISTORY_SIZES, denoise_chunk_steps
from ..runtime.scheduler import DMDScheduler
from . import procedural
from .train_vae import anchor_latents

CHUNKS = 3  # chunks per training video
CHANGE_PROB = 0.35  # chance that a later chunk changes colour (and caption)
TEXT_LENGTHS = (16, 32, 64)  # prompt paddings trained (exports pad to their text_length)
SELF_FORCING = 0.5  # share of steps whose stages 1 and 2 start from the model's own earlier stages
CHUNK_WEIGHTS = (0.5, 0.25, 0.25)  # chunk 0 (no history: the caption alone sets the motion) half the time
STAGE_WEIGHTS = {0: 2.0, 1: 1.0, 2: 1.0}  # stage 0 lays the shape out and sets its motion; the later ones refine


def caption_embeddings(tokenizer, text_encoder, captions: list[str], length: int = 128) -> dict[str, torch.Tensor]:
    """Each caption's UMT5 embeddings over its real tokens [n, D] (what the pipeline keeps; zero after)."""
    out = {}
    with torch.no_grad():
        for c in captions:
            enc = tokenizer(c, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
            hidden = text_encoder(enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state[0]
            out[c] = hidden[: int(enc.attention_mask.sum())].clone()
    return out


def padded(embeds: list[torch.Tensor], length: int) -> torch.Tensor:
    """[B, length, D]: each prompt's embeddings (truncated to length) and zeros after, as the runtime pads."""
    out = torch.zeros(len(embeds), length, embeds[0].shape[1])
    for i, e in enumerate(embeds):
        out[i, : min(length, len(e))] = e[:length]
    return out


class Batches:
    """Training batches: normalised chunk latents of procedural videos (a pool of ``videos`` made once), the
    chunk to denoise, its history."""

    def __init__(self, height: int, width: int, latents_mean, latents_std, seed: int, videos: int = 800):
        self.rng = np.random.default_rng(seed)
        mean = torch.tensor(latents_mean).view(1, -1, 1, 1, 1)
        inv_std = 1 / torch.tensor(latents_std).view(1, -1, 1, 1, 1)
        latents, self.captions = [], []
        for _ in range(videos):
            motion = procedural.sample_motion(self.rng, height, width, CHUNKS, CHANGE_PROB)
            frames = torch.from_numpy(procedural.render(motion, height, width)).permute(3, 0, 1, 2)
            chunks = frames.split(procedural.CHUNK_FRAMES, dim=1)
            latents.append(torch.cat([anchor_latents(c[None]) for c in chunks], 2))
            self.captions.append(motion.captions())
        self.latents = (torch.cat(latents) - mean) * inv_std  # [N, C, 9 * CHUNKS, h, w]

    def videos(self, batch: int):
        """(latents [B, C, 9 * CHUNKS, h, w] normalised, captions per video), drawn from the pool."""
        pick = self.rng.integers(0, len(self.latents), batch)
        return self.latents[torch.from_numpy(pick)], [self.captions[i] for i in pick]

    def chunk_batch(self, batch: int):
        """(history [B, C, 19, h, w], prefix [B, C, 1, h, w], target [B, C, 9, h, w], captions, chunk index)."""
        latents, captions = self.videos(batch)
        ks = self.rng.choice(CHUNKS, batch, p=CHUNK_WEIGHTS)
        b, c, _, h, w = latents.shape
        hist_len = sum(HISTORY_SIZES)
        history, prefix, target = [], [], []
        for i, k in enumerate(ks):
            past = torch.cat([torch.zeros(c, hist_len, h, w), latents[i, :, : 9 * k]], 1)
            history.append(past[:, -hist_len:])
            prefix.append(latents[i, :, :1] if k > 0 else torch.zeros(c, 1, h, w))
            target.append(latents[i, :, 9 * k: 9 * k + 9])
        prompts = [captions[i][k] for i, k in enumerate(ks)]
        return torch.stack(history), torch.stack(prefix), torch.stack(target), prompts, ks


class Teacher:
    """Answers each sampler call with the flow that lands the DMD step on the clean chunk at that stage's
    resolution (the stage is read from the call's width), and records the call. With ``model``, stages 0 and 1
    are answered by the model itself (no gradient), so the next stage starts from what the model makes, as
    it will when sampling."""

    def __init__(self, target: torch.Tensor, sigmas: dict[int, float], model=None):
        self.full = target.shape[-1]
        self.targets = {target.shape[-1]: target}
        for _ in range(2):
            target = F.avg_pool3d(target, (1, 2, 2))
            self.targets[target.shape[-1]] = target
        self.sigmas, self.calls, self.model = sigmas, [], model

    def __call__(self, feeds):
        x = feeds["hidden_states"]
        target, sigma = self.targets[x.shape[-1]], self.sigmas[x.shape[-1]]
        self.calls.append((dict(feeds), target, sigma))
        if self.model is not None and x.shape[-1] != self.full:
            return self.model(**feeds, return_dict=False)[0]
        return (x - target) / sigma


def stage_sigmas(scheduler: DMDScheduler, h: int, w: int, patch) -> dict[int, float]:
    """The DMD sigma of each stage's single step (1,1,1), by stage width, as the sampler computes it."""
    from ..runtime.sampler import stage_mu

    out, shapes = {}, [(h // 4, w // 4), (h // 2, w // 2), (h, w)]
    for stage, (sh, sw) in enumerate(shapes):
        prev = shapes[max(stage - 1, 0)]
        mu = stage_mu(torch.zeros(1, 1, 9, *prev), patch, scheduler.config)
        out[sw] = scheduler.stage_solver(1, stage, mu, False).schedule.step_sigmas[0]
    return out


def train_transformer(transformer, embeds: dict[str, torch.Tensor], scheduler_config: dict, latents_mean,
                      latents_std, height: int, width: int, seed: int, steps: int, batch: int = 12,
                      lr: float = 2e-3, log=print, videos: int = 800) -> dict:
    """Train ``transformer`` (float32, in place) for ``steps`` steps through the runtime's sampler loop."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data = Batches(height, width, latents_mean, latents_std, seed, videos)
    scheduler = DMDScheduler(scheduler_config)
    block_noise = BlockNoise(scheduler.gamma)
    patch = transformer.config.patch_size
    sigmas = stage_sigmas(scheduler, height // 8, width // 8, patch)
    indices = {k: torch.tensor([v]).expand(batch, -1) for k, v in frame_indices().items()}
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    transformer.train()
    losses = []
    for step in range(1, steps + 1):
        history, prefix, target, prompts, _ = data.chunk_batch(batch)
        length = TEXT_LENGTHS[int(data.rng.integers(len(TEXT_LENGTHS)))]
        request = ChunkRequest(padded([embeds[p] for p in prompts], length), (1, 1, 1), False)
        teacher = Teacher(target, sigmas, transformer if data.rng.random() < SELF_FORCING else None)
        run = denoise_chunk_steps(scheduler, block_noise, ChunkState(history, prefix), request, generator, False,
                                  patch, indices)
        _drive(run, teacher)
        loss = 0.0
        for stage, (feeds, clean, sigma) in enumerate(teacher.calls):
            pred = transformer(**feeds, return_dict=False)[0]
            loss = loss + STAGE_WEIGHTS[stage] * F.mse_loss(feeds["hidden_states"] - sigma * pred, clean)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 25 == 0:
            log(f"  transformer step {step}: x0 mse (3 stages) {np.mean(losses[-25:]):.4f}")
    transformer.eval()
    return {"steps": steps, "x0_mse": float(np.mean(losses[-25:]))}


def _drive(steps, transformer) -> torch.Tensor:
    from ..runtime.guidance import drive

    with torch.no_grad():
        return drive(steps, transformer)
