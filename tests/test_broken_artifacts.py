"""Artifacts that changed under the manifest, a disk that fills up, an interrupted or killed step: one clear
message, exit code 1, the artifacts folder unchanged, and nothing half-written left for the next run."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import run_cli

PROMPTS = "A cat and a dog baking a cake together in a kitchen.\n"


def _snapshot(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every entry, hidden ones included: (size, mtime) of files, None for folders (a step's work folder made and
    removed inside one changes the folder's own mtime, not what it holds)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def arts(artifacts, tmp_path) -> Path:
    return Path(shutil.copytree(artifacts, tmp_path / "arts"))


def _commands(arts: Path, ckpt: Path, tmp: Path) -> dict[str, list]:
    """Every command that opens artifacts."""
    return {
        "generate": ["generate", arts, "--prompt", "a cat", "-o", tmp / "v.mp4"],
        "quantize": ["quantize", arts, "--keep-high-precision", "^proj_out/"],
        "quantize_bf16": ["quantize", arts, "--precision", "bf16"],
        "parity": ["parity", ckpt, arts, "--components", "transformer"],
        "build": ["build", arts, "--dry-run"],
        "bench": ["bench", arts, "--repeats", "1"],
        "triton": ["triton", arts, "-o", tmp / "repo"],
        "verify": ["verify", arts],
    }


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_every_command_refuses_damaged_external_data(arts, tiny_ckpt, tmp_path, capsys, damage):
    data = arts / "transformer" / "model.onnx.data"
    if damage == "truncated":
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)
    else:
        data.unlink()
    before = _snapshot(arts)
    commands = _commands(arts, tiny_ckpt, tmp_path)
    if damage == "missing":  # refused where the graph is loaded; verify needs engines (and a GPU) first
        commands.pop("verify")
    for name, args in commands.items():
        code, _, err = run_cli(args, capsys)
        assert code == 1, f"{name}: exit {code}\n{err}"
        assert "do not match their manifest" in err and "model.onnx.data" in err and damage in err, f"{name}: {err}"
        assert "Traceback" not in err, f"{name}: {err}"
        assert _snapshot(arts) == before, f"{name} changed the artifacts"
    assert not (tmp_path / "repo").exists() and not (tmp_path / "v.mp4").exists()


def _cli(args, limit_bytes: int | None = None, **kw) -> subprocess.Popen:
    """helios-deploy in a child process; ``limit_bytes``: RLIMIT_FSIZE, a disk that is full past that size."""
    def preexec():
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return subprocess.Popen([sys.executable, "-m", "helios_deploy.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec, **kw)


@pytest.mark.parametrize("step", [["quantize", "--precision", "bf16"],
                                  ["quantize", "--keep-high-precision", "^proj_out/", "--calibration-chunks", "1"]])
def test_disk_full_mid_write(arts, tmp_path, step):
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPTS)
    args = [step[0], arts, *step[1:]] + (["--calibration-prompts", prompts] if "--calibration-chunks" in step else [])
    before = _snapshot(arts)
    proc = _cli(args, limit_bytes=200_000)  # the tiny graphs' data files are larger: the first big write fails
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err
    assert "out of disk space" in err and "Traceback" not in err, err
    assert _snapshot(arts) == before


def test_disk_full_during_export_leaves_nothing(tiny_ckpt, tmp_path):
    """The text encoder: the component the tiny checkpoint exports fastest (about 6 s against the transformer's 30),
    through the same graph writer; its graph (about 220 KB) is larger than the limit."""
    out = tmp_path / "out"
    proc = _cli(["export", tiny_ckpt, "-o", out, "--height", 64, "--width", 128, "--components", "text_encoder",
                 "--no-audit"], limit_bytes=200_000)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1 and "out of disk space" in err and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def _wait_for_partial(folder: Path, proc: subprocess.Popen, timeout: float = 300) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(folder.glob(".fp8.partial-*"))
        if found:
            return found[0]
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    raise AssertionError("the step never started its work folder")


def test_sigterm_mid_step_changes_nothing(arts, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPTS * 4)
    before = _snapshot(arts)
    proc = _cli(["quantize", arts, "--keep-high-precision", "^proj_out/", "--calibration-prompts", prompts])
    _wait_for_partial(arts / "transformer", proc)
    time.sleep(1.0)  # inside calibration
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "interrupted" in err and "Traceback" not in err, err
    assert _snapshot(arts) == before


def test_killed_step_leaves_a_partial_the_next_run_removes(arts, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPTS)
    args = ["quantize", arts, "--keep-high-precision", "^proj_out/", "--calibration-prompts", prompts,
            "--calibration-chunks", "1"]
    proc = _cli(args)
    partial = _wait_for_partial(arts / "transformer", proc)
    proc.kill()  # SIGKILL: no clean-up possible
    proc.communicate(timeout=60)
    assert partial.exists()
    code = _cli(args).wait(timeout=600)
    assert code == 0
    assert not partial.exists() and not list((arts / "transformer").glob(".fp8.partial-*"))
    assert (arts / "transformer" / "model.fp8.onnx").is_file()


def test_a_partial_of_a_live_run_is_left_alone(arts):
    from helios_deploy.fsutil import clean_stale_partials, partial_dir

    mine = partial_dir(arts / "transformer", "fp8")  # this process is alive
    dead = arts / "transformer" / ".fp8.partial-999999999-x"
    dead.mkdir()
    removed = clean_stale_partials(arts / "transformer", "fp8")
    assert removed == [dead] and mine.exists() and not dead.exists()
    os.rmdir(mine)


@pytest.mark.slow
def test_triton_model_refuses_damaged_artifacts(arts, tmp_path):
    """The `helios` model checks the artifacts when it loads: a truncated graph stops the server with the same
    message the CLI prints (the repository records the artifacts' path, so the damage happens after writing)."""
    from helios_deploy.serving.repository import RepoOptions, write_repository
    from helios_deploy.serving.server import LocalServer, find_env

    write_repository(arts, tmp_path / "repo", RepoOptions(reference=True))
    data = arts / "transformer" / "model.onnx.data"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 4096)
    with pytest.raises(RuntimeError) as failed:
        LocalServer(find_env(), tmp_path / "repo", tmp_path / "server.log").start(timeout=300)
    assert "do not match their manifest" in str(failed.value) and "model.onnx.data" in str(failed.value)
    assert "truncated" in str(failed.value)
