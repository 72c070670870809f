import click


@click.command("streams")
@click.argument("artifacts", type=click.Path())
@click.option("--concurrent", type=int, default=2, show_default=True, help="Streams started at once (5 ms apart).")
@click.option("--chunks", type=int, default=4, show_default=True, help="33-frame chunks per stream.")
@click.option("--via", type=click.Choice(["api", "triton", "cluster"]), default="api", show_default=True,
              help="api: LiveScheduler in this process; triton: a tritonserver on loopback (`make triton-env`); "
                   "cluster: --nodes tritonservers and 2 API replicas (with --failover), streams through the WebSocket.")
@click.option("--nodes", type=int, default=3, show_default=True, help="With --via cluster: Triton nodes to start.")
@click.option("--kill-node-at", type=int, default=None, metavar="CHUNK",
              help="With --via cluster: kill -9 the busiest node once a stream has received CHUNK chunks.")
@click.option("--drain-node-at", type=int, default=None, metavar="CHUNK",
              help="With --via cluster: SIGTERM (drain) the busiest node once a stream has received CHUNK chunks.")
@click.option("--store", default=None, metavar="postgresql://...",
              help="With --via cluster: the PostgreSQL job store the 2 API replicas share (default: one SQLite each).")
@click.option("--seed", type=int, default=0, show_default=True, help="First stream's seed (the others +1, +2, ...).")
@click.option("--fps", type=float, default=24.0, show_default=True, help="Playback rate the deadlines follow.")
@click.option("--chunk-seconds", type=float, default=None,
              help="A chunk's time for admission (default: measured on a warm-up chunk).")
@click.option("--max-streams", type=int, default=None, help="Cap on concurrent real-time streams.")
@click.option("--queue/--refuse", default=False, show_default=True, help="Over capacity: queue or refuse new streams.")
@click.option("--max-batch", type=int, default=1, show_default=True,
              help="Streams whose transformer calls may share one call (same size and settings).")
@click.option("--no-compare", is_flag=True, help="Skip generating each stream alone to compare its frames.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON.")
def command(artifacts, concurrent, chunks, via, nodes, kill_node_at, drain_node_at, store, seed, fps, chunk_seconds, max_streams, queue, max_batch, no_compare,
            json_path):
    """Run N live streams at once and report, per stream, first-chunk latency, the median chunk interval,
    deadline misses, and whether its frames equal the stream generated alone.

    \b
    Examples:
      helios-deploy streams engines/tiny-onnx --concurrent 4 --chunks 6
      helios-deploy streams engines/tiny-onnx --concurrent 2 --chunks 6 --via triton --json streams.json
      helios-deploy streams engines/tiny-onnx --concurrent 6 --chunks 4 --queue      # over capacity: queued
      helios-deploy streams engines/tiny-onnx --via cluster --nodes 3 --concurrent 6 --chunks 6 --kill-node-at 2
    """
    import json
    from pathlib import Path

    from ..measure.streams import format_report, run_streams

    if via == "cluster":
        from ..measure.cluster_streams import format_cluster_report, run_cluster

        report = run_cluster(artifacts, concurrent, chunks, nodes=nodes, kill_node_at=kill_node_at,
                             drain_node_at=drain_node_at, seed=seed, store=store, fps=fps,
                             chunk_seconds=chunk_seconds, max_streams=max_streams, compare=not no_compare)
        click.echo(format_cluster_report(report))
        if json_path:
            Path(json_path).write_text(json.dumps(report, indent=2))
            click.echo(f"wrote {json_path}")
        return
    report = run_streams(artifacts, concurrent, chunks, via=via, seed=seed, compare=not no_compare, fps=fps,
                         chunk_seconds=chunk_seconds, max_streams=max_streams, queue=queue, max_batch=max_batch)
    click.echo(format_report(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
        click.echo(f"wrote {json_path}")
