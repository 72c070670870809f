"""Small random LoRA adapters made with PEFT on a checkpoint's transformer, in the two layouts helios-deploy
fuses (docs/lora.md): the diffusers/PEFT layout ``HeliosPipeline.save_lora_weights`` writes, and the
Wan-style original layout (``diffusion_model.blocks.N.self_attn.q.lora_down.weight`` with ``.alpha``) that
diffusers converts. For tests and for trying ``export --lora`` / ``refit`` without a trained adapter.

Needs ``peft`` and diffusers (the ``reference`` extra). The adapter's B matrices are random (PEFT's
``init_lora_weights=False``), so the adapter changes the model's output.
"""

from __future__ import annotations

from pathlib import Path

# diffusers' Helios/Wan module names -> the original Wan names diffusers' converter maps back
_WAN_NAMES = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
              "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
              "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0",
              "ffn.net.2": "ffn.2"}
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2")
TEXT_ENCODER_TARGETS = ("q", "k", "v", "o", "wi_0", "wi_1", "wo")  # UMT5's attention and gated FFN linears


def peft_lora_state(checkpoint: str | Path, rank: int = 4, alpha: float = 8.0, seed: int = 0,
                    targets=DEFAULT_TARGETS, component: str = "transformer") -> tuple[dict, dict]:
    """(PEFT state dict of a random LoRA on the checkpoint's transformer or text encoder, its LoraConfig as a dict)."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    if component == "text_encoder":
        from transformers import UMT5EncoderModel

        model = UMT5EncoderModel.from_pretrained(Path(checkpoint) / "text_encoder", torch_dtype=torch.float32)
    else:
        from diffusers import HeliosTransformer3DModel

        model = HeliosTransformer3DModel.from_pretrained(Path(checkpoint) / "transformer", torch_dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
    torch.manual_seed(seed)
    inject_adapter_in_model(config, model)  # PEFT itself (transformers' add_adapter wants a newer PEFT than PyPI has)
    with torch.no_grad():  # PEFT's random init is small; make the adapter's effect clearly visible
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.2)
    return get_peft_model_state_dict(model), config.to_dict()


def _jsonable(config: dict) -> dict:
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


def write_tiny_lora(checkpoint: str | Path, out: str | Path, layout: str = "diffusers", rank: int = 4,
                    alpha: float = 8.0, seed: int = 0, targets=DEFAULT_TARGETS, text_encoder: str = "no") -> Path:
    """Write a random LoRA for ``checkpoint``'s transformer to the file ``out``; ``layout`` "diffusers"
    (save_lora_weights, with the LoraConfig in the file's metadata) or "wan" (original keys, alpha per layer).
    ``text_encoder``: "no", "also" (a LoRA on the UMT5 text encoder's linears too) or "only" (on the text encoder
    alone), written in the diffusers/PEFT layout (``text_encoder.*`` keys, as diffusers' ``_save_lora_weights``
    writes a text encoder's adapter)."""
    import torch
    from diffusers import HeliosPipeline
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if text_encoder != "no":
        if layout != "diffusers":
            raise ValueError("a text-encoder adapter is written in the diffusers layout only")
        layers, metadata = {}, {}
        te_state, te_config = peft_lora_state(checkpoint, rank, alpha, seed + 1, TEXT_ENCODER_TARGETS, "text_encoder")
        layers["text_encoder"], metadata["text_encoder"] = te_state, _jsonable(te_config)
        if text_encoder == "also":
            state, config = peft_lora_state(checkpoint, rank, alpha, seed, targets)
            layers["transformer"], metadata["transformer"] = state, _jsonable(config)
        HeliosPipeline._save_lora_weights(out.parent, lora_layers=layers, lora_metadata=metadata, weight_name=out.name)
        return out
    state, config = peft_lora_state(checkpoint, rank, alpha, seed, targets)
    if layout == "diffusers":
        HeliosPipeline.save_lora_weights(out.parent, transformer_lora_layers=state, weight_name=out.name,
                                         transformer_lora_adapter_metadata=_jsonable(config))
        return out
    if layout != "wan":
        raise ValueError(f"unknown layout {layout!r}")
    wan = {}
    for key, value in state.items():  # blocks.0.attn1.to_q.lora_A.weight
        module, kind = key.rsplit(".lora_", 1)
        block, rest = module.split(".", 2)[1], module.split(".", 2)[2]
        if rest not in _WAN_NAMES:
            raise ValueError(f"{key}: no Wan name for {rest}")
        base = f"diffusion_model.blocks.{block}.{_WAN_NAMES[rest]}"
        wan[f"{base}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value.contiguous()
        wan[f"{base}.alpha"] = torch.tensor(float(alpha))
    save_file(wan, str(out))
    return out
