"""A local tritonserver on CPU: the one bundled in the nvidia-pytriton wheel (Python backend only), run
from its own environment (`make triton-env` -> .venv-triton), because the Python backend stub needs
numpy<2 while the project's environment has numpy 2 (see /work/shared/docs/PLATFORM.md).

    with LocalServer(find_env(), repo) as server:                    # free loopback ports, stopped by PID
        client = HeliosClient(server.grpc_url)

The service wrapper (`python -m helios_deploy.serving.server serve`, drain on SIGTERM) is serving/service.py;
serving/server.py is its entry point.

The recipe: the stub for this Python version is copied into pytriton's backends/python folder; the
interpreter's libpython is put on LD_LIBRARY_PATH and the environment's bin first on PATH, so the stub's
embedded interpreter finds the environment's site-packages (numpy<2, helios-deploy, onnxruntime).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

ENV_VAR = "HELIOS_TRITON_VENV"
STARTUP_FILE = "load_models.txt"  # in a repository: the models to load at start (one per line), explicit control
DEFAULT_VENV = Path(__file__).resolve().parents[2] / ".venv-triton"

_PROBE = r"""
import json, os, sys, sysconfig
import numpy, pytriton
root = os.path.join(os.path.dirname(pytriton.__file__), "tritonserver")
print(json.dumps({"root": root, "libdir": sysconfig.get_config_var("LIBDIR"), "numpy": numpy.__version__,
                  "python": "%d.%d" % sys.version_info[:2]}))
"""


@dataclass(frozen=True)
class ServerEnv:
    """Where the server environment's pieces are."""

    venv: Path
    root: Path  # pytriton/tritonserver
    libdir: str  # the interpreter's libpython folder
    python_version: str
    numpy: str

    @property
    def tritonserver(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.root / "backends"

    def process_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (self.libdir, env.get("LD_LIBRARY_PATH")) if p)
        env["VIRTUAL_ENV"] = str(self.venv)
        env.pop("PYTHONHOME", None)
        env.pop("PYTHONPATH", None)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env


def find_env(venv: str | Path | None = None) -> ServerEnv:
    """The server environment at ``venv``, $HELIOS_TRITON_VENV or <repo>/.venv-triton; a UserError if
    it is missing or broken (the tests fail with this message rather than skip)."""
    venv = Path(venv or os.environ.get(ENV_VAR) or DEFAULT_VENV).absolute()
    python = venv / "bin" / "python"
    fix = "run `make triton-env` (creates .venv-triton: torch 2.13 CPU, nvidia-pytriton 0.7.0, numpy<2, helios-deploy)"
    if not python.is_file():
        raise UserError(f"no Triton server environment at {venv}", found=f"no {python}", fix=fix)
    proc = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"the Triton server environment at {venv} is incomplete", found=tail, fix=fix)
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if int(info["numpy"].split(".")[0]) >= 2:
        raise UserError(f"numpy {info['numpy']} in {venv}", expected="numpy<2 (the Python backend stub fails with 2.x)",
                        fix=f"{python} -m pip install 'numpy<2'")
    return ServerEnv(venv, Path(info["root"]), info["libdir"], info["python"], info["numpy"])


def system_env(tritonserver: str | Path) -> ServerEnv:
    """A tritonserver installed the usual way (NVIDIA's container: /opt/tritonserver/bin/tritonserver, its Python
    backend using this interpreter's environment): nothing to prepare."""
    binary = Path(tritonserver)
    if not binary.is_file() or binary.parent.name != "bin":
        raise UserError(f"no tritonserver at {binary}", expected="<root>/bin/tritonserver, e.g. /opt/tritonserver/bin/tritonserver")
    return ServerEnv(Path(sys.prefix), binary.parent.parent, "", "%d.%d" % sys.version_info[:2], "system")


def prepare_backend(root: Path, python_version: str) -> Path:
    """Copy the Python backend stub for this interpreter into backends/python (idempotent)."""
    src = root / "python_backend_stubs" / python_version / "triton_python_backend_stub"
    dst = root / "backends" / "python" / "triton_python_backend_stub"
    if not src.is_file():
        raise UserError(f"pytriton ships no Python backend stub for Python {python_version}", found=str(src.parent.parent))
    if not dst.is_file() or dst.stat().st_size != src.stat().st_size:
        tmp = dst.with_name(dst.name + f".partial-{os.getpid()}")
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    return dst


def check_runtime_imports() -> str:
    """Import what the helios model imports (run inside the server environment); their versions."""
    import onnxruntime
    import tokenizers
    import torch

    from .. import runtime  # noqa: F401 - the model's own import

    return f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, tokenizers {tokenizers.__version__}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """tritonserver on loopback with free ports; its log goes to ``log_path``; stopped by its PID."""

    def __init__(self, env: ServerEnv, repo: str | Path, log_path: str | Path | None = None,
                 extra_args: tuple[str, ...] = (), address: str = "127.0.0.1", exit_timeout: int = 5):
        self.env, self.repo = env, Path(repo).absolute()
        self.log_path = Path(log_path or self.repo.with_name(self.repo.name + ".tritonserver.log"))
        self.extra_args, self.address, self.exit_timeout = extra_args, address, exit_timeout
        self.proc: subprocess.Popen | None = None
        self.http_port = self.grpc_port = self.metrics_port = 0

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self) -> list[str]:
        a = self.address
        return [str(self.env.tritonserver), "--model-repository", str(self.repo),
                "--backend-directory", str(self.env.backends),
                "--http-address", a, "--http-port", str(self.http_port),
                "--grpc-address", a, "--grpc-port", str(self.grpc_port),
                "--metrics-address", a, "--metrics-port", str(self.metrics_port),
                "--allow-gpu-metrics", "false", "--exit-timeout-secs", str(self.exit_timeout),
                *startup_args(self.repo), *self.extra_args]

    def start(self, timeout: float = 180.0) -> "LocalServer":
        prepare_backend(self.env.root, self.env.python_version)
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env.process_env(),
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        try:
            ready = wait_ready(self.proc, self.http_port, timeout, self.address)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; log:\n{self.log()}") from None
        if not ready:
            raise RuntimeError(f"tritonserver exited with code {self.proc.returncode}; log:\n{self.log()}")

    @property
    def http_url(self) -> str:
        return f"http://{loopback(self.address)}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{loopback(self.address)}:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else "(no log)"

    def stop(self, timeout: float = 30.0) -> None:
        """SIGINT to the server's PID (Triton waits up to --exit-timeout-secs for requests), then SIGKILL to
        its process group (the server and its backend stubs) if it has not exited within ``timeout``."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # started in its own session: pgid == its PID
            proc.wait()

    def __enter__(self) -> "LocalServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def startup_args(repo: Path) -> list[str]:
    """Explicit model control where the repository says so (its load_models.txt, written with plan models):
    tritonserver loads only the models listed there at start; the others on request."""
    listed = Path(repo) / STARTUP_FILE
    if not listed.is_file():
        return []
    names = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
    return ["--model-control-mode", "explicit", *(arg for name in names for arg in ("--load-model", name))]


def wait_ready(proc: subprocess.Popen, http_port: int, timeout: float, address: str = "127.0.0.1") -> bool:
    """Poll /v2/health/ready until it answers 200 (True) or the server exits (False); RuntimeError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    url = f"http://{loopback(address)}:{http_port}/v2/health/ready"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"tritonserver not ready after {timeout:.0f} s")


def loopback(address: str) -> str:
    """Where to reach a server listening on ``address`` from this host."""
    return "127.0.0.1" if address in ("0.0.0.0", "") else address
