"""`python -m helios_deploy.serving.server`: a local tritonserver (the nvidia-pytriton wheel's, Python backend only)
run from its own environment (.venv-triton), for the tests and users without a GPU, and as a service:

    python -m helios_deploy.serving.server prepare                  # copy the stub into place (idempotent)
    python -m helios_deploy.serving.server serve MODEL_REPO         # a service: gRPC 8001, HTTP 8000, metrics 8002
        [--grpc-port P] [--http-port P] [--metrics-port P] [--address A] [--exit-timeout-secs S]
        [--drain-timeout-secs S] [--tritonserver /opt/tritonserver/bin/tritonserver]

`serve` (serving/service.py) drains on SIGTERM: the node takes no new streams, its streams end after their
current chunk as moved (with their state, so the API resumes them on another node), then tritonserver stops.

The pieces (LocalServer, find_env, prepare_backend, wait_ready, startup_args, free_port) are in
serving/tritonserver.py and imported from here too, as before.
"""

from __future__ import annotations

import sys

from ..errors import UserError
from .service import parse_args, serve
from .tritonserver import (STARTUP_FILE, LocalServer, ServerEnv, check_runtime_imports, find_env,  # noqa: F401
                           free_port, prepare_backend, startup_args, wait_ready)


def main(argv: list[str]) -> int:
    if argv[:1] == ["prepare"]:
        env = find_env(argv[1] if len(argv) > 1 else sys.prefix)
        print(f"python backend stub: {prepare_backend(env.root, env.python_version)}")
        print(f"runtime imports under numpy {env.numpy}: {check_runtime_imports()}")
        return 0
    try:
        args = parse_args(argv)
        return serve(args.repo, grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port,
                     address=args.address, exit_timeout=args.exit_timeout_secs, drain_timeout=args.drain_timeout_secs,
                     tritonserver=args.tritonserver)
    except UserError as e:
        print(f"error: {e.render()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
