"""A synthetic checkpoint at the real Helios-14B width, for trying the whole deploy chain at real size
without downloading anything.

- transformer: diffusers' HeliosTransformer3DModel defaults (dim 5120, 40 heads, ffn 13824, text_dim 4096)
  with as many blocks as asked (about 0.7 GB of bf16 weights per block, 1.4 GB in fp32);
- text_encoder: a UMT5 encoder at UMT5-XXL width (d_model 4096, 64 heads, d_ff 10240) with few layers and
  the real 256384-token vocabulary, so ``text_dim`` matches and the largest single tensor (the 4.2 GB fp32
  embedding table) is real;
- vae, tokenizer, scheduler: the tiny ones (helios_deploy.checkpoints.tiny), so the whole pipeline runs; or
  (``real_vae=True``) the VAE at the real Wan 2.1 config (diffusers' AutoencoderKLWan defaults: base_dim 96, z_dim
  16, dim_mult [1, 2, 4, 4], 2 res blocks; 127 M parameters), for trying the VAE's steps at real width.

Weights are drawn and written one tensor at a time into bf16 safetensors shards of at most 2 GB (as real
checkpoints are stored), so writing it takes little memory. The values follow the tiny checkpoint's rule
(``tiny.init_values``) so activations stay O(1) through the blocks, as in a trained model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..fsutil import staged_dir
from .tiny import build_pipeline, init_values

# diffusers' HeliosTransformer3DModel defaults are the 14B config; only the depth changes.
REAL_WIDTH = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, text_dim=4096, freq_dim=256,
                  rope_dim=(44, 42, 42))
# UMT5-XXL's encoder (google/umt5-xxl, the Wan / Helios text encoder); only the depth changes.
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, relative_attention_num_buckets=32,
                relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                layer_norm_epsilon=1e-6, is_encoder_decoder=False, pad_token_id=0, eos_token_id=1,
                tie_word_embeddings=False)
SHARD_BYTES = 2 << 30


def _write_shards(model, folder: Path, stem: str, seed: int) -> int:
    """Draw every parameter of ``model`` (on the meta device) one at a time and write bf16 shards plus the
    index, with the diffusers / transformers shard names; returns the parameter count."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    parts: list[list[str]] = []
    shard: dict = {}

    def flush():
        save_file(shard, str(folder / f"part-{len(parts)}.safetensors"), metadata={"format": "pt"})
        parts.append(list(shard))
        shard.clear()

    for name, p in model.named_parameters():
        t = _draw_bf16(name, tuple(p.shape), g)
        if shard and sum(x.numel() * 2 for x in shard.values()) + t.numel() * 2 > SHARD_BYTES:
            flush()
        shard[name] = t
        del t
    flush()
    weight_map = {}
    for i, keys in enumerate(parts):  # shard names say how many there are: known only once all are written
        name = f"{stem}-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        (folder / f"part-{i}.safetensors").rename(folder / name)
        weight_map.update(dict.fromkeys(keys, name))
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    (folder / f"{stem}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return sum(p.numel() for p in model.parameters())


def _draw_bf16(name: str, shape: tuple, generator, rows_per_draw: int = 8192):
    """``init_values`` in bf16, drawn in slices of rows for large tensors (the 4.2 GB fp32 embedding table
    is never whole in fp32)."""
    import torch

    if len(shape) < 2 or shape[0] <= rows_per_draw:
        return init_values(name, shape, generator).to(torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    for start in range(0, shape[0], rows_per_draw):
        rows = out[start:start + rows_per_draw]
        rows.copy_(init_values(name, tuple(rows.shape), generator))
    return out


def _write_transformer(folder: Path, layers: int, seed: int) -> int:
    import torch
    from diffusers import HeliosTransformer3DModel

    with torch.device("meta"):
        model = HeliosTransformer3DModel(**REAL_WIDTH, num_layers=layers)
    model.save_config(folder)
    return _write_shards(model, folder, "diffusion_pytorch_model", seed)


def _write_text_encoder(folder: Path, layers: int, seed: int) -> int:
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(**UMT5_XXL, num_layers=layers)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    config.save_pretrained(folder)
    return _write_shards(model, folder, "model", seed + 1)


def _write_vae(folder: Path, layers: int, seed: int) -> int:
    """The Wan 2.1 VAE at diffusers' defaults (the real config; ``layers`` is not used)."""
    import torch
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        model = AutoencoderKLWan()
    model.save_config(folder)
    return _write_shards(model, folder, "diffusion_pytorch_model", seed + 2)


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def write_wide_checkpoint(out_dir: str | Path, layers: int = 2, text_encoder_layers: int = 1, seed: int = 0,
                          force: bool = False, real_vae: bool = False) -> dict:
    """Write the synthetic checkpoint; returns the parameter counts and weight bytes per component (the VAE's
    too with ``real_vae``: the real Wan 2.1 VAE config instead of the tiny VAE)."""
    out = Path(out_dir)
    with staged_dir(out, force=force) as tmp:
        build_pipeline(seed=seed).save_pretrained(tmp, safe_serialization=True)
        info = {}
        parts = [("transformer", _write_transformer, layers), ("text_encoder", _write_text_encoder, text_encoder_layers)]
        for folder, write, n in parts + ([("vae", _write_vae, 0)] if real_vae else []):
            shutil.rmtree(tmp / folder)
            (tmp / folder).mkdir()
            info[folder] = {"layers": n, "params": write(tmp / folder, n, seed), "weights_bytes": _bytes(tmp / folder)}
        (tmp / "helios_deploy_synthetic.json").write_text(json.dumps(
            {"seed": seed, "real_width": True, **({"real_vae": True} if real_vae else {}), "components": info}, indent=2) + "\n")
    return {"path": str(out), **info}
