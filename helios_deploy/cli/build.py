import json

import click

from .options import components_option, parse_components


@click.command("build")
@click.argument("artifacts", type=click.Path())
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp8"]), default="fp8", show_default=True,
              help="fp8 builds from model.fp8.onnx (run quantize first); the network is strongly typed, so "
                   "precision comes from the graph's own dtypes and Q/DQ nodes.")
@components_option
@click.option("--opt-level", type=int, default=4, show_default=True, help="Builder optimization level 0-5.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="Persistent timing cache file.")
@click.option("--workspace", type=int, default=None, help="Workspace limit in bytes.")
@click.option("--memory-budget", type=int, default=None,
              help="Device memory all of an engine's weights may take, in bytes: builds with weight streaming; at load "
                   "the runner keeps the weights TensorRT cannot stream plus as many streamable ones as fit the rest "
                   "of the budget on the GPU and streams the others from host memory. Only streaming on/off is part "
                   "of the engine key: a new value on built engines is recorded without a rebuild.")
@click.option("--max-batch", type=int, default=None, help="Largest batch the profiles accept (default: 1).")
@click.option("--dry-run", is_flag=True, help="Print, as JSON, everything the build would do; needs no GPU.")
@click.option("--rebuild", is_flag=True, help="Rebuild engines even when their key matches.")
@click.option("--refittable", is_flag=True, help="Build with BuilderFlag.REFIT, so `helios-deploy refit` can put other "
              "LoRA weights into the engines without a rebuild (fp32 engines).")
@click.option("--strip-weights", is_flag=True, help="Weight-stripped plans (STRIP_PLAN + REFIT_IDENTICAL, TensorRT >= 10): "
              "the engine file holds kernels only and the runner refits it from the ONNX weights at load.")
def command(artifacts, precision, components, opt_level, timing_cache, workspace, memory_budget, max_batch,
            dry_run, rebuild, refittable, strip_weights):
    """Build TensorRT engines from the exported ONNX graphs (one optimization profile per operating point:
    the three pyramid stages, the text length, the VAE chunk).

    \b
    Examples:
      helios-deploy build engines/helios --precision fp8 --timing-cache engines/timing.cache
      helios-deploy build engines/helios --precision fp32 --dry-run
      helios-deploy build engines/helios --precision fp32 --refittable    # LoRA swaps with `refit`
    """
    from ..export.tensorrt.build import build, plan
    from ..export.tensorrt.engines import BuildSettings

    settings = BuildSettings(precision=precision, opt_level=opt_level, workspace=workspace,
                             memory_budget=memory_budget, timing_cache=timing_cache, refittable=refittable,
                             strip_weights=strip_weights)
    comps = parse_components(components) if components else None
    if dry_run:
        click.echo(json.dumps(plan(artifacts, comps, settings, max_batch), indent=2))
        return
    build(artifacts, comps, settings, max_batch, rebuild=rebuild, log=lambda m: click.echo(m, err=True))
    click.echo(f"engines recorded in {artifacts}/manifest.json")
