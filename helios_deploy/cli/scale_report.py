import click


@click.command("scale-report")
@click.argument("checkpoints", nargs=-1, type=click.Path(file_okay=False))
@click.option("-o", "--out", "out", type=click.Path(file_okay=False), default="engines/scale-report", show_default=True,
              help="Folder for the report (scale_report.json, table.txt), each step's log and the artifacts.")
@click.option("--height", type=int, default=128, show_default=True)
@click.option("--width", type=int, default=128, show_default=True)
@click.option("--keep-high-precision", "keep", multiple=True, metavar="REGEX",
              help="Passed to quantize --precision fp8 (default: the patch embeddings, condition embedder and "
                   "proj_out, so every block of a few-block checkpoint is FP8).")
@click.option("--calibration-prompts", type=click.Path(dir_okay=False), help="Passed to quantize (default: built-in).")
@click.option("--keep-artifacts", is_flag=True, help="Keep each checkpoint's artifacts (default: removed after its chain).")
@click.option("--refit", is_flag=True,
              help="Run nothing: recompute the fits and the table of the report already in --out.")
def command(checkpoints, out, height, width, keep, calibration_prompts, keep_artifacts, refit):
    """Run the deploy chain (export, parity, quantize fp8, parity fp8, quantize bf16, build --dry-run,
    generate fp8) on each checkpoint, each step in its own process; record peak RSS, wall time and disk
    written per step; fit the growth per transformer block (and per text-encoder layer when the checkpoints
    vary in it) and extrapolate to Helios-14B (40 blocks, 24 UMT5 layers).

    \b
    Examples:
      for n in 1 2 4; do helios-deploy tiny-checkpoint engines/w$n --real-width-layers $n; done
      helios-deploy tiny-checkpoint engines/w1t2 --real-width-layers 1 --text-encoder-layers 2
      helios-deploy scale-report engines/w1 engines/w2 engines/w4 engines/w1t2 -o engines/scale
      helios-deploy scale-report --refit -o engines/scale      # the table again from scale_report.json
    """
    import json
    from pathlib import Path

    from ..errors import UserError
    from ..measure.scale import KEEP_ALL_BLOCKS, check_checkpoints, fits_of, report, table

    if refit:
        saved = Path(out) / "scale_report.json"
        try:
            result = fits_of(json.loads(saved.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read the scale report {saved}", found=str(e),
                            fix="run scale-report on checkpoints first (or pass the right -o)") from None
        saved.write_text(json.dumps(result, indent=2) + "\n")
    else:
        check_checkpoints(checkpoints)
        result = report(checkpoints, out, height, width, keep=list(keep) or KEEP_ALL_BLOCKS,
                        prompts=calibration_prompts,
                        keep_artifacts=keep_artifacts, log=lambda m: click.echo(m, err=True))
    text = table(result)
    (Path(out) / "table.txt").write_text(text + "\n")
    click.echo(text)
    click.echo(f"report: {Path(out) / 'scale_report.json'}")
