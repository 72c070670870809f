import click


@click.command("demo")
@click.option("-o", "--output", "out", default="engines/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--height", type=int, default=64, show_default=True)
@click.option("--width", type=int, default=128, show_default=True)
def command(out, height, width):
    """The embedded default on CPU: tiny checkpoint -> export (audited) -> two-chunk mp4 -> pipeline parity.

    \b
    Example:
      helios-deploy demo -o engines/demo
    """
    from ..demo import run_demo

    run_demo(out, height=height, width=width, log=lambda m: click.echo(m))
