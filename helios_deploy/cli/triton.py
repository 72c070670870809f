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
@click.option("--instances", type=int, default=1, show_default=True, help="Model instances per GPU (or on CPU).")
@click.option("--gpus", default=None, metavar="LIST", help="GPU indices, e.g. 0,1: one instance group per GPU "
              "(KIND_GPU). Default: CPU for onnxruntime, GPU 0 for tensorrt.")
@click.option("--max-frames", type=int, default=660, show_default=True, help="Largest num_frames a request may ask for.")
@click.option("--copy-artifacts/--reference-artifacts", "copy", default=True, show_default=True,
              help="Copy the artifacts into the repository (self-contained, relocatable; hard links where "
                   "possible) or record their absolute path.")
@force_option
def command(artifacts, out, backend, precision, instances, gpus, max_frames, copy, force):
    """Write a Triton Inference Server model repository that streams video from ARTIFACTS.

    \b
    Examples:
      helios-deploy triton engines/tiny-onnx -o model_repo                        # CPU, onnxruntime
      helios-deploy triton engines/helios -o model_repo --backend tensorrt --precision fp8 --gpus 0,1
      helios-deploy triton engines/helios -o model_repo --reference-artifacts     # no copy of the weights
    """
    from ..serving.repository import RepoOptions, write_repository

    opts = RepoOptions(backend=backend, precision=precision, instances=instances, gpus=parse_gpus(gpus),
                       max_frames=max_frames, reference=not copy)
    report = write_repository(artifacts, out, opts, force=force, log=click.echo)
    click.echo(f"wrote {report.root}: models {', '.join(report.models)} (see {report.root}/README.md)")
