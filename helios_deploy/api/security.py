"""Who may call the API and how much: bearer keys, where it binds, body and request limits.

Keys come from ``--api-key`` or HELIOS_API_KEY (comma-separated: several keys, e.g. one per client). Every
route but /health and the page's static files answers 401 without one of them. Browsers cannot put a header
on a WebSocket, so the socket also takes the key as a subprotocol ``bearer.<key>`` beside ``helios.v1``.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
from dataclasses import dataclass

from ..errors import UserError

SUBPROTOCOL = "helios.v1"
KEY_PROTOCOL_PREFIX = "bearer."


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 16 << 20  # a request body (an input_reference image); over it: 413
    max_frames: int = 33 * 10  # frames of one job or stream; over it: 400
    max_jobs_per_key: int = 2  # queued or running jobs of one key; over it: 429
    max_streams_per_key: int = 2  # open WebSocket streams of one key; over it: 429
    max_message_bytes: int = 1 << 20  # one WebSocket message (a session.start may carry an image); over it: error
    max_prompt_chars: int = 4000  # a prompt change's text (session.interaction)
    max_backlog_chunks: int = 3  # chunks made for a viewer and not yet sent; over it the viewer is stopped
    send_buffer_bytes: int = 512 << 10  # bytes queued for one viewer below the app (socket + transport)
    encode_workers: int | None = None  # H.264 encoder threads (None: one per CPU this process may use)
    encode_seconds: float | None = None  # a chunk's encode time at the default size (None: measured)


def parse_keys(value: str | None) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in (value or "").split(",") if k.strip())
    short = [k for k in keys if len(k) < 16]
    if short:
        raise UserError(f"API key too short ({len(short[0])} characters)", expected="at least 16 characters",
                        fix="make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    bad = [k for k in keys if not all(c.isalnum() or c in "-_.~" for c in k)]
    if bad:
        raise UserError("API key has characters outside letters, digits and -_.~",
                        fix="make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return keys


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except OSError:
            return False


def resolve_keys(keys: tuple[str, ...], host: str, insecure_no_key: bool) -> tuple[tuple[str, ...], str | None]:
    """The keys to serve with, and a key made for this run (None if keys were given or none is wanted).
    Without keys: on loopback a random key is made and shown; on another address the server refuses to start
    unless ``insecure_no_key`` says the open API is meant."""
    if keys or insecure_no_key:
        return keys, None
    if not is_loopback(host):
        raise UserError(f"refusing to serve on {host} without an API key",
                        expected="--api-key KEY (or HELIOS_API_KEY) when binding to a non-loopback address",
                        fix="pass --api-key, or --insecure-no-key if the network in front is trusted")
    made = secrets.token_urlsafe(32)
    return (made,), made


class KeyCheck:
    def __init__(self, keys: tuple[str, ...]):
        self.keys = keys

    @property
    def open(self) -> bool:
        return not self.keys

    def match(self, candidate: str | None) -> str | None:
        """The key ``candidate`` is (compared in constant time), or None."""
        if self.open:
            return "anonymous"
        if not candidate:
            return None
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.encode(), candidate.encode()):
                found = key
        return found

    def from_header(self, authorization: str | None) -> str | None:
        scheme, _, token = (authorization or "").partition(" ")
        return self.match(token.strip() if scheme.lower() == "bearer" else None)

    def from_subprotocols(self, protocols: list[str]) -> str | None:
        for p in protocols:
            if p.startswith(KEY_PROTOCOL_PREFIX):
                return self.match(p[len(KEY_PROTOCOL_PREFIX):])
        return None


def key_label(key: str) -> str:
    """What is stored and logged for a key: never the key itself."""
    import hashlib

    return "anonymous" if key == "anonymous" else "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``limit`` bytes (by Content-Length, or while it streams)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            # the server's transport (uvicorn: the protocol's bound send), so the socket can bound its buffers
            scope["helios.transport"] = getattr(getattr(send, "__self__", None), "transport", None)
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send, int(length))
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge()
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send, seen)

    async def _refuse(self, send, size: int):
        import json

        body = json.dumps({"error": {"message": f"request body of {size} bytes is over this server's limit of "
                                                f"{self.limit} bytes", "type": "invalid_request_error",
                                     "param": None, "code": "body_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
