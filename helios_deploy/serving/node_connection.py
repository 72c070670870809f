"""One Triton node as a client reaches it: one gRPC channel and ONE bidirectional ModelStreamInfer stream on it
that every request to the node shares (stream opens and the in-band control requests ``action`` = set_prompt /
stop / progress / capacity / drain), the answers routed back by request id to each request's handler. The API's
cluster (api/cluster.py) and the CLI's HeliosClient (serving/client.py, through a ReplyQueue per request) speak to
nodes through it.

    node = NodeConnection("10.0.0.5:8001")
    rid = node.send(arrays, handler)            # handler(Reply) on the node's reader thread: it must not block
    node.control("progress", stream_id, owner)  # -> the node's JSON answer ({"error": {...}} included)
    node.ready(); node.sizes(); node.close()
    replies = ReplyQueue(max_buffered=8); node.send(arrays, replies); replies.take(timeout)  # a reader thread's

When the stream breaks (the node died: UNAVAILABLE, connection reset) every request on it gets a ``lost`` reply
and the node is marked down (``up`` False) until ``ready()`` finds it back; the next request opens a new stream
on the same channel. A stream with no request pending is closed after IDLE_CLOSE_S (a draining node, whose
model unloads, is not held by it). An error Triton makes itself names its request (``[request id: X] ...``).
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import uuid
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from ..errors import UserError

CONTROL_TIMEOUT = 5.0
IDLE_CLOSE_S = 2.0  # a node's stream with no request pending is closed after this (a draining node can exit)
_MAX_MESSAGE = 2**31 - 1  # a chunk at 384x640 is ~24 MB, its state ~5 MB: gRPC's 4 MB default is far too small
_OPTIONS = [("grpc.max_send_message_length", _MAX_MESSAGE), ("grpc.max_receive_message_length", _MAX_MESSAGE)]
_REQUEST_ID = re.compile(r"^\[request id: ([^\]]+)\]")


@dataclass
class Reply:
    """One answer to a request on a node: ``response`` (result: tritonclient InferResult), ``error`` (Triton
    refused or failed the request), ``final`` (no more answers), ``lost`` (the node's connection broke);
    ``overflow`` (a ReplyQueue's reader fell behind) only from a ReplyQueue."""

    kind: str
    result: object = None
    message: str = ""

    def output(self, name: str):
        return None if self.result is None else self.result.as_numpy(name)

    def text(self, name: str) -> str | None:
        value = self.output(name)
        if value is None or value.size == 0:
            return None
        raw = value.reshape(-1)[0]
        return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)

    def json(self, name: str = "control") -> dict | None:
        text = self.text(name)
        return None if text is None else json.loads(text)


class NodeUnavailable(UserError):
    """A node did not answer (down, unreachable, or too slow)."""


def infer_request(model: str, request_id: str, arrays: Mapping[str, np.ndarray]):
    """A ModelInferRequest of ``arrays`` (Triton data types from their numpy dtypes), asking for the empty
    final response that closes every decoupled request."""
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor

    req = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    req.parameters["triton_enable_empty_final_response"].bool_param = True
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        t = req.inputs.add()
        t.name, t.datatype = name, np_to_triton_dtype(arr.dtype)
        t.shape.extend(arr.shape)
        if arr.dtype == np.object_:
            data = serialize_byte_tensor(arr)
            req.raw_input_contents.append(data.item() if data.size else b"")
        else:
            req.raw_input_contents.append(np.ascontiguousarray(arr).tobytes())
    return req


def text_array(value: str | bytes) -> np.ndarray:
    return np.array([value if isinstance(value, bytes) else value.encode("utf-8")], dtype=np.object_)


def control_arrays(action: str, stream_id: str | None = None, owner: str | None = None,
                   prompt: str | None = None) -> dict[str, np.ndarray]:
    """A control request's inputs (those given)."""
    values = {"action": action, "stream_id": stream_id, "owner": owner, "prompt": prompt}
    return {k: text_array(v) for k, v in values.items() if v is not None}


class ReplyQueue:
    """One request's replies for a thread that reads them in turn: ``node.send(arrays, replies)``, then
    ``replies.take(timeout)`` for the next Reply (queue.Empty when none came in time). At most ``max_buffered``
    responses wait unread: at the next one, ``on_overflow()`` is called (once, on the node's reader thread: it must
    not block; e.g. stop the request on the node) and ``take`` gives Reply("overflow") after the responses already
    there, then nothing more: memory never grows with a slow reader. ``on_response(reply)`` sees every response
    on the reader thread as it arrives, before it waits in the queue."""

    def __init__(self, max_buffered: int | None = None, on_response: Callable[[Reply], None] | None = None,
                 on_overflow: Callable[[], None] | None = None):
        self.max_buffered, self._on_response, self._on_overflow = max_buffered, on_response, on_overflow
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.buffered, self.overflowed = 0, False  # responses in the queue not yet taken; the bound was passed

    def __call__(self, reply: Reply) -> None:
        if self.overflowed:
            return
        if reply.kind == "response":
            if self._on_response is not None:
                self._on_response(reply)
            with self._lock:
                self.overflowed = self.max_buffered is not None and self.buffered >= self.max_buffered
                self.buffered += not self.overflowed
            if self.overflowed:
                self._queue.put(Reply("overflow", message=f"{self.max_buffered} responses were waiting to be read"))
                if self._on_overflow is not None:
                    self._on_overflow()
                return
        self._queue.put(reply)

    def take(self, timeout: float | None = None) -> Reply:
        reply = self._queue.get(timeout=timeout)
        if reply.kind == "response":
            with self._lock:
                self.buffered -= 1
        return reply


class _Stream:
    """One bidirectional ModelStreamInfer stream: requests in through a queue, answers out by request id."""

    def __init__(self, stub, on_lost: Callable[["_Stream", str], None]):
        self.requests: queue.Queue = queue.Queue()
        self.handlers: dict[str, Callable[[Reply], None]] = {}
        self.lock = threading.Lock()
        self.alive, self.closing = True, False
        self._on_lost = on_lost
        self._responses = stub.ModelStreamInfer(iter(self.requests.get, None))
        threading.Thread(target=self._read, name="helios-node-reader", daemon=True).start()

    def send(self, request, handler: Callable[[Reply], None]) -> bool:
        """False when the stream has been closed meanwhile (idle or lost): send on a new one."""
        with self.lock:
            if not self.alive:
                return False
            self.handlers[request.id] = handler
        self.requests.put(request)
        return True

    def _idle(self) -> None:
        """After the last pending request: close the stream if still idle; the channel (TCP) stays."""
        with self.lock:
            if self.handlers or not self.alive:
                return
            self.alive, self.closing = False, True
        self.close()

    def forget(self, request_id: str) -> None:
        with self.lock:
            self.handlers.pop(request_id, None)

    def _read(self) -> None:
        import grpc

        try:
            for message in self._responses:
                self._dispatch(message)
            reason = "the node closed its stream"
        except grpc.RpcError as e:
            reason = f"{e.code().name}: {e.details()}"
        with self.lock:
            self.alive, handlers, self.handlers = False, self.handlers, {}
        self._on_lost(self, reason)
        for handler in handlers.values():
            _call(handler, Reply("lost", message=reason))

    def _dispatch(self, message) -> None:
        from tritonclient.grpc import InferResult

        r = message.infer_response
        match = _REQUEST_ID.match(message.error_message or "")
        request_id = r.id or (match.group(1) if match else "")
        final = "triton_final_response" in r.parameters and r.parameters["triton_final_response"].bool_param
        with self.lock:
            handler = self.handlers.get(request_id)
            if handler is not None and (final or message.error_message):
                del self.handlers[request_id]
                if not self.handlers:
                    timer = threading.Timer(IDLE_CLOSE_S, self._idle)
                    timer.daemon = True
                    timer.start()
        if handler is None:
            return  # a request forgotten (its reader left, its stream moved on) or an error that names none
        if message.error_message:
            return _call(handler, Reply("error", message=_REQUEST_ID.sub("", message.error_message).strip()))
        if r.outputs:
            _call(handler, Reply("response", InferResult(r)))
        if final:
            _call(handler, Reply("final"))

    def close(self) -> None:
        self.requests.put(None)
        self._responses.cancel()


def _why(error: Exception) -> str:
    """A gRPC failure's first line of details (else its type)."""
    detail = error.details() if callable(getattr(error, "details", None)) else str(error)
    return (detail or type(error).__name__).strip().splitlines()[0]


def _call(handler, reply: Reply) -> None:
    try:
        handler(reply)
    except Exception:  # noqa: BLE001 - one stream's bug must not stop the node's reader
        logging.getLogger("helios_deploy.serving").exception("a node reply handler failed")


class NodeConnection:
    """One Triton node (gRPC address): its shared stream, control requests over it, readiness and sizes."""

    def __init__(self, address: str, model: str = "helios"):
        import grpc
        from tritonclient.grpc import service_pb2_grpc

        self.address, self.model = address, model
        self.up, self.lost_reason = True, None
        self._channel = grpc.insecure_channel(address, options=_OPTIONS)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._conn: _Stream | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address}, {'up' if self.up else 'down'})"

    def send(self, arrays: Mapping[str, np.ndarray], handler: Callable[[Reply], None],
             request_id: str | None = None) -> str:
        """Send one request; ``handler`` gets its replies (on the node's reader thread: it must not block)."""
        request = infer_request(self.model, request_id or uuid.uuid4().hex, arrays)
        while True:
            with self._lock:
                if self._conn is None or not self._conn.alive:
                    self._conn = _Stream(self._stub, self._lost)
                conn = self._conn
            if conn.send(request, handler):
                return request.id

    def forget(self, request_id: str) -> None:
        """No more replies for this request (its reader left, or its stream moved to another node)."""
        conn = self._conn
        if conn is not None:
            conn.forget(request_id)

    def _lost(self, conn: _Stream, reason: str) -> None:
        with self._lock:
            if self._conn is conn:
                self._conn = None
            if not conn.closing:
                self.up, self.lost_reason = False, reason
                self.on_lost()

    def on_lost(self) -> None:
        """Called (under the node's lock) when its stream broke; subclasses forget what they cached."""

    def control(self, action: str, stream_id: str | None = None, owner: str | None = None,
                prompt: str | None = None, timeout: float = CONTROL_TIMEOUT) -> dict:
        """One control request to the ``helios`` model; its JSON answer (``{"error": {...}}`` included).
        NodeUnavailable when the node does not answer within ``timeout`` or fails the request."""
        arrays = control_arrays(action, stream_id, owner, prompt)
        done, box = threading.Event(), {}

        def handler(reply: Reply) -> None:
            if reply.kind == "response" and reply.output("control") is not None:
                box["answer"] = reply.json("control")
            elif reply.kind in ("error", "lost"):
                box["error"] = reply.message
            if reply.kind != "response":
                done.set()

        rid = self.send(arrays, handler)
        if not done.wait(timeout):
            self.forget(rid)
            raise NodeUnavailable(f"the Triton node {self.address} did not answer {action!r} within {timeout:g} s",
                                  fix="check the server's log")
        if "answer" not in box:
            raise NodeUnavailable(f"the Triton node {self.address} failed {action!r}",
                                  found=box.get("error") or "no control answer (is it serving helios-deploy's model?)")
        return box["answer"]

    def model_ready(self, timeout: float = 2.0) -> bool:
        """The model's readiness; NodeUnavailable when the node cannot be reached."""
        from tritonclient.grpc import service_pb2

        try:
            return self._stub.ModelReady(service_pb2.ModelReadyRequest(name=self.model), timeout=timeout).ready
        except Exception as e:  # noqa: BLE001 - any gRPC failure
            raise NodeUnavailable(f"cannot reach a Triton server at {self.address}", found=_why(e),
                                  fix="start the server, and pass its gRPC address (default port 8001)") from None

    def ready(self, timeout: float = 2.0) -> bool:
        try:
            ok = self.model_ready(timeout)
        except NodeUnavailable:
            ok = False
        if ok and not self.up:
            self.up, self.lost_reason = True, None
        return ok

    def sizes(self) -> tuple[tuple[int, int], ...]:
        """The (height, width) sizes the node's model takes, the default first (its config's ``sizes``)."""
        from tritonclient.grpc import service_pb2

        from ..model.sizes import parse_sizes

        config = self._stub.ModelConfig(service_pb2.ModelConfigRequest(name=self.model), timeout=10).config
        if "sizes" in config.parameters and config.parameters["sizes"].string_value:
            return parse_sizes(config.parameters["sizes"].string_value)
        dims = next(i.dims for i in config.input if i.name == "image")
        return ((int(dims[0]), int(dims[1])),)

    def unload(self, timeout: float = 30.0) -> str | None:
        """Ask Triton to unload the model (its repository API): its readiness fails at once and Triton refuses new
        requests, while those in flight finish. None when asked; else why not (e.g. no explicit model control)."""
        from tritonclient.grpc import service_pb2

        try:
            self._stub.RepositoryModelUnload(service_pb2.RepositoryModelUnloadRequest(model_name=self.model),
                                             timeout=timeout)
        except Exception as e:  # noqa: BLE001 - any gRPC failure: say why
            return _why(e)
        return None

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.closing = True
            conn.close()
        self._channel.close()
