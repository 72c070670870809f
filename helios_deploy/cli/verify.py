import json
from pathlib import Path

import click

from .options import components_option, parse_components


@click.command("verify")
@click.argument("artifacts", type=click.Path())
@components_option
@click.option("--device", default="cuda", show_default=True, help="The GPU the engines run on (cuda or cuda:N).")
@click.option("--pipeline/--no-pipeline", default=True, show_default=True,
              help="Also generate a two-chunk video on the engines and score it against the fp32 pipeline "
                   "(PSNR per chunk).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report here.")
@click.option("--seed", type=int, default=0, show_default=True)
def command(artifacts, components, device, pipeline, json_path, seed):
    """Check every TensorRT engine against ONNX Runtime (the fp32 export) at every operating point, with
    Polygraphy's Comparator, and the pipeline on engines against the fp32 pipeline. Targets by the
    precision an engine was built at: fp32 rel_l2 <= 1e-3; bf16 rel_l2 <= 0.05, cosine >= 0.999; fp8
    rel_l2 <= 0.08, cosine >= 0.99; pipeline PSNR >= 40 / 30 / 30 dB per chunk. Exits 1 below a target.
    Needs TensorRT and an NVIDIA GPU.

    \b
    Example:
      helios-deploy verify engines/helios --json engines/verify.json
    """
    from ..errors import UserError
    from ..export.tensorrt.verify import verify

    report = verify(artifacts, parse_components(components) if components else None, device=device,
                    pipeline=pipeline, seed=seed)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    for component, graphs in report["components"].items():
        for graph, result in graphs.items():
            click.echo(f"{component}/{graph} ({result['precision']}): {'PASS' if result['passed'] else 'FAIL'}")
            for c in result["cases"]:
                click.echo(f"  {c['name']:10s} rel_l2 {c['rel_l2']:.3e}  cosine {c['cosine']:.6f}  "
                           f"{'ok' if c['passed'] else 'FAIL'}")
    if "pipeline" in report:
        p = report["pipeline"]
        sizes = p.get("per_size") or {"": p["psnr_db_per_chunk"]}
        per_chunk = "; ".join(f"{size + ' ' if len(sizes) > 1 else ''}{', '.join(f'{x:.1f}' for x in c)}"
                              for size, c in sizes.items())
        click.echo(f"pipeline ({p['precision']}): PSNR per chunk {per_chunk} dB "
                   f"(>= {p['threshold_psnr_db']}): {'PASS' if p['passed'] else 'FAIL'}")
    if not report["passed"]:
        raise UserError("verify failed", found="see the cases marked FAIL above",
                        fix="rebuild at a higher precision, or widen --keep-high-precision when quantizing")
    click.echo("verify passed")
