import json
from pathlib import Path

import click

from .generate import backend_option, parse_steps


@click.command("bench")
@click.argument("artifacts", type=click.Path())
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write all numbers here.")
@click.option("--against-reference", "reference", type=click.Path(file_okay=False),
              help="Also time diffusers' HeliosPyramidPipeline on this checkpoint, same inputs, same run.")
@click.option("--frames", type=int, default=66, show_default=True)
@click.option("--steps", default="1,1,1", show_default=True)
@click.option("--amplify-first-chunk", is_flag=True)
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed runs (best is reported).")
@backend_option
@click.option("--device", default="cpu", show_default=True)
@click.option("--gpu", default="H100 SXM", show_default=True, help="GPU of the cost model's prediction.")
def command(artifacts, json_path, reference, frames, steps, amplify_first_chunk, repeats, backend, device, gpu):
    """Time generation: total, first-chunk latency, steady-state FPS, per component and pyramid stage,
    host overhead per chunk, peak memory; with --against-reference, speedup over diffusers.

    \b
    Example:
      helios-deploy bench engines/demo/artifacts --against-reference engines/demo/checkpoint --json bench.json
    """
    from ..bench import run_bench

    r = run_bench(artifacts, frames=frames, steps=parse_steps(steps), amplify=amplify_first_chunk, backend=backend,
                  device=device, repeats=repeats, reference=reference, gpu=gpu)
    steady = f"{r['steady_state_fps']:.1f}" if r["steady_state_fps"] else "n/a (one chunk)"
    click.echo(f"{r['frames']} frames in {r['chunks']} chunks: total {r['total_s']:.3f}s, first chunk "
               f"{r['first_chunk_latency_s']:.3f}s, {r['fps']:.1f} FPS, steady state {steady} FPS")
    click.echo(f"host overhead {r['host_overhead_per_chunk_ms']:.2f} ms per chunk; peak RSS {r['peak_rss_mb']:.0f} MB")
    pred = r.get("predicted")
    for comp, sec in r["per_component_s"].items():
        click.echo(f"  {comp:13s} {sec:.3f}s")
    for stage, sec in sorted(r["transformer_per_stage_s"].items()):
        key = f"transformer/{stage}"
        extra = ""
        if pred and key in pred["flops"]:
            per_call = sec / r["transformer_per_stage_calls"][stage]
            extra = (f"  {pred['flops'][key] / 1e9 / max(per_call, 1e-12):.1f} GFLOP/s measured; "
                     f"{pred['gpu']} roofline {pred['bf16_s'][key] * 1e3:.3g} ms bf16 / {pred['fp8_s'][key] * 1e3:.3g} ms fp8 per call")
        click.echo(f"  transformer {stage}: {sec:.3f}s{extra}")
    if "speedup_vs_reference" in r:
        click.echo(f"reference (diffusers) {r['reference_total_s']:.3f}s -> speedup_vs_reference {r['speedup_vs_reference']:.2f}x")
    if json_path:
        Path(json_path).write_text(json.dumps(r, indent=2) + "\n")
