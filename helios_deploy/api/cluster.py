"""The Triton nodes an API serves from: discovery, one long-lived gRPC connection per node, in-band control,
placement by free real-time capacity.

    cluster = Cluster("10.0.0.5:8001,10.0.0.6:8001")     # or "helios-triton-headless:8001" (a DNS name)
    for node in cluster.ranked():                          # most free real-time capacity first
        rid = node.send(arrays, handler)                   # handler(Reply) on the node's reader thread
    cluster.broadcast("stop", stream_id, owner)            # whichever node holds the stream answers

A node is one ``helios`` model behind one gRPC address. Every request to it (a stream's open, and the control
requests ``action`` = set_prompt / stop / progress / capacity) travels over ONE bidirectional
ModelStreamInfer stream on ONE channel, the answers routed back by request id; when that stream breaks (the
node died: UNAVAILABLE, reset) every request on it gets a ``lost`` reply and the node is marked down until a
readiness probe finds it back. A DNS name is resolved again every ``refresh_s`` seconds (a Kubernetes
headless Service lists one address per ready pod). ``owner`` (owner_of(key)) goes with every open and
control request: a node answers control only for streams opened with the same owner.
"""

from __future__ import annotations

import ipaddress
import json
import queue
import re
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import UserError

CAPACITY_TTL = 0.5  # seconds a node's capacity answer is reused for placement
REFRESH_S = 10.0  # DNS re-resolution and down-node probing period
CONTROL_TIMEOUT = 5.0
_MAX_MESSAGE = 2**31 - 1  # a chunk at 384x640 is ~24 MB, its state ~5 MB: gRPC's 4 MB default is far too small
_OPTIONS = [("grpc.max_send_message_length", _MAX_MESSAGE), ("grpc.max_receive_message_length", _MAX_MESSAGE)]


def owner_of(key_label: str) -> str:
    """What a node records as a stream's owner: the API key's label (security.key_label: a sha256 digest of the
    key, the same on every replica), so any replica serving that key may steer the stream."""
    return key_label


@dataclass
class Reply:
    """One answer to a request on a node: ``response`` (result: tritonclient InferResult), ``error`` (the
    node refused or failed the request), ``final`` (no more answers), ``lost`` (the node's connection broke)."""

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


class _Connection:
    """One bidirectional ModelStreamInfer stream: requests in through a queue, answers out by request id."""

    def __init__(self, stub, on_lost: Callable[["_Connection", str], None]):
        self.requests: queue.Queue = queue.Queue()
        self.handlers: dict[str, Callable[[Reply], None]] = {}
        self.lock = threading.Lock()
        self.alive = True
        self._on_lost = on_lost
        self._responses = stub.ModelStreamInfer(iter(self.requests.get, None))
        threading.Thread(target=self._read, name="helios-node-reader", daemon=True).start()

    def send(self, request, handler: Callable[[Reply], None]) -> None:
        with self.lock:
            if not self.alive:
                raise NodeUnavailable("the node's connection is closed")
            self.handlers[request.id] = handler
        self.requests.put(request)

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
        request_id = r.id or _named_request(message.error_message)
        final = "triton_final_response" in r.parameters and r.parameters["triton_final_response"].bool_param
        with self.lock:
            handler = self.handlers.get(request_id)
            if handler is not None and (final or message.error_message):
                del self.handlers[request_id]
        if handler is None:
            return  # a request forgotten (its stream moved on) or one whose error carried no id
        if message.error_message:
            return _call(handler, Reply("error", message=message.error_message))
        if r.outputs:
            _call(handler, Reply("response", InferResult(r)))
        if final:
            _call(handler, Reply("final"))

    def close(self) -> None:
        self.requests.put(None)
        self._responses.cancel()


def _named_request(error_message: str) -> str:
    """The request id Triton puts in front of an error it makes itself: ``[request id: X] ...``."""
    match = re.match(r"^\[request id: ([^\]]+)\]", error_message or "")
    return match.group(1) if match else ""


def _call(handler, reply: Reply) -> None:
    try:
        handler(reply)
    except Exception:  # noqa: BLE001 - one stream's bug must not stop the node's reader
        import logging

        logging.getLogger("helios_deploy.api").exception("a node reply handler failed")


class Node:
    """One Triton node (gRPC address): its connection, control requests over it, its capacity answer."""

    def __init__(self, address: str, model: str = "helios"):
        import grpc
        from tritonclient.grpc import service_pb2_grpc

        self.address, self.model = address, model
        self.up, self.lost_reason = True, None
        self._channel = grpc.insecure_channel(address, options=_OPTIONS)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._conn: _Connection | None = None
        self._lock = threading.Lock()
        self._capacity: tuple[float, dict | None] = (-1e9, None)

    def __repr__(self) -> str:
        return f"Node({self.address}, {'up' if self.up else 'down'})"

    def send(self, arrays: Mapping[str, np.ndarray], handler: Callable[[Reply], None],
             request_id: str | None = None) -> str:
        """Send one request; ``handler`` gets its replies (on the node's reader thread: it must not block)."""
        request = infer_request(self.model, request_id or uuid.uuid4().hex, arrays)
        with self._lock:
            if self._conn is None or not self._conn.alive:
                self._conn = _Connection(self._stub, self._lost)
            conn = self._conn
        conn.send(request, handler)
        return request.id

    def forget(self, request_id: str) -> None:
        """No more replies for this request (a stream that moved to another node)."""
        conn = self._conn
        if conn is not None:
            conn.forget(request_id)

    def _lost(self, conn: _Connection, reason: str) -> None:
        with self._lock:
            if self._conn is conn:
                self._conn = None
            if not getattr(conn, "closing", False):
                self.up, self.lost_reason = False, reason
                self._capacity = (-1e9, None)

    def control(self, action: str, stream_id: str | None = None, owner: str | None = None,
                prompt: str | None = None, timeout: float = CONTROL_TIMEOUT) -> dict:
        """One control request to the ``helios`` model; its JSON answer (``{"error": {...}}`` included)."""
        arrays = {"action": text_array(action)}
        for name, value in (("stream_id", stream_id), ("owner", owner), ("prompt", prompt)):
            if value is not None:
                arrays[name] = text_array(value)
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
            raise NodeUnavailable(f"the Triton node {self.address} did not answer {action!r} within {timeout:g} s")
        if "error" in box and "answer" not in box:
            raise NodeUnavailable(f"the Triton node {self.address} failed {action!r}", found=box["error"])
        return box.get("answer") or {}

    def capacity(self, ttl: float = CAPACITY_TTL) -> dict | None:
        """The node's capacity answer ({capacity, active, queued, free, draining, demand}), cached ``ttl``
        seconds; None when the node does not answer."""
        at, value = self._capacity
        if time.monotonic() - at < ttl:
            return value
        try:
            value = self.control("capacity", timeout=2.0)
        except UserError:
            value = None
        self._capacity = (time.monotonic(), value)
        return value

    def forget_capacity(self) -> None:
        self._capacity = (-1e9, None)

    def ready(self, timeout: float = 2.0) -> bool:
        from tritonclient.grpc import service_pb2

        try:
            ok = self._stub.ModelReady(service_pb2.ModelReadyRequest(name=self.model), timeout=timeout).ready
        except Exception:  # noqa: BLE001 - any gRPC failure: not ready
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

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.closing = True
            conn.close()
        self._channel.close()


def parse_targets(targets: str | Sequence[str]) -> list[str]:
    """``--triton`` values: comma-separated and/or repeated HOST:PORT (a name may stand for several nodes)."""
    items = [targets] if isinstance(targets, str) else list(targets)
    out = [t.strip() for item in items for t in str(item).split(",") if t.strip()]
    if not out:
        raise UserError("no Triton address given", expected="--triton HOST:PORT[,HOST:PORT...] or a DNS name")
    for t in out:
        host, sep, port = t.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise UserError(f"--triton {t!r} is not HOST:PORT", fix="e.g. localhost:8001 or helios-triton:8001")
    return out


def resolve(target: str) -> list[str]:
    """The node addresses behind one HOST:PORT: a name resolving to several addresses (a headless Service)
    gives one node each; an IP address, or a name resolving to loopback only, stands for itself."""
    host, _, port = target.rpartition(":")
    bare = host.strip("[]")
    try:
        ipaddress.ip_address(bare)
        return [target]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(bare, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    ips = sorted({info[4][0] for info in infos})
    if all(ipaddress.ip_address(ip).is_loopback for ip in ips):
        return [target]
    return [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips]


class Cluster:
    """The node set: resolved from ``targets``, refreshed in the background, ranked by free capacity."""

    def __init__(self, targets: str | Sequence[str], model: str = "helios", refresh_s: float = REFRESH_S,
                 capacity_ttl: float = CAPACITY_TTL):
        self.targets, self.model = parse_targets(targets), model
        self.refresh_s, self.capacity_ttl = refresh_s, capacity_ttl
        self.nodes: dict[str, Node] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="helios-cluster")
        self.refresh()
        if not self.nodes:
            raise UserError(f"no Triton node found at {', '.join(self.targets)}", found="the name(s) did not resolve",
                            fix="pass reachable HOST:PORT addresses or a resolvable DNS name")
        self._thread = threading.Thread(target=self._refresher, name="helios-cluster-refresh", daemon=True)
        self._thread.start()

    def refresh(self) -> None:
        """Resolve the targets again (new nodes join, nodes no longer listed leave placement) and probe the
        nodes marked down."""
        found = {a for t in self.targets for a in resolve(t)}
        with self._lock:
            for address in found - set(self.nodes):
                self.nodes[address] = Node(address, self.model)
            gone = [self.nodes.pop(a) for a in set(self.nodes) - found]
        for node in gone:
            node.up = False  # its streams keep their connection until they end or fail over
        for node in self.live(include_down=True):
            if not node.up:
                node.ready(timeout=1.0)

    def _refresher(self) -> None:
        while not self._closed.wait(self.refresh_s):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - a DNS hiccup: keep the last node set
                pass

    def live(self, include_down: bool = False) -> list[Node]:
        with self._lock:
            return [n for n in self.nodes.values() if include_down or n.up]

    def capacities(self, nodes: Sequence[Node] | None = None) -> dict[Node, dict | None]:
        nodes = list(self.live() if nodes is None else nodes)
        answers = list(self._pool.map(lambda n: n.capacity(self.capacity_ttl), nodes))
        return dict(zip(nodes, answers))

    def ranked(self, exclude: Sequence[Node] = ()) -> list[Node]:
        """Nodes that answer and are not draining, the most free real-time capacity first (then the fewest
        active streams); nodes reporting no free room last, so a queueing node can still be tried."""
        answers = self.capacities([n for n in self.live() if n not in exclude])
        usable = [(n, a) for n, a in answers.items() if a is not None and not a.get("draining")]
        usable.sort(key=lambda na: (-float(na[1].get("free", 0)), float(na[1].get("active", 0)), na[0].address))
        return [n for n, _ in usable]

    def broadcast(self, action: str, stream_id: str, owner: str | None, prompt: str | None = None,
                  timeout: float = CONTROL_TIMEOUT) -> tuple[Node, dict]:
        """Ask every live node; the answer of the one that holds the stream (for this owner). A StreamError
        not_found when none does."""
        from ..runtime.live import StreamError

        nodes = self.live()

        def ask(node):
            try:
                return node.control(action, stream_id, owner, prompt, timeout=timeout)
            except UserError:
                return None

        for node, answer in zip(nodes, self._pool.map(ask, nodes)):
            if answer is not None and (answer.get("error") or {}).get("code") != "not_found":
                return node, answer
        raise StreamError("not_found", f"no stream {stream_id!r} for this key on any Triton node",
                          found=f"{len(nodes)} node(s) asked")

    def demand(self) -> float | None:
        """The cluster's demand: (active + queued + refused in the last minute) / capacity over all nodes, from
        each node's ``demand`` x ``capacity``; None when no node answers."""
        answers = [a for a in self.capacities().values() if a is not None]
        cap = sum(float(a.get("capacity", 0)) for a in answers)
        if not answers:
            return None
        wanted = sum(float(a.get("demand", 0)) * float(a.get("capacity", 0)) for a in answers)
        return wanted / cap if cap else (float("inf") if wanted else 0.0)

    def ready(self) -> list[Node]:
        """The nodes whose ``helios`` model answers ready now."""
        nodes = self.live(include_down=True)
        return [n for n, ok in zip(nodes, self._pool.map(lambda n: n.ready(timeout=1.0), nodes)) if ok]

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            nodes, self.nodes = list(self.nodes.values()), {}
        for node in nodes:
            node.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
