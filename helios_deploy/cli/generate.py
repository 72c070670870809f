import time

import click

from .options import request_options


def parse_steps(value: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers such as 1,1,1") from None
    if not steps or any(s < 1 for s in steps):
        raise click.BadParameter(f"{value!r}: every stage needs at least one step")
    return steps


def backend_option(f):
    return click.option("--backend", default="onnxruntime", show_default=True,
                        help="onnxruntime | tensorrt | torch, for all components or per component, e.g. "
                             "transformer=tensorrt,vae_decoder=torch.")(f)


@click.command("generate")
@click.argument("artifacts", type=click.Path())
@request_options
@click.option("--image", type=click.Path(dir_okay=False), help="Image for image-to-video.")
@click.option("--video", type=click.Path(dir_okay=False), help="Video for video-to-video (at least 33 frames).")
@backend_option
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--precision", type=click.Choice(["fp32", "fp8"]), default="fp32", show_default=True,
              help="fp8: the transformer graph from `quantize` (ONNX Runtime backend).")
@click.option("--fps", type=int, default=24, show_default=True)
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="Output .mp4 file.")
def command(artifacts, prompt, image, video, frames, seed, steps, amplify_first_chunk, backend, device, precision, fps,
            out):
    """Generate a video from exported artifacts and write it as H.264 mp4, chunk by chunk.

    \b
    Examples:
      helios-deploy generate engines/demo/artifacts --prompt "a cat in a kitchen" --frames 66 -o cat.mp4
      helios-deploy generate ARTIFACTS --prompt "the same scene at night" --image first.png -o i2v.mp4
      helios-deploy generate ARTIFACTS --prompt "..." --backend transformer=torch -o bisect.mp4
      helios-deploy generate ARTIFACTS --prompt "a cat in a kitchen" --precision fp8 -o cat-fp8.mp4
    """
    from ..errors import UserError
    from ..runtime import Pipeline
    from ..runtime.video_io import write_mp4

    if image and video:
        raise UserError("pass --image or --video, not both")
    pyramid = parse_steps(steps)
    pipe = Pipeline.from_artifacts(artifacts, backend=backend, device=device, precision=precision)
    chunks = max(1, (frames + 32) // 33) if frames > 0 else 0
    total = sum(pyramid) * chunks + (sum(pyramid) if amplify_first_chunk else 0)
    t0 = time.perf_counter()
    with click.progressbar(length=total, label="denoising", file=click.get_text_stream("stderr")) as bar:
        def on_step(stage, i):
            bar.update(1)

        stream = pipe.stream(prompt, num_frames=frames, seed=seed, image=image, video=video, pyramid_steps=pyramid,
                             amplify_first_chunk=amplify_first_chunk, on_step=on_step)
        n = write_mp4(out, (c.frames for c in stream), fps=fps)
    click.echo(f"wrote {out}: {n} frames in {time.perf_counter() - t0:.1f}s")
