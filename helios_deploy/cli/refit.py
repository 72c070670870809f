from pathlib import Path

import click

from .options import lora_option, parse_loras


@click.command("refit")
@click.argument("artifacts", type=click.Path())
@lora_option
@click.option("--no-lora", is_flag=True, help="Go back to the checkpoint's own weights (no adapter).")
@click.option("--repository", type=click.Path(), default=None,
              help="A Triton model repository (helios-deploy triton) that serves ARTIFACTS by reference: its helios "
                   "model's lora parameter, README and tensorrt_plan copies are brought up to date. A repository "
                   "whose helios/artifacts is ARTIFACTS is updated without this option.")
def command(artifacts, loras, no_lora, repository):
    """Swap the LoRA adapters fused into an export and its engines, without a rebuild.

    Rewrites the ONNX weights of the transformer (and of the text encoder, when an old or a new adapter has
    weights for it) with the new adapters fused in (streamed from the checkpoint, one tensor at a time), refits
    each engine built with `build --refittable` in place, setting only the weights that changed (TensorRT
    Refitter; needs the GPU), and records the new adapters, graph hashes and engine keys in the manifest.
    Weight-stripped engines (`build --strip-weights`) need no GPU here: the runner refits them from the ONNX at
    load. bf16 graphs (`quantize --precision bf16`) are lowered again from the new weights with their recipe; an
    FP8 graph gets the changed layers quantized again (weight scales from the new weights, activation scales
    kept from its calibration: re-run `quantize --precision fp8` to calibrate the new model). A Triton
    repository serving these artifacts (REPO/helios/artifacts, or --repository) is brought up to date; the
    running server picks the new weights up when the helios model is reloaded.

    \b
    Examples:
      helios-deploy refit engines/helios --lora style.safetensors:0.8
      helios-deploy refit engines/helios --lora a.safetensors:0.5 --lora b.safetensors
      helios-deploy refit engines/helios --no-lora
    """
    from ..errors import UserError
    from ..export.tensorrt.refit import refit_artifacts
    from ..serving.repository import refresh_repository, repository_artifacts, served_by

    if bool(loras) == bool(no_lora):
        raise UserError("say which adapters to fuse", expected="--lora FILE[:SCALE] (repeatable) or --no-lora",
                        fix="helios-deploy refit ARTIFACTS --lora my_lora.safetensors:0.8")
    repo = repository or served_by(artifacts)
    if repository and repository_artifacts(Path(repository)).resolve() != Path(artifacts).resolve():
        raise UserError(f"the repository {repository} serves other artifacts",
                        found=f"its helios model serves {repository_artifacts(Path(repository))}",
                        fix="pass the repository whose helios model serves ARTIFACTS")
    record = refit_artifacts(artifacts, parse_loras(loras), log=lambda m: click.echo(m, err=True))
    if repo is not None:
        for line in refresh_repository(repo, artifacts):
            click.echo(f"repository: {line}")
        click.echo(f"repository {repo} is up to date: reload its helios model "
                   "(POST v2/repository/models/helios/load) to serve the new weights")
    for a in record["lora"]:
        click.echo(f"lora: {a['file']} scale {a['scale']} (sha256 {a['sha256'][:12]})")
    for g, e in record["engines"].items():
        click.echo(f"engine {g}: {e['mode']}, {e['weights']} weights changed, {e['refit_seconds']:.2f}s")
    click.echo(f"weights fused and written in {record['fuse_write_seconds']:.2f}s; refit done in {record['seconds']:.2f}s")
