import click

from .options import lora_option, parse_loras


@click.command("refit")
@click.argument("artifacts", type=click.Path())
@lora_option
@click.option("--no-lora", is_flag=True, help="Go back to the checkpoint's own weights (no adapter).")
def command(artifacts, loras, no_lora):
    """Swap the LoRA adapters fused into an export and its engines, without a rebuild.

    Rewrites the transformer's ONNX weights with the new adapters fused in (streamed from the checkpoint,
    one tensor at a time), refits each fp32 / bf16 engine built with `build --refittable` in place, setting only the
    weights that changed (TensorRT Refitter; needs the GPU), and records the new adapters, graph hashes and
    engine keys in the manifest. Weight-stripped engines (`build --strip-weights`) need no GPU here: the
    runner refits them from the ONNX at load. bf16 graphs (`quantize --precision bf16`) are lowered again
    from the new weights with their recipe; an FP8 graph is dropped from the manifest (re-run `quantize`:
    its weight scales and calibration come from the weights), and fp8 engines are refused. A Triton repository serving these artifacts picks the new weights up
    when the helios model is reloaded.

    \b
    Examples:
      helios-deploy refit engines/helios --lora style.safetensors:0.8
      helios-deploy refit engines/helios --lora a.safetensors:0.5 --lora b.safetensors
      helios-deploy refit engines/helios --no-lora
    """
    from ..errors import UserError
    from ..export.tensorrt.refit import refit_artifacts

    if bool(loras) == bool(no_lora):
        raise UserError("say which adapters to fuse", expected="--lora FILE[:SCALE] (repeatable) or --no-lora",
                        fix="helios-deploy refit ARTIFACTS --lora my_lora.safetensors:0.8")
    record = refit_artifacts(artifacts, parse_loras(loras), log=lambda m: click.echo(m, err=True))
    for a in record["lora"]:
        click.echo(f"lora: {a['file']} scale {a['scale']} (sha256 {a['sha256'][:12]})")
    for g, e in record["engines"].items():
        click.echo(f"engine {g}: {e['mode']}, {e['weights']} weights changed, {e['refit_seconds']:.2f}s")
    click.echo(f"weights fused and written in {record['fuse_write_seconds']:.2f}s; refit done in {record['seconds']:.2f}s")
