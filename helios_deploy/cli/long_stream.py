import json
from pathlib import Path

import click

from .generate import parse_steps

@click.command("long-stream")
@click.argument("artifacts", type=click.Path())
@click.option("--chunks", type=click.IntRange(min=3), default=100, show_default=True,
              help="33-frame chunks in the stream.")
@click.option("--via", default="api,triton", show_default=True, metavar="LIST",
              help="api (the runtime in this process), triton (a local tritonserver from .venv-triton), or both.")
@click.option("--early", type=click.IntRange(min=2), default=10, show_default=True,
              help="Compare RSS after this chunk with RSS after the last one.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", default="1,1,1", show_default=True, help="Steps per pyramid stage.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every number here.")
@click.option("--drift-against", "drift_checkpoint", type=click.Path(), default=None, metavar="CHECKPOINT",
              help="Instead: the drift audit of the FP8 graphs (quantize --precision fp8, with or without "
                   "--fp8-attention) over CHUNKS chunks against diffusers' fp32 pipeline on CHECKPOINT: PSNR per "
                   "chunk, slope, last - first, and whether each chunk still shows the prompt (trained tiny "
                   "checkpoint).")
def command(artifacts, chunks, via, early, seed, steps, json_path, drift_checkpoint):
    """Stream CHUNKS chunks in one request and print memory and time per chunk: RSS after chunk EARLY and
    after the last (target: within 5%), time per chunk early and late, and its slope.

    \b
    Examples:
      helios-deploy long-stream engines/tiny-onnx --chunks 100
      helios-deploy long-stream engines/tiny-onnx --chunks 100 --via triton --json long.json
      helios-deploy long-stream ARTIFACTS --chunks 12 --drift-against CHECKPOINT   # FP8 drift + adherence
    """
    from ..errors import UserError
    from ..measure.longstream import api_stream, format_summary, triton_stream

    if drift_checkpoint:
        from ..measure.longstream import drift_audit, format_drift

        click.echo(f"drift audit: {chunks} chunks ...", err=True)
        result = drift_audit(drift_checkpoint, artifacts, chunks=chunks, seed=seed)
        click.echo(format_drift(result))
        if json_path:
            Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
        return
    paths = [v.strip() for v in via.split(",") if v.strip()]
    if not paths or any(p not in ("api", "triton") for p in paths):
        raise UserError(f"--via {via!r}", expected="api, triton or api,triton")
    pyramid_steps = parse_steps(steps)
    run = {"api": api_stream, "triton": triton_stream}
    results = []
    for p in paths:
        click.echo(f"streaming {chunks} chunks via {p} ...", err=True)
        results.append(run[p](artifacts, chunks, seed=seed, steps=pyramid_steps, early=early))
        click.echo(format_summary(results[-1]))
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
