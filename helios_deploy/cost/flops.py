"""Analytic work per call, written from the architectures (diffusers 0.42 HeliosTransformer3DModel,
transformers UMT5EncoderModel): FLOPs, parameters, activation traffic and live activation memory.

This is one of two independent counts; meta_count.py runs the real modules under FlopCounterMode and
tests/test_cost.py checks that they agree. Conventions (those of torch.utils.flop_counter):
- a matmul [m, k] x [k, n] is 2*m*k*n FLOPs; biases, norms, activations, softmax, the rotary tables
  (an einsum that is an outer product, i.e. elementwise) and other elementwise work are not counted
  (well under 1% of the FLOPs here);
- attention is two matmuls, q.k^T and p.v: 4 * q_len * kv_len * (heads * head_dim) FLOPs.
Bytes moved (``activation_bytes``): every matmul / conv reads its input once and writes its output
once in bf16; attention is fused (flash-style: reads q, k, v and writes o once, never the scores);
elementwise work is assumed fused into its neighbours. Weights and the call's own inputs/outputs are
counted separately (estimate.py).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

BF16, FP32 = 2, 4


@dataclass
class Count:
    """Work of one call: FLOPs by kind, bytes of activation traffic, peak live activation bytes."""

    flops: dict = field(default_factory=lambda: defaultdict(float))
    activation_bytes: float = 0.0
    live_bytes: float = 0.0

    def matmul(self, kind: str, rows: int, k: int, n: int, times: int = 1) -> None:
        """``times`` linear layers [rows, k] -> [rows, n] (or convs with k = Cin * kernel volume)."""
        self.flops[kind] += 2.0 * rows * k * n * times
        self.activation_bytes += BF16 * rows * (k + n) * times

    def conv(self, kind: str, positions: int, cin: int, cout: int, kernel: int) -> None:
        """A stride-1 conv over ``positions`` output positions: reads Cin, writes Cout per position."""
        self.flops[kind] += 2.0 * positions * cin * kernel * cout
        self.activation_bytes += BF16 * positions * (cin + cout)

    def attention(self, kind: str, batch: int, q_len: int, kv_len: int, width: int) -> None:
        self.flops[kind] += 4.0 * batch * q_len * kv_len * width
        self.activation_bytes += BF16 * batch * 2 * (q_len + kv_len) * width


# ---------------------------------------------------------------------------------------------------
# Transformer


def _patches(shape, kernel, pad=None) -> int:
    """Tokens a Conv3d patch embedding makes from [B, C, T, H, W] (after replicate-padding to ``pad``)."""
    _, _, *thw = shape
    if pad:
        thw = [math.ceil(x / p) * p for x, p in zip(thw, pad)]
    return math.prod(x // k for x, k in zip(thw, kernel))


def transformer_tokens(cfg: dict, inputs: dict) -> dict:
    """Token counts of one call. Short history uses the noisy patch (1,2,2), mid 2x and long 4x it;
    diffusers pads mid to multiples of (2,4,4) and long to (4,8,8) first."""
    p1 = tuple(cfg["patch_size"])
    p2, p4 = tuple(2 * p for p in p1), tuple(4 * p for p in p1)
    shape = lambda name: inputs[name][0]  # noqa: E731
    tok = {
        "noisy": _patches(shape("hidden_states"), p1),
        "short": _patches(shape("latents_history_short"), p1),
        "mid": _patches(shape("latents_history_mid"), p2, (2, 4, 4)),
        "long": _patches(shape("latents_history_long"), p4, (4, 8, 8)),
        "text": shape("encoder_hidden_states")[1],
        "batch": shape("hidden_states")[0],
    }
    tok["history"] = tok["short"] + tok["mid"] + tok["long"]
    return tok


def _embeddings(c: Count, cfg: dict, tok: dict, dim: int) -> None:
    """Patch embeddings (convs with stride = kernel: a linear map per patch) and the condition embedder."""
    cin, p1 = int(cfg["in_channels"]), tuple(cfg["patch_size"])
    b = tok["batch"]
    for name, scale in (("noisy", 1), ("short", 1), ("mid", 2), ("long", 4)):
        c.matmul("linear", b * tok[name], cin * math.prod(p1) * scale**3, dim)
    # time embedding: freq -> dim -> dim, then dim -> 6 dim; a second time (batch 1) for the history's t=0
    for rows in ([b, 1] if cfg["zero_history_timestep"] else [b]):
        c.matmul("linear", rows, int(cfg["freq_dim"]), dim)
        c.matmul("linear", rows, dim, dim)
        c.matmul("linear", rows, dim, 6 * dim)
    c.matmul("linear", b * tok["text"], int(cfg["text_dim"]), dim)
    c.matmul("linear", b * tok["text"], dim, dim)


def _blocks(c: Count, cfg: dict, tok: dict, dim: int) -> None:
    b, n, t = tok["batch"], tok["noisy"], tok["text"]
    s = n + tok["history"]
    q_cross = n if cfg["guidance_cross_attn"] else s  # guidance cross-attention: noisy tokens only
    ffn = int(cfg["ffn_dim"])
    for _ in range(int(cfg["num_layers"])):
        c.matmul("linear", b * s, dim, dim, times=4)  # self-attention q, k, v, out
        c.attention("attention_self", b, s, s, dim)
        c.matmul("linear", b * q_cross, dim, dim, times=2)  # cross-attention q, out
        c.matmul("linear", b * t, dim, dim, times=2)  # cross-attention k, v from the text tokens
        c.attention("attention_cross", b, q_cross, t, dim)
        c.matmul("linear", b * s, dim, ffn)
        c.matmul("linear", b * s, ffn, dim)


def _transformer_live(cfg: dict, tok: dict, dim: int, io_bytes: float) -> float:
    """Peak live activations: per token the fp32 residual stream, its bf16 normalised copy, the larger of
    (q, k, v, attention output) and (FFN hidden before and after GELU), and the fp32 rotary table; plus
    the projected text and the call's inputs/outputs. Assumes the adaLN modulation is applied from its
    two distinct rows (history t=0, noisy t) rather than materialised per token, as diffusers does."""
    rope = FP32 * 2 * sum(cfg["rope_dim"])
    per_token = FP32 * dim + BF16 * dim + BF16 * max(4 * dim, 2 * int(cfg["ffn_dim"])) + rope
    s = tok["noisy"] + tok["history"]
    return tok["batch"] * (s * per_token + tok["text"] * BF16 * dim) + io_bytes


def transformer_count(cfg: dict, inputs: dict, io_bytes: float = 0.0) -> Count:
    dim = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    tok = transformer_tokens(cfg, inputs)
    c = Count()
    _embeddings(c, cfg, tok, dim)
    _blocks(c, cfg, tok, dim)
    c.matmul("linear", tok["batch"] * tok["noisy"], dim, int(cfg["out_channels"]) * math.prod(cfg["patch_size"]))
    c.live_bytes = _transformer_live(cfg, tok, dim, io_bytes)
    return c


def transformer_params(cfg: dict) -> dict:
    """Parameters by kind: ``linear_weights`` (matrices of linear layers and patch embeddings: what fp8
    quantizes) and ``other`` (biases, norms, modulation tables, history key scales)."""
    heads, f = int(cfg["num_attention_heads"]), int(cfg["ffn_dim"])
    d = heads * int(cfg["attention_head_dim"])
    cin, p = int(cfg["in_channels"]), math.prod(cfg["patch_size"])
    out = int(cfg["out_channels"]) * p
    mats = [cin * p * d * s**3 for s in (1, 1, 2, 4)]  # patch_embedding, short, mid, long
    mats += [int(cfg["freq_dim"]) * d, d * d, d * 6 * d, int(cfg["text_dim"]) * d, d * d, d * out]
    # biases: 4 patch convs, time/text embedders (d, d, 6d, d, d); output norm table (2d); proj_out bias
    other = 4 * d + 10 * d + 2 * d + out
    block_mats = 8 * d * d + 2 * d * f
    block_other = 8 * d + 4 * d + f + d + 6 * d  # attention biases, q/k RMSNorm gains, FFN biases, table
    if cfg["cross_attn_norm"]:
        block_other += 2 * d  # norm2 weight and bias
    if cfg["is_amplify_history"]:
        block_other += heads if cfg["history_scale_mode"] == "per_head" else 1
    if cfg.get("added_kv_proj_dim"):
        a = int(cfg["added_kv_proj_dim"])
        block_mats += 2 * a * d
        block_other += 2 * d + d  # their biases and norm_added_k
    layers = int(cfg["num_layers"])
    return {"linear_weights": sum(mats) + layers * block_mats, "other": other + layers * block_other}


# ---------------------------------------------------------------------------------------------------
# Text encoder (UMT5 encoder)


def text_encoder_count(cfg: dict, inputs: dict, io_bytes: float = 0.0) -> Count:
    b, t = inputs["input_ids"][0]
    dm, dff = int(cfg["d_model"]), int(cfg["d_ff"])
    inner = int(cfg["num_heads"]) * int(cfg["d_kv"])
    gated = str(cfg["feed_forward_proj"]).startswith("gated")
    c = Count()
    for _ in range(int(cfg["num_layers"])):
        c.matmul("linear", b * t, dm, inner, times=3)  # q, k, v
        c.matmul("linear", b * t, inner, dm)  # o
        c.attention("attention", b, t, t, inner)
        c.matmul("linear", b * t, dm, dff, times=2 if gated else 1)  # wi_0, wi_1 (gated) or wi
        c.matmul("linear", b * t, dff, dm)  # wo
    # live: hidden (fp32) + normalised copy + q, k, v, o or the FFN hidden pair; fp32 scores + position bias
    per_token = FP32 * dm + BF16 * dm + BF16 * max(4 * inner, 2 * dff)
    c.live_bytes = b * t * per_token + 2 * FP32 * b * int(cfg["num_heads"]) * t * t + io_bytes
    return c


def text_encoder_params(cfg: dict) -> dict:
    """``embedding`` (the token table: a call reads only its prompt's rows), ``linear_weights``, ``other``."""
    dm, dff, heads = int(cfg["d_model"]), int(cfg["d_ff"]), int(cfg["num_heads"])
    inner = heads * int(cfg["d_kv"])
    ff = 3 if str(cfg["feed_forward_proj"]).startswith("gated") else 2
    layers = int(cfg["num_layers"])
    # UMT5 gives every layer its own relative-position bias table (buckets x heads) and two RMSNorm gains
    other = layers * (int(cfg["relative_attention_num_buckets"]) * heads + 2 * dm) + dm
    return {"embedding": int(cfg["vocab_size"]) * dm, "linear_weights": layers * (4 * dm * inner + ff * dm * dff),
            "other": other}
