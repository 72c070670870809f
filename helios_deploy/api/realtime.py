"""WS /v1/realtime/video: a live stream, one fragmented-MP4 piece per chunk as soon as it is decoded.

Client -> server (JSON text):
    {"type": "session.start", "prompt": "...", "num_frames": 66, "seed": 0, "size": "128x64", ...}
    {"type": "session.interaction", "prompt": "..."}      change the prompt from the next chunk not started
    {"type": "session.stop"}                              stop now (the stream's state is freed)
    {"type": "session.ping"}
Server -> client:
    {"type": "session.started", "stream_id", "width", "height", "fps", "num_chunks", "mime"}
    per chunk: {"type": "video.chunk_metadata", "chunk_index", "frames", "bytes", "latency_s", "mime"}
               then one binary message: ftyp+moov+moof+mdat of that chunk (see fmp4.py)
    {"type": "session.prompt_updated", "from_chunk"}, {"type": "session.pong"}
    {"type": "session.completed" | "session.stopped", "progress": {...}}
    {"type": "error", "error": {"code", "message", "param"}}   a bad message; the socket stays open
A client that closes the socket (or goes away) stops its stream at once.
Auth: ``Authorization: Bearer KEY``, or the subprotocols ["helios.v1", "bearer.KEY"] (browsers).
"""

from __future__ import annotations

import asyncio
import time

from fastapi import WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from ..errors import UserError
from .errors import ApiError, body, from_user_error
from .fmp4 import ChunkEncoder
from .requests import parse
from .security import SUBPROTOCOL, key_label

POLL_S = 0.25  # how often the sender looks up from waiting for a chunk (to notice a stop)


class Session:
    def __init__(self, ws: WebSocket, state, key: str):
        self.ws, self.state, self.key = ws, state, key
        self.stream = None
        self.sender: asyncio.Task | None = None

    async def error(self, e: ApiError) -> None:
        await self.ws.send_json({"type": "error", **body(e.status, e.message, e.code, e.param)})

    async def handle(self, msg: dict) -> None:
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "session.start":
            await self.start({k: v for k, v in msg.items() if k != "type"})
        elif kind == "session.interaction":
            if self.stream is None:
                raise ApiError(400, "no stream to change: send session.start first", "no_stream")
            prompt = msg.get("prompt")
            at = await asyncio.to_thread(self.stream.set_prompt, prompt)
            await self.ws.send_json({"type": "session.prompt_updated", "from_chunk": at, "prompt": prompt})
        elif kind == "session.stop":
            await self.stop()
        elif kind == "session.ping":
            await self.ws.send_json({"type": "session.pong"})
        else:
            raise ApiError(400, f"unknown message type {kind!r}; expected session.start, session.interaction, "
                           "session.stop or session.ping", "unknown_message", "type")

    async def start(self, fields: dict) -> None:
        s = self.state
        if self.stream is not None:
            raise ApiError(400, "this socket already streams; send session.stop first", "stream_open")
        if s.streams_of(self.key) >= s.limits.max_streams_per_key:
            s.metrics.refused.labels("per_key_limit").inc()
            raise ApiError(429, f"this key already has {s.limits.max_streams_per_key} live streams", "too_many_streams")
        req = parse(fields, sizes=s.backend.sizes, fps=s.fps, max_frames=s.limits.max_frames, models=s.models)
        opened = time.perf_counter()
        try:
            self.stream = await asyncio.to_thread(s.backend.open, req.prompt, owner=self.key, **req.backend_kwargs())
        except UserError as e:
            if getattr(e, "code", None) == "over_capacity":
                s.metrics.refused.labels("over_capacity").inc()
            raise from_user_error(e) from None
        s.open_streams[self.stream.id] = self.key
        encoder = ChunkEncoder(fps=s.fps, crf=s.crf)
        await self.ws.send_json({"type": "session.started", "stream_id": self.stream.id, "height": req.size[0],
                                 "width": req.size[1], "fps": s.fps, "num_chunks": self.stream.progress()["num_chunks"],
                                 "mime": encoder.mime})
        self.sender = asyncio.create_task(self.send_chunks(self.stream, encoder, opened))

    async def send_chunks(self, stream, encoder: ChunkEncoder, opened: float) -> None:
        metrics = self.state.metrics
        try:
            while True:
                try:
                    chunk = await asyncio.to_thread(stream.next, POLL_S)
                except TimeoutError:
                    continue
                if chunk is None:
                    break
                latency = time.perf_counter() - opened
                if chunk.index == 0:
                    metrics.first_chunk.observe(latency)
                metrics.chunks.inc()
                data = await asyncio.to_thread(encoder.encode, chunk.frames)
                await self.ws.send_json({"type": "video.chunk_metadata", "chunk_index": chunk.index,
                                         "frames": len(chunk.frames), "bytes": len(data), "latency_s": latency,
                                         "mime": encoder.mime})
                await self.ws.send_bytes(data)
            progress = stream.progress()
            await self.ws.send_json({"type": "session.stopped" if progress["status"] == "stopped"
                                     else "session.completed", "progress": progress})
        except UserError as e:  # the stream failed
            await self.error(from_user_error(e))
        except Exception as e:  # noqa: BLE001 - reported to the client, the socket stays usable
            await self.error(ApiError(500, f"the stream failed: {type(e).__name__}: {e}", "stream_failed"))
        finally:
            self.release(stream)

    def release(self, stream) -> None:
        self.state.open_streams.pop(stream.id, None)
        if self.stream is stream:
            self.stream = None

    async def stop(self) -> None:
        stream, sender = self.stream, self.sender
        if stream is None:
            raise ApiError(400, "no stream to stop", "no_stream")
        stream.stop()
        if sender is not None:
            await sender  # sends session.stopped once the stream has ended

    async def close(self) -> None:
        """The client went away: stop its stream now."""
        if self.stream is not None:
            self.stream.stop()
            self.release(self.stream)
        if self.sender is not None:
            self.sender.cancel()


async def endpoint(ws: WebSocket) -> None:
    state = ws.app.state.api
    protocols = ws.scope.get("subprotocols", [])
    key = state.keys.from_header(ws.headers.get("authorization")) or state.keys.from_subprotocols(protocols)
    if key is None:
        await ws.send_denial_response(JSONResponse(body(401, "missing or invalid API key: send Authorization: "
                                                        "Bearer KEY or the subprotocol bearer.KEY",
                                                        "invalid_api_key"), status_code=401))
        return
    await ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in protocols else None)
    session = Session(ws, state, key_label(key))
    try:
        while True:
            try:
                msg = await ws.receive_json()
            except (ValueError, KeyError):
                await session.error(ApiError(400, "messages must be JSON text", "invalid_json"))
                continue
            try:
                await session.handle(msg)
            except ApiError as e:
                await session.error(e)
            except UserError as e:
                await session.error(from_user_error(e))
    except WebSocketDisconnect:
        pass
    finally:
        await session.close()
