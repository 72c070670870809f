import click

from .options import force_option


@click.command("tiny-checkpoint")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--amplify-history/--no-amplify-history", default=True, show_default=True,
              help="Turn on the transformer's is_amplify_history (history key scaling).")
@click.option("--real-width-layers", type=int, default=None, metavar="N",
              help="Instead: a synthetic checkpoint whose transformer has the real 14B width (dim 5120, "
                   "ffn 13824, text_dim 4096) and N blocks (about 0.7 GB of bf16 weights per block), for "
                   "measuring export memory. Only its transformer is meant to be exported.")
@force_option
def command(out_dir, seed, amplify_history, real_width_layers, force):
    """Write a small random-weight Helios-Distilled checkpoint in diffusers layout.

    \b
    Examples:
      helios-deploy tiny-checkpoint engines/tiny --seed 0
      helios-deploy tiny-checkpoint engines/wide --real-width-layers 6
    """
    if real_width_layers is not None:
        from ..errors import UserError
        from ..synthetic import write_wide_checkpoint

        if real_width_layers < 1:
            raise UserError("--real-width-layers must be at least 1", found=str(real_width_layers))
        info = write_wide_checkpoint(out_dir, layers=real_width_layers, seed=seed, force=force)
        click.echo(f"synthetic checkpoint written to {info['path']}: transformer {info['transformer_params'] / 1e9:.2f}B "
                   f"parameters, {info['transformer_weights_bytes'] / 1e9:.2f} GB of weights")
        return
    from ..tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(out_dir, seed=seed, amplify_history=amplify_history, force=force)
    click.echo(f"tiny checkpoint written to {path}")
