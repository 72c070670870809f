import click


@click.command("quantize")
@click.argument("artifacts", type=click.Path())
@click.option("--precision", type=click.Choice(["fp8", "bf16"]), default="fp8", show_default=True,
              help="fp8: calibrated FP8 linear layers (also lowered to bf16 elsewhere, what TensorRT builds); "
                   "bf16: every graph lowered to bf16 for bf16 engines and for the non-FP8 engines of an fp8 build.")
@click.option("--components", default=None, metavar="LIST",
              help="fp8: transformer (default), optionally with text_encoder; bf16: any (default: all).")
@click.option("--calibration-prompts", type=click.Path(dir_okay=False),
              help="Text file, one prompt per line (default: a built-in set of 8 varied prompts).")
@click.option("--keep-high-precision", "keep", multiple=True, metavar="REGEX",
              help="Transformer layers to keep in high precision, by regex over module-qualified node names such as "
                   "'blocks.3.attn1.to_q/node_MatMul_1'; repeatable; replaces the default (patch embeddings, "
                   "condition_embedder, proj_out, first and last 3 blocks). 'none' keeps nothing. With bf16: nodes "
                   "of the exported graphs to keep in fp32 (added to Sin/Cos and their arguments).")
@click.option("--calibration-chunks", type=int, default=2, show_default=True,
              help="Chunks generated per prompt (the second and later chunks have real history).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="fp8: where calibration runs the fp32 sampler loop (ONNX Runtime's CPU provider, or CUDA on a GPU "
                   "host with onnxruntime-gpu). It holds one copy of the fp32 weights of the text encoder, transformer "
                   "and VAE decoder graphs (docs/scale.md gives the memory per model size).")
@click.option("--fp8-attention", "fp8_attention", is_flag=True,
              help="fp8: also Q/DQ on both attention matmuls (Q.K^T and softmax.V) in the placement TensorRT's fused "
                   "FP8 attention needs, calibrated like the linear layers (opt-in: see docs/quantize-and-build.md).")
@click.option("--fp8-vae", "fp8_vae", is_flag=True,
              help="fp8: also FP8 convolutions in the VAE decoder where TensorRT runs them in FP8 (input and output "
                   "channels > 16, filters of at most 32 elements; first and last convolutions kept), calibrated in "
                   "the same run (opt-in: see docs/quantize-and-build.md).")
@click.option("--fp8-vae-min-channels", "vae_min_channels", type=int, default=None, metavar="N",
              help="With --fp8-vae: a decoder convolution becomes FP8 only with at least N input and output channels "
                   "(default 17: Model Optimizer's FP8 rule, > 16; at least 16, TensorRT's FP8 convolution kernels' "
                   "floor). Recorded in the manifest (rule.min_channels).")
@click.option("--seed", type=int, default=0, show_default=True)
def command(artifacts, precision, components, calibration_prompts, keep, calibration_chunks, device, seed,
            fp8_attention, fp8_vae, vae_min_channels):
    """Quantize exported graphs to FP8 (E4M3 Q/DQ on the linear layers, FP8 weights), calibrated on the real
    sampler loop (all three pyramid stages, chunks with history). Writes ARTIFACTS/<component>/model.fp8.onnx
    (+ .data) and records the recipe, calibration hash and per-layer precision in the manifest.

    \b
    Examples:
      helios-deploy quantize engines/helios --precision fp8
      helios-deploy quantize engines/helios --precision fp8 --device cuda   # calibrate on the GPU
      helios-deploy quantize engines/helios --precision fp8 --fp8-attention  # + FP8 attention
      helios-deploy quantize engines/helios --precision fp8 --fp8-attention --fp8-vae  # + FP8 VAE convolutions
      helios-deploy quantize ARTIFACTS --calibration-prompts prompts.txt --components transformer,text_encoder
      helios-deploy quantize ARTIFACTS --keep-high-precision '^patch_' --keep-high-precision '^proj_out/'
      helios-deploy quantize ARTIFACTS --precision bf16     # bf16 graphs for bf16 builds and the rest of fp8 ones
    """
    from ..export.transforms.quantize import quantize_artifacts
    from ..export.transforms.vae import KERNEL_MIN_CHANNELS, MIN_CHANNELS

    _check_min_channels(vae_min_channels, fp8_vae, KERNEL_MIN_CHANNELS)
    patterns = None if not keep else [] if list(keep) == ["none"] else list(keep)
    if precision == "bf16":
        if fp8_attention or fp8_vae:
            from ..errors import UserError

            flag = "--fp8-attention" if fp8_attention else "--fp8-vae"
            raise UserError(f"{flag} is an option of --precision fp8", fix="pass --precision fp8")
        from ..export.transforms.lowering import lower_artifacts
        from .options import parse_components

        comps = parse_components(components) if components else None
        manifest = lower_artifacts(artifacts, comps, keep_fp32=patterns or (),
                                   log=lambda m: click.echo(m, err=True))
        for name, entry in manifest["components"].items():
            for graph, record in (entry.get("bf16") or {}).items():
                n = record["recipe"]["nodes"]
                click.echo(f"{name}/{graph}: {record['file']} ({n['bf16']} bf16 / {n['fp32']} fp32 nodes)")
        return
    names = [c.strip() for c in (components or "transformer").split(",") if c.strip()]
    result = quantize_artifacts(artifacts, names, prompts_file=calibration_prompts, keep=patterns,
                                chunks=calibration_chunks, seed=seed, device=device,
                                log=lambda m: click.echo(m, err=True), attention=fp8_attention, vae=fp8_vae,
                                vae_min_channels=MIN_CHANNELS if vae_min_channels is None else vae_min_channels)
    for name, e in result["components"].items():
        if name == "vae_decoder":
            n = sum(v == "fp8" for v in e["layer_precision"].values())
            click.echo(f"{name}: {n} of {len(e['layer_precision'])} convolutions in FP8, {len(e['kept'])} kept in high "
                       f"precision; {e['file']} + {e['data']} ({e['data_bytes']} B)")
            continue
        counts = {p: sum(1 for v in e["layer_precision"].values() if v == p) for p in ("fp8", "fp32")}
        w = e["weight_bytes"]
        click.echo(f"{name}: {counts['fp8']} fp8 / {counts['fp32']} fp32 layers (linear + conv); quantized weights "
                   f"{w['fp32_graph']['fp32'] - w['fp8_graph']['fp32']} B fp32 -> {w['fp8_graph']['fp8']} B fp8; "
                   f"{e['file']} + {e['data']} ({e['data_bytes']} B)")
        if e.get("attention"):
            click.echo(f"{name}: {len(e['attention']['nodes'])} attentions in FP8 (Q.K^T and softmax.V), "
                       f"{len(e['attention']['kept'])} kept in high precision")
    click.echo(f"quantized in {result['seconds']:.1f}s")


def _check_min_channels(value, fp8_vae, floor):
    """--fp8-vae-min-channels goes with --fp8-vae and is at least TensorRT's FP8 convolution floor."""
    from ..errors import UserError

    if value is None:
        return
    if not fp8_vae:
        raise UserError("--fp8-vae-min-channels is an option of --fp8-vae", fix="pass --precision fp8 --fp8-vae")
    if value < floor:
        raise UserError(f"--fp8-vae-min-channels must be at least {floor}", found=str(value),
                        expected=f"an integer >= {floor} (TensorRT's FP8 convolutions need at least {floor} input and "
                                 "output channels; Model Optimizer's FP8 rule is 17)")
