"""Run the API: pick the backend, open the job store, check keys and address, serve with uvicorn."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from .security import Limits, parse_keys, resolve_keys

KEY_ENV = "HELIOS_API_KEY"
MALLOC_ARENAS = 2  # glibc malloc arenas of the server process (its default: up to 8 per core)
_M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)


def open_backend(artifacts: str | None, triton: str | None, *, backend: str = "onnxruntime", device: str = "cpu",
                 fps: float = 24.0, max_streams: int | None = None, triton_model: str = "helios",
                 failover: bool = False):
    if artifacts:
        from .backends import InProcessBackend

        return InProcessBackend.open_artifacts(artifacts, backend=backend, device=device, fps=fps,
                                               max_streams=max_streams)
    from .backends import TritonBackend

    return TritonBackend(triton, model=triton_model, max_streams=max_streams, fps=fps, failover=failover)


def bound_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas (as MALLOC_ARENA_MAX does); True when set, False off glibc. Each thread that
    finds the arenas busy gets a new one (up to 8 per core), and each arena keeps the memory freed in it: the
    server's threads (event loop, backend calls, encoders, one per job) then held more and more freed memory.
    Measured in 5-minute soaks: malloc's free-but-held memory 24 -> 35 MB (RSS +7 MB, in use flat at 145 MB)
    with the default arenas; 9 -> 12 MB and flat after the first minute with 2. Call it before threads start."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, int(arenas)) == 1
    except (OSError, AttributeError):
        return False


def uvicorn_options(limits: Limits) -> dict:
    """uvicorn's settings for the API (besides host and port). The socket takes messages up to 4x the app's
    limit, so one over it gets the app's clear error. No permessage-deflate (uvicorn's default, and every client
    offers it): the chunks are H.264, which deflate does not shrink (a 170 KB 64x128 chunk by 0.1 %), yet each
    socket held a zlib compressor and every chunk was deflated on the event loop (~7 ms per 170 KB chunk)."""
    return {"log_level": "warning", "ws_max_size": 4 * limits.max_message_bytes, "ws_per_message_deflate": False}


def serve(*, artifacts: str | None, triton: str | None, store: str | Path, host: str = "127.0.0.1",
          port: int = 8080, api_key: str | None = None, insecure_no_key: bool = False, limits: Limits = Limits(),
          fps: float = 24.0, crf: int = 23, max_streams: int | None = None, backend: str = "onnxruntime",
          device: str = "cpu", videos: str | Path | None = None, retention: float | None = None,
          lease: float | None = None, failover: bool = False, log=print) -> None:
    """Check everything that can be checked before loading a model, then serve until SIGINT / SIGTERM."""
    import uvicorn

    from .app import create_app
    from .jobs import LEASE_SECONDS, open_store

    bound_malloc_arenas()
    if bool(artifacts) == bool(triton):
        raise UserError("pass --artifacts DIR (run in this process) or --triton HOST:PORT, one of them",
                        fix="helios-deploy api --artifacts engines/demo/artifacts")
    keys, made = resolve_keys(parse_keys(api_key if api_key is not None else os.environ.get(KEY_ENV)), host,
                              insecure_no_key)
    jobs = open_store(store, videos=videos, retention=retention, lease=lease or LEASE_SECONDS)
    if jobs.recovered:
        log(f"{jobs.recovered} job(s) left running by the last run are marked failed" if not jobs.requeue else
            f"{jobs.recovered} job(s) of replicas that stopped renewing their lease are re-queued")
    engine = open_backend(artifacts, triton, backend=backend, device=device, fps=fps, max_streams=max_streams,
                          failover=failover)
    try:
        app = create_app(engine, jobs, keys=keys, limits=limits, fps=fps, crf=crf)
        shown = "localhost" if host in ("127.0.0.1", "::1") else host
        log(f"serving on http://{shown}:{port}/ ({engine.name} backend, {engine.metrics()['capacity']} real-time "
            f"streams, jobs in {jobs.name}, videos in {jobs.videos.resolve()})")
        if made:
            log(f"API key for this run (no --api-key / {KEY_ENV} given): {made}")
        elif not keys:
            log("WARNING: serving without an API key (--insecure-no-key)")
        uvicorn.run(app, host=host, port=port, **uvicorn_options(limits))
    finally:
        engine.close()
        jobs.close()
