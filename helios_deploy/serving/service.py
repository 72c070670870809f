"""`python -m helios_deploy.serving.server serve MODEL_REPO`: the local tritonserver run as a service.

Triton's ports by default (gRPC 8001, HTTP 8000, metrics 8002), refused up front when one is taken.

SIGTERM (what systemd, Docker and Kubernetes send on scale-down or a rolling update) drains the node first:
`serve` sends ``action=drain`` to its own ``helios`` model over gRPC (the node takes no new streams; each of
its streams ends after its current chunk with a last response ``{"moved": true}`` carrying its state, which
the API resumes on another node), unloads ``helios`` through Triton's model-repository API (its readiness,
/v2/models/helios/ready, fails at once: Kubernetes stops sending new streams; Triton refuses new requests while
the streams in flight finish), waits until it is unloaded (every stream gone; without explicit model control:
until the node reports no stream left) or --drain-timeout-secs pass, then forwards SIGTERM to tritonserver.
SIGINT (Ctrl-C), a second SIGTERM, or a repository without the helios model stop at once. tritonserver finishes in-flight requests for up to --exit-timeout-secs and stops its
Python backend stubs; `serve` waits for it and exits with its status (128 + N if it died of signal N). tritonserver runs in its own
session, so a terminal's Ctrl-C reaches it once, through `serve`; should `serve` itself be killed, the
kernel sends tritonserver SIGTERM (Linux parent-death signal). Anything of the server's process group
still alive after it exits is killed, so no stub keeps the ports.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..errors import UserError
from ..measure.procfs import live_processes
from .tritonserver import LocalServer, ServerEnv, find_env, loopback, prepare_backend, system_env, wait_ready

DEFAULT_PORTS = {"grpc": 8001, "http": 8000, "metrics": 8002}  # tritonserver's own defaults
FORWARDED = (signal.SIGTERM, signal.SIGINT)
DRAIN_TIMEOUT = 30.0  # seconds; streams end after their current chunk (a few seconds), so this is a bound


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # bad arguments: one UserError (exit 1), not argparse's exit 2
        raise UserError(f"bad arguments: {message}", fix=f"see `{self.prog} --help`")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="python -m helios_deploy.serving.server",
                description="prepare: copy the Python backend stub into place; serve: run tritonserver on a "
                            "model repository (from `helios-deploy triton`) as a service.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="copy the Python backend stub into pytriton's backends (idempotent)")
    s = sub.add_parser("serve", help="run tritonserver until SIGTERM or SIGINT, forwarded to it")
    s.add_argument("repo", type=Path, help="model repository")
    for name, port in DEFAULT_PORTS.items():
        s.add_argument(f"--{name}-port", type=int, default=port, help=f"default {port}")
    s.add_argument("--address", default="127.0.0.1", help="listen address (0.0.0.0 for all interfaces)")
    s.add_argument("--exit-timeout-secs", type=int, default=5,
                   help="how long tritonserver waits for in-flight requests after SIGTERM/SIGINT (default 5)")
    s.add_argument("--tritonserver", default=None, metavar="PATH",
                   help="a tritonserver installed the usual way (NVIDIA's container: /opt/tritonserver/bin/tritonserver) "
                        "instead of the nvidia-pytriton environment's")
    s.add_argument("--drain-timeout-secs", type=float, default=DRAIN_TIMEOUT,
                   help=f"on SIGTERM: how long to wait for the node's streams to move before stopping "
                        f"(default {DRAIN_TIMEOUT:g})")
    return p.parse_args(argv)


def check_ports(ports: dict[str, int], address: str) -> None:
    """Every port valid, distinct and free to listen on at ``address``; else one UserError naming it."""
    if len(set(ports.values())) != len(ports):
        raise UserError("the ports must differ", found=", ".join(f"{k} {v}" for k, v in ports.items()))
    for flag, port in ports.items():
        if not 0 < port < 65536:
            raise UserError(f"{flag} {port} is not a TCP port", expected="1..65535")
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as tritonserver binds
            try:
                s.bind((address, port))
            except OSError as e:
                raise UserError(f"port {port} ({flag}) on {address} is not free", found=e.strerror or str(e),
                                fix=f"stop what listens there, or pass {flag} with another port") from None


class _Forwarder:
    """Signal handlers: SIGTERM drains the node (``drain``, on a thread of its own) and then reaches the server;
    SIGINT and a second SIGTERM reach it at once; a signal before the server started is held until then."""

    def __init__(self, drain=None):
        self.proc: subprocess.Popen | None = None
        self.pending: list[int] = []
        self.drain, self.draining = drain, None

    def __enter__(self) -> "_Forwarder":
        self.previous = {s: signal.signal(s, self._handle) for s in FORWARDED}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.proc is None:
            self.pending.append(signum)
        elif self.proc.poll() is None:
            if signum == signal.SIGTERM and self.drain is not None and self.draining is None:
                self.draining = threading.Thread(target=self._drain_then_stop, name="drain", daemon=True)
                self.draining.start()
            else:
                self.proc.send_signal(signum)

    def _drain_then_stop(self) -> None:
        try:
            self.drain()
        finally:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)

    def attach(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        for signum in self.pending:
            proc.send_signal(signum)  # before the server was up: nothing to drain


def drain_node(grpc_url: str, timeout: float, log=lambda m: print(m, file=sys.stderr, flush=True),
               http_url: str | None = None) -> bool:
    """Drain the node at ``grpc_url`` (its helios model: action=drain) and wait until no stream of it is left
    (each has sent its last response, moved) or ``timeout`` seconds pass; True when it emptied in time.

    With ``http_url`` (Triton's HTTP endpoint, explicit model control) the helios model is then unloaded through
    Triton's model-repository API: its readiness (``/v2/models/helios/ready``, the Kubernetes readiness probe)
    answers not-ready at once while the streams in flight still send their last responses, Triton itself
    refuses every new request, and the unload completes once every request has ended and every client stream
    to the model has closed; that is what is waited for then."""
    from .client import HeliosClient

    deadline = time.monotonic() + timeout
    try:
        with HeliosClient(grpc_url, timeout=min(10.0, timeout)) as client:
            answer = client.drain()
            log(f"serve: draining: {answer['streams']} stream(s) to move (at most {timeout:g} s)")
            unloading = http_url is not None and unload_model(http_url, "helios", log)
            while not unloading and time.monotonic() < deadline:
                left = client.capacity()["streams"]
                if left == 0:
                    log("serve: drained: no stream left")
                    return True
                time.sleep(0.2)
    except UserError as e:  # not a helios node, or it is not answering: stop at once
        log(f"serve: could not drain the node ({e.what}); stopping now")
        return False
    while unloading and time.monotonic() < deadline:  # our own client stream is closed: it holds no more
        if model_state(http_url, "helios") not in ("READY", "UNLOADING"):
            log("serve: drained: no stream left (helios unloaded)")
            return True
        time.sleep(0.2)
    log(f"serve: drain timed out after {timeout:g} s with streams left; stopping now")
    return False


def _repository(http_url: str, path: str) -> bytes:
    import urllib.request

    request = urllib.request.Request(f"{http_url}/v2/repository/{path}", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return r.read()


def unload_model(http_url: str, model: str, log) -> bool:
    """Ask Triton to unload ``model`` (it answers at once; the unload waits for requests in flight); False when
    it cannot (model control mode none: the repository has no load_models.txt)."""
    try:
        _repository(http_url, f"models/{model}/unload")
    except OSError as e:
        log(f"serve: could not unload {model} ({e}); its readiness stays until the server stops")
        return False
    log(f"serve: {model} unloading: not ready from now on (new requests refused by Triton)")
    return True


def model_state(http_url: str, model: str) -> str | None:
    """The model's state in Triton's repository index (READY, UNLOADING, UNAVAILABLE...); None when not listed
    or Triton does not answer."""
    import json

    try:
        index = json.loads(_repository(http_url, "index"))
    except (OSError, ValueError):
        return None
    return next((m.get("state") for m in index if m.get("name") == model), None)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent (serve) dies, even of SIGKILL (Linux prctl)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def serve(repo: str | Path, grpc_port: int = 8001, http_port: int = 8000, metrics_port: int = 8002,
          address: str = "127.0.0.1", exit_timeout: int = 5, env: ServerEnv | None = None,
          drain_timeout: float = DRAIN_TIMEOUT, tritonserver: str | None = None) -> int:
    """Run tritonserver on ``repo`` until it exits; returns the exit status for ``sys.exit``."""
    repo = Path(repo)
    if not (repo.is_dir() and any(repo.glob("*/config.pbtxt"))):
        raise UserError(f"{repo} is not a Triton model repository", found="no <model>/config.pbtxt in it",
                        fix="write one with `helios-deploy triton ARTIFACTS -o MODEL_REPO`")
    check_ports({"--grpc-port": grpc_port, "--http-port": http_port, "--metrics-port": metrics_port}, address)
    if tritonserver is not None:
        env = system_env(tritonserver)
    else:
        env = env or find_env()
        prepare_backend(env.root, env.python_version)
    server = LocalServer(env, repo, address=address, exit_timeout=exit_timeout)
    server.grpc_port, server.http_port, server.metrics_port = grpc_port, http_port, metrics_port
    drain = None
    if (repo / "helios" / "config.pbtxt").is_file():
        drain = functools.partial(drain_node, f"{loopback(address)}:{grpc_port}", drain_timeout,
                                  http_url=f"http://{loopback(address)}:{http_port}")
    with _Forwarder(drain) as forward:
        proc = subprocess.Popen(server.command(), env=env.process_env(), stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_die_with_parent)
        forward.attach(proc)
        if wait_ready(proc, http_port, float("inf"), address):
            print(f"tritonserver ready (pid {proc.pid}): grpc {address}:{grpc_port}, http {address}:{http_port}, "
                  f"metrics {address}:{metrics_port}", flush=True)
        code = proc.wait()
    _kill_leftovers(proc.pid)
    return code if code >= 0 else 128 - code


def group_members(pgid: int) -> list[int]:
    """PIDs of the live (not zombie) processes in process group ``pgid``."""
    return [pid for pid, fields in live_processes() if int(fields[2]) == pgid]


def _kill_leftovers(pgid: int) -> None:
    left = group_members(pgid)
    if left:
        print(f"serve: killing {len(left)} process(es) tritonserver left behind: {left}", file=sys.stderr)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
