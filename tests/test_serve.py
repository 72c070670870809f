"""`python -m helios_deploy.serving.server serve REPO` as a service: the ports it is given, SIGTERM and
SIGINT forwarded to tritonserver, its exit status passed on, and nothing left behind (no tritonserver, no
Python backend stub, ports free). Runs the real tritonserver from .venv-triton (`make triton-env`)."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from helios_deploy.errors import UserError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(artifacts, tmp_path_factory) -> Path:
    from helios_deploy.serving.repository import RepoOptions, write_repository

    out = tmp_path_factory.mktemp("serve") / "repo"
    write_repository(artifacts, out, RepoOptions(backend="onnxruntime", reference=True))  # no hard links to them
    return out


def free_ports(n: int = 3) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Serve:
    """`serve` in a child process, its output in a file."""

    def __init__(self, env, repo: Path, ports: list[int], log: Path):
        grpc, http, metrics = ports
        self.ports, self.log_path = ports, log
        cmd = [str(env.venv / "bin" / "python"), "-m", "helios_deploy.serving.server", "serve", str(repo),
               "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics)]
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while "tritonserver ready" not in self.log():
            assert self.proc.poll() is None, f"serve exited with {self.proc.returncode}:\n{self.log()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready after {timeout} s:\n{self.log()[-3000:]}"
            time.sleep(0.5)

    def stop(self) -> None:  # cleanup after a failed test: the whole tree, by PID
        from helios_deploy.serving.service import group_members

        for pid in descendants(self.proc.pid):
            _kill(pid)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in group_members(self.proc.pid):
            _kill(pid)


def _kill(pid: int) -> None:
    import os

    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stat(pid: int) -> tuple[str, str, int] | None:
    """(name, state, ppid) of a process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = text[text.index("(") + 1:text.rindex(")")]
    state, ppid = text[text.rindex(")") + 2:].split()[:2]
    return name, state, int(ppid)


def descendants(root: int) -> dict[int, str]:
    """Every live process below ``root``: pid -> name."""
    children: dict[int, list[int]] = {}
    names = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) and st[1] != "Z":
            children.setdefault(st[2], []).append(int(entry.name))
            names[int(entry.name)] = st[0]
    out, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out[child] = names[child]
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[1] != "Z"


def assert_ports_free(ports: list[int]) -> None:
    for port in ports:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on {port}"
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))  # a new server could take it


@pytest.fixture
def serve(server_env, repo, tmp_path):
    started = []

    def start(ports=None, repository=None) -> Serve:
        s = Serve(server_env, repository or repo, ports or free_ports(), tmp_path / f"serve{len(started)}.log")
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_serve_stops_tritonserver_and_frees_the_ports(serve, sig):
    s = serve()
    s.wait_ready()
    grpc, http, metrics = s.ports
    tree = descendants(s.proc.pid)
    assert sorted(set(tree.values())) == ["triton_python_b", "tritonserver"], tree  # comm is cut at 15 chars
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=5) as r:
        assert r.status == 200  # on the ports it was given
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
        assert r.status == 200
    from helios_deploy.serving.client import HeliosClient

    with HeliosClient(f"127.0.0.1:{grpc}", timeout=60) as client:
        client.check_ready()
    s.proc.send_signal(sig)
    assert s.proc.wait(90) == 0, s.log()[-3000:]  # tritonserver's own status after a graceful stop
    assert [pid for pid in tree if alive(pid)] == []
    assert_ports_free(s.ports)


def test_serve_exits_with_the_servers_status_and_reaps_what_it_left(serve):
    """tritonserver killed outright (SIGKILL, no clean-up of its own): serve exits 128 + 9 and kills the
    Python backend stub the server could not stop."""
    s = serve()
    s.wait_ready()
    tree = descendants(s.proc.pid)
    server = next(pid for pid, name in tree.items() if name == "tritonserver")
    _kill(server)
    assert s.proc.wait(60) == 128 + signal.SIGKILL, s.log()[-3000:]
    assert [pid for pid in tree if alive(pid)] == []
    assert_ports_free(s.ports)


def test_failing_server_status_is_passed_on(serve, tmp_path):
    bad = tmp_path / "bad-repo"
    (bad / "bad" / "1").mkdir(parents=True)
    (bad / "bad" / "config.pbtxt").write_text('name: "bad"\nbackend: "python"\n'
                                              'instance_group [ { kind: KIND_CPU count: 1 } ]\n')
    (bad / "bad" / "1" / "model.py").write_text('raise RuntimeError("broken on purpose")\n')
    s = serve(repository=bad)
    assert s.proc.wait(120) == 1  # tritonserver: "failed to load all models", exit status 1
    assert "failed to load all models" in s.log() and "tritonserver ready" not in s.log()
    assert descendants(s.proc.pid) == {}


def test_port_in_use_is_refused_before_anything_starts(serve):
    ports = free_ports()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[1]))
        taken.listen()
        s = serve(ports=ports)
        assert s.proc.wait(60) == 1
    log = s.log()
    assert f"port {ports[1]} (--http-port) on 127.0.0.1 is not free" in log and "Traceback" not in log
    assert "server.cc" not in log and "tritonserver ready" not in log  # tritonserver never started


def test_bad_arguments_and_defaults():
    from helios_deploy.serving.service import parse_args

    args = parse_args(["serve", "repo"])
    assert (args.grpc_port, args.http_port, args.metrics_port) == (8001, 8000, 8002)  # Triton's defaults
    with pytest.raises(UserError, match="bad arguments"):
        parse_args(["serve", "repo", "--grpc-port", "x"])
    from helios_deploy.serving.service import check_ports

    with pytest.raises(UserError, match="must differ"):
        check_ports({"--grpc-port": 9000, "--http-port": 9000}, "127.0.0.1")
