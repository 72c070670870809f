import click


@click.command("stream-control")
@click.argument("url")
@click.argument("stream_id", required=False)
@click.option("--set-prompt", "new_prompt", default=None, help="The stream's prompt from its next chunk not yet started.")
@click.option("--stop", is_flag=True, help="End the stream now (its client gets the final response).")
@click.option("--progress", is_flag=True, help="Print the stream's progress as JSON.")
@click.option("--capacity", is_flag=True, help="Print the node's capacity, active streams and demand as JSON.")
@click.option("--drain", is_flag=True, help="Drain the node: it takes no new streams, its streams end as moved "
              "after their current chunk, and its helios model is unloaded so its readiness fails at once (what "
              "SIGTERM to `python -m helios_deploy.serving.server serve` does, but the server keeps running: load "
              "the model again with POST /v2/repository/models/helios/load on its HTTP port).")
@click.option("--owner", default="", help="The owner the stream was opened with (the API: sha256 hex of the API "
              "key); a stream of another owner is answered as unknown.")
@click.option("--timeout", type=float, default=30.0, show_default=True)
def command(url, stream_id, new_prompt, stop, progress, capacity, drain, owner, timeout):
    """Change the prompt of, stop, or read a running stream on a node (control requests to its helios model over
    the node's gRPC connection), or read / drain the node.

    \b
    Examples:
      helios-deploy stream-control localhost:8001 3f2a9c0d1e4b5a67 --set-prompt "a dog running on the beach"
      helios-deploy stream-control localhost:8001 3f2a9c0d1e4b5a67 --progress
      helios-deploy stream-control localhost:8001 3f2a9c0d1e4b5a67 --stop
      helios-deploy stream-control localhost:8001 --capacity
    """
    import json

    from ..errors import UserError
    from ..serving.client import HeliosClient

    if sum([new_prompt is not None, stop, progress, capacity, drain]) != 1:
        raise UserError("pass exactly one of --set-prompt, --stop, --progress, --capacity, --drain")
    if (capacity or drain) == bool(stream_id):
        raise UserError("pass a STREAM_ID with --set-prompt / --stop / --progress, and none with --capacity / --drain")
    with HeliosClient(url, timeout=timeout, owner=owner) as client:
        if new_prompt is not None:
            click.echo(f"prompt changed from chunk {client.set_prompt(stream_id, new_prompt)}")
        elif stop:
            client.stop(stream_id)
            click.echo(f"stopped {stream_id}")
        elif progress:
            click.echo(json.dumps(client.progress(stream_id), indent=2))
        elif capacity:
            click.echo(json.dumps(client.capacity(), indent=2))
        else:
            answer = client.drain()
            why_not = client.unload()  # readiness fails now, as on SIGTERM; the moved streams' answers still go
            answer["unloading"] = why_not is None
            if why_not is not None:
                answer["readiness"] = f"stays ready until the server stops: the model could not be unloaded ({why_not})"
            click.echo(json.dumps(answer, indent=2))
