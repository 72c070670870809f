"""Triton nodes on this host as a cluster runs them: each is `python -m helios_deploy.serving.server serve REPO`
(the service wrapper, which drains the node on SIGTERM) on free loopback ports, from one model repository.

    with LocalNodes(artifacts, workdir, count=3, max_streams=2) as nodes:
        urls = [n.grpc_url for n in nodes.nodes]
        nodes.nodes[0].kill()        # kill -9 of its tritonserver (and backend stubs): a node lost
        nodes.nodes[1].drain()       # SIGTERM to its wrapper: the node drains its streams, then exits
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..serving.server import free_port, wait_ready

_READY = re.compile(r"tritonserver ready \(pid (\d+)\)")


class ServedNode:
    def __init__(self, repo: Path, log_path: Path, name: str = "node"):
        self.repo, self.log_path, self.name = Path(repo), Path(log_path), name
        self.proc: subprocess.Popen | None = None
        self.server_pid: int | None = None
        self.grpc_port = self.http_port = self.metrics_port = 0

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else "(no log)"

    def start(self, timeout: float = 240.0) -> "ServedNode":
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "helios_deploy.serving.server", "serve", str(self.repo),
               "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
               "--metrics-port", str(self.metrics_port)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        try:
            if not wait_ready(self.proc, self.http_port, timeout):
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log:\n{self.log()[-4000:]}")
            deadline = time.monotonic() + 30
            while self.server_pid is None and time.monotonic() < deadline:  # the wrapper prints it once ready
                match = _READY.search(self.log())
                self.server_pid = int(match.group(1)) if match else None
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """kill -9 of the node's tritonserver and its backend stubs (its process group), as a crash would."""
        if self.server_pid is not None:
            try:
                os.killpg(self.server_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def drain(self) -> None:
        """SIGTERM to the wrapper (what Kubernetes sends on scale-down): the node moves its streams away, exits."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.kill()  # anything of the server left (a stub) goes too


class LocalNodes:
    """``count`` ServedNodes from one repository of ``artifacts`` (written under ``workdir``), started at once."""

    def __init__(self, artifacts, workdir, count: int = 3, **repo_options):
        self.artifacts, self.workdir, self.count = Path(artifacts), Path(workdir), count
        self.repo_options = {"max_frames": 330, "reference": True, **repo_options}
        self.nodes: list[ServedNode] = []

    def start(self) -> "LocalNodes":
        from ..serving.repository import RepoOptions, write_repository

        repo = self.workdir / "repo"
        if not repo.is_dir():
            write_repository(self.artifacts, repo, RepoOptions(**self.repo_options), log=lambda m: None)
        self.nodes = [ServedNode(repo, self.workdir / f"node{i}.log", f"node{i}") for i in range(self.count)]
        try:
            with ThreadPoolExecutor(self.count) as pool:
                list(pool.map(lambda n: n.start(), self.nodes))
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def urls(self) -> list[str]:
        return [n.grpc_url for n in self.nodes]

    def by_url(self, url: str) -> ServedNode:
        return next(n for n in self.nodes if n.grpc_url == url)

    def stop(self) -> None:
        with ThreadPoolExecutor(max(1, len(self.nodes))) as pool:
            list(pool.map(lambda n: n.stop(), self.nodes))

    def __enter__(self) -> "LocalNodes":
        return self.start() if not self.nodes else self

    def __exit__(self, *exc) -> None:
        self.stop()
