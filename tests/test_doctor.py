"""`helios-deploy doctor` on this host (no GPU, no TensorRT): it must say so and exit 0; what it reports is
compared with what the libraries themselves say; the step needs it prints reproduce the measurements in
docs/scale.md (at 14B, and at the real-width checkpoints they were measured on)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from .conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from helios_deploy.doctor import diagnose

    return diagnose(path=tmp_path_factory.mktemp("doctor") / "not-yet" / "engines")


def test_host_facts_match_the_libraries(report):
    import imageio_ffmpeg
    import onnxruntime
    import torch

    host = report["host"]
    assert host["torch"]["version"] == torch.__version__
    assert host["torch"]["cuda_build"] == torch.version.cuda
    assert host["torch"]["cuda_available"] is torch.cuda.is_available()
    assert host["onnxruntime"]["version"] == onnxruntime.__version__
    assert host["onnxruntime"]["providers"] == onnxruntime.get_available_providers()
    assert host["ffmpeg"]["exe"] == imageio_ffmpeg.get_ffmpeg_exe() and Path(host["ffmpeg"]["exe"]).is_file()
    mem = host["memory"]
    assert mem["ram_total_bytes"] == pytest.approx(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), rel=0.01)
    assert 0 < mem["ram_available_bytes"] <= mem["ram_total_bytes"]
    free = os.statvfs(mem["disk_path"])
    assert mem["disk_free_bytes"] == pytest.approx(free.f_bavail * free.f_frsize, rel=0.05)
    assert Path(mem["disk_path"]).exists()  # the nearest existing folder of a path not made yet


@pytest.mark.skipif(os.path.exists("/dev/nvidia0"), reason="this host has an NVIDIA GPU")
def test_no_gpu_here_is_said_and_exits_0(capsys):
    code, out, err = run_cli(["doctor"], capsys)
    assert code == 0, err
    assert "no NVIDIA GPU" in out and "TensorRT      not installed (needs >= 10.1: no)" in out
    assert "pip install tensorrt" in out and "onnxruntime-gpu" in out
    for gpu_step in ("build (TensorRT engines)", "verify", "generate --backend tensorrt"):
        row = next(line for line in out.splitlines() if line.strip().startswith(gpu_step + " "))
        assert "no: needs an NVIDIA GPU" in row
    code, out, err = run_cli(["doctor", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["gpu"] is False and report["host"]["tensorrt"]["ok"] is False
    assert report["host"]["tensorrt"]["tensorrt"] is None and report["host"]["tensorrt"]["gpu"] is None
    assert all(s["here"] is False for s in report["steps"] if s["gpu"])
    assert any("pip install tensorrt" in fix for fix in report["install"])


def test_ram_verdicts_follow_this_hosts_memory(report):
    total = report["host"]["memory"]["ram_total_bytes"]
    cpu_steps = [s for s in report["steps"] if not s["gpu"]]
    assert cpu_steps and all(s["here"] is (s["ram_bytes"] <= total) for s in cpu_steps)
    export = next(s for s in cpu_steps if s["command"] == "export")
    assert export["here"] is True  # 1.1 GB: every host that runs the tests can export 14B
    assert report["artifacts"]["bytes"] == pytest.approx(150 * GB, rel=0.02)  # docs/scale.md: about 150 GB


@pytest.mark.parametrize("version, ok", [("10.1.0", True), ("10.13.2.6", True), ("11.0", True), ("10.0.1", False),
                                         ("8.6.1", False), (None, False), ("unknown", False)])
def test_tensorrt_minimum_version(version, ok):
    from helios_deploy.doctor import tensorrt_version_ok

    assert tensorrt_version_ok(version) is ok


def docs_table() -> dict[str, dict]:
    """docs/scale.md's 'What each step needs at 14B': per step, the measured peaks (1 / 2 / 4 blocks), the
    peak at 14B and the disk written at 14B (GB)."""
    text = (ROOT / "docs" / "scale.md").read_text()
    section = text[text.index("## What each step needs at 14B"):]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[0].startswith("`"):
            continue
        numbers = lambda s: [float(x) for x in re.findall(r"\d+(?:\.\d+)?", s)]  # noqa: E731
        measured = numbers(cells[1].split("(was")[0].split(";")[0])
        rows[cells[0]] = {"measured": measured if "GB at 1 block" not in cells[1] else measured[:1],
                          "peak_14b": numbers(cells[3])[0], "disk_14b": numbers(cells[4])[0] if cells[4][0].isdigit()
                          else 0.0}
    return rows


def test_needs_at_14b_are_the_docs_table():
    from helios_deploy.cost.configs import load_configs
    from helios_deploy.measure.scale import model_parts, step_needs

    table = docs_table()
    needs = {s["step"]: s for s in step_needs(model_parts(load_configs(config="helios-14b"))) if not s["gpu"]}
    assert set(needs) == set(table), (sorted(needs), sorted(table))
    for step, row in table.items():
        assert needs[step]["ram_bytes"] / GB == pytest.approx(row["peak_14b"], rel=0.03), step
        assert needs[step]["disk_bytes"] / GB == pytest.approx(row["disk_14b"], rel=0.03), step


def test_needs_at_the_measured_real_width_checkpoints():
    """The needs for the real-width checkpoints (1, 2, 4 blocks, one UMT5-XXL layer) are what was measured."""
    from helios_deploy.cost.configs import model_configs
    from helios_deploy.measure.scale import model_parts, step_needs
    from helios_deploy.checkpoints.synthetic import REAL_WIDTH, UMT5_XXL

    table = docs_table()
    for i, blocks in enumerate((1, 2, 4)):
        parts = model_parts(model_configs({**REAL_WIDTH, "num_layers": blocks}, {**UMT5_XXL, "num_layers": 1}, {}))
        for need in step_needs(parts):
            measured = table.get(need["step"], {}).get("measured", [])
            if i < len(measured):
                assert need["ram_bytes"] / GB == pytest.approx(measured[i], rel=0.05, abs=0.15), (need["step"], blocks)


def test_a_checkpoint_folder_is_sized_from_its_configs(tiny_ckpt, capsys):
    code, out, err = run_cli(["doctor", tiny_ckpt, "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["model"] == str(tiny_ckpt)
    export = next(s for s in report["steps"] if s["command"] == "export")
    weights = sum(p.stat().st_size for c in ("transformer", "text_encoder") for p in (tiny_ckpt / c).glob("*.safetensors"))
    # fp32 graphs of bf16 / fp32 weights: about 2x / 1x their bytes (the tiny checkpoint stores fp32)
    assert weights * 0.9 <= export["disk_bytes"] <= weights * 2.2
    code, out, err = run_cli(["doctor", tiny_ckpt.parent / "missing"], capsys)
    assert code == 1 and "does not exist" in err
