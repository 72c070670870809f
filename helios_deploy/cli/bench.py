import json
from pathlib import Path

import click

from .generate import backend_option, sampler_options
from .options import request_settings, request_size_options


@click.command("bench")
@click.argument("artifacts", type=click.Path())
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write all numbers here.")
@click.option("--against-reference", "reference", type=click.Path(file_okay=False),
              help="Also time the checkpoint's diffusers pipeline (HeliosPipeline or HeliosPyramidPipeline), same "
                   "inputs and settings, same run.")
@click.option("--frames", type=int, default=66, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@request_size_options
@click.option("--steps", default=None, help="Mid / Distilled: steps per pyramid stage (default: the variant's).")
@click.option("--num-inference-steps", type=int, default=None, help="Base: denoising steps (default 50).")
@click.option("--guidance-scale", type=float, default=None, help="Base / Mid: guidance scale (default 5.0; 1 = off).")
@click.option("--negative-prompt", default=None, help="Base / Mid with guidance.")
@click.option("--amplify-first-chunk", is_flag=True, help="Distilled: twice the steps for the first chunk.")
@sampler_options
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed runs (best is reported).")
@backend_option
@click.option("--device", default="cpu", show_default=True)
@click.option("--gpu", default="H100 SXM", show_default=True, help="GPU of the cost model's prediction.")
def command(artifacts, json_path, reference, frames, seed, height, width, repeats, backend, device, gpu, sampler,
            cfg_zero_star, **request):
    """Time generation: total, first-chunk latency, steady-state FPS, per component and pyramid stage,
    host overhead per chunk, peak memory; with --against-reference, speedup over diffusers.

    \b
    Examples:
      helios-deploy bench engines/demo/artifacts --against-reference engines/demo/checkpoint --json bench.json
      helios-deploy bench BASE_ARTIFACTS --against-reference BASE_CHECKPOINT --num-inference-steps 4
      helios-deploy bench MID_ARTIFACTS --against-reference MID_CHECKPOINT --steps 2,2,2
      helios-deploy bench ARTIFACTS --height 640 --width 384     # another exported size
    """
    from ..measure.bench import run_bench

    r = run_bench(artifacts, frames=frames, seed=seed, backend=backend, device=device, repeats=repeats,
                  height=height, width=width,
                  reference=reference, gpu=gpu, **request_settings(**request, sampler=sampler, cfg_zero_star=cfg_zero_star))
    click.echo(f"{r['variant']}: sampler {r['sampler']}, steps {','.join(map(str, r['steps']))}, guidance "
               f"{r['guidance_scale']:g} ({r['transformer_calls_per_chunk']} transformer calls per chunk at batch "
               f"{r['transformer_batch']})")
    steady = f"{r['steady_state_fps']:.1f}" if r["steady_state_fps"] else "n/a (one chunk)"
    click.echo(f"{r['frames']} frames at {r['video']['height']}x{r['video']['width']} in {r['chunks']} chunks: total {r['total_s']:.3f}s, first chunk "
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
        click.echo(f"reference (diffusers, {r['variant']}) {r['reference_total_s']:.3f}s -> speedup_vs_reference "
                   f"{r['speedup_vs_reference']:.2f}x")
    if json_path:
        Path(json_path).write_text(json.dumps(r, indent=2) + "\n")
