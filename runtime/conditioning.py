"""Image-to-video and video-to-video conditioning, as HeliosPyramidPipeline prepares it: preprocess
(Lanczos resize, [-1, 1]), VAE-encode, sample the latent Gaussian, normalise, and add the conditioning
noise, drawing from the generator in the reference's order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import UserError
from .vae import run_chunk

SIGMA_MIN, SIGMA_MAX = 0.111, 0.135  # image_/video_noise_sigma_min/max defaults
CHUNK_FRAMES = 33


def load_image(image, height: int, width: int):
    """uint8 [H, W, 3] array, PIL image or path -> PIL RGB image."""
    from PIL import Image

    try:
        if isinstance(image, (str, Path)):
            return Image.open(image).convert("RGB")
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise UserError("image array must be uint8 [H, W, 3]", found=f"{image.dtype} {list(image.shape)}")
            return Image.fromarray(image)
        return image.convert("RGB")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {image if isinstance(image, (str, Path)) else ''}",
                        found=str(e), expected="a PNG/JPEG file or a uint8 [H, W, 3] array") from None


def load_video(video) -> list:
    """uint8 [T, H, W, 3] array or a video file path -> list of PIL RGB frames."""
    from PIL import Image

    if isinstance(video, (str, Path)):
        from .video_io import read_video

        video = read_video(video)
    if not isinstance(video, np.ndarray) or video.dtype != np.uint8 or video.ndim != 4 or video.shape[3] != 3:
        raise UserError("video must be a uint8 [T, H, W, 3] array or a video file",
                        found=f"{getattr(video, 'dtype', type(video))} {list(getattr(video, 'shape', []))}")
    return [Image.fromarray(f) for f in video]


def to_tensor(frames: Sequence, height: int, width: int) -> torch.Tensor:
    """PIL frames -> [1, 3, T, H, W] in [-1, 1] (the pipeline's VaeImageProcessor.preprocess)."""
    from PIL import Image

    arrays = [np.asarray(f.resize((width, height), resample=Image.LANCZOS)).astype(np.float32) / 255.0
              for f in frames]
    x = torch.from_numpy(np.stack(arrays)).permute(3, 0, 1, 2).unsqueeze(0)  # [1, 3, T, H, W]
    return 2.0 * x - 1.0


@dataclass
class Normaliser:
    mean: torch.Tensor  # [1, z, 1, 1, 1]
    inv_std: torch.Tensor  # 1 / latents_std, as the pipeline holds it

    @classmethod
    def from_attrs(cls, attrs: dict) -> "Normaliser":
        z = attrs["z_dim"]
        return cls(torch.tensor(attrs["latents_mean"], dtype=torch.float32).view(1, z, 1, 1, 1),
                   1.0 / torch.tensor(attrs["latents_std"], dtype=torch.float32).view(1, z, 1, 1, 1))

    def to(self, device) -> "Normaliser":
        return Normaliser(self.mean.to(device), self.inv_std.to(device))

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.mean) * self.inv_std

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """What the pipeline does before ``vae.decode``: latents / inv_std + mean."""
        return latents / self.inv_std + self.mean


def sample_latents(moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """DiagonalGaussianDistribution(moments).sample(generator)."""
    mean, logvar = torch.chunk(moments, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    return mean + std * torch.randn(mean.shape, generator=generator, dtype=moments.dtype, device=generator.device)


def _noised(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    sigma = torch.rand(1, generator=generator, device=generator.device) * (SIGMA_MAX - SIGMA_MIN) + SIGMA_MIN
    return sigma * torch.randn(x.shape, generator=generator, device=generator.device) + (1 - sigma) * x


Encode = Callable[[torch.Tensor], torch.Tensor]  # [1, 3, T, H, W] -> moments [1, 2z, t, h, w]


def image_conditioning(image, encode: Encode, norm: Normaliser, generator, height, width):
    """(image_latents [1, z, 1, h, w], fake_image_latents [1, z, 1, h, w]) after noise."""
    x = to_tensor([load_image(image, height, width)], height, width).to(generator.device)
    image_latents = norm(sample_latents(encode(x), generator))
    fake = norm(sample_latents(encode(x.repeat(1, 1, CHUNK_FRAMES, 1, 1)), generator))[:, :, -1:]
    return _noised(image_latents, generator), _noised(fake, generator)


def video_conditioning(video, encode: Encode, norm: Normaliser, generator, height, width):
    """(first-frame latents [1, z, 1, h, w], video latents [1, z, 9 * n, h, w]) after noise; the last
    n * 33 frames are used, as in the reference."""
    frames = load_video(video)
    if len(frames) < CHUNK_FRAMES:
        raise UserError(f"video too short: {len(frames)} frames", expected=f"at least {CHUNK_FRAMES} frames",
                        fix="pass a longer video")
    x = to_tensor(frames, height, width).to(generator.device)
    n = x.shape[2] // CHUNK_FRAMES
    start = x.shape[2] - n * CHUNK_FRAMES
    first = norm(sample_latents(encode(x[:, :, 0:1]), generator))
    chunks = [norm(sample_latents(encode(x[:, :, start + i * CHUNK_FRAMES: start + (i + 1) * CHUNK_FRAMES]), generator))
              for i in range(n)]
    first = _noised(first, generator)
    noisy = []
    for chunk in chunks:
        sig = torch.rand(chunk.shape[2], generator=generator, device=generator.device)
        sig = (sig * (SIGMA_MAX - SIGMA_MIN) + SIGMA_MIN).view(1, 1, -1, 1, 1)
        noisy.append(sig * torch.randn(chunk.shape, generator=generator, device=generator.device) + (1 - sig) * chunk)
    return first, torch.cat(noisy, dim=2)


def encoder_fn(first_runner, step_runner) -> Encode:
    from .vae import runner_fn

    first, step = runner_fn(first_runner), runner_fn(step_runner)
    return lambda x: run_chunk(first, step, x, "encode")
