"""One gRPC connection to a node and the one bidirectional stream on it that every request shares (opens and
control requests alike), with the responses handed to each request by its request id.

tritonclient's gRPC client holds one stream at a time and calls one callback for every response; this module
keeps a Pending per request id and puts each response into its queue. A chunk queue is bounded: when a reader
falls ``max_buffered`` chunks behind, its request is stopped on the node (in band) and the reader gets the
chunks already there, then a UserError saying it fell behind; memory never grows with a slow reader.
An error response that Triton itself makes names its request (``[request id: X] ...``); a failure of the whole
stream (the node gone: UNAVAILABLE) ends every pending request with StreamError("unavailable"), and the next
request starts a new stream on the connection.
"""

from __future__ import annotations

import queue
import re
import threading
import uuid
from typing import Callable

from ..errors import UserError

_REQUEST_ID = re.compile(r"^\[request id: ([^\]]+)\]")
ERROR, RESULT = "error", "result"


class Pending:
    """The responses of one request, in order: (RESULT, result, final) or (ERROR, exception, True)."""

    def __init__(self, request_id: str, max_buffered: int | None):
        self.id, self.max_buffered = request_id, max_buffered
        self.queue: queue.Queue = queue.Queue()
        self.buffered = 0  # results in the queue not yet read
        self.answered = False  # a response has arrived
        self.stream_id: str | None = None  # an open's stream, from its first response
        self.abandoned = False  # the reader left before the stream was named: stop it when it is
        self.lock = threading.Lock()

    def take(self, timeout: float | None):
        item = self.queue.get(timeout=timeout)
        if item[0] == RESULT:
            with self.lock:
                self.buffered -= 1
        return item


def stream_level(error) -> bool:
    """A failure of the gRPC stream itself (tritonclient sets the gRPC status), not one request's error."""
    status = error.status() if callable(getattr(error, "status", None)) else None
    return bool(status) and not _REQUEST_ID.match(str(error.message() if callable(getattr(error, "message", None))
                                                       else error))


class Connection:
    """The shared stream of one tritonclient gRPC client: ``send`` a request, read its Pending."""

    def __init__(self, client, on_overflow: Callable[[Pending], None]):
        self._client, self._on_overflow = client, on_overflow
        self._pending: dict[str, Pending] = {}
        self._lock = threading.Lock()
        self._started = self._broken = self._closed = False

    def send(self, model: str, inputs, outputs, max_buffered: int | None = None) -> Pending:
        pending = Pending(uuid.uuid4().hex, max_buffered)
        with self._lock:
            if self._closed:
                raise UserError("this client is closed", fix="use a new HeliosClient")
            if self._broken:  # the last stream failed: end it (its reader thread has returned), start anew
                self._stop_quietly()
                self._started = self._broken = False
            if not self._started:
                self._client.start_stream(callback=self._on_response)
                self._started = True
            self._pending[pending.id] = pending
            try:
                self._client.async_stream_infer(model, inputs, outputs=outputs, request_id=pending.id,
                                                enable_empty_final_response=True)
            except Exception as e:  # noqa: BLE001 - the stream broke before this request: a fresh one next time
                self._pending.pop(pending.id, None)
                self._restart()
                raise _unavailable(str(e)) from None
        return pending

    def forget(self, pending: Pending) -> None:
        with self._lock:
            self._pending.pop(pending.id, None)

    def _on_response(self, result, error) -> None:
        if error is not None:
            return self._on_error(error)
        response = result.get_response()
        final = response.parameters["triton_final_response"].bool_param
        with self._lock:
            pending = self._pending.get(response.id)
            if pending is not None and final:
                del self._pending[response.id]
        if pending is None:
            return  # a request its reader gave up on
        pending.answered = True
        sid = result.as_numpy("stream_id")
        if sid is not None and pending.stream_id is None:
            pending.stream_id = sid.reshape(-1)[0].decode()
            if pending.abandoned:
                self._on_overflow(pending)
        with pending.lock:
            full = pending.max_buffered is not None and pending.buffered >= pending.max_buffered
            if not full:
                pending.buffered += 1
        if full:
            self.forget(pending)
            pending.queue.put((ERROR, UserError(
                f"the reader fell behind: {pending.buffered} chunks of stream {pending.stream_id} were waiting to be "
                "read", fix="read chunks as they come (or raise max_buffered); the stream was stopped"), True))
            self._on_overflow(pending)
            return
        pending.queue.put((RESULT, result, final))

    def _on_error(self, error) -> None:
        text = str(error.message() if callable(getattr(error, "message", None)) else error)
        if stream_level(error):
            with self._lock:
                failed, self._pending = list(self._pending.values()), {}
                self._restart()
            for pending in failed:
                pending.queue.put((ERROR, _unavailable(text), True))
            return
        match = _REQUEST_ID.match(text)
        with self._lock:
            if match:
                pending = self._pending.pop(match.group(1), None)
            else:  # no id: the oldest request that has had no response yet
                pending = next((p for p in self._pending.values() if not p.answered), None)
                if pending is not None:
                    del self._pending[pending.id]
        if pending is not None:
            pending.queue.put((ERROR, UserError("the Triton server refused or failed the request",
                                                found=_REQUEST_ID.sub("", text).strip()), True))

    def _restart(self) -> None:
        """Under the lock: the next send ends the failed stream and starts a new one (not here: this may be the
        stream's own reader thread, which stop_stream joins)."""
        self._broken = self._started

    def _stop_quietly(self) -> None:
        try:
            self._client.stop_stream(cancel_requests=True)
        except Exception:  # noqa: BLE001 - already broken
            pass

    def close(self) -> None:
        """Cancel every request still open on the stream (the node stops them) and end the stream."""
        with self._lock:
            started, self._started, self._broken, self._closed = self._started, False, False, True
            self._pending = {}
        if started:
            self._stop_quietly()


def _unavailable(text: str) -> UserError:
    from ..runtime.live import StreamError

    return StreamError("unavailable", "lost the connection to the node", found=text.strip().splitlines()[0]
                       if text.strip() else "the gRPC stream ended", fix="the node may be down: try another node")
