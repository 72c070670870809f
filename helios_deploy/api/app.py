"""The FastAPI app: OpenAI-style video jobs, the live-stream WebSocket, the page, /health and /metrics.

    app = create_app(backend, JobStore("jobs/"), keys=("...",))
    uvicorn.run(app, host="127.0.0.1", port=8080)

Every route but /health and the page's static files needs a bearer key (security.py); the page itself
holds no data and asks for the key before it opens the socket.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from importlib import resources

from fastapi import Depends, FastAPI, Request, WebSocket
from fastapi.responses import HTMLResponse, Response

from . import errors, realtime, steer, videos
from .errors import ApiError
from .jobs import JobStore
from .metrics import Metrics
from .security import BodyLimit, KeyCheck, Limits, key_label

PAGE_FILES = {"app.js": "text/javascript"}


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
    open_streams: dict = field(default_factory=dict)  # live stream id -> key label

    def streams_of(self, key: str) -> int:
        return sum(1 for k in list(self.open_streams.values()) if k == key)


def create_app(backend, store: JobStore, keys: tuple[str, ...] = (), limits: Limits | None = None,
               fps: float = 24.0, crf: int = 23, models: tuple[str, ...] = ("helios",)) -> FastAPI:
    state = ApiState(backend, store, KeyCheck(keys), limits or Limits(), fps, crf, models)
    state.metrics = Metrics(store, backend)
    state.jobs = videos.JobRunner(state)

    def auth(request: Request) -> str:
        key = state.keys.from_header(request.headers.get("authorization"))
        if key is None:
            raise ApiError(401, "missing or invalid API key: send the header Authorization: Bearer KEY",
                           "invalid_api_key")
        return key_label(key)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.jobs.stop_all()  # their rows are marked failed when the store is opened next

    app = FastAPI(title="helios-deploy video API", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.api = state
    errors.install(app)
    app.include_router(videos.router(auth))
    app.include_router(steer.router(auth))  # POST/GET /v1/realtime/streams/{id}...: steering by id
    app.add_api_websocket_route("/v1/realtime/video", _ws)

    @app.get("/health")
    async def health():
        return {"status": "ok", "backend": backend.name}

    @app.get("/metrics")
    async def metrics(key: str = Depends(auth)):
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

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


def _page_file(name: str) -> str:
    return resources.files("helios_deploy.api").joinpath("page", name).read_text(encoding="utf-8")
