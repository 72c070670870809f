"""The cost model of one configuration: per call, per pyramid stage, per 33-frame chunk and per prompt,
with roofline times per GPU and precision. ``estimate()`` is the library entry point (the ``cost``
command prints it; ``bench`` compares measured times with ``CostEstimate.predicted_seconds``).

Bytes moved per call = weights read once (bf16; in the fp8 variant the transformer's linear weight
matrices take 1 byte) + activation traffic (flops.py: each matmul/conv reads its input and writes its
output once in bf16, attention fused) + the call's own inputs and outputs (floats as bf16, int64 as 8).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .calls import Call, chunk_frames, prompt_calls
from .configs import ModelConfigs, Workload, check_workload, load_configs
from .flops import (BF16, text_encoder_count, text_encoder_params, transformer_count, transformer_params,
                    transformer_tokens)
from .roofline import FAST_KINDS, GPUS, PRECISIONS, Gpu, call_time, realtime_chunk_seconds, throughput
from .vae_flops import vae_decode_count, vae_params

_COUNTERS = {"transformer": transformer_count, "text_encoder": text_encoder_count, "vae_decoder": vae_decode_count}


@dataclass
class CallCost:
    """One kind of call (a pyramid stage, the prompt's text encoding, a chunk's decode) and its cost."""

    component: str
    point: str
    per_chunk: int
    per_prompt: int
    flops: dict  # analytic FLOPs by kind
    weight_bytes: dict  # per precision: weights read by one call
    activation_bytes: float
    io_bytes: float
    live_bytes: float  # peak live activations (estimate, see flops.py / vae_flops.py)
    tokens: dict | None = None  # sequence lengths (transformer: noisy / history / text)
    flops_meta: dict | None = None  # the FlopCounterMode count, when run

    @property
    def key(self) -> str:
        return f"{self.component}/{self.point}"

    @property
    def total_flops(self) -> float:
        return sum(self.flops.values())

    def bytes_moved(self, precision: str) -> float:
        """Weights at the variant's precision (fp8 variants: the transformer's linear weights in 1 byte; with
        +vae the decoder's conv weights too) + activation traffic (bf16 in every variant) + call I/O."""
        fp8_weights = self.component in FAST_KINDS[precision] and "fp8" in self.weight_bytes
        weights = self.weight_bytes["fp8" if fp8_weights else "bf16"]
        return weights + self.activation_bytes + self.io_bytes

    def time(self, gpu: Gpu, precision: str) -> dict:
        kinds = FAST_KINDS[precision].get(self.component, ())
        fast = sum(n for kind, n in self.flops.items() if kind in kinds)
        return call_time(gpu, fast, self.total_flops - fast, self.bytes_moved(precision), precision)


@dataclass
class CostEstimate:
    source: str
    height: int
    width: int
    text_length: int
    steps: tuple
    chunk_frames: int
    params: dict  # {"analytic": {component: n}, "meta": {...} | None}
    calls: list[CallCost]
    check: dict | None  # analytic vs FlopCounterMode relative differences
    roofline: dict = field(default_factory=dict)  # gpu name -> precision -> numbers
    gpus: list = field(default_factory=list)
    realtime_chunk_s: float = 0.0  # a chunk's budget for real-time playback at 24 fps
    variant: str = "distilled"  # whose sampler: base | mid | distilled
    guided: bool = False  # transformer calls at batch 2 (classifier-free guidance)

    @property
    def transformer_calls_per_chunk(self) -> int:
        return sum(c.per_chunk for c in self.calls if c.component == "transformer")

    def call(self, key: str) -> CallCost:
        return next(c for c in self.calls if c.key == key)

    def per_chunk(self) -> dict:
        """FLOPs per 33-frame chunk by component and kind."""
        out: dict = {}
        for c in self.calls:
            if c.per_chunk:
                kinds = out.setdefault(c.component, {})
                for kind, n in c.flops.items():
                    kinds[kind] = kinds.get(kind, 0.0) + c.per_chunk * n
        return out

    def predicted_seconds(self, gpu: str, precision: str) -> dict:
        """Roofline seconds of one call, by call key (``transformer/stage0`` ... ``vae_decoder/chunk``)."""
        return {k: v["seconds"] for k, v in self.roofline[gpu][precision]["calls"].items()}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["steps"] = list(self.steps)
        d["transformer_calls_per_chunk"] = self.transformer_calls_per_chunk
        for c, cd in zip(self.calls, d["calls"]):
            cd["key"], cd["total_flops"] = c.key, c.total_flops
            cd["bytes_moved"] = {p: c.bytes_moved(p) for p in PRECISIONS}
        chunk = self.per_chunk()
        d["per_chunk"] = {"flops": chunk, "total_flops": sum(sum(k.values()) for k in chunk.values())}
        d["per_prompt"] = {c.key: c.total_flops * c.per_prompt for c in self.calls if c.per_prompt}
        return d


def _io_bytes(call: Call) -> float:
    tensors = [*call.inputs.values(), *call.outputs.values()]
    return float(sum(math.prod(shape) * (8 if dtype == "int64" else BF16) for shape, dtype in tensors))


def _weight_bytes(configs: ModelConfigs, call: Call) -> dict:
    if call.component == "transformer":
        p = transformer_params(configs.transformer)
        return {"bf16": BF16 * (p["linear_weights"] + p["other"]), "fp8": 1 * p["linear_weights"] + BF16 * p["other"]}
    if call.component == "text_encoder":
        p = text_encoder_params(configs.text_encoder)
        rows = math.prod(call.inputs["input_ids"][0])  # a call reads only its tokens' embedding rows
        n = BF16 * (p["linear_weights"] + p["other"] + rows * int(configs.text_encoder["d_model"]))
        return {"bf16": n, "fp8": n}
    n = vae_params(configs.vae)["decoder"]  # almost all conv weights: 1 byte each with FP8 convolutions
    return {"bf16": BF16 * n, "fp8": 1 * n}


def _cost(configs: ModelConfigs, call: Call) -> CallCost:
    cfg = {"transformer": configs.transformer, "text_encoder": configs.text_encoder,
           "vae_decoder": configs.vae}[call.component]
    io = _io_bytes(call)
    count = _COUNTERS[call.component](cfg, call.inputs, io)
    if call.component == "transformer":
        tok = transformer_tokens(cfg, call.inputs)
        tokens = {"noisy": tok["noisy"], "history": tok["history"], "text": tok["text"]}
    elif call.component == "text_encoder":
        tokens = {"text": call.inputs["input_ids"][0][1]}
    else:
        tokens = None
    return CallCost(call.component, call.point, call.per_chunk, call.per_prompt, dict(count.flops),
                    _weight_bytes(configs, call), count.activation_bytes, io, count.live_bytes, tokens)


def analytic_params(configs: ModelConfigs) -> dict:
    v = vae_params(configs.vae)
    return {"transformer": sum(transformer_params(configs.transformer).values()),
            "text_encoder": sum(text_encoder_params(configs.text_encoder).values()), "vae_decoder": v["decoder"],
            "vae": v["decoder"] + v["encoder"]}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b)) if max(abs(a), abs(b)) else 0.0


def _check(calls: list[CallCost], params: dict, meta_params: dict) -> dict:
    """Relative difference analytic vs FlopCounterMode, per call and kind, and per parameter count."""
    out = {"flops": {}, "params": {k: _rel(params[k], meta_params[k]) for k in params}}
    for c in calls:
        kinds = set(c.flops) | set(c.flops_meta)
        diffs = {k: _rel(c.flops.get(k, 0.0), c.flops_meta.get(k, 0.0)) for k in kinds}
        diffs["total"] = _rel(c.total_flops, sum(c.flops_meta.values()))
        out["flops"][c.key] = diffs
    out["max_rel_diff"] = max([*out["params"].values(), *(d for v in out["flops"].values() for d in v.values())])
    return out


def _resident_weight_bytes(configs: ModelConfigs, precision: str) -> float:
    """All weights held on the GPU: the transformer's linears at ``precision``, the VAE decoder in FP8 with
    +vae, the rest in bf16."""
    t = transformer_params(configs.transformer)
    linear = t["linear_weights"] * (1 if precision.startswith("fp8") else BF16)
    p = analytic_params(configs)
    vae = p["vae"] - (p["vae_decoder"] / 2 if "vae_decoder" in FAST_KINDS[precision] else 0)
    return linear + BF16 * (t["other"] + p["text_encoder"] + vae)


def _roofline(est: CostEstimate, configs: ModelConfigs, gpu: Gpu, precision: str) -> dict:
    calls = {c.key: c.time(gpu, precision) for c in est.calls}
    parts = {c.key: c.per_chunk * calls[c.key]["seconds"] for c in est.calls if c.per_chunk}
    weights = _resident_weight_bytes(configs, precision)
    activations = max(c.live_bytes for c in est.calls)  # components run one after another
    memory = {"weights_gb": weights / 1e9, "activations_gb": activations / 1e9,
              "total_gb": (weights + activations) / 1e9}
    memory["fits"] = memory["total_gb"] <= gpu.memory_gb
    prompt = sum(c.per_prompt * calls[c.key]["seconds"] for c in est.calls if c.per_prompt)
    return {"calls": calls, "chunk_parts_s": parts, **throughput(sum(parts.values()), est.chunk_frames),
            "prompt_s": prompt, "memory": memory}


def estimate(checkpoint: str | Path | None = None, *, config: str | None = None, height: int = 384,
             width: int = 640, steps: str | tuple | None = None, text_length: int = 226,
             meta_count: bool = True, gpus: tuple[Gpu, ...] = GPUS, variant: str | None = None,
             guidance_scale: float | None = None) -> CostEstimate:
    """Cost of generating with a checkpoint's configs (or ``config="helios-14b"``) at height x width, with
    the variant's sampler (the checkpoint's, or ``variant``; steps and guidance default to its reference
    defaults).

    With ``meta_count`` the real modules are also counted on the meta device (a few seconds for 14B)
    and ``check`` holds the relative differences between the two counts.
    """
    return estimate_configs(load_configs(checkpoint, config), height=height, width=width, steps=steps,
                            text_length=text_length, meta_count=meta_count, gpus=gpus, variant=variant,
                            guidance_scale=guidance_scale)


def estimate_configs(configs: ModelConfigs, *, height: int = 384, width: int = 640, steps: str | tuple | None = None,
                     text_length: int = 226, meta_count: bool = True, gpus: tuple[Gpu, ...] = GPUS,
                     variant: str | None = None, guidance_scale: float | None = None) -> CostEstimate:
    """``estimate`` for configs already in memory (see configs.model_configs)."""
    wl: Workload = check_workload(configs, height, width, text_length, steps, variant, guidance_scale)
    calls = prompt_calls(configs, wl)
    costs = [_cost(configs, c) for c in calls]
    params = {"analytic": analytic_params(configs), "meta": None}
    check = None
    if meta_count:
        from .meta_count import count_calls

        meta_flops, params["meta"] = count_calls(configs, calls)
        for c in costs:
            c.flops_meta = meta_flops[c.key]
        check = _check(costs, params["analytic"], params["meta"])
    frames = chunk_frames(configs)
    est = CostEstimate(configs.source, height, width, text_length, wl.steps, frames, params, costs, check,
                       gpus=[g.as_dict() for g in gpus], realtime_chunk_s=realtime_chunk_seconds(frames),
                       variant=wl.variant, guided=wl.guided)
    est.roofline = {g.name: {p: _roofline(est, configs, g, p) for p in PRECISIONS} for g in gpus}
    return est
