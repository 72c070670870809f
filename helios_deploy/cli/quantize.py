import click


@click.command("quantize")
@click.argument("artifacts", type=click.Path())
@click.option("--precision", type=click.Choice(["fp8"]), default="fp8", show_default=True)
@click.option("--components", default="transformer", show_default=True, metavar="LIST",
              help="transformer, optionally with text_encoder (comma-separated).")
@click.option("--calibration-prompts", type=click.Path(dir_okay=False),
              help="Text file, one prompt per line (default: a built-in set of 8 varied prompts).")
@click.option("--keep-high-precision", "keep", multiple=True, metavar="REGEX",
              help="Transformer layers to keep in high precision, by regex over module-qualified node names such as "
                   "'blocks.3.attn1.to_q/node_MatMul_1'; repeatable; replaces the default (patch embeddings, "
                   "condition_embedder, proj_out, first and last 3 blocks). 'none' keeps nothing.")
@click.option("--calibration-chunks", type=int, default=2, show_default=True,
              help="Chunks generated per prompt (the second and later chunks have real history).")
@click.option("--seed", type=int, default=0, show_default=True)
def command(artifacts, precision, components, calibration_prompts, keep, calibration_chunks, seed):
    """Quantize exported graphs to FP8 (E4M3 Q/DQ on the linear layers, FP8 weights), calibrated on the real
    sampler loop (all three pyramid stages, chunks with history). Writes ARTIFACTS/<component>/model.fp8.onnx
    (+ .data) and records the recipe, calibration hash and per-layer precision in the manifest.

    \b
    Examples:
      helios-deploy quantize engines/helios --precision fp8
      helios-deploy quantize ARTIFACTS --calibration-prompts prompts.txt --components transformer,text_encoder
      helios-deploy quantize ARTIFACTS --keep-high-precision '^patch_' --keep-high-precision '^proj_out/'
    """
    from ..export.quantize import quantize_artifacts

    names = [c.strip() for c in components.split(",") if c.strip()]
    patterns = None if not keep else [] if list(keep) == ["none"] else list(keep)
    result = quantize_artifacts(artifacts, names, prompts_file=calibration_prompts, keep=patterns,
                                chunks=calibration_chunks, seed=seed, log=lambda m: click.echo(m, err=True))
    for name, e in result["components"].items():
        counts = {p: sum(1 for v in e["layer_precision"].values() if v == p) for p in ("fp8", "fp32")}
        w = e["weight_bytes"]
        click.echo(f"{name}: {counts['fp8']} fp8 / {counts['fp32']} fp32 layers (linear + conv); quantized weights "
                   f"{w['fp32_graph']['fp32'] - w['fp8_graph']['fp32']} B fp32 -> {w['fp8_graph']['fp8']} B fp8; "
                   f"{e['file']} + {e['data']} ({e['data_bytes']} B)")
    click.echo(f"quantized in {result['seconds']:.1f}s")
