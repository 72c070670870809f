import click

from .options import request_options, request_settings, request_size_options


@click.command("client")
@click.argument("url")
@request_options
@request_size_options
@click.option("--image", type=click.Path(dir_okay=False), help="Image for image-to-video (resized to the served size).")
@click.option("--video", type=click.Path(dir_okay=False), help="Video for video-to-video (resized to the served size).")
@click.option("--model", default="helios", show_default=True, help="Model name in the repository.")
@click.option("--fps", type=int, default=24, show_default=True)
@click.option("--timeout", type=float, default=None, help="Seconds to wait for each chunk (default: no limit).")
@click.option("--prompt-at", "prompt_at", multiple=True, metavar="CHUNK:PROMPT",
              help="Change the running stream's prompt once chunk CHUNK-1 has arrived (repeatable); the server "
                   "applies it from its next chunk not yet started, which is printed.")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="Output .mp4 file.")
def command(url, prompt, image, video, frames, seed, model, fps, timeout, prompt_at, out, height, width, **request):
    """Stream a generation from a Triton server over gRPC and write the mp4 as chunks arrive.

    \b
    Examples:
      helios-deploy client localhost:8001 --prompt "a cat in a kitchen" --frames 66 -o cat.mp4
      helios-deploy client localhost:8001 --prompt "the same scene at night" --image first.png -o i2v.mp4
      helios-deploy client localhost:8001 --prompt "a cat" --height 640 --width 384 -o portrait.mp4  # a served size
      helios-deploy client localhost:8001 --prompt "a cat" --negative-prompt "blurry" --num-inference-steps 30 -o b.mp4
      helios-deploy client localhost:8001 --prompt "a cat" --frames 330 --prompt-at 3:"a dog" -o pets.mp4
    """
    from ..errors import UserError
    from ..runtime.video_io import write_mp4
    from ..serving.client import HeliosClient, load_conditioning

    if image and video:
        raise UserError("pass --image or --video, not both")
    settings = request_settings(**request)
    changes = parse_prompt_changes(prompt_at)
    with HeliosClient(url, model=model, timeout=timeout) as client:
        client.check_ready()
        height, width = client.video_size(height, width)  # a size the server does not take: refused here
        image_arr, video_arr = load_conditioning(image, video, height, width) if image or video else (None, None)
        stream = client.stream(prompt, image=image_arr, video=video_arr, height=height, width=width,
                               num_frames=frames, seed=seed, **settings)
        last = [0.0]

        def progress(chunks):
            for chunk in chunks:
                if chunk.index == 0:
                    click.echo(f"stream {client.stream_id}; time to first chunk: {chunk.seconds:.2f}s", err=True)
                if chunk.index + 1 in changes:
                    at = client.set_prompt(client.stream_id, changes[chunk.index + 1])
                    click.echo(f"prompt changed from chunk {at}: {changes[chunk.index + 1]!r}", err=True)
                click.echo(f"chunk {chunk.index}: {len(chunk.frames)} frames at {chunk.seconds:.2f}s "
                           f"(+{chunk.seconds - last[0]:.2f}s)", err=True)
                last[0] = chunk.seconds
                yield chunk.frames
            if last[0] == 0.0:  # write_mp4 needs at least one chunk
                raise UserError("the server ended the stream without sending frames", fix="check the server's log")

        n = write_mp4(out, progress(stream), fps=fps)
    click.echo(f"wrote {out}: {n} frames in {last[0]:.1f}s")


def parse_prompt_changes(values) -> dict[int, str]:
    """--prompt-at CHUNK:PROMPT values -> {chunk: prompt}."""
    out = {}
    for value in values:
        chunk, sep, text = value.partition(":")
        if not sep or not chunk.strip().isdigit() or int(chunk) < 1 or not text.strip():
            raise click.BadParameter(f"{value!r}: expected CHUNK:PROMPT with CHUNK >= 1, e.g. 3:\"a dog\"",
                                     param_hint="--prompt-at")
        out[int(chunk)] = text
    return out

