import click

from .options import force_option


@click.command("tiny-checkpoint")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--amplify-history/--no-amplify-history", default=True, show_default=True,
              help="Turn on the transformer's is_amplify_history (history key scaling).")
@force_option
def command(out_dir, seed, amplify_history, force):
    """Write a small random-weight Helios-Distilled checkpoint in diffusers layout.

    \b
    Example:
      helios-deploy tiny-checkpoint engines/tiny --seed 0
    """
    from ..tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(out_dir, seed=seed, amplify_history=amplify_history, force=force)
    click.echo(f"tiny checkpoint written to {path}")
