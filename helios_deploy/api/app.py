"""The FastAPI app: OpenAI-style video jobs, the live-stream WebSocket, the page, health and /metrics.

    app = create_app(backend, JobStore("jobs/"), keys=("...",))
    uvicorn.run(app, host="127.0.0.1", port=8080)

Every route but the health checks and the page's static files needs a bearer key (security.py); the page
itself holds no data and asks for the key before it opens the socket. Nothing blocks the event loop: backend
calls, store queries and image decoding run on threads (ApiState.call), H.264 on the encoder's own threads.

Health: /health/live fails (503) when the backend's worker is dead or its runners are broken (restart me);
/health/ready fails when the backend cannot serve (Triton unreachable, not yet started); /health is both.
They answer from the last probe (a thread asks the backend every PROBE_EVERY_S seconds), so they answer at
once even when the backend hangs; a probe that has not answered for PROBE_TIMEOUT_S counts as not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources

from fastapi import Depends, FastAPI, Request, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, Response

from . import errors, realtime, steer, videos
from .errors import ApiError
from .fmp4 import EncodeMeter
from .jobs import JobStore
from .metrics import Metrics
from .security import BodyLimit, KeyCheck, Limits, key_label

PAGE_FILES = {"app.js": "text/javascript"}
PROBE_EVERY_S = 1.0
PROBE_TIMEOUT_S = 3.0


@dataclass
class ApiState:
    backend: object
    store: JobStore
    keys: KeyCheck
    limits: Limits
    fps: float
    crf: int
    models: tuple[str, ...]
    metrics: Metrics | None = None  # set by create_app
    jobs: "videos.JobRunner | None" = None
    encode: EncodeMeter | None = None
    health: "HealthMonitor | None" = None
    open_streams: dict = field(default_factory=dict)  # live stream id (or a reservation) -> key label
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(256, thread_name_prefix="helios-api"))
    _tokens: itertools.count = field(default_factory=itertools.count)

    def streams_of(self, key: str) -> int:
        return sum(1 for k in list(self.open_streams.values()) if k == key)

    async def call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on a thread: a blocking call (backend, store, image decode) off the loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    # live streams: a place is reserved (on the event loop, with no await between check and take) before the
    # stream is opened, so a burst of session.start messages cannot pass the per-key limit
    def reserve_stream(self, key: str) -> str:
        if self.streams_of(key) >= self.limits.max_streams_per_key:
            self.metrics.refused.labels("per_key_limit").inc()
            raise ApiError(429, f"this key already has {self.limits.max_streams_per_key} live streams",
                           "too_many_streams")
        token = f"reserved-{next(self._tokens)}"
        self.open_streams[token] = key
        return token

    def unreserve(self, token: str) -> None:
        self.open_streams.pop(token, None)
        self.encode.release(token)

    def opened_stream(self, token: str, stream_id: str) -> None:
        self.open_streams[stream_id] = self.open_streams.pop(token)
        self.encode.rename(token, stream_id)

    def close_stream(self, stream_id: str) -> bool:
        """Free a stream's place; True the first time (the caller then stops the stream)."""
        self.encode.release(stream_id)
        return self.open_streams.pop(stream_id, None) is not None


class HealthMonitor:
    """Asks the backend ``health() -> {"live", "ready", "detail"}`` on a thread, over and over; the routes
    read the last answer. Backends without health(): the in-process scheduler's worker thread, or Triton's
    readiness."""

    def __init__(self, backend):
        self.backend = backend
        self.last = self._probe()
        self.asked = self.answered = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="helios-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(PROBE_EVERY_S):
            self.asked = time.monotonic()
            self.last = self._probe()
            self.answered = time.monotonic()

    def _probe(self) -> dict:
        try:
            return dict(probe(self.backend))
        except Exception as e:  # noqa: BLE001 - a failing probe is the answer
            return {"live": True, "ready": False, "detail": f"the backend's health check failed: "
                                                            f"{type(e).__name__}: {e}"}

    def state(self) -> dict:
        out = {"live": bool(self.last.get("live")), "ready": bool(self.last.get("ready")),
               "detail": self.last.get("detail")}
        waiting = time.monotonic() - self.asked if self.asked > self.answered else 0.0
        if waiting > PROBE_TIMEOUT_S:
            out.update(ready=False, detail=f"the backend has not answered a health check for {waiting:.1f} s")
        return out


def probe(backend) -> dict:
    """The backend's health: its own health() when it has one (API-backend agent), else the worker thread of
    the in-process scheduler, else a Triton readiness call."""
    health = getattr(backend, "health", None)
    if callable(health):
        return health()
    scheduler = getattr(backend, "scheduler", None)
    if scheduler is not None:
        worker = getattr(scheduler, "_thread", None)
        alive = worker is not None and worker.is_alive() and not getattr(scheduler, "_closed", False)
        return {"live": alive, "ready": alive,
                "detail": "the live scheduler's worker thread runs" if alive else "the live scheduler's worker "
                "thread is dead: no stream can make progress"}
    from ..serving.client import HeliosClient

    with HeliosClient(backend.url, model=backend.model) as client:
        client.check_ready()
    return {"live": True, "ready": True, "detail": f"Triton at {backend.url} is ready"}


def create_app(backend, store: JobStore, keys: tuple[str, ...] = (), limits: Limits | None = None,
               fps: float = 24.0, crf: int = 23, models: tuple[str, ...] = ("helios",)) -> FastAPI:
    state = ApiState(backend, store, KeyCheck(keys), limits or Limits(), fps, crf, models)
    state.encode = EncodeMeter(state.limits.encode_workers, state.limits.encode_seconds, tuple(backend.sizes[0]))
    if hasattr(backend, "count_encode"):  # runners on this host's CPUs: the encode counts in their admission
        backend.count_encode(state.encode)
    if hasattr(backend, "share_prompts"):  # Triton nodes: prompt changes recorded in the store the replicas share
        backend.share_prompts(store)
    state.metrics = Metrics(store, backend, state.encode, fps)
    state.jobs = videos.JobRunner(state)
    state.health = HealthMonitor(backend)

    def auth(request: Request) -> str:
        key = state.keys.from_header(request.headers.get("authorization"))
        if key is None:
            raise ApiError(401, "missing or invalid API key: send the header Authorization: Bearer KEY",
                           "invalid_api_key")
        return key_label(key)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.health.start()
        yield
        state.health.stop()
        state.jobs.stop_all()  # their rows are marked failed when the store is opened next
        state.encode.close()
        state.pool.shutdown(wait=False)

    app = FastAPI(title="helios-deploy video API", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.api = state
    errors.install(app)
    app.include_router(videos.router(auth))
    app.include_router(steer.router(auth))  # POST/GET /v1/realtime/streams/{id}...: steering by id
    app.add_api_websocket_route("/v1/realtime/video", _ws)

    def health_answer(ok: bool, h: dict) -> JSONResponse:
        return JSONResponse({"status": "ok" if ok else "unavailable", "backend": backend.name, **h},
                            status_code=200 if ok else 503)

    @app.get("/health")
    async def health():
        h = state.health.state()
        return health_answer(h["live"] and h["ready"], h)

    @app.get("/health/live")
    async def health_live():
        h = state.health.state()
        return health_answer(h["live"], h)

    @app.get("/health/ready")
    async def health_ready():
        h = state.health.state()
        return health_answer(h["live"] and h["ready"], h)

    @app.get("/metrics")
    async def metrics(key: str = Depends(auth)):
        text = await state.call(state.metrics.render)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def page():
        return HTMLResponse(_page_file("index.html"))

    @app.get("/page/{name}")
    async def page_file(name: str):
        if name not in PAGE_FILES:
            raise ApiError(404, f"no page file {name!r}", "not_found")
        return Response(_page_file(name), media_type=PAGE_FILES[name])

    app.add_middleware(BodyLimit, limit=state.limits.max_body_bytes)
    return app


async def _ws(ws: WebSocket):
    await realtime.endpoint(ws)


@functools.lru_cache(maxsize=None)
def _page_file(name: str) -> str:
    return resources.files("helios_deploy.api").joinpath("page", name).read_text(encoding="utf-8")
