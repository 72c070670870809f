import time

import click

from .options import parse_steps, request_options, request_settings, request_size_options

__all__ = ["backend_option", "command", "parse_steps"]


def backend_option(f):
    return click.option("--backend", default="onnxruntime", show_default=True,
                        help="onnxruntime | tensorrt | torch, for all components or per component, e.g. "
                             "transformer=tensorrt,vae_decoder=torch.")(f)


def sampler_options(f):
    """Settings of the HeliosScheduler variants (Base, Mid) beyond the request_options (generate, bench)."""
    f = click.option("--cfg-zero-star/--no-cfg-zero-star", default=None,
                     help="Mid: CFG-Zero* guidance on or off (default: the checkpoint's is_cfg_zero_star).")(f)
    return click.option("--sampler", type=click.Choice(["unipc", "euler"]), default=None,
                        help="Base / Mid: HeliosScheduler's update (default: the checkpoint's scheduler_type).")(f)


@click.command("generate")
@click.argument("artifacts", type=click.Path())
@request_options
@request_size_options
@sampler_options
@click.option("--image", type=click.Path(dir_okay=False), help="Image for image-to-video.")
@click.option("--video", type=click.Path(dir_okay=False), help="Video for video-to-video (at least 33 frames).")
@backend_option
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--precision", type=click.Choice(["fp32", "fp8"]), default="fp32", show_default=True,
              help="fp8: the transformer graph from `quantize` (ONNX Runtime backend).")
@click.option("--low-memory", is_flag=True,
              help="ONNX Runtime sessions without prepacked weights: one copy of the weights in RAM instead of "
                   "about 1.7x (slower matmuls on CPU); for graphs near the host's RAM.")
@click.option("--fps", type=int, default=24, show_default=True)
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="Output .mp4 file.")
def command(artifacts, prompt, image, video, frames, seed, backend, device, precision, low_memory, fps, out,
            sampler, cfg_zero_star, height, width, **request):
    """Generate a video from exported artifacts and write it as H.264 mp4, chunk by chunk. The sampler is the
    checkpoint's own (Base: one stage, UniPC or Euler, CFG; Mid: pyramid, CFG-Zero*; Distilled: pyramid, DMD).

    \b
    Examples:
      helios-deploy generate engines/demo/artifacts --prompt "a cat in a kitchen" --frames 66 -o cat.mp4
      helios-deploy generate ARTIFACTS --prompt "a cat" --height 640 --width 384 -o portrait.mp4  # an exported size
      helios-deploy generate ARTIFACTS --prompt "the same scene at night" --image first.png -o i2v.mp4
      helios-deploy generate BASE_ARTIFACTS --prompt "a cat" --negative-prompt "blurry" --num-inference-steps 30 -o b.mp4
      helios-deploy generate MID_ARTIFACTS --prompt "a cat" --steps 5,5,5 --guidance-scale 4 -o mid.mp4
      helios-deploy generate ARTIFACTS --prompt "..." --backend transformer=torch -o bisect.mp4
      helios-deploy generate ARTIFACTS --prompt "a cat in a kitchen" --precision fp8 -o cat-fp8.mp4
    """
    from ..errors import UserError
    from ..runtime import Pipeline
    from ..runtime.video_io import write_mp4

    if image and video:
        raise UserError("pass --image or --video, not both")
    settings = request_settings(**request, sampler=sampler, cfg_zero_star=cfg_zero_star)
    pipe = Pipeline.from_artifacts(artifacts, backend=backend, device=device, precision=precision,
                                   low_memory=low_memory)
    height, width = pipe.check_size(height, width)  # one of the exported sizes, before anything runs
    chunks = max(1, (frames + 32) // 33) if frames > 0 else 0
    total = pipe.sampling(**settings).transformer_calls(chunks)  # also checks the settings before anything runs
    t0 = time.perf_counter()
    with click.progressbar(length=total, label="denoising", file=click.get_text_stream("stderr")) as bar:
        def on_step(stage, i):
            bar.update(1)

        stream = pipe.stream(prompt, num_frames=frames, seed=seed, image=image, video=video, on_step=on_step,
                             height=height, width=width, **settings)
        n = write_mp4(out, (c.frames for c in stream), fps=fps)
    click.echo(f"wrote {out}: {n} frames at {height}x{width} in {time.perf_counter() - t0:.1f}s")
