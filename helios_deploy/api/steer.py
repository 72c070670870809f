"""Steer a live stream by id over HTTP, from any API replica (an application directing a stream that a viewer
watches through another replica's WebSocket):

    POST /v1/realtime/streams/{id}/interaction   {"prompt": "..."}   -> {"stream_id", "from_chunk", "prompt"}
    POST /v1/realtime/streams/{id}/stop                               -> {"stream_id", "stopped": true}
    GET  /v1/realtime/streams/{id}                                    -> the stream's progress

The same key rules as the WebSocket: only the key that opened the stream steers it (any other key gets 404,
as for an unknown id). The backend finds the stream: in process, its own scheduler; through Triton, the
stream's node when this replica holds it, else every node is asked by id with the key's owner digest.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from ..errors import UserError
from ..serving.node_connection import NodeUnavailable
from .cluster import owner_of
from .errors import ApiError, from_user_error


def _steer(request: Request, key: str, stream_id: str, action: str, prompt: str | None = None):
    backend = request.app.state.api.backend
    return run_in_threadpool(backend.steer, stream_id, action, owner_of(key), prompt)


async def _answer(request: Request, key: str, stream_id: str, action: str, prompt: str | None = None) -> dict:
    try:
        return await _steer(request, key, stream_id, action, prompt)
    except NodeUnavailable as e:
        raise ApiError(503, e.render(), "backend_unavailable") from None
    except UserError as e:
        raise from_user_error(e) from None


def router(auth) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/realtime/streams/{stream_id}/interaction")
    async def interaction(stream_id: str, request: Request, key: str = Depends(auth)):
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the body must be JSON: {\"prompt\": \"...\"}", "invalid_json") from None
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ApiError(400, "prompt must be a non-empty string (as in session.interaction)", "invalid_prompt",
                           "prompt")
        answer = await _answer(request, key, stream_id, "set_prompt", prompt)
        return {"stream_id": stream_id, "from_chunk": answer["from_chunk"], "prompt": prompt}

    @r.post("/v1/realtime/streams/{stream_id}/stop")
    async def stop(stream_id: str, request: Request, key: str = Depends(auth)):
        await _answer(request, key, stream_id, "stop")
        return {"stream_id": stream_id, "stopped": True}

    @r.get("/v1/realtime/streams/{stream_id}")
    async def progress(stream_id: str, request: Request, key: str = Depends(auth)):
        return await _answer(request, key, stream_id, "progress")

    return r
