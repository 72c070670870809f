"""The embedded default: a small, deterministic, random-weight Helios checkpoint in the real diffusers
layout, made locally (nothing is downloaded): Helios-Distilled by default, or Helios-Base / Helios-Mid
(``variant``). The same seed gives the same weights for every variant; they differ in pipeline class,
pipeline config and scheduler, as the real checkpoints do.

Every Helios feature of the transformer is on (multi-term memory patches, guidance cross-attention,
zero history timestep; amplify-history is a choice); the text encoder is a real UMT5EncoderModel with a
tokenizer trained locally with `tokenizers`; the VAE is a real AutoencoderKLWan (8x spatial, 4x temporal,
z_dim 16) with few channels. Weights are written as sharded safetensors.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from ..errors import UserError
from ..fsutil import staged_dir
from ..model.variants import VARIANTS

# Small but structurally complete: two heads of 16 channels so the rotary split (t, y, x) is exercised.
TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_dim=(8, 4, 4),
    rope_theta=10000.0,
    guidance_cross_attn=True,
    zero_history_timestep=True,
    has_multi_term_memory_patch=True,
    history_scale_mode="per_head",
)
TEXT_ENCODER_CONFIG = dict(
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    is_encoder_decoder=False,
    pad_token_id=0,
    eos_token_id=1,
)
VAE_CONFIG = dict(
    base_dim=8,
    z_dim=16,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
)
# HeliosDMDScheduler with dynamic shifting, as the distilled model uses it; the runtime always reads the
# checkpoint's own scheduler_config.json, never this dict.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=1.0,
    stages=3,
    stage_range=[0, 1 / 3, 2 / 3, 1],
    gamma=1 / 3,
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    use_dynamic_shifting=True,
    time_shift_type="linear",
)
# HeliosScheduler as Helios-Base uses it (diffusers' own HeliosPipeline tests: one stage over the whole
# range, dynamic shifting) and as Helios-Mid uses it over the three pyramid stages; UniPC bh2 of order 2.
_FLOW_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=1.0,
    gamma=1 / 3,
    prediction_type="flow_prediction",
    solver_order=2,
    solver_type="bh2",
    use_flow_sigmas=True,
    scheduler_type="unipc",
    use_dynamic_shifting=True,
    time_shift_type="exponential",
)
BASE_SCHEDULER_CONFIG = dict(_FLOW_SCHEDULER, stages=1, stage_range=[0, 1])
MID_SCHEDULER_CONFIG = dict(_FLOW_SCHEDULER, stages=3, stage_range=[0, 1 / 3, 2 / 3, 1])
# Deterministic text for the tokenizer's vocabulary (a Unigram model, like UMT5's SentencePiece).
_CORPUS = (
    "a cat and a dog baking a cake together in a kitchen. the cat is carefully measuring flour, while the dog "
    "is stirring the batter with a wooden spoon. the kitchen is cozy, with sunlight streaming through the window. "
    "a red car drives along a coastal road at sunset; waves crash on the rocks below. a person walks through a "
    "busy city street at night, neon lights reflecting on wet pavement. slow motion, cinematic, highly detailed, "
    "aerial view of mountains covered in snow, a river flowing through a green valley, birds flying over the sea."
)
SHARD_SIZE = "64KB"  # small enough that every component is written as several shards


def build_tokenizer():
    """A fast tokenizer trained locally: Unigram with Metaspace, </s> appended, pad 0 / eos 1 / unk 2."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    sentences = [s.strip() for s in _CORPUS.replace(";", ".").split(".") if s.strip()]
    tok.train_from_iterator(sentences * 4, trainer=trainer)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def init_values(name: str, shape, generator):
    """Seeded values for one parameter that keep activations O(1) (default inits are often zeros or ones,
    which would leave weights unexercised by parity tests): weights N(0, 1/fan_in), biases 0.02 N(0, 1),
    norm gains and history key scales 1 + 0.1 N(0, 1), scale/shift tables 0.1 N(0, 1)."""
    import torch

    if "scale_shift_table" in name:  # the generic draw first, then its own (the tiny checkpoint's values)
        init_values("", shape, generator)
        return 0.1 * torch.randn(shape, generator=generator)
    if len(shape) >= 2:
        return torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))
    if name.endswith("bias"):
        return 0.02 * torch.randn(shape, generator=generator)
    return 1.0 + 0.1 * torch.randn(shape, generator=generator)


def _randomize(module, generator) -> None:
    import torch

    for name, p in module.named_parameters():
        with torch.no_grad():
            p.copy_(init_values(name, p.shape, generator).to(p.dtype))


def build_pipeline(seed: int = 0, amplify_history: bool = True, variant: str = "distilled",
                   cfg_zero_star: bool | None = None):
    """The tiny pipeline of ``variant`` in memory (float32): HeliosPipeline (base) or HeliosPyramidPipeline
    (mid: CFG-Zero* unless ``cfg_zero_star`` is False; distilled)."""
    import torch
    from diffusers import (AutoencoderKLWan, HeliosDMDScheduler, HeliosPipeline, HeliosPyramidPipeline,
                           HeliosScheduler, HeliosTransformer3DModel)
    from transformers import UMT5Config, UMT5EncoderModel

    if variant not in VARIANTS:
        raise UserError(f"unknown variant {variant!r}", expected=" | ".join(VARIANTS))
    if cfg_zero_star is not None and variant != "mid":
        raise UserError("CFG-Zero* is a setting of Helios-Mid checkpoints", found=f"variant {variant}",
                        fix="pass --variant mid, or leave --cfg-zero-star out")

    generator = torch.Generator().manual_seed(seed)
    tokenizer = build_tokenizer()
    transformer = HeliosTransformer3DModel(**TRANSFORMER_CONFIG, is_amplify_history=amplify_history)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TEXT_ENCODER_CONFIG))
    vae = AutoencoderKLWan(**VAE_CONFIG)
    for module in (transformer, text_encoder, vae):
        _randomize(module, generator)
        module.eval()
    modules = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer)
    if variant == "base":
        return HeliosPipeline(scheduler=HeliosScheduler(**BASE_SCHEDULER_CONFIG), **modules)
    if variant == "mid":
        return HeliosPyramidPipeline(scheduler=HeliosScheduler(**MID_SCHEDULER_CONFIG), **modules,
                                     is_cfg_zero_star=cfg_zero_star is not False, is_distilled=False)
    return HeliosPyramidPipeline(scheduler=HeliosDMDScheduler(**SCHEDULER_CONFIG), **modules,
                                 is_cfg_zero_star=False, is_distilled=True)


def write_tiny_checkpoint(out_dir: str | Path, seed: int = 0, amplify_history: bool = True, force: bool = False,
                          variant: str = "distilled", cfg_zero_star: bool | None = None) -> Path:
    """Write the tiny checkpoint of ``variant`` to ``out_dir`` (atomically: a temporary folder moved into place)."""
    out = Path(out_dir)
    pipe = build_pipeline(seed=seed, amplify_history=amplify_history, variant=variant, cfg_zero_star=cfg_zero_star)
    with staged_dir(out, force=force) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True, max_shard_size=SHARD_SIZE)
        (tmp / "helios_deploy_tiny.json").write_text(
            json.dumps({"seed": seed, "amplify_history": amplify_history, "variant": variant}, indent=2) + "\n"
        )
        shards = list(tmp.glob("*/*.safetensors.index.json"))
        if len(shards) < 3:  # the sharded path must be exercised for every model component
            raise RuntimeError(f"tiny checkpoint was not sharded: {shards}")
    return out


def ensure_tiny_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """Reuse a complete tiny checkpoint at ``out_dir`` or write one."""
    out = Path(out_dir)
    marker = out / "helios_deploy_tiny.json"
    if marker.is_file() and json.loads(marker.read_text()).get("seed") == seed:
        return out
    if out.exists():
        if any(out.iterdir()):
            raise UserError(
                f"{out} exists and is not a tiny checkpoint with seed {seed}",
                fix="choose another folder or remove it",
            )
        shutil.rmtree(out)
    return write_tiny_checkpoint(out, seed=seed)
