"""Atomic writes: artifacts are built in a temporary folder beside the target and moved into place only
when complete, so a failure never leaves a half-written artifact behind."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
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


@contextlib.contextmanager
def staged_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``out``; on success replace ``out`` with it, on any
    error delete it and leave ``out`` untouched."""
    out = Path(out)
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
