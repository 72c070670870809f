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
    {"type": "session.warning", "code": "slow_consumer", "backlog_chunks"}   the viewer is falling behind
    {"type": "session.completed" | "session.stopped", "progress": {...}, "reason"?}
    {"type": "error", "error": {"code", "message", "param"}}   a bad message; the socket stays open
A client that closes the socket (or goes away) stops its stream at once. A viewer that reads slower than the
stream plays (more than Limits.max_backlog_chunks chunks made and not yet sent, or behind for longer than that
many chunk periods) is warned, then its stream is stopped (error code slow_consumer) and the socket closed with
1008; one whose socket stays full while one chunk's send waits that long is stopped at once (a warning would wait
behind the bytes it has not read): nothing is buffered without bound.
A message over Limits.max_message_bytes is refused (error code message_too_large, the socket stays open).
Auth: ``Authorization: Bearer KEY``, or the subprotocols ["helios.v1", "bearer.KEY"] (browsers).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

from fastapi import WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from ..errors import UserError
from .errors import ApiError, body, from_user_error
from .fmp4 import ChunkEncoder
from .requests import parse
from .security import SUBPROTOCOL, key_label

POLL_S = 0.25  # how often the sender looks up from waiting for a chunk (to notice a stop)
CLOSE_TIMEOUT_S = 2.0  # the longest a goodbye to a slow or gone client may take


class SlowConsumer(Exception):
    pass


class Session:
    def __init__(self, ws: WebSocket, state, key: str):
        self.ws, self.state, self.key = ws, state, key
        self.stream = None
        self.sender: asyncio.Task | None = None
        self.starting = False
        self.behind_since: float | None = None  # when the viewer last fell behind (chunks made and not yet sent)

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
            if isinstance(prompt, str) and len(prompt) > self.state.limits.max_prompt_chars:
                raise ApiError(400, f"prompt is {len(prompt)} characters; at most "
                               f"{self.state.limits.max_prompt_chars} are accepted", "invalid_request", "prompt")
            at = await self.state.call(self.stream.set_prompt, prompt)
            await self.ws.send_json({"type": "session.prompt_updated", "from_chunk": at, "prompt": prompt})
        elif kind == "session.stop":
            await self.stop()
        elif kind == "session.ping":
            await self.ws.send_json({"type": "session.pong"})
        else:
            raise ApiError(400, f"unknown message type {str(kind)[:40]!r}; expected session.start, "
                           "session.interaction, session.stop or session.ping", "unknown_message", "type")

    async def start(self, fields: dict) -> None:
        s = self.state
        if self.stream is not None or self.starting:
            raise ApiError(400, "this socket already streams; send session.stop first", "stream_open")
        token = s.reserve_stream(self.key)  # the per-key limit, taken before any await: a burst cannot pass it
        self.starting = True
        try:
            req = await s.call(parse, fields, sizes=s.backend.sizes, fps=s.fps, max_frames=s.limits.max_frames,
                               models=s.models)  # an input image is decoded off the event loop
            await s.call(s.encode.admit, token, req.size, s.fps)  # measured on the first stream
            opened = time.perf_counter()
            try:
                stream = await s.call(s.backend.open, req.prompt, owner=self.key, **req.backend_kwargs())  # steer.py
            except UserError as e:
                if getattr(e, "code", None) == "over_capacity":
                    s.metrics.refused.labels("over_capacity").inc()
                raise from_user_error(e) from None
        except BaseException:
            s.unreserve(token)
            raise
        finally:
            self.starting = False
        s.opened_stream(token, stream.id)
        self.stream = stream
        encoder = ChunkEncoder(fps=s.fps, crf=s.crf)
        try:
            await self.ws.send_json({"type": "session.started", "stream_id": stream.id, "height": req.size[0],
                                     "width": req.size[1], "fps": s.fps,
                                     "num_chunks": stream.progress()["num_chunks"], "mime": encoder.mime})
        except BaseException:
            await self.release(stream)
            raise
        self.behind_since = None
        self.sender = asyncio.create_task(self.send_chunks(stream, encoder, opened))

    async def send_chunks(self, stream, encoder: ChunkEncoder, opened: float) -> None:
        s, metrics = self.state, self.state.metrics
        period = 33 / s.fps
        try:
            while True:
                try:
                    chunk = await s.call(stream.next, POLL_S)
                except TimeoutError:
                    continue
                if chunk is None:
                    break
                latency = time.perf_counter() - opened
                if chunk.index == 0:
                    metrics.first_chunk.observe(latency)
                metrics.chunks.inc()
                await self.check_backlog(stream, chunk.index)
                data = await s.encode.encode(encoder, chunk.frames)
                meta = {"type": "video.chunk_metadata", "chunk_index": chunk.index, "frames": len(chunk.frames),
                        "bytes": len(data), "latency_s": latency, "mime": encoder.mime}
                try:  # a viewer whose socket takes no more than this is a slow consumer
                    await asyncio.wait_for(self._send_chunk(meta, data), s.limits.max_backlog_chunks * period)
                except asyncio.TimeoutError:
                    raise SlowConsumer(f"sending chunk {chunk.index} took over {s.limits.max_backlog_chunks} "
                                       f"chunk periods ({s.limits.max_backlog_chunks * period:.2f} s)") from None
            progress = stream.progress()
            await self.ws.send_json({"type": "session.stopped" if progress["status"] == "stopped"
                                     else "session.completed", "progress": progress})
        except SlowConsumer as e:
            await self.drop_slow_consumer(stream, str(e))
        except UserError as e:  # the stream failed
            await self.try_error(from_user_error(e))
        except (WebSocketDisconnect, RuntimeError, ConnectionError):
            pass  # the client went away while a chunk was being sent: release() stops its stream
        except Exception as e:  # noqa: BLE001 - reported to the client, the socket stays usable
            await self.try_error(ApiError(500, f"the stream failed: {type(e).__name__}: {e}", "stream_failed"))
        finally:
            await self.release(stream)

    async def try_error(self, e: ApiError, timeout: float = CLOSE_TIMEOUT_S) -> None:
        try:
            await asyncio.wait_for(self.error(e), timeout)
        except Exception:  # noqa: BLE001 - the client is gone: nobody to tell
            pass

    async def _send_chunk(self, meta: dict, data: bytes) -> None:
        await self.ws.send_json(meta)
        await self.ws.send_bytes(data)

    async def check_backlog(self, stream, index: int) -> None:
        """Chunks made but not yet sent (the stream's queue): warn at half the limit; stop beyond it, or when
        the viewer has stayed behind (never caught up) for more than ``limit`` chunk periods: one that reads
        steadily slower than the stream plays, whose backlog the bounded queue would otherwise hide."""
        limit, period = self.state.limits.max_backlog_chunks, 33 / self.state.fps
        backlog = stream.progress()["chunks_done"] - index - 1
        self.state.metrics.backlog.observe(max(0, backlog))
        now = time.perf_counter()
        warn = backlog >= max(1, limit // 2)
        self.behind_since = (self.behind_since or now) if warn else None
        if backlog > limit:
            raise SlowConsumer(f"{backlog} chunks were made and not yet sent (at most {limit})")
        if warn and now - self.behind_since > limit * period:
            raise SlowConsumer(f"it has been {backlog}+ chunks behind for {now - self.behind_since:.1f} s (more than "
                               f"{limit} chunk periods)")
        if warn:
            await self.ws.send_json({"type": "session.warning", "code": "slow_consumer", "backlog_chunks": backlog,
                                     "message": f"this viewer is {backlog} chunks behind the stream; at "
                                                f"{limit + 1} it is stopped"})

    async def drop_slow_consumer(self, stream, why: str) -> None:
        self.state.metrics.refused.labels("slow_consumer").inc()
        await self.release(stream)  # the stream stops first: its chunks are not kept for a viewer that lags
        message = (f"the stream was stopped: this viewer reads slower than the stream plays ({why}); read every "
                   "message as it arrives, or lower the size / frame rate")
        # the goodbye queues behind the bytes the viewer has not read yet: a viewer still reading (slowly) gets it
        # within a few chunk periods; one that reads nothing more is cut off after that (nothing else is held)
        goodbye = max(CLOSE_TIMEOUT_S, (self.state.limits.max_backlog_chunks + 1) * 33 / self.state.fps)
        await self.try_error(ApiError(400, message, "slow_consumer"), goodbye)
        try:
            await asyncio.wait_for(self.ws.close(code=1008, reason="slow consumer: stream stopped"), goodbye)
        except Exception:  # noqa: BLE001 - a client that cannot take the goodbye is gone anyway
            pass

    async def release(self, stream) -> None:
        """The stream is over for this socket: stop it on the backend (if it still runs) and free its place."""
        if self.stream is stream:
            self.stream = None
        if self.state.close_stream(stream.id):
            try:
                await self.state.call(stream.stop)
            except UserError:
                pass  # it ended meanwhile

    async def stop(self) -> None:
        stream, sender = self.stream, self.sender
        if stream is None:
            raise ApiError(400, "no stream to stop", "no_stream")
        try:
            await self.state.call(stream.stop)
        except UserError:
            pass  # it ended meanwhile: the sender reports how
        if sender is not None:
            await sender  # sends session.stopped once the stream has ended

    async def close(self) -> None:
        """The client went away: stop its stream now."""
        if self.stream is not None:
            await self.release(self.stream)
        if self.sender is not None:
            self.sender.cancel()


async def receive(ws: WebSocket, limit: int):
    """The next message as JSON; ApiError for one that is not JSON text or is over ``limit`` bytes."""
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    text = message.get("text")
    size = len(text.encode()) if text is not None else len(message.get("bytes") or b"")
    if size > limit:
        raise ApiError(413, f"message of {size} bytes is over this server's limit of {limit} bytes",
                       "message_too_large")
    if text is None:
        raise ApiError(400, "messages must be JSON text (this one was binary)", "invalid_json")
    try:
        return json.loads(text)
    except ValueError:
        raise ApiError(400, "messages must be JSON text", "invalid_json") from None


def bound_send_buffer(ws: WebSocket, size: int) -> bool:
    """Cap the bytes queued for this client below the app (the kernel's send buffer, which Linux would grow
    to 4 MB, and the event loop transport's), so a viewer that stops reading blocks our send within about
    ``size`` bytes and is found slow, instead of the bytes piling up. False if the server hides its socket."""
    transport = ws.scope.get("helios.transport")  # security.BodyLimit puts it there
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    transport.set_write_buffer_limits(high=size)
    return True


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
    bound_send_buffer(ws, state.limits.send_buffer_bytes)
    session = Session(ws, state, key_label(key))
    try:
        while True:
            try:
                await session.handle(await receive(ws, state.limits.max_message_bytes))
            except ApiError as e:
                await session.error(e)
            except UserError as e:
                await session.error(from_user_error(e))
            except (WebSocketDisconnect, asyncio.CancelledError):
                raise
            except Exception as e:  # noqa: BLE001 - one clear message instead of a bare 1011 close
                await session.error(ApiError(500, f"the server failed on this message: {type(e).__name__}: {e}",
                                             "internal_error"))
    except (WebSocketDisconnect, RuntimeError):
        pass  # RuntimeError: starlette's "not connected" after a close we sent (slow consumer)
    finally:
        await session.close()
