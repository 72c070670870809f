import click


@click.command("demo")
@click.option("-o", "--output", "out", default="engines/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--height", type=int, default=64, show_default=True)
@click.option("--width", type=int, default=128, show_default=True)
def command(out, height, width):
    """The embedded default on CPU: trained tiny checkpoint -> export (audited) -> two-chunk mp4 -> adherence ->
    pipeline parity.

    The checkpoint is a tiny Helios-Distilled trained on procedural videos ("a yellow circle moving right");
    a strip of a few frames is written beside the video (demo-strip.png) and what the video shows is measured
    against the prompt. Third-party warnings and progress bars go to OUTPUT/demo.log, not to the terminal.

    \b
    Example:
      helios-deploy demo -o engines/demo
    """
    from ..demo import run_demo

    run_demo(out, height=height, width=width)
