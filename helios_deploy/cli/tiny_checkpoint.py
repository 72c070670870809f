import click

from .options import force_option


@click.command("tiny-checkpoint")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--variant", type=click.Choice(["base", "mid", "distilled"]), default="distilled", show_default=True,
              help="Helios-Base (HeliosPipeline, HeliosScheduler UniPC, CFG), Helios-Mid (HeliosPyramidPipeline, "
                   "HeliosScheduler over 3 stages, CFG-Zero*) or Helios-Distilled (DMD, no guidance).")
@click.option("--cfg-zero-star/--no-cfg-zero-star", default=None,
              help="Mid only: the pipeline's is_cfg_zero_star (default on, as Helios-Mid).")
@click.option("--amplify-history/--no-amplify-history", default=True, show_default=True,
              help="Turn on the transformer's is_amplify_history (history key scaling).")
@click.option("--real-width-layers", type=int, default=None, metavar="N",
              help="Instead: a synthetic checkpoint at the real 14B width: transformer dim 5120, ffn 13824, text_dim "
                   "4096 with N blocks (about 0.7 GB of bf16 weights per block), a UMT5 encoder at UMT5-XXL width with "
                   "the real 256384-token vocabulary (--text-encoder-layers layers), the tiny VAE and tokenizer. The "
                   "whole pipeline runs on it: for trying the deploy chain at real size.")
@click.option("--text-encoder-layers", type=int, default=1, show_default=True, metavar="K",
              help="With --real-width-layers: UMT5 layers (the embedding table, 2.1 GB in bf16, comes on top).")
@click.option("--trained", is_flag=True,
              help="Instead: the tiny Helios-Distilled trained on procedural videos (\"a red square moving right\"; "
                   "weights shipped with the package, see docs/model.md): its videos show the prompt.")
@click.option("--retrain", is_flag=True,
              help="With --trained: train it here first (seeded; about 10 minutes on 2 CPU cores) instead of "
                   "using the shipped weights.")
@force_option
def command(out_dir, seed, variant, cfg_zero_star, amplify_history, real_width_layers, text_encoder_layers, trained,
            retrain, force):
    """Write a small random-weight Helios checkpoint (Distilled, Base or Mid) in diffusers layout, or (--trained)
    the tiny Helios-Distilled trained on procedural videos.

    \b
    Examples:
      helios-deploy tiny-checkpoint engines/tiny --seed 0
      helios-deploy tiny-checkpoint engines/tiny-base --variant base
      helios-deploy tiny-checkpoint engines/tiny-mid --variant mid --no-cfg-zero-star
      helios-deploy tiny-checkpoint engines/wide2 --real-width-layers 2
      helios-deploy tiny-checkpoint engines/trained --trained
    """
    from ..errors import UserError

    if retrain and not trained:
        raise UserError("--retrain goes with --trained", fix="pass --trained --retrain")
    if trained:
        if real_width_layers is not None or variant != "distilled" or cfg_zero_star is not None:
            raise UserError("--trained writes the trained tiny Helios-Distilled only",
                            fix="leave --variant, --cfg-zero-star and --real-width-layers out with --trained")
        _write_trained(out_dir, seed, retrain, force)
        return

    if real_width_layers is not None:
        if variant != "distilled" or cfg_zero_star is not None:
            raise UserError("--real-width-layers writes a Helios-Distilled checkpoint only",
                            found=f"--variant {variant}", fix="leave --variant out with --real-width-layers")
        from ..checkpoints.synthetic import write_wide_checkpoint

        if real_width_layers < 1 or text_encoder_layers < 1:
            raise UserError("--real-width-layers and --text-encoder-layers must be at least 1",
                            found=f"{real_width_layers} and {text_encoder_layers}")
        info = write_wide_checkpoint(out_dir, layers=real_width_layers, text_encoder_layers=text_encoder_layers,
                                     seed=seed, force=force)
        for name in ("transformer", "text_encoder"):
            c = info[name]
            click.echo(f"{name}: {c['layers']} layers, {c['params'] / 1e9:.2f}B parameters, "
                       f"{c['weights_bytes'] / 1e9:.2f} GB of bf16 weights")
        click.echo(f"real-width checkpoint written to {info['path']}")
        return
    from ..checkpoints.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(out_dir, seed=seed, amplify_history=amplify_history, force=force, variant=variant,
                                 cfg_zero_star=cfg_zero_star)
    click.echo(f"tiny {variant} checkpoint written to {path}")


def _write_trained(out_dir, seed, retrain, force):
    import tempfile
    from pathlib import Path

    from ..checkpoints.trained import write_trained_checkpoint
    from ..fsutil import check_output_dir

    check_output_dir(Path(out_dir), force)  # before ten minutes of training
    if not retrain:
        path = write_trained_checkpoint(out_dir, force=force)
        click.echo(f"trained tiny distilled checkpoint written to {path}")
        return
    from ..checkpoints.train_tiny import build_trained_pipeline, save_trained

    pipe, record = build_trained_pipeline(seed, log=lambda m: click.echo(m, err=True))
    with tempfile.TemporaryDirectory() as tmp:
        source = save_trained(pipe, record, Path(tmp) / "trained")
        path = write_trained_checkpoint(out_dir, force=force, source=source)
    click.echo(f"trained tiny distilled checkpoint (retrained here, seed {seed}) written to {path}")
