"""Control of running streams across Triton model instances: the ``helios_control`` model and its channel.

Every ``helios`` model instance (a Python-backend stub process of its own) runs its streams on its own
LiveScheduler and listens on a Unix socket in a control folder shared by the repository's models:

    $TMPDIR/helios-control-<hash of the repository path>/   (mode 0700)
      authkey                 random key (0600): connections authenticate with it (multiprocessing HMAC)
      <instance name>.sock    one per helios instance

``helios_control`` (a plain, non-decoupled Python model) asks each instance's socket in turn; the instance
that owns the stream id answers, the others answer not_found. A stream id is only meaningful to the
instance that opened it, so any number of instances (and GPUs) works without routing.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
import threading
from multiprocessing.connection import Client, Listener
from pathlib import Path

from ..errors import UserError

ACTIONS = ("set_prompt", "stop", "progress")


def control_dir(model_repository: str | Path, override: str | None = None) -> Path:
    """The control folder of the repository holding the model at ``model_repository`` (<repo>/<model>)."""
    if override:
        return Path(override)
    repo = Path(model_repository).resolve().parent
    digest = hashlib.sha1(str(repo).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"helios-control-{digest}"


def _authkey(folder: Path, create: bool) -> bytes:
    key = folder / "authkey"
    if create:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        except FileExistsError:
            pass  # another instance made it
    try:
        return key.read_text().strip().encode()
    except FileNotFoundError:
        raise UserError(f"no helios model instance is listening (no {key})",
                        fix="start the helios model; helios_control serves its streams only") from None


def apply(scheduler, message: dict) -> dict:
    """One control message on this instance's scheduler -> {"ok": True, "result": ...} or an error."""
    from ..runtime.live import StreamError

    action, stream_id = message.get("action"), message.get("stream_id", "")
    try:
        if action == "set_prompt":
            return {"ok": True, "result": {"from_chunk": scheduler.set_prompt(stream_id, message.get("prompt") or "")}}
        if action == "stop":
            scheduler.stop(stream_id)
            return {"ok": True, "result": {}}
        if action == "progress":
            return {"ok": True, "result": scheduler.stream(stream_id).progress()}
        return {"ok": False, "code": "bad_action", "error": f"unknown action {action!r}; expected one of {ACTIONS}"}
    except StreamError as e:
        return {"ok": False, "code": e.code, "error": e.render()}
    except UserError as e:
        return {"ok": False, "code": "bad_request", "error": e.render()}


class ControlServer:
    """The socket of one helios instance: answers control messages on a thread of its own."""

    def __init__(self, folder: Path, instance: str, scheduler):
        self.path = folder / f"{''.join(c if c.isalnum() or c in '-_' else '_' for c in instance)}.sock"
        authkey = _authkey(folder, create=True)
        self.path.unlink(missing_ok=True)  # a stale socket of a killed server
        self._listener = Listener(str(self.path), family="AF_UNIX", authkey=authkey)
        self._scheduler = scheduler
        self._thread = threading.Thread(target=self._serve, name="helios-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn = self._listener.accept()
            except OSError:  # closed
                return
            except Exception:  # noqa: BLE001 - a client with a wrong key: refuse it, keep listening
                continue
            with conn:
                try:
                    conn.send(apply(self._scheduler, conn.recv()))
                except (EOFError, OSError):
                    pass

    def close(self) -> None:
        self._listener.close()
        self.path.unlink(missing_ok=True)


def forward(folder: Path, message: dict) -> dict:
    """Ask every helios instance's socket; the owner's answer (or not_found from all)."""
    authkey = _authkey(folder, create=False)
    answer = {"ok": False, "code": "not_found", "error": f"no stream {message.get('stream_id')!r}"}
    for sock in sorted(folder.glob("*.sock")):
        try:
            with Client(str(sock), family="AF_UNIX", authkey=authkey) as conn:
                conn.send(message)
                reply = conn.recv()
        except (OSError, EOFError):  # a socket left by an instance that is gone
            continue
        if reply.get("code") != "not_found":
            return reply
        answer = reply
    return answer


class TritonPythonModel:
    """helios_control: inputs stream_id, action, prompt; output result (JSON); an error response for an
    unknown stream, a finished one, an empty prompt or an unknown action."""

    def initialize(self, args: dict) -> None:
        from .model import model_parameters

        params = model_parameters(json.loads(args["model_config"]))
        self.folder = control_dir(args["model_repository"], params.get("control_dir"))

    def execute(self, requests):
        import numpy as np
        import triton_python_backend_utils as pb_utils

        from .model import _error

        responses = []
        for request in requests:
            def text(name):
                t = pb_utils.get_input_tensor_by_name(request, name)
                if t is None:
                    return None
                raw = t.as_numpy().reshape(-1)[0]
                return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)

            try:
                reply = forward(self.folder, {"action": text("action"), "stream_id": text("stream_id"),
                                              "prompt": text("prompt")})
            except UserError as e:
                reply = {"ok": False, "code": "unavailable", "error": e.render()}
            if reply["ok"]:
                out = np.array([json.dumps(reply["result"]).encode()], dtype=np.object_)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("result", out)]))
            else:
                code = {"not_found": "NOT_FOUND", "unavailable": "UNAVAILABLE"}.get(reply["code"], "INVALID_ARG")
                responses.append(_error(f"{reply['code']}: {reply['error']}", code))
        return responses
