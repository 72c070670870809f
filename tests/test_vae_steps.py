"""The explicit-cache VAE steps equal the reference chunk decode/encode bitwise (PyTorch, no ONNX)."""

import copy

import torch

from helios_deploy.export.vae_steps import VaeFirstStep, VaeStep, cache_layout
from helios_deploy.runtime.vae import run_chunk


def test_steps_equal_reference_decode_and_encode(tiny_ckpt):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(tiny_ckpt / "vae").eval()
    meta = copy.deepcopy(vae).to("meta")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 16, 9, 8, 16, generator=g)
    video = torch.rand(1, 3, 33, 64, 96, generator=g) * 2 - 1
    with torch.no_grad():
        for direction, x, ref in (("decode", z, vae.decode(z, return_dict=False)[0]),
                                  ("encode", video, vae.encode(video).latent_dist.parameters)):
            layout = cache_layout(meta, direction)
            ours = run_chunk(VaeFirstStep(vae, direction, layout), VaeStep(vae, direction, layout), x, direction)
            assert ours.shape == ref.shape
            assert torch.equal(ours, ref), (direction, (ours - ref).abs().max())
