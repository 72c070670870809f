import click


@click.command("api")
@click.option("--artifacts", type=click.Path(file_okay=False), default=None,
              help="Serve these exported artifacts in this process (the live-stream scheduler on this host).")
@click.option("--triton", multiple=True, metavar="HOST:PORT",
              help="Serve through Triton nodes' gRPC ports instead: several comma-separated or repeated, or a DNS name "
                   "resolving to several (a headless Service; resolved again every 10 s). New streams go to the node "
                   "with the most free real-time capacity.")
@click.option("--failover", is_flag=True,
              help="With --triton: keep each stream's state (a snapshot per chunk) and continue a stream on another "
                   "node when its node is lost or drains (costs the snapshot's bytes per chunk; docs/cluster.md).")
@click.option("--store", default="engines/api-jobs", show_default=True, metavar="DIR|postgresql://...",
              help="The job store, kept across restarts: a folder (SQLite, one server per folder) or a PostgreSQL "
                   "URL that several API replicas share.")
@click.option("--videos", type=click.Path(file_okay=False), default=None,
              help="Folder of the finished videos (default: STORE/videos); with PostgreSQL, required: a folder "
                   "every replica mounts.")
@click.option("--retention", default="7d", show_default=True,
              help="How long a finished job and its video are kept (seconds, or 90s, 15m, 24h, 7d; never).")
@click.option("--lease", type=float, default=30.0, show_default=True,
              help="With PostgreSQL: seconds after which a replica that stopped renewing its jobs' lease (it died) "
                   "has them run again by another replica.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--api-key", default=None, help="Bearer key(s), comma-separated (default: $HELIOS_API_KEY; none on "
                                              "loopback: a key is made and printed).")
@click.option("--insecure-no-key", is_flag=True, help="Serve without any key (refused otherwise off loopback).")
@click.option("--max-frames", type=int, default=330, show_default=True, help="Frames of one job or stream at most.")
@click.option("--max-jobs-per-key", type=int, default=2, show_default=True, help="Queued or running jobs per key.")
@click.option("--max-streams-per-key", type=int, default=2, show_default=True, help="Open live streams per key.")
@click.option("--max-body-mb", type=float, default=16, show_default=True, help="Largest request body (MB).")
@click.option("--max-message-kb", type=int, default=1024, show_default=True,
              help="Largest WebSocket message (KB); over it: an error message, the socket stays open.")
@click.option("--send-buffer-kb", type=int, default=512, show_default=True,
              help="Bytes queued for one viewer below the app (KB); a viewer that lets them fill is slow.")
@click.option("--encode-workers", type=int, default=None,
              help="H.264 encoder threads for live streams (default: one per CPU); admission counts their time.")
@click.option("--max-streams", type=int, default=None,
              help="Concurrent streams at most (default: in-process, what the measured chunk time allows in real "
                   "time; through Triton, what the server admits).")
@click.option("--fps", type=float, default=24.0, show_default=True, help="Playback rate of the videos and streams.")
@click.option("--crf", type=int, default=23, show_default=True, help="H.264 quality of the live stream (0 = best).")
@click.option("--backend", default="onnxruntime", show_default=True, help="With --artifacts: runner backend.")
@click.option("--device", default="cpu", show_default=True, help="With --artifacts: cpu or cuda[:N].")
def command(artifacts, triton, failover, store, videos, retention, lease, host, port, api_key, insecure_no_key, max_frames,
            max_jobs_per_key, max_streams_per_key, max_body_mb, max_message_kb, send_buffer_kb, encode_workers,
            max_streams, fps, crf, backend, device):
    """Serve OpenAI-style video jobs (/v1/videos), a live WebSocket (/v1/realtime/video) and a page that plays
    it (GET /), in front of the runtime in this process or a Triton server.

    \b
    Examples:
      helios-deploy api --artifacts engines/demo/artifacts              # prints a key; open http://localhost:8080/
      HELIOS_API_KEY=$(cat key.txt) helios-deploy api --artifacts ARTIFACTS --device cuda --backend tensorrt
      helios-deploy api --triton localhost:8001 --api-key KEY1,KEY2 --host 0.0.0.0 --store /data/jobs
      helios-deploy api --triton nodes:8001 --store postgresql://helios:PW@db/helios --videos /shared/videos
      curl -H "Authorization: Bearer $KEY" -F prompt="a cat" -F seconds=2 http://localhost:8080/v1/videos
    """
    from ..api.jobs import parse_duration
    from ..api.security import Limits
    from ..api.serve import serve

    limits = Limits(max_body_bytes=int(max_body_mb * (1 << 20)), max_frames=max_frames,
                    max_jobs_per_key=max_jobs_per_key, max_streams_per_key=max_streams_per_key,
                    max_message_bytes=max_message_kb << 10, send_buffer_bytes=send_buffer_kb << 10,
                    encode_workers=encode_workers)
    serve(artifacts=artifacts, triton=",".join(triton) or None, failover=failover, store=store, host=host, port=port, api_key=api_key,
          insecure_no_key=insecure_no_key, limits=limits, fps=fps, crf=crf, max_streams=max_streams,
          backend=backend, device=device, videos=videos, retention=parse_duration(retention), lease=lease,
          log=lambda m: click.echo(m, err=True))
