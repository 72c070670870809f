"""A synthetic checkpoint with a real-width Helios transformer (dim 5120, ffn 13824, text_dim 4096) and
as many blocks as asked, for measuring export memory on multi-GB weights without downloading any.

The rest of the checkpoint (text encoder, VAE, tokenizer, scheduler) is the tiny one, so only the
transformer is meant to be exported from it. Weights are drawn and written one tensor at a time, in
bf16 shards, so making it needs little memory either.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from .fsutil import staged_dir
from .tiny import build_pipeline

# diffusers' HeliosTransformer3DModel defaults are the 14B config; only the depth changes.
REAL_WIDTH = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, text_dim=4096, freq_dim=256,
                  rope_dim=(44, 42, 42))
SHARD_BYTES = 2 << 30


def _write_transformer(folder: Path, layers: int, seed: int) -> int:
    import torch
    from diffusers import HeliosTransformer3DModel
    from safetensors.torch import save_file

    with torch.device("meta"):
        model = HeliosTransformer3DModel(**REAL_WIDTH, num_layers=layers)
    model.save_config(folder)
    g = torch.Generator().manual_seed(seed)
    parts: list[list[str]] = []
    shard: dict = {}

    def flush():
        save_file(shard, str(folder / f"part-{len(parts)}.safetensors"), metadata={"format": "pt"})
        parts.append(list(shard))
        shard.clear()

    for name, p in model.named_parameters():
        std = 1 / math.sqrt(math.prod(p.shape[1:])) if p.ndim >= 2 else 0.02
        t = (torch.randn(p.shape, generator=g) * std).to(torch.bfloat16)
        if shard and sum(x.numel() * 2 for x in shard.values()) + t.numel() * 2 > SHARD_BYTES:
            flush()
        shard[name] = t
    flush()
    weight_map = {}
    for i, keys in enumerate(parts):  # diffusers' shard naming, known only once all are written
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        (folder / f"part-{i}.safetensors").rename(folder / name)
        weight_map.update(dict.fromkeys(keys, name))
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return sum(p.numel() for p in model.parameters())


def write_wide_checkpoint(out_dir: str | Path, layers: int = 6, seed: int = 0, force: bool = False) -> dict:
    """Write the synthetic checkpoint; returns its transformer's parameter count and weights bytes."""
    out = Path(out_dir)
    with staged_dir(out, force=force) as tmp:
        build_pipeline(seed=seed).save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(tmp / "transformer")
        (tmp / "transformer").mkdir()
        params = _write_transformer(tmp / "transformer", layers, seed)
    weights = sum(p.stat().st_size for p in (out / "transformer").glob("*.safetensors"))
    return {"path": str(out), "transformer_params": params, "transformer_weights_bytes": weights}
