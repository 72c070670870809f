import click


@click.command("demo")
@click.option("-o", "--output", "out", default="engines/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--height", type=int, default=64, show_default=True)
@click.option("--width", type=int, default=128, show_default=True)
def command(out, height, width):
    """The embedded default on CPU: tiny checkpoint -> export (audited) -> two-chunk mp4 -> pipeline parity.

    The checkpoint has random weights, so the video is noise; a strip of a few frames is written beside it
    (demo-strip.png). Third-party warnings and progress bars go to OUTPUT/demo.log, not to the terminal.

    \b
    Example:
      helios-deploy demo -o engines/demo
    """
    from ..demo import run_demo

    run_demo(out, height=height, width=width)
