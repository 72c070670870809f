"""Atomic writes: artifacts are built in a temporary folder beside the target and moved into place only
when complete, so a failure never leaves a half-written artifact behind."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from .errors import UserError


def check_output_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} is a file", expected="a folder (new or empty)", fix="choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(
            f"output folder {out} already exists and is not empty",
            found=f"{sum(1 for _ in out.iterdir())} entries",
            expected="a new or empty folder",
            fix="choose another folder, or pass --force to replace it",
        )


PARTIAL = ".partial-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def clean_stale_partials(parent: Path, name: str) -> list[Path]:
    """Remove ``.{name}.partial-{pid}-*`` left in ``parent`` by a run of the same step that was killed (its
    process is gone); a partial of a run still alive is left alone. Returns what was removed."""
    removed = []
    for p in Path(parent).glob(f".{name}{PARTIAL}*"):
        pid = p.name[len(f".{name}{PARTIAL}"):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def partial_dir(parent: Path, name: str) -> Path:
    """A fresh hidden work folder ``.{name}.partial-{pid}-XXXX`` in ``parent`` (stale ones of the same name,
    left by a killed run, are removed first). The caller moves its contents into place when complete and
    removes it in any case."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(parent, name)
    return Path(tempfile.mkdtemp(prefix=f".{name}{PARTIAL}{os.getpid()}-", dir=parent))


@contextlib.contextmanager
def staging(parent: Path, name: str) -> Iterator[Path]:
    """``partial_dir``, removed when the block ends (after its contents were moved into place, or on error)."""
    tmp = partial_dir(parent, name)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends: moving a step's finished files into place and writing
    the manifest is not interrupted half-way (a second signal after the block still stops the process)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    blocked = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def staged_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``out``; on success replace ``out`` with it, on any
    error delete it and leave ``out`` untouched."""
    out = Path(out)
    check_output_dir(out, force)
    tmp = partial_dir(out.parent, out.name)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with deferred_signals():
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
