"""The second, independent count: the real diffusers / transformers modules built on the meta device
(no weights in memory) and run under torch.utils.flop_counter.FlopCounterMode with the call's shapes.

FlopCounterMode counts matmuls and convolutions per module. We sort them into the analytic kinds:
mm / addmm / convolution are "linear" (transformer, text encoder) or "conv" (VAE); attention matmuls
(bmm, or a fused SDPA op if one is dispatched) are attributed by the module that ran them (attn1 =
self, attn2 = cross in the transformer). The rotary tables' einsum is an outer product, which
FlopCounterMode (like the analytic count) does not count.
"""

from __future__ import annotations

import re

import torch

from .calls import Call
from .configs import ModelConfigs

_LINEAR_OPS = {"aten.mm", "aten.addmm", "aten.convolution", "aten._convolution"}
_ATTENTION_OPS = {"aten.bmm", "aten.baddbmm", "aten._scaled_dot_product_efficient_attention",
                  "aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_cudnn_attention",
                  "aten._scaled_dot_product_flash_attention_for_cpu"}
# module-name pattern of each component's attention kinds (matched against FlopCounterMode's names)
_ATTENTION_MODULES = {
    "transformer": {"attention_self": r"\.blocks\.\d+\.attn1$", "attention_cross": r"\.blocks\.\d+\.attn2$"},
    "text_encoder": {"attention": r"\.block\.\d+\.layer\.0\.SelfAttention$"},
    "vae_decoder": {"attention": r"\.attentions\.\d+$"},
}
_REST = "other"  # attention-type matmuls outside the attention modules (none in diffusers 0.42)
_LINEAR_KIND = {"transformer": "linear", "text_encoder": "linear", "vae_decoder": "conv"}


def build_meta_modules(configs: ModelConfigs) -> dict:
    """The three reference modules with every parameter and buffer on ``meta``."""
    from diffusers import AutoencoderKLWan, HeliosTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        return {
            "transformer": HeliosTransformer3DModel.from_config(configs.transformer).eval(),
            "text_encoder": UMT5EncoderModel(UMT5Config.from_dict(configs.text_encoder)).eval(),
            "vae": AutoencoderKLWan.from_config(configs.vae).eval(),
        }


def module_params(modules: dict) -> dict:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    vae = modules["vae"]
    return {
        "transformer": count(modules["transformer"]),
        "text_encoder": count(modules["text_encoder"]),
        "vae_decoder": count(vae.decoder) + count(vae.post_quant_conv),
        "vae": count(vae),
    }


def _meta_tensor(shape, dtype: str) -> torch.Tensor:
    return torch.zeros(shape, dtype=getattr(torch, dtype), device="meta")


def _run(modules: dict, call: Call) -> None:
    from ..export.exporter.patches import rope_without_autocast

    ins = {name: _meta_tensor(shape, dtype) for name, (shape, dtype) in call.inputs.items()}
    if call.component == "transformer":
        with rope_without_autocast():  # autocast rejects device_type "meta"
            modules["transformer"](**ins, return_dict=False)
    elif call.component == "text_encoder":
        # no mask: the dense attention costs the same, and masking code calls .item() (fails on meta)
        modules["text_encoder"](input_ids=ins["input_ids"])
    else:
        modules["vae"].decode(ins["latents"], return_dict=False)


def _sort(component: str, counts: dict) -> dict:
    """FlopCounterMode's per-module counts -> FLOPs by the analytic kinds."""
    total = {str(op): n for op, n in counts["Global"].items()}
    unknown = set(total) - _LINEAR_OPS - _ATTENTION_OPS
    if unknown:
        raise RuntimeError(f"FlopCounterMode counted ops the cost model does not sort: {sorted(unknown)}")
    out = {_LINEAR_KIND[component]: float(sum(n for op, n in total.items() if op in _LINEAR_OPS))}
    attention_total = float(sum(n for op, n in total.items() if op in _ATTENTION_OPS))
    for kind, pattern in _ATTENTION_MODULES[component].items():
        out[kind] = float(sum(n for name, ops in counts.items() if re.search(pattern, name)
                              for op, n in ops.items() if str(op) in _ATTENTION_OPS))
    rest = attention_total - sum(out[k] for k in _ATTENTION_MODULES[component])
    if rest:
        out[_REST] = rest
    return out


def count_call(modules: dict, call: Call) -> dict:
    """FLOPs by kind of one call, counted on the meta modules."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, depth=None)
    with counter, torch.no_grad():
        _run(modules, call)
    return _sort(call.component, counter.get_flop_counts())


def count_calls(configs: ModelConfigs, calls: list[Call]) -> tuple[dict, dict]:
    """(FLOPs by kind per call key, parameter counts) from the meta modules."""
    modules = build_meta_modules(configs)
    return {call.key: count_call(modules, call) for call in calls}, module_params(modules)
