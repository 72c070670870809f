"""The Wan VAE as two small graphs per direction with its causal cache as explicit tensors.

``AutoencoderKLWan`` decodes a chunk one latent frame at a time (the first frame gives 1 video frame,
each further frame 4) and encodes 1 video frame then 4 at a time, threading a Python list of cached
activations (``feat_cache``) through every causal convolution. Exported as one graph that loop is
unrolled into thousands of nodes and takes about a minute even for a tiny VAE, and on a GPU it would
hold activations for all 33 frames at once. Instead we export:

- ``first``: the first step, from an empty cache; returns its output and the cache;
- ``step``: one further step, cache in and cache out.

The decoder's artifact is one graph per chunk composed from its two (export/transforms/vae_chunk.py); the encoder
keeps both, as the video it encodes has any length.

The reference's cache entries change form after the first step (``None``, the marker ``"Rep"``, or a
single frame). Each is padded here with leading zero frames to its steady-state shape, which feeds the
causal convolutions the same values the reference's own zero padding does, so the result is equal to
``vae.decode`` / ``vae.encode`` (tests check this against the reference).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

CACHE_T = 2  # frames a causal conv keeps (diffusers' CACHE_T)


class CacheEntry(NamedTuple):
    """Steady-state shape of one cache tensor: [B, channels, frames, h * scale, w * scale] where h, w
    are the latent size (the same for both directions)."""

    channels: int
    frames: int
    scale: int


def _run(net, x, cache, **kw):
    return net(x, feat_cache=cache, feat_idx=[0], **kw)


def _frames_per_step(direction: str) -> tuple[int, int]:
    """(first, steady) input frames per step: latent frames for decode, video frames for encode."""
    return (1, 1) if direction == "decode" else (1, 4)


def cache_layout(vae, direction: str) -> list[CacheEntry]:
    """Steady-state cache shapes, learned by running first + one step on the meta device."""
    net = vae.decoder if direction == "decode" else vae.encoder
    h, w = 8, 8
    if direction == "decode":
        ch, size = vae.config.z_dim, (h, w)
    else:
        ch, size = 3, (h * 8, w * 8)
    first_n, step_n = _frames_per_step(direction)
    cache: list = [None] * cache_slots(vae, direction)
    with torch.no_grad():
        _run(net, torch.zeros(1, ch, first_n, *size, device="meta"), cache,
             **({"first_chunk": True} if direction == "decode" else {}))
        _run(net, torch.zeros(1, ch, step_n, *size, device="meta"), cache)
    used = [t for t in cache if t is not None]  # trailing slots of convs that never cache stay None
    if any(t is None for t in cache[: len(used)]):
        raise RuntimeError("VAE cache slots are not a prefix of the conv list; this diffusers version is unsupported")
    if any(t.shape[3] % h for t in used):
        raise RuntimeError("a VAE cache is smaller than the latent grid; this VAE layout is unsupported")
    return [CacheEntry(int(t.shape[1]), int(t.shape[2]), int(t.shape[3]) // h) for t in used]


def cache_slots(vae, direction: str) -> int:
    net = vae.decoder if direction == "decode" else vae.encoder
    return sum(type(m).__name__ == "WanCausalConv3d" for m in net.modules())


def _normalize(cache: list, layout: list[CacheEntry], b: int, h, w, dtype, device) -> list[torch.Tensor]:
    out = []
    for t, e in zip(cache[: len(layout)], layout):
        hh, ww = h * e.scale, w * e.scale
        if t is None or isinstance(t, str):  # "Rep": the next step sees zero padding
            out.append(torch.zeros(b, e.channels, e.frames, hh, ww, dtype=dtype, device=device))
            continue
        missing = e.frames - t.shape[2]
        if missing > 0:
            t = torch.cat([t.new_zeros(b, e.channels, missing, hh, ww), t], dim=2)
        out.append(t)
    return out


class VaeFirstStep(torch.nn.Module):
    """decode: latent frame [B, z, 1, h, w] -> (video [B, 3, 1, 8h, 8w], *cache);
    encode: video frame [B, 3, 1, 8h, 8w] -> (moments [B, 2z, 1, h, w], *cache)."""

    def __init__(self, vae, direction: str, layout: list[CacheEntry]):
        super().__init__()
        self.vae, self.direction, self.layout = vae, direction, layout
        self.slots = cache_slots(vae, direction)

    def forward(self, *inputs):  # varargs like every exported wrapper (one dynamic-shapes layout)
        (x,) = inputs
        vae = self.vae
        b = x.shape[0]
        cache: list = [None] * self.slots
        if self.direction == "decode":
            h, w = x.shape[3], x.shape[4]
            out = _run(vae.decoder, vae.post_quant_conv(x), cache, first_chunk=True)
            out = torch.clamp(out, min=-1.0, max=1.0)
        else:
            h, w = x.shape[3] // 8, x.shape[4] // 8
            out = vae.quant_conv(_run(vae.encoder, x, cache))
        return (out, *_normalize(cache, self.layout, b, h, w, x.dtype, x.device))


class VaeStep(torch.nn.Module):
    """decode: (latent frame [B, z, 1, h, w], *cache) -> (video [B, 3, 4, 8h, 8w], *cache);
    encode: (video frames [B, 3, 4, 8h, 8w], *cache) -> (moments [B, 2z, 1, h, w], *cache)."""

    def __init__(self, vae, direction: str, layout: list[CacheEntry]):
        super().__init__()
        self.vae, self.direction, self.layout = vae, direction, layout
        self.slots = cache_slots(vae, direction)

    def forward(self, *inputs):
        return self._step(inputs[0], inputs[1:])

    def _step(self, x, cache_in):
        vae = self.vae
        cache = list(cache_in) + [None] * (self.slots - len(cache_in))
        if self.direction == "decode":
            out = torch.clamp(_run(vae.decoder, vae.post_quant_conv(x), cache), min=-1.0, max=1.0)
        else:
            out = vae.quant_conv(_run(vae.encoder, x, cache))
        return (out, *cache[: len(self.layout)])


class VaeChunkDecoder(torch.nn.Module):
    """The decoder's chunk graph in PyTorch (the torch backend's vae_decoder): latents [B, z, 9, h, w] ->
    (video [B, 3, 33, 8h, 8w] in [-1, 1] from ``vae.decode``, frames uint8 [B, 33, 8h, 8w, 3])."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        from ...runtime.vae import to_frames

        video = self.vae.decode(latents, return_dict=False)[0]
        return video, to_frames(video)
