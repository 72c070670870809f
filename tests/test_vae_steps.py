"""The explicit-cache VAE steps equal the reference chunk decode/encode bitwise (PyTorch, no ONNX)."""

import copy

import torch

from helios_deploy.export.exporter.vae_steps import VaeFirstStep, VaeStep, cache_layout
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


def test_chunk_graph_equals_reference_decode_and_postprocess(tiny_ckpt, artifacts):
    """The exported chunk graph (first + 8 steps composed in ONNX) against diffusers: the video equals
    vae.decode, the uint8 frames equal the reference pipeline's own post-processing (VideoProcessor to
    [0, 1], then its PIL conversion: x * 255 rounded), and the weights are stored once."""
    import json

    import numpy as np
    import onnxruntime as ort
    from diffusers import AutoencoderKLWan
    from diffusers.video_processor import VideoProcessor

    vae = AutoencoderKLWan.from_pretrained(tiny_ckpt / "vae").eval()
    z = torch.randn(2, 16, 9, 8, 16, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        ref = vae.decode(z, return_dict=False)[0]
    unit = VideoProcessor(vae_scale_factor=8).postprocess_video(ref, output_type="np")  # [B, T, H, W, 3] in [0, 1]
    ref_frames = (unit * 255).round().astype(np.uint8)
    session = ort.InferenceSession(str(artifacts / "vae_decoder" / "model.onnx"), providers=["CPUExecutionProvider"])
    video, frames = session.run(["video", "frames"], {"latents": z.numpy()})
    assert np.abs(video - ref.numpy()).max() <= 1e-5
    assert frames.dtype == np.uint8 and frames.shape == ref_frames.shape == (2, 33, 64, 128, 3)
    assert np.abs(frames.astype(int) - ref_frames).max() <= 1 and (frames != ref_frames).mean() < 1e-3
    assert frames.min() == 0 and frames.max() == 255  # clamping is exercised (z * 2 saturates some pixels)

    info = json.loads((artifacts / "manifest.json").read_text())["components"]["vae_decoder"]["graphs"]["model"]
    assert info["nodes"] > 8 * info["composed_of"]["step"]["nodes"]  # the step graph unrolled 8 times, plus first
    # every copy reads the same weights: the external data holds the decoder's parameters once
    decoder_bytes = 4 * sum(p.numel() for m in (vae.decoder, vae.post_quant_conv) for p in m.parameters())
    data = (artifacts / "vae_decoder" / info["data"]).stat().st_size
    assert 0.9 * decoder_bytes <= data <= 1.1 * decoder_bytes, (data, decoder_bytes)
    assert sorted(p.name for p in (artifacts / "vae_decoder").iterdir()) == ["model.onnx", "model.onnx.data"]
