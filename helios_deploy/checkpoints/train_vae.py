"""The trained tiny checkpoint's VAE: the tiny AutoencoderKLWan trained as an autoencoder of the procedural
videos, with its latent anchored to a pooled view of the video so the latents are known without running
the encoder (the transformer's training data is then cheap to make on CPU).

The anchor (``anchor_latents``) of latent frame t (video frame 0 for t = 0, frames 4t-3..4t after, as the
causal Wan VAE groups them) and latent pixel (i, j) (an 8x8 block of pixels): channels 0-11 are the mean
RGB of the block's four 4x4 quadrants, channels 12-15 the mean brightness of the block in each of the
group's frames. The decoder learns anchor -> frames, the encoder frames -> anchor; the VAE config's
latents_mean / latents_std are the anchors' statistics, so the transformer sees unit-scale latents.
"""

from __future__ import annotations

import math
import numpy as np
import torch
import torch.nn.functional as F

from . import procedural


def frame_groups(frames: int) -> list[list[int]]:
    """The video frames of each latent frame: [0], [1..4], [5..8], ..."""
    return [[0]] + [list(range(i, i + 4)) for i in range(1, frames, 4)]


def anchor_latents(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] in [0, 1] -> [B, 16, 1 + (T - 1) / 4, H / 8, W / 8]."""
    b, _, t, h, w = video.shape
    out = []
    for group in frame_groups(t):
        g = video[:, :, group]  # [B, 3, n, H, W]
        quads = F.avg_pool2d(g.mean(2), 4)  # [B, 3, H/4, W/4]
        quads = quads.reshape(b, 3, h // 8, 2, w // 8, 2).permute(0, 3, 5, 1, 2, 4).reshape(b, 12, h // 8, w // 8)
        bright = F.avg_pool2d(g.amax(1), 8)  # [B, n, H/8, W/8]
        bright = bright[:, [min(i, bright.shape[1] - 1) for i in range(4)]]
        out.append(torch.cat([quads, bright], 1))
    return torch.stack(out, 2)


def procedural_batch(rng: np.random.Generator, batch: int, height: int, width: int, frames: int,
                     crop: int | None = None) -> torch.Tensor:
    """[B, 3, T, H, W] in [0, 1]: random procedural clips (a random window of a random video); with ``crop``,
    a crop x crop window (a multiple of 8) around the shape at the clip's first frame."""
    clips = []
    for _ in range(batch):
        motion = procedural.sample_motion(rng, height, width, chunks=1)
        start = int(rng.integers(0, procedural.CHUNK_FRAMES - frames + 1))
        clip = procedural.render(motion, height, width, frames, start)
        if crop:
            ys, xs = np.nonzero(clip[0].max(-1) > 0.5)
            cy, cx = (ys.mean(), xs.mean()) if len(ys) else (height / 2, width / 2)
            top = int(np.clip((cy - crop / 2 + rng.integers(-8, 9)) // 8 * 8, 0, height - crop))
            left = int(np.clip((cx - crop / 2 + rng.integers(-8, 9)) // 8 * 8, 0, width - crop))
            clip = clip[:, top:top + crop, left:left + crop]
        clips.append(clip)
    return torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).contiguous()


def latent_stats(height: int, width: int, seed: int, count: int = 64) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the anchors over ``count`` procedural chunks."""
    rng = np.random.default_rng(seed)
    z = anchor_latents(procedural_batch(rng, count, height, width, procedural.CHUNK_FRAMES))
    mean = z.mean(dim=(0, 2, 3, 4))
    std = z.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    return mean.tolist(), std.tolist()


def init_decoder(vae, bias: float = 10.0, gain: float = 8.0) -> None:
    """Start the decoder as "each 8x8 block shows its anchor's mean colour": post_quant_conv puts a constant
    ``bias`` in channel 0 and the block's mean R, G, B in channels 1-3; conv_in, the shortcuts, the upsampling
    convolutions and the time convolutions (both output frames) pass channels 0-3 through; every residual
    branch and the attention add zero (their last layer is zero, the rest keeps its default init so training
    can grow them); norm_out divides by about ``bias``, and SiLU(gain * c) is mapped back to [-1, 1] by
    conv_out. Training then sharpens the blocks into shapes."""
    import torch.nn as nn

    def identity(conv, n=4, copies=1):
        conv.weight.zero_()
        conv.bias.zero_()
        w = conv.weight
        centre = (-1,) + tuple(k // 2 for k in w.shape[3:]) if w.dim() == 5 else tuple(k // 2 for k in w.shape[2:])
        for copy in range(copies):
            for i in range(n):
                w[(copy * w.shape[1] + i, i) + centre] = 1.0

    dec = vae.decoder
    with torch.no_grad():
        vae.post_quant_conv.weight.zero_()
        vae.post_quant_conv.bias.zero_()
        vae.post_quant_conv.bias[0] = bias
        for c in range(3):
            for q in range(4):
                vae.post_quant_conv.weight[1 + c, 3 * q + c] = 0.25
        identity(dec.conv_in)
        for module in dec.modules():
            if type(module).__name__ == "WanResidualBlock":
                module.conv2.weight.zero_()
                module.conv2.bias.zero_()
                if not isinstance(module.conv_shortcut, nn.Identity):
                    identity(module.conv_shortcut)
            elif type(module).__name__ == "WanAttentionBlock":
                module.proj.weight.zero_()
                module.proj.bias.zero_()
            elif type(module).__name__ == "WanResample":
                identity(module.resample[1])
                if hasattr(module, "time_conv"):
                    identity(module.time_conv, copies=2)
        dec.norm_out.gamma.zero_()
        dec.norm_out.gamma[1:4] = gain * bias / dec.norm_out.scale
        dec.conv_out.weight.zero_()
        for c in range(3):
            dec.conv_out.weight[c, 1 + c, -1, 1, 1] = 2.0 / gain
        dec.conv_out.bias.fill_(-1.0)


def train_vae(vae, height: int, width: int, seed: int, steps: int, log=print, batch: int = 4,
              frames: int = 5, crop: int = 32, lr: float = 1e-3, image_steps: bool = True,
              train_decoder: bool = True) -> dict:
    """Train ``vae`` (float32, in place) for ``steps`` steps on crop x crop windows of single frames (two steps
    of three) and ``frames``-frame clips: decoder(anchor) -> video and encoder(video) -> anchor (mean squared
    errors; with ``train_decoder`` False the decoder keeps its weights); returns the last losses."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(  # warm-up, then cosine decay to zero
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    vae.train()
    dec_loss, enc_loss = float("nan"), float("nan")
    for step in range(1, steps + 1):
        if image_steps and step % 3:  # two of three steps on single frames (the first-frame path, 8x cheaper), at twice the batch
            video = procedural_batch(rng, 2 * batch, height, width, 1, crop)
        else:
            video = procedural_batch(rng, batch, height, width, frames, crop)
        z = anchor_latents(video)
        dec = F.mse_loss(vae.decode(z).sample, video * 2 - 1) if train_decoder else None
        enc = F.mse_loss(vae.encode(video * 2 - 1).latent_dist.mean, z) if step % 3 != 2 else None
        losses = [x for x in (dec, enc) if x is not None]
        if not losses:
            continue
        loss = sum(losses)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        dec_loss = dec.item() if dec is not None else dec_loss
        enc_loss = enc.item() if enc is not None else enc_loss
        if step % 25 == 0:
            log(f"  vae step {step}: decoder mse {dec_loss:.4f}, encoder mse {enc_loss:.4f}")
    vae.eval()
    return {"steps": steps, "decoder_trained": train_decoder, "decoder_mse": dec_loss, "encoder_mse": enc_loss}
