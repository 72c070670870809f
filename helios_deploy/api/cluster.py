"""The Triton nodes an API serves from: discovery, one long-lived gRPC connection per node, in-band control,
placement by free real-time capacity.

    cluster = Cluster("10.0.0.5:8001,10.0.0.6:8001")     # or "helios-triton-headless:8001" (a DNS name)
    for node in cluster.ranked():                          # most free real-time capacity first
        rid = node.send(arrays, handler)                   # handler(Reply) on the node's reader thread
    cluster.broadcast("stop", stream_id, owner)            # whichever node holds the stream answers

A node is one ``helios`` model behind one gRPC address (serving/node_connection.py's NodeConnection, with its
capacity answer cached here). Every request to it (a stream's open, and the control
requests ``action`` = set_prompt / stop / progress / capacity) travels over ONE bidirectional
ModelStreamInfer stream on ONE channel, the answers routed back by request id; when that stream breaks (the
node died: UNAVAILABLE, reset) every request on it gets a ``lost`` reply and the node is marked down until a
readiness probe finds it back. A DNS name is resolved again every ``refresh_s`` seconds (a Kubernetes
headless Service lists one address per ready pod). ``owner`` (owner_of(key)) goes with every open and
control request: a node answers control only for streams opened with the same owner.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from ..errors import UserError
from ..serving.node_connection import CONTROL_TIMEOUT, NodeConnection

REFRESH_S = 10.0  # DNS re-resolution and down-node probing period
CAPACITY_TTL = 0.5  # seconds a node's capacity answer is reused for placement


class Node(NodeConnection):
    """A node as placement sees it: its connection (serving/node_connection.py) and its capacity answer, cached."""

    def __init__(self, address: str, model: str = "helios"):
        super().__init__(address, model)
        self.opening = 0  # opens sent to this node and not yet answered (placement counts them as taken)
        self._placed: list[float] = []  # when streams were admitted here, until a capacity answer counts them
        self._count = threading.Lock()
        self._capacity: tuple[float, dict | None] = (-1e9, None)

    def reserve(self) -> None:
        """An open is on its way here: placement counts it as taken (a burst of opens, or of a lost node's
        streams resuming at once, spreads over the nodes instead of all going to the one that looked freest)."""
        with self._count:
            self.opening += 1

    def settle(self, admitted: bool) -> None:
        """The node answered the open: an admitted stream stays counted until a capacity answer asked after its
        admission includes it."""
        with self._count:
            self.opening -= 1
            if admitted:
                self._placed.append(time.monotonic())

    def taken(self) -> int:
        """Streams placement has sent here that the cached capacity answer does not count yet."""
        with self._count:
            return self.opening + len(self._placed)

    def on_lost(self) -> None:
        self._capacity = (-1e9, None)
        with self._count:
            self._placed = []  # its streams are gone (moving elsewhere)

    def capacity(self, ttl: float = CAPACITY_TTL) -> dict | None:
        """The node's capacity answer ({capacity, active, queued, free, draining, demand}), cached ``ttl``
        seconds; None when the node does not answer."""
        at, value = self._capacity
        if time.monotonic() - at < ttl or (value or {}).get("draining"):
            return value  # a draining node is not asked again (it would be held open): it is going away
        asked = time.monotonic()
        try:
            value = self.control("capacity", timeout=CONTROL_TIMEOUT)
            with self._count:
                self._placed = [t for t in self._placed if t > asked]  # the answer counts the earlier ones
        except UserError:
            value = None
            if not self.ready(timeout=1.0):  # e.g. helios unloading on a draining node: ask nothing more (a
                self.up = False  # stream opened to ask would hold its unload); the refresher probes it again
        self._capacity = (time.monotonic(), value)
        return value

    def drained(self) -> None:
        """The node said it drains (a moved stream): take no new streams there, ask it nothing more."""
        self._capacity = (time.monotonic(), {"capacity": 0, "active": 0, "queued": 0, "free": 0, "draining": True,
                                             "demand": 0.0})

    def forget_capacity(self) -> None:
        self._capacity = (-1e9, None)

    def ready(self, timeout: float = 2.0) -> bool:
        ok = super().ready(timeout)
        if not ok and (self._capacity[1] or {}).get("draining"):
            self.up, self._capacity = False, (-1e9, None)  # the drained node has gone: forget its draining
        return ok


def owner_of(key_label: str) -> str:
    """What a node records as a stream's owner: the API key's label (security.key_label: a sha256 digest of the
    key, the same on every replica), so any replica serving that key may steer the stream."""
    return key_label


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
        self._placing = threading.Lock()  # a ranking and its reservation are one step
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
            if not node.up or (node.capacity(ttl=float("inf")) or {}).get("draining"):
                node.ready(timeout=1.0)  # back up / a drained node gone

    def _refresher(self) -> None:
        while not self._closed.wait(self.refresh_s):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - a DNS hiccup: keep the last node set
                pass

    def live(self, include_down: bool = False) -> list[Node]:
        with self._lock:
            return [n for n in self.nodes.values() if include_down or n.up]

    def capacities(self, nodes: Sequence[Node] | None = None, ttl: float | None = None) -> dict[Node, dict | None]:
        """Each node's capacity answer (None: it does not answer), cached up to ``ttl`` (default capacity_ttl)."""
        nodes = list(self.live() if nodes is None else nodes)
        ttl = self.capacity_ttl if ttl is None else ttl
        answers = list(self._pool.map(lambda n: n.capacity(ttl), nodes))
        return dict(zip(nodes, answers))

    def ranked(self, exclude: Sequence[Node] = (), reserve: bool = False) -> list[Node]:
        """Nodes that answer and are not draining, the most free real-time capacity first (then the fewest
        active streams, then at random); nodes reporting no free room last, so a queueing node can still be
        tried. Free room is the node's capacity answer less the streams sent there since (Node.taken).
        ``reserve``: the first node counts one more open at once, in the same step as the ranking, so that opens
        placed at the same moment by this replica (a lost node's streams) do not all pick the same node.
        Other replicas' opens are not seen until a node's answer counts them, hence: with ``exclude`` (a stream
        moving off a node) every node is asked afresh (streams other replicas moved there a moment ago count),
        and ties go to a random node rather than the same one on every replica."""
        nodes = [n for n in self.live() if n not in exclude]
        answers = self.capacities(nodes, ttl=0.0 if exclude else None)  # asked outside the lock
        with self._placing:
            usable = [(n, a, n.taken()) for n, a in answers.items() if a is not None and not a.get("draining")]
            usable.sort(key=lambda nat: (nat[2] - float(nat[1].get("free", 0)),
                                         float(nat[1].get("active", 0)) + nat[2], random.random()))
            if reserve and usable:
                usable[0][0].reserve()
        return [n for n, _, _ in usable]

    def broadcast(self, action: str, stream_id: str, owner: str | None, prompt: str | None = None,
                  timeout: float = CONTROL_TIMEOUT, settle: float = 2.0,
                  failing_over: float = 12.0) -> tuple[Node, dict]:
        """Ask every live node; the answer of the one that holds the stream running (for this owner). When only
        an ended copy answers (a stream that moved leaves one behind: "finished"), or a node did not answer (the
        stream may be failing over from it), the stream may be between two nodes: asked again for up to
        ``settle`` seconds (``failing_over`` while a node is marked down or does not answer: its streams are being
        resumed elsewhere by the replicas that hold them, which takes up to the 10-s watchdog plus a resume).
        StreamError not_found when every node, none of them down, answered and none knows it."""
        from ..runtime.live import StreamError

        start = time.monotonic()
        while True:
            nodes = self.live()
            some_down = len(nodes) < len(self.live(include_down=True))

            def ask(node):
                try:
                    return node.control(action, stream_id, owner, prompt, timeout=timeout)
                except UserError:
                    return None

            answers = [(n, a) for n, a in zip(nodes, self._pool.map(ask, nodes)) if a is not None]
            for node, answer in answers:
                if "error" not in answer:
                    return node, answer
            ended = [(n, a) for n, a in answers if a["error"].get("code") != "not_found"]
            unsure = some_down or len(answers) < len(nodes)  # a lost node's streams may be resuming elsewhere
            deadline = start + (max(settle, failing_over) if unsure else settle)
            if not ended and not unsure:  # every node answered, none is down: none knows it
                raise StreamError("not_found", f"no stream {stream_id!r} for this key on any Triton node",
                                  found=f"{len(nodes)} node(s) asked")
            if time.monotonic() > deadline:
                if ended:
                    return ended[0]
                raise StreamError("not_found", f"no stream {stream_id!r} for this key on the Triton nodes that "
                                  "answered", found=f"{len(answers)} of {len(nodes)} node(s) answered")
            time.sleep(0.2)

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
