import json
from pathlib import Path

import click

from .options import parse_components, revision_option


def print_report(report: dict) -> None:
    for name, comp in report["components"].items():
        click.echo(f"{name} ({comp['precision']}): {'PASS' if comp['passed'] else 'FAIL'}")
        for c in comp["cases"]:
            click.echo(f"  {c['name']:16s} max_abs_err {c['max_abs_err']:.3e}  rel_l2 {c['rel_l2']:.3e}  "
                       f"cosine {c['cosine']:.8f}  {'ok' if c['passed'] else 'FAIL'}")
    if "pipeline" in report:
        reference = "HeliosPipeline" if report["pipeline"].get("variant") == "base" else "HeliosPyramidPipeline"
        click.echo(f"pipeline ({report['pipeline'].get('variant', 'distilled')} runtime vs {reference}): "
                   f"{'PASS' if report['pipeline']['passed'] else 'FAIL'}")
        for c in report["pipeline"]["cases"]:
            click.echo(f"  {c['name']:20s} frames {c['frames']}  max_abs_err {c['max_abs_err']:.3e}  "
                       f"{'ok' if c['passed'] else 'FAIL'}")
            if "psnr_db" in c:
                click.echo(f"    PSNR per chunk (dB): {', '.join(f'{v:.2f}' for v in c['psnr_db'])}; slope "
                           f"{c['slope_db_per_chunk']:+.3f} dB/chunk, last - first {c['drift_db']:+.2f} dB")
            else:
                click.echo(f"    max_abs_err per chunk: {', '.join(f'{v:.1e}' for v in c['max_abs_err_per_chunk'])}")
    if report.get("table"):
        click.echo(report["table"])


@click.command("parity")
@click.argument("checkpoint", type=click.Path())
@click.argument("artifacts", type=click.Path())
@revision_option
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report here.")
@click.option("--components", default=None, metavar="LIST", help="Subset of the exported components.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp8", "bf16"]), default="fp32", show_default=True,
              help="fp8: the graphs from `quantize` against the fp32 reference (cosine >= 0.99, rel_l2 <= 0.08; "
                   "with --pipeline, PSNR per chunk of the FP8 runtime against the fp32 reference pipeline); "
                   "bf16: the graphs from `quantize --precision bf16` in ONNX's reference evaluator "
                   "(rel_l2 <= 0.05).")
@click.option("--pipeline", is_flag=True, help="Also run the whole sampler against the checkpoint's diffusers pipeline "
              "(max abs error <= 1e-3 at every chunk): Distilled (HeliosPyramidPipeline) T2V, I2V, V2V, amplify on "
              "and off, 1,1,1 and 2,2,2, a prompt that changes every chunk; Base (HeliosPipeline) UniPC and Euler, "
              "guidance 5 and off, T2V and I2V; Mid (HeliosPyramidPipeline) 2,2,2 with CFG-Zero* on and off, I2V, "
              "Euler.")
@click.option("--chunks", type=click.IntRange(min=1), default=2, show_default=True,
              help="With --pipeline: how many 33-frame chunks each case streams; the error (fp8: PSNR and its "
                   "slope) is reported per chunk.")
def command(checkpoint, artifacts, revision, json_path, components, seed, precision, pipeline, chunks):
    """Compare exported ONNX (ONNX Runtime, CPU) with the reference modules at every operating point,
    at batch 2 and at a shape not used at export. Exits 1 when any case fails (fp32: rel_l2 <= 1e-4).
    CHECKPOINT may be a Hub id: without --revision it resolves at the commit the artifacts were exported from.

    \b
    Example:
      helios-deploy parity engines/tiny engines/tiny-onnx --json engines/parity.json
      helios-deploy parity engines/tiny engines/tiny-onnx --precision fp8 --pipeline
      helios-deploy parity engines/tiny engines/tiny-onnx --pipeline --chunks 12     # a long stream
    """
    from ..errors import UserError
    from ..export.parity.report import parity_report

    if chunks != 2 and not pipeline:
        raise UserError("--chunks is for the pipeline comparison", fix="add --pipeline")
    report = parity_report(checkpoint, artifacts, parse_components(components) if components else None, seed=seed,
                           pipeline=pipeline, precision=precision, revision=revision, chunks=chunks)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    if not report["passed"]:
        raise UserError("parity failed", found="see the cases marked FAIL above", fix="re-export, or inspect with --json")
    click.echo(f"parity passed{f'; report: {json_path}' if json_path else ''}")
