"""Analytic work of the Wan 2.1 VAE (diffusers 0.42 AutoencoderKLWan): decode of one chunk, parameters.

The decoder runs one latent frame at a time with a causal cache: the first latent frame gives 1 video
frame, each further one 4 (two temporal upsamplings, each doubling the frames of every step but the
first, whose cache starts as the "Rep" marker and skips the temporal conv). A causal 3x3x3 conv costs
the same per output frame whether its two past frames come from the cache or from zero padding, so
FLOPs are counted per output frame: conv = 2 * Cin * Cout * kernel volume per output position.
Conventions are those of flops.py (matmuls and convs only; bf16 traffic, each conv reads its input and
writes its output once; the mid-block attention is fused).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from .flops import BF16, Count

CACHE_T = 2  # past frames each causal conv keeps (diffusers' CACHE_T)


def _check_layout(cfg: dict) -> None:
    unsupported = []
    if cfg.get("is_residual"):
        unsupported.append("is_residual=True (Wan 2.2 VAE)")
    if cfg.get("patch_size"):
        unsupported.append(f"patch_size={cfg['patch_size']}")
    if cfg.get("attn_scales"):
        unsupported.append(f"attn_scales={cfg['attn_scales']}")
    if unsupported:
        raise UserError("the cost model does not support this VAE layout", found=", ".join(unsupported),
                        expected="the Wan 2.1 VAE that Helios uses (AutoencoderKLWan defaults)")


@dataclass
class _Level:
    """Activation geometry at one decoder level: frames summed over all steps, frames of the first step
    and of each further step, spatial positions per frame."""

    frames_first: int
    frames_rest: int
    steps: int
    positions: int
    batch: int

    @property
    def frames(self) -> int:
        return self.frames_first + (self.steps - 1) * self.frames_rest

    @property
    def total(self) -> int:  # output positions over the whole chunk
        return self.batch * self.frames * self.positions


def _resblock(c: Count, lv: _Level, cin: int, cout: int, cache: list) -> None:
    c.conv("conv", lv.total, cin, cout, 27)
    c.conv("conv", lv.total, cout, cout, 27)
    cache += [cin * lv.positions, cout * lv.positions]  # each causal conv caches CACHE_T input frames
    if cin != cout:
        c.conv("conv", lv.total, cin, cout, 1)


def _attention(c: Count, lv: _Level, ch: int) -> None:
    """Single-head attention over the positions of each frame, with 1x1 conv projections."""
    c.conv("conv", lv.total, ch, 3 * ch, 1)
    c.attention("attention", lv.batch * lv.frames, lv.positions, lv.positions, ch)
    c.conv("conv", lv.total, ch, ch, 1)


def _upsample(c: Count, lv: _Level, ch: int, temporal: bool, cache: list) -> _Level:
    if temporal:  # causal (3,1,1) conv to 2*ch channels, interleaved into twice the frames (not step 1)
        rest = lv.batch * (lv.steps - 1) * lv.frames_rest * lv.positions
        c.conv("conv", rest, ch, 2 * ch, 3)
        cache.append(ch * lv.positions)
        lv = _Level(lv.frames_first, 2 * lv.frames_rest, lv.steps, lv.positions, lv.batch)
    lv = _Level(lv.frames_first, lv.frames_rest, lv.steps, 4 * lv.positions, lv.batch)
    c.conv("conv", lv.total, ch, ch // 2, 9)  # nearest 2x, then a 3x3 Conv2d to half the channels
    return lv


def vae_decode_count(cfg: dict, inputs: dict, io_bytes: float = 0.0) -> Count:
    _check_layout(cfg)
    b, z, steps, h, w = inputs["latents"][0]
    base = int(cfg.get("decoder_base_dim") or cfg["base_dim"])
    mult, nres = list(cfg["dim_mult"]), int(cfg["num_res_blocks"])
    temporal = list(cfg["temperal_downsample"])[::-1]
    dims = [base * m for m in [mult[-1], *mult[::-1]]]
    c, cache = Count(), []
    lv = _Level(1, 1, steps, h * w, b)
    c.conv("conv", lv.total, z, z, 1)  # post_quant_conv
    c.conv("conv", lv.total, z, dims[0], 27)  # conv_in
    cache.append(z * lv.positions)
    _resblock(c, lv, dims[0], dims[0], cache)
    _attention(c, lv, dims[0])
    _resblock(c, lv, dims[0], dims[0], cache)
    largest = 0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        cin = cin // 2 if i > 0 else cin  # Wan 2.1: each upsampler halves the channels
        for j in range(nres + 1):
            _resblock(c, lv, cin if j == 0 else cout, cout, cache)
        largest = max(largest, 2 * cout * lv.frames_rest * lv.positions)  # conv input and output of a step
        if i != len(mult) - 1:
            lv = _upsample(c, lv, cout, temporal[i], cache)
            largest = max(largest, (cout + cout // 2) * lv.frames_rest * lv.positions)
    out_ch = int(cfg.get("out_channels") or 3)
    c.conv("conv", lv.total, dims[-1], out_ch, 27)  # conv_out
    cache.append(dims[-1] * lv.positions)
    # live: the causal cache (CACHE_T frames per conv) + the residual shortcut next to the largest step
    # conv's input and output + the chunk's output video (written into one buffer)
    c.live_bytes = b * BF16 * (CACHE_T * sum(cache) + 1.5 * largest) + io_bytes
    return c


def _conv_params(cin: int, cout: int, kernel: int) -> int:
    return cin * cout * kernel + cout


def _res_params(cin: int, cout: int) -> int:
    short = _conv_params(cin, cout, 1) if cin != cout else 0
    return cin + _conv_params(cin, cout, 27) + cout + _conv_params(cout, cout, 27) + short  # RMS gains + convs


def _mid_params(ch: int) -> int:
    return 2 * _res_params(ch, ch) + ch + _conv_params(ch, 3 * ch, 1) + _conv_params(ch, ch, 1)


def _decoder_params(cfg: dict) -> int:
    z, base = int(cfg["z_dim"]), int(cfg.get("decoder_base_dim") or cfg["base_dim"])
    mult, nres = list(cfg["dim_mult"]), int(cfg["num_res_blocks"])
    temporal = list(cfg["temperal_downsample"])[::-1]
    dims = [base * m for m in [mult[-1], *mult[::-1]]]
    n = _conv_params(z, z, 1) + _conv_params(z, dims[0], 27) + _mid_params(dims[0])  # post_quant_conv first
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        cin = cin // 2 if i > 0 else cin
        n += sum(_res_params(cin if j == 0 else cout, cout) for j in range(nres + 1))
        if i != len(mult) - 1:
            n += _conv_params(cout, cout // 2, 9) + (_conv_params(cout, 2 * cout, 3) if temporal[i] else 0)
    return n + dims[-1] + _conv_params(dims[-1], int(cfg.get("out_channels") or 3), 27)


def _encoder_params(cfg: dict) -> int:
    z, base = int(cfg["z_dim"]), int(cfg["base_dim"])
    mult, nres = list(cfg["dim_mult"]), int(cfg["num_res_blocks"])
    dims = [base * m for m in [1, *mult]]
    n = _conv_params(int(cfg.get("in_channels") or 3), dims[0], 27)
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        n += sum(_res_params(cin if j == 0 else cout, cout) for j in range(nres))
        if i != len(mult) - 1:
            n += _conv_params(cout, cout, 9) + (_conv_params(cout, cout, 3) if cfg["temperal_downsample"][i] else 0)
    n += _mid_params(dims[-1]) + dims[-1] + _conv_params(dims[-1], 2 * z, 27)
    return n + _conv_params(2 * z, 2 * z, 1)  # quant_conv


def vae_params(cfg: dict) -> dict:
    """``decoder`` (post_quant_conv + decoder: what a decode call reads) and ``encoder`` (+ quant_conv)."""
    _check_layout(cfg)
    return {"decoder": _decoder_params(cfg), "encoder": _encoder_params(cfg)}
