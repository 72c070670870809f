import click


@click.command("stream-control")
@click.argument("url")
@click.argument("stream_id")
@click.option("--set-prompt", "new_prompt", default=None, help="The stream's prompt from its next chunk not yet started.")
@click.option("--stop", is_flag=True, help="End the stream now (its client gets the final response).")
@click.option("--progress", is_flag=True, help="Print the stream's progress as JSON.")
@click.option("--timeout", type=float, default=30.0, show_default=True)
def command(url, stream_id, new_prompt, stop, progress, timeout):
    """Change the prompt of, stop, or read a running stream on a Triton server (the helios_control model).

    \b
    Examples:
      helios-deploy stream-control localhost:8001 3f2a9c0d1e4b5a67 --set-prompt "a dog running on the beach"
      helios-deploy stream-control localhost:8001 3f2a9c0d1e4b5a67 --progress
      helios-deploy stream-control localhost:8001 3f2a9c0d1e4b5a67 --stop
    """
    import json

    from ..errors import UserError
    from ..serving.client import HeliosClient

    if sum([new_prompt is not None, stop, progress]) != 1:
        raise UserError("pass exactly one of --set-prompt, --stop, --progress")
    with HeliosClient(url, timeout=timeout) as client:
        if new_prompt is not None:
            click.echo(f"prompt changed from chunk {client.set_prompt(stream_id, new_prompt)}")
        elif stop:
            client.stop(stream_id)
            click.echo(f"stopped {stream_id}")
        else:
            click.echo(json.dumps(client.progress(stream_id), indent=2))
