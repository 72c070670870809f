from pathlib import Path

import click

from .options import resolve_sizes, size_options, sizes_option


@click.command("cost")
@click.argument("checkpoint", required=False, type=click.Path())
@click.option("--config", "config_name", default=None, metavar="NAME",
              help="A built-in model instead of a checkpoint: helios-14b (the real configs).")
@size_options
@sizes_option
@click.option("--variant", type=click.Choice(["base", "mid", "distilled"]), default=None,
              help="Whose sampler (default: the checkpoint's; distilled for --config).")
@click.option("--steps", default=None,
              help="Transformer steps per pyramid stage (distilled: 1,1,1 is the fastest, the shipped script uses "
                   "2,2,2; mid: 10,10,10), or Base's number of steps (50). Default: the variant's.")
@click.option("--guidance-scale", type=float, default=None,
              help="Base / Mid: > 1 counts a batch-2 transformer call per step (default 5.0; 1 = no guidance).")
@click.option("--text-length", type=int, default=226, show_default=True, help="Prompt tokens (UMT5, padded).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write every number here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a bar chart (PNG) of time per chunk by component, precision and GPU.")
@click.option("--meta-count/--no-meta-count", default=True, show_default=True,
              help="Also count FLOPs with FlopCounterMode over the real modules on the meta device (a few "
                   "seconds for 14B) and show the difference to the analytic count.")
def command(checkpoint, config_name, height, width, sizes, variant, steps, guidance_scale, text_length, json_path, plot_path,
            meta_count):
    """Predict FLOPs, bytes moved, time per chunk, FPS, real-time streams and memory per GPU.

    Counts each component call (UMT5 once per prompt; the transformer per pyramid stage; the VAE decode
    per 33-frame chunk) without loading weights, and estimates roofline times on H100 SXM, H100 PCIe,
    H200, B200 and L40S in bf16 and with fp8 transformer linears.

    \b
    Examples:
      helios-deploy cost --config helios-14b
      helios-deploy cost --config helios-14b --steps 2,2,2 --json cost.json --plot cost.png
      helios-deploy cost --config helios-14b --variant base        # 50 steps, CFG: 50 batch-2 calls per chunk
      helios-deploy cost checkpoints/Helios-Distilled --height 480 --width 832
      helios-deploy cost --config helios-14b --sizes 384x640,640x384,512x832   # each size, then a table of all
    """
    from ..cost import estimate
    from ..cost.report import check_writable, format_sizes, write_json, write_plot

    for path in (json_path, plot_path):
        if path:
            check_writable(path)
    ests = [estimate(checkpoint, config=config_name, height=h, width=w, steps=steps, text_length=text_length,
                     meta_count=meta_count, variant=variant, guidance_scale=guidance_scale)
            for h, w in resolve_sizes(height, width, sizes)]
    click.echo(format_sizes(ests))
    if json_path:
        click.echo(f"wrote {write_json(ests, json_path)}")
    if plot_path:  # one chart per size: NAME-HxW.png when there are several
        for est in ests:
            path = Path(plot_path)
            if len(ests) > 1:
                path = path.with_name(f"{path.stem}-{est.height}x{est.width}{path.suffix}")
            click.echo(f"wrote {write_plot(est, path)}")
