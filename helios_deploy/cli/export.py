import click

from .options import (components_option, force_option, lora_option, parse_components, parse_loras, resolve_sizes, revision_option, size_options,
                      sizes_option)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


@click.command("export")
@click.argument("checkpoint", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False), help="Artifact folder.")
@revision_option
@size_options
@sizes_option
@components_option
@click.option("--opset", type=int, default=20, show_default=True, help="ONNX opset (18-23).")
@click.option("--max-text-length", type=int, default=512, show_default=True,
              help="Longest prompt the graphs accept (UMT5 limit 512).")
@click.option("--text-length", type=int, default=None,
              help="Text length of the operating points (default: --max-text-length, what the pipeline pads to).")
@click.option("--audit/--no-audit", default=True, show_default=True,
              help="Check each graph (onnx.checker, ONNX Runtime, parity against the reference) before "
                   "moving the artifacts into place. Parity loads the reference weights in memory.")
@click.option("--report-memory", is_flag=True, help="Print the export's peak RSS against the weights size.")
@lora_option
@force_option
def command(checkpoint, out, revision, height, width, sizes, components, opset, max_text_length, text_length, audit,
            report_memory, loras, force):
    """Export a Helios checkpoint (diffusers layout: a local folder or a Hugging Face Hub id) to verified ONNX.

    A Hub id (org/name) is resolved in the hub cache (HF_HUB_CACHE, or HF_HOME/hub) with
    huggingface_hub, downloading only the files the export needs unless they are cached; with
    HF_HUB_OFFLINE=1 nothing is downloaded. The manifest records the repo id and the resolved commit.

    Writes OUT/<component>/model.onnx (+ external data; the VAE encoder also has first.onnx), OUT/manifest.json,
    the tokenizer and the scheduler config. Weights are streamed from the safetensors shards, so the
    14B transformer exports on a host with less RAM than the checkpoint (use --no-audit there).

    \b
    Examples:
      helios-deploy export engines/tiny -o engines/tiny-onnx --height 64 --width 128
      helios-deploy export engines/tiny -o engines/tiny-2 --sizes 64x128,128x64   # landscape and portrait
      helios-deploy export ~/models/Helios-Distilled -o engines/helios --no-audit --report-memory
      helios-deploy export BestWishYsh/Helios-Distilled -o engines/helios --no-audit --revision main
      helios-deploy export engines/tiny -o engines/tiny-lora --height 64 --width 128 --lora style.safetensors:0.8
    """
    from ..export.exporter.run import export_checkpoint

    manifest = export_checkpoint(
        checkpoint, out, height=height, width=width, sizes=resolve_sizes(height, width, sizes), components=parse_components(components), opset=opset,
        text_length=text_length or max_text_length, max_text_length=max_text_length, force=force,
        run_audit=audit, revision=revision, adapters=parse_loras(loras), log=lambda m: click.echo(m, err=True),
    )
    for name, comp in manifest["components"].items():
        graphs = ", ".join(f"{g['file']} ({g['nodes']} nodes, {g['export_seconds']:.1f}s)" for g in comp["graphs"].values())
        click.echo(f"{name:13s} {graphs}")
    if "audit" in manifest:
        click.echo("audit passed: " + ", ".join(f"{c} max rel_l2 {max(x['rel_l2'] for x in r['cases']):.1e}"
                                                for c, r in manifest["audit"].items()))
    if report_memory:
        rss, w = manifest["export_peak_rss_bytes"], manifest["weights_bytes"]
        click.echo(f"memory: export peak RSS {_gb(rss)}, weights {_gb(w)}, ratio {rss / w:.3f}")
    hub = manifest["checkpoint"].get("hub")
    if hub:
        click.echo(f"checkpoint: {hub['repo_id']} at commit {hub['commit']} (revision {hub['revision']})")
    for a in manifest["lora"]:
        into = [f"{len(e['lora_targets'])} {c} weights" for c, e in manifest["components"].items()
                if any(x["sha256"] == a["sha256"] for x in e.get("lora") or [])]
        click.echo(f"lora: {a['file']} scale {a['scale']} (sha256 {a['sha256'][:12]}) fused into {', '.join(into)}")
    click.echo(f"sizes: {', '.join(f'{h}x{w}' for h, w in manifest['video']['sizes'])} (default first)")
    click.echo(f"artifacts: {out}")
