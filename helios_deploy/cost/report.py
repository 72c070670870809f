"""A CostEstimate as a readable table, as JSON and as a bar chart."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .estimate import CallCost, CostEstimate
from .roofline import PRECISIONS

# FLOP kinds -> table columns (the VAE's convs sit with the linear layers; its and UMT5's attention is self-attention)
_COLUMNS = {"linear": "linear/conv", "conv": "linear/conv", "attention_self": "self-attn", "attention": "self-attn",
            "attention_cross": "cross-attn"}
_LABELS = {"text_encoder/prompt": "UMT5 (per prompt)", "vae_decoder/chunk": "VAE decode"}


def _label(key: str) -> str:
    return _LABELS.get(key, key.replace("transformer/", "transformer "))


def _tokens(c: CallCost) -> str:
    if not c.tokens:
        return "9 -> 33 fr"
    if "noisy" in c.tokens:
        return f"{c.tokens['noisy'] + c.tokens['history']} ({c.tokens['noisy']} noisy)"
    return str(c.tokens["text"])


def _flops_table(est: CostEstimate) -> list[str]:
    cols = ["linear/conv", "self-attn", "cross-attn"]
    lines = [f"{'call':<20} {'tokens':>18} {'x/chunk':>7} " + " ".join(f"{c:>11}" for c in cols)
             + f" {'total':>9} {'meta':>9} {'diff':>8}"]
    for c in est.calls:
        by_col = {col: 0.0 for col in cols}
        for kind, n in c.flops.items():
            by_col[_COLUMNS.get(kind, "linear/conv")] += n
        meta = f"{sum(c.flops_meta.values()) / 1e12:9.2f}" if c.flops_meta else f"{'-':>9}"
        diff = f"{est.check['flops'][c.key]['total']:8.4%}" if est.check else f"{'-':>8}"
        count = str(c.per_chunk) if c.per_chunk else "prompt"
        lines.append(f"{_label(c.key):<20} {_tokens(c):>18} {count:>7} "
                     + " ".join(f"{by_col[col] / 1e12:11.2f}" for col in cols)
                     + f" {c.total_flops / 1e12:9.2f} {meta} {diff}")
    chunk = est.per_chunk()
    parts = ", ".join(f"{k} {sum(v.values()) / 1e12:.1f}" for k, v in chunk.items())
    total = sum(sum(v.values()) for v in chunk.values())
    prompt = ", ".join(f"{c.component} {c.total_flops * c.per_prompt / 1e12:.2f}" for c in est.calls if c.per_prompt)
    lines.append(f"per 33-frame chunk: {total / 1e12:.1f} TFLOP ({parts}); per prompt: {prompt} TFLOP")
    return lines


def _bytes_table(est: CostEstimate) -> list[str]:
    lines = [f"{'call':<20} {'weights bf16':>12} {'weights fp8':>12} {'activations':>12} {'call I/O':>10} "
             f"{'peak live':>10}"]
    for c in est.calls:
        lines.append(f"{_label(c.key):<20} {c.weight_bytes['bf16'] / 1e9:12.2f} {c.weight_bytes['fp8'] / 1e9:12.2f} "
                     f"{c.activation_bytes / 1e9:12.2f} {c.io_bytes / 1e9:10.4f} {c.live_bytes / 1e9:10.3f}")
    return lines


def _params_lines(est: CostEstimate) -> list[str]:
    a, m = est.params["analytic"], est.params["meta"]
    names = {"transformer": "transformer", "text_encoder": "text encoder", "vae": "VAE", "vae_decoder": "VAE decoder"}
    out = []
    for key, name in names.items():
        meta = f" (meta modules: {m[key] / 1e9:.4f} B)" if m else ""
        out.append(f"  {name:<13} {a[key] / 1e9:8.4f} B{meta}")
    return out


def _roofline_table(est: CostEstimate) -> list[str]:
    stages = [c.key for c in est.calls if c.per_chunk]
    head = " ".join(f"{_label(k).replace('transformer ', ''):>10}" for k in stages)
    lines = [f"{'GPU':<10} {'prec':<12} {head} {'chunk s':>8} {'FPS':>7} {'streams':>8} "
             f"{'weights GB':>10} {'act GB':>7} {'fits':>5}"]
    for gpu in est.gpus:
        for p in PRECISIONS:
            r = est.roofline[gpu["name"]][p]
            parts = " ".join(f"{r['chunk_parts_s'][k]:10.3f}" for k in stages)
            mem = r["memory"]
            lines.append(f"{gpu['name']:<10} {p:<12} {parts} {r['chunk_s']:8.3f} {r['fps']:7.1f} "
                         f"{r['realtime_streams']:8.2f} {mem['weights_gb']:10.1f} {mem['activations_gb']:7.2f} "
                         f"{'yes' if mem['fits'] else 'NO':>5}")
    return lines


def format_report(est: CostEstimate) -> str:
    steps = ",".join(map(str, est.steps))
    guidance = "guidance: one batch-2 call per step" if est.guided else "no guidance"
    lines = [f"Helios cost model: {est.source} ({est.variant}) at {est.height}x{est.width}, {est.chunk_frames} "
             f"frames per chunk, steps {steps} ({est.transformer_calls_per_chunk} transformer calls per chunk, "
             f"{guidance}), text {est.text_length} tokens", "", "Parameters"]
    lines += _params_lines(est)
    lines += ["", "Work per call, TFLOP (analytic; 'meta' = FlopCounterMode over the real modules on meta)"]
    lines += _flops_table(est)
    if est.check:
        lines.append(f"largest analytic vs meta difference (FLOPs by kind, params): {est.check['max_rel_diff']:.4%}")
    lines += ["", "Bytes moved per call, GB (weights read once; activations: every matmul/conv reads its input and",
              "writes its output once in bf16, attention fused; peak live = activation memory estimate)"]
    lines += _bytes_table(est)
    lines += ["", "Roofline seconds per chunk at peak (max of compute and memory time per call; fp8 = transformer",
              "linear layers in fp8, attention and VAE bf16; fp8+attn = also both attention matmuls at the FP8 peak;",
              "fp8+attn+vae = also the VAE decoder's convolutions); streams = FPS / 24; memory = all weights + peak live"]
    lines += _roofline_table(est)
    prompt = ", ".join(f"{g['name']} {est.roofline[g['name']]['bf16']['prompt_s'] * 1e3:.1f} ms" for g in est.gpus)
    lines.append(f"real time: {est.chunk_frames} frames / 24 fps = {est.realtime_chunk_s:.3f} s per chunk; "
                 f"UMT5 adds once per prompt: {prompt}")
    return "\n".join(lines)


def format_sizes(ests: list[CostEstimate]) -> str:
    """Each size's report, then one table of time per chunk and FPS per size, GPU and precision."""
    if len(ests) == 1:
        return format_report(ests[0])
    lines = [format_report(e) + "\n" for e in ests]
    lines.append(f"Per video size (roofline at peak; chunk s and FPS; real time = {ests[0].realtime_chunk_s:.3f} s "
                 "per chunk)")
    lines.append(f"{'size':<10} {'GPU':<10} " + " ".join(f"{p + ' chunk s':>20} {p + ' FPS':>16}" for p in PRECISIONS))
    for e in ests:
        for gpu in e.gpus:
            r = e.roofline[gpu["name"]]
            lines.append(f"{f'{e.height}x{e.width}':<10} {gpu['name']:<10} "
                         + " ".join(f"{r[p]['chunk_s']:20.3f} {r[p]['fps']:16.1f}" for p in PRECISIONS))
    return "\n".join(lines)


def check_writable(path: str | Path) -> Path:
    """The output path, if its folder exists (checked before the work, so a typo costs nothing)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}", found=f"folder {path.parent} does not exist",
                        fix="create the folder first or choose another path")
    return path


def write_json(est: CostEstimate | list[CostEstimate], path: str | Path) -> Path:
    """One estimate's numbers, or with several sizes {"sizes": [each size's numbers]}."""
    path = check_writable(path)
    ests = est if isinstance(est, list) else [est]
    data = ests[0].to_dict() if len(ests) == 1 else {"sizes": [e.to_dict() for e in ests]}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def write_plot(est: CostEstimate, path: str | Path) -> Path:
    """Stacked bars of seconds per chunk by component, one bar per precision variant and GPU, and the real-time
    line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = check_writable(path)
    keys = [c.key for c in est.calls if c.per_chunk]
    names = [g["name"] for g in est.gpus]
    colors = plt.get_cmap("tab10").colors
    fig, ax = plt.subplots(figsize=(11, 5.5))
    width = 0.8 / len(PRECISIONS)
    for j, p in enumerate(PRECISIONS):
        xs = [i + (j - (len(PRECISIONS) - 1) / 2) * width for i in range(len(names))]
        bottom = [0.0] * len(names)
        for k, key in enumerate(keys):
            vals = [est.roofline[n][p]["chunk_parts_s"][key] for n in names]
            ax.bar(xs, vals, width, bottom=bottom, color=colors[k], edgecolor="white",
                   hatch=None if p == "bf16" else "/" * j, label=_label(key) if j == 0 else None)
            bottom = [b + v for b, v in zip(bottom, vals)]
        for x, n, top in zip(xs, names, bottom):
            ax.text(x, top, f"{p}\n{est.roofline[n][p]['fps']:.0f} FPS", ha="center", va="bottom", fontsize=5)
    ax.axhline(est.realtime_chunk_s, color="red", linestyle="--",
               label=f"real time: {est.chunk_frames} frames at 24 fps = {est.realtime_chunk_s:.3f} s")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("seconds per 33-frame chunk (roofline, peak)")
    ax.set_title(f"Helios {est.source} at {est.height}x{est.width}, steps {','.join(map(str, est.steps))}: "
                 f"time per chunk by component ({', '.join(PRECISIONS)}, left to right)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_ylim(0, max(est.realtime_chunk_s, max(est.roofline[n]["bf16"]["chunk_s"] for n in names)) * 1.35)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
