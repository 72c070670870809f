"""A stress checkpoint for FP8 attention: the same model with sharply peaked attention.

FP8 attention breaks where softmax is peaked: the logits' range grows, Q and K use more of FP8's range,
and a few large probabilities carry the output, so their 3-bit mantissa error is not averaged away.
Helios normalises Q and K with an RMSNorm across heads right after ``to_q`` / ``to_k``, so scaling those
projections' weights changes nothing; the stress checkpoint scales the norms' gains (``norm_q.weight``,
``norm_k.weight``, the last weights on the query and key paths) by ``factor``: every logit grows by
``factor**2``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch

PEAKED = r"\.attn1\.norm_[qk]\.weight$"  # self-attention (28% of the last stage's work at 384x640)


def write_peaked_checkpoint(src: str | Path, dst: str | Path, factor: float = 4.0, pattern: str = PEAKED) -> Path:
    """Copy the checkpoint ``src`` to ``dst`` with the transformer tensors matching ``pattern`` scaled by
    ``factor`` (each shard rewritten with safetensors). Returns ``dst``."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    rx, scaled = re.compile(pattern), []
    for shard in sorted((tmp / "transformer").glob("*.safetensors")):
        tensors = load_file(str(shard))
        hits = [k for k in tensors if rx.search(k)]
        if hits:
            for k in hits:
                tensors[k] = tensors[k] * factor
            save_file(tensors, str(shard), metadata={"format": "pt"})
            scaled += hits
    if not scaled:
        shutil.rmtree(tmp)
        raise ValueError(f"no transformer tensor of {src} matches {pattern!r}")
    (tmp / "helios_deploy_stress.json").write_text(json.dumps({"factor": factor, "scaled": sorted(scaled)}, indent=2))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def attention_peak(checkpoint, prompt: str = "A cat and a dog baking a cake together in a kitchen.",
                   height: int = 64, width: int = 128, seed: int = 0) -> dict:
    """How peaked the reference pipeline's attention is over one chunk (every call of scaled_dot_product_
    attention, every query): the mean of the largest probability per query row, and the share of rows whose
    largest probability is above 0.5."""
    import torch.nn.functional as F
    from diffusers import HeliosPyramidPipeline

    ref = HeliosPyramidPipeline.from_pretrained(str(checkpoint), torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    rows: list[np.ndarray] = []
    original = F.scaled_dot_product_attention

    def recording(*args, **kw):
        names = ("query", "key", "value")
        q, k = (args[i] if len(args) > i else kw[n] for i, n in enumerate(names[:2]))
        scale = kw.get("scale")
        s = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
        rows.append(torch.softmax(s.float(), dim=-1).amax(dim=-1).flatten().numpy())
        return original(*args, **kw)

    F.scaled_dot_product_attention = recording
    try:
        ref(prompt=prompt, height=height, width=width, num_frames=33, generator=torch.Generator().manual_seed(seed),
            pyramid_num_inference_steps_list=[1, 1, 1], output_type="np")
    finally:
        F.scaled_dot_product_attention = original
    top = np.concatenate(rows) if rows else np.zeros(0)
    return {"calls": len(rows), "mean_max_prob": float(top.mean()), "share_max_above_0.5": float((top > 0.5).mean())}
