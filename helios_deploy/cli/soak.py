import click


@click.command("soak")
@click.argument("artifacts", type=click.Path())
@click.option("--via", type=click.Choice(["api", "triton"]), default="api", show_default=True,
              help="api: `helios-deploy api --artifacts` (runners in the API process); triton: the API in front "
                   "of a tritonserver on loopback (`make triton-env`).")
@click.option("--seconds", type=float, default=60.0, show_default=True, help="How long the clients run.")
@click.option("--clients", type=int, default=6, show_default=True,
              help="Clients, each of one kind in turn: good, bad, slow, vanish, jobs, good, ...")
@click.option("--warmup", type=float, default=None, help="Seconds before the first RSS reading (default: S/4, "
                                                         "at most 20).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON.")
def command(artifacts, via, seconds, clients, warmup, json_path):
    """Run the API server and C clients for S seconds: good streams with prompt changes, slow readers, clients
    that vanish, bad and oversized input, wrong keys, bursts over the per-key limit, job create/delete races;
    then check memory, streams left, 5xx, lost jobs and chunks, misses, /health latency and every bad input's
    answer. Exit code 1 when a check fails.

    \b
    Examples:
      helios-deploy soak engines/demo/artifacts --seconds 600 --clients 6 --json soak.json
      helios-deploy soak engines/demo/artifacts --via triton --seconds 120
    """
    import json
    from pathlib import Path

    from ..measure.soak import format_report, run_soak

    report = run_soak(artifacts, via=via, seconds=seconds, clients=clients, warmup=warmup,
                      log=lambda m: click.echo(m, err=True))
    click.echo(format_report(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
        click.echo(f"wrote {json_path}")
    if not report["ok"]:
        raise SystemExit(1)
