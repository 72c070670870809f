import click

from .options import force_option


def parse_gpus(value: str | None) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated GPU indices such as 0,1") from None


@click.command("triton")
@click.argument("artifacts", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False), help="Model repository folder.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="What the helios model's runtime runs (tensorrt needs engines from `build`).")
@click.option("--precision", type=click.Choice(["fp32", "fp8"]), default="fp32", show_default=True,
              help="fp8: the quantized transformer (run `quantize` first; with --backend tensorrt, engines "
                   "built --precision fp8).")
@click.option("--instances", type=int, default=1, show_default=True,
              help="With --plan-models: the plan models' instances per GPU. The helios model always runs ONE "
                   "instance per node, with one live-stream scheduler per GPU (--gpus).")
@click.option("--gpus", default=None, metavar="LIST", help="GPU indices, e.g. 0,1: the node's one helios instance "
              "runs a scheduler per GPU (KIND_MODEL); a new stream goes to the GPU with the most room. Default: "
              "CPU for onnxruntime, GPU 0 for tensorrt.")
@click.option("--max-frames", type=int, default=660, show_default=True, help="Largest num_frames a request may ask for.")
@click.option("--copy-artifacts/--reference-artifacts", "copy", default=True, show_default=True,
              help="Copy the artifacts into the repository (self-contained, relocatable; hard links where "
                   "possible) or record their absolute path.")
@click.option("--max-streams", type=int, default=None,
              help="Live streams per GPU (scheduler) at most (default: as many as its measured chunk time allows).")
@click.option("--chunk-seconds", type=float, default=None,
              help="A chunk's time for admission (default: measured on a warm-up chunk when the model loads).")
@click.option("--fps", type=float, default=24.0, show_default=True, help="Playback rate the stream deadlines follow.")
@click.option("--queue/--refuse", default=False, show_default=True,
              help="Over capacity: queue new streams, or refuse them at once (UNAVAILABLE).")
@click.option("--max-batch", type=int, default=1, show_default=True,
              help="Streams whose transformer calls may share one call (TensorRT: engines built with --max-batch).")
@click.option("--plan-models", is_flag=True, help="Also write a helios_<component> tensorrt_plan model per engine, "
              "loaded on request only (each holds its engine's weights a second time on the GPU).")
@click.option("--triton-release", default=None, metavar="YY.MM", help="NVIDIA Triton container release to run; "
              "refused unless it ships the engines' TensorRT. Default: the newest listed one that does; "
              "with --plan-models required (the -py3 release that ships it; checked when the container starts).")
@force_option
def command(artifacts, out, backend, precision, instances, gpus, max_frames, copy, max_streams, chunk_seconds, fps,
            queue, max_batch, plan_models, triton_release, force):
    """Write a Triton Inference Server model repository that streams video from ARTIFACTS.

    \b
    Examples:
      helios-deploy triton engines/tiny-onnx -o model_repo                        # CPU, onnxruntime
      helios-deploy triton engines/helios -o model_repo --backend tensorrt --precision fp8 --gpus 0,1
      helios-deploy triton engines/helios -o model_repo --reference-artifacts     # no copy of the weights
      helios-deploy triton engines/tiny-onnx -o model_repo --max-streams 4 --queue  # live streams per scheduler
      helios-deploy triton engines/helios -o model_repo --backend tensorrt --plan-models --triton-release 26.02
    """
    from ..serving.repository import RepoOptions, write_repository

    opts = RepoOptions(backend=backend, precision=precision, instances=instances, gpus=parse_gpus(gpus),
                       max_frames=max_frames, reference=not copy, max_streams=max_streams,
                       chunk_seconds=chunk_seconds, fps=fps, queue=queue, max_batch=max_batch,
                       plan_models=plan_models, triton_release=triton_release)
    report = write_repository(artifacts, out, opts, force=force, log=click.echo)
    click.echo(f"wrote {report.root}: models {', '.join(report.models)} (see {report.root}/README.md)")
    if report.deployment.tensorrt:
        click.echo(f"TensorRT {report.deployment.tensorrt}: {report.deployment.image}")
