import json

import click


@click.command("doctor")
@click.argument("checkpoint", required=False, type=click.Path())
@click.option("--config", "config_name", default=None, metavar="NAME",
              help="The model whose needs to show: helios-14b (the default), or pass a CHECKPOINT folder.")
@click.option("--path", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Where the artifacts will go: its free disk is compared with what the steps write.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(checkpoint, config_name, path, as_json):
    """What this host can do: torch and CUDA, TensorRT (>= 10.1?), ONNX Runtime's providers, tritonserver,
    ffmpeg, RAM and disk against what each step needs for the model, and what to install for the rest.

    Exits 0 whatever the host lacks (a host without a GPU is a host for the CPU steps).

    \b
    Examples:
      helios-deploy doctor                        # Helios-14B's needs (docs/scale.md)
      helios-deploy doctor --path /data/engines   # free disk where the artifacts will go
      helios-deploy doctor engines/tiny --json    # a checkpoint's own size, as JSON
    """
    from ..doctor import diagnose, render

    report = diagnose(checkpoint, config_name, path)
    click.echo(json.dumps(report, indent=2) if as_json else render(report))
