"""`build`: the dry-run plan (profiles, precision, settings, cache key) without a GPU, the refusal of
modified graphs, and one clear error where TensorRT or the GPU is missing."""

import json
import shutil

import pytest

from helios_deploy.artifacts import Artifacts

from .conftest import run_cli


def _dry_run(arts, capsys, *extra):
    code, out, err = run_cli(["build", arts, "--dry-run", *extra], capsys)
    assert code == 0, err
    return json.loads(out)


def test_dry_run_plans_one_profile_per_operating_point(artifacts, capsys):
    plan = _dry_run(artifacts, capsys, "--precision", "fp32")
    arts = Artifacts.open(artifacts)
    assert set(plan["components"]) == set(arts.components)
    for component, graphs in plan["components"].items():
        spec = arts.spec(component)
        assert set(graphs) == {g.name for g in spec.graphs}
        for g in spec.graphs:
            p = graphs[g.name]
            assert [x["operating_point"] for x in p["profiles"]] == [op.name for op in g.operating_points]
            for prof, op in zip(p["profiles"], g.operating_points):
                assert list(prof["inputs"]) == [t.name for t in g.inputs]
                from helios_deploy.model.specs import resolve_shape
                for t in g.inputs:
                    shape = list(resolve_shape(t, op.dims))
                    assert prof["inputs"][t.name] == {"min": shape, "opt": shape, "max": shape}
            assert p["precision"] == "fp32" and p["engine"].endswith(".engine") and p["key"][:16] in p["engine"]
    stages = plan["components"]["transformer"]["model"]["profiles"]
    assert len({json.dumps(s["inputs"]["hidden_states"]) for s in stages}) == 3  # each stage its own shape


def test_key_follows_settings(artifacts, capsys):
    a = _dry_run(artifacts, capsys, "--precision", "fp32", "--components", "text_encoder")
    b = _dry_run(artifacts, capsys, "--precision", "fp32", "--components", "text_encoder", "--opt-level", "3")
    c = _dry_run(artifacts, capsys, "--precision", "fp32", "--components", "text_encoder", "--timing-cache", "t.cache")
    key = lambda p: p["components"]["text_encoder"]["model"]["key"]  # noqa: E731
    assert key(a) != key(b) and key(a) == key(c)  # the timing cache changes build time, not the engine


def test_fp8_build_needs_quantize(artifacts, capsys):
    code, _, err = run_cli(["build", artifacts, "--dry-run", "--precision", "fp8", "--components", "transformer"], capsys)
    assert code == 1 and "quantize" in err


@pytest.mark.parametrize("change, needle", [
    ("append", "changed since"),  # another size: refused when the artifacts are opened
    ("flip", "modified after export"),  # same size, other bytes: refused by sha256 before the build reads it
])
def test_modified_graph_is_refused(artifacts, tmp_path, capsys, change, needle):
    arts = tmp_path / "arts"
    shutil.copytree(artifacts, arts)
    path = arts / "text_encoder" / "model.onnx"
    data = bytearray(path.read_bytes())
    if change == "append":
        data += b"\0"
    else:
        data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    code, _, err = run_cli(["build", arts, "--dry-run", "--precision", "fp32"], capsys)
    assert code == 1 and needle in err and "text_encoder" in err and "Traceback" not in err


def test_build_without_gpu_names_what_is_missing(artifacts, tmp_path, capsys):
    from helios_deploy.export.tensorrt.probe import current_platform

    if current_platform()["gpu"] and current_platform()["tensorrt"]:
        pytest.skip("TensorRT and a GPU are present")
    arts = tmp_path / "arts"
    shutil.copytree(artifacts, arts)
    before = sorted(p.name for p in (arts / "transformer").iterdir())
    code, _, err = run_cli(["build", arts, "--precision", "fp32"], capsys)
    assert code == 1 and "tensorrt" in err.lower() and "GPU" in err and "Traceback" not in err
    assert sorted(p.name for p in (arts / "transformer").iterdir()) == before  # nothing written


def test_key_follows_weight_streaming_not_the_budget(artifacts, capsys):
    args = ("--precision", "fp32", "--components", "text_encoder")
    a = _dry_run(artifacts, capsys, *args, "--memory-budget", "1000000")
    b = _dry_run(artifacts, capsys, *args, "--memory-budget", "2000000")
    c = _dry_run(artifacts, capsys, *args)
    key = lambda p: p["components"]["text_encoder"]["model"]["key"]  # noqa: E731
    assert key(a) == key(b) != key(c)
    assert a["memory_budget"] == 1000000 and a["settings"]["weight_streaming"] is True and c["memory_budget"] is None


def test_build_records_the_budget_and_the_engine_hash_and_rebuilds_only_what_changed(artifacts, tmp_path, monkeypatch):
    """`build` through a recording fake of the tensorrt module (tests/fake_tensorrt.py)."""
    import sys

    from helios_deploy.export.tensorrt import build as B
    from helios_deploy.export.tensorrt.engines import BuildSettings
    from helios_deploy.fsutil import sha256_file

    from .fake_tensorrt import FakeTensorRT

    arts = tmp_path / "arts"
    shutil.copytree(artifacts, arts)
    trt = FakeTensorRT(Artifacts.open(arts).spec("text_encoder").graph("model"))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(B, "require_gpu_tensorrt",
                        lambda index=0: {"tensorrt": "10.9.0", "gpu": "NVIDIA H100", "compute_capability": "9.0"})
    logs: list[str] = []

    def build(budget):
        B.build(arts, ["text_encoder"], BuildSettings(precision="fp32", memory_budget=budget), log=logs.append)
        entry = Artifacts.open(arts).manifest["components"]["text_encoder"]["engines"]["model"]
        return entry, len(trt.named("build_serialized_network"))

    entry, builds = build(1 << 30)
    engine = arts / "text_encoder" / entry["file"]
    assert builds == 1 and entry["memory_budget"] == 1 << 30 and entry["key"]["settings"]["weight_streaming"]
    assert entry["report"]["engine_sha256"] == sha256_file(engine)
    entry, builds = build(2 << 30)  # another budget: recorded, no rebuild
    assert builds == 1 and entry["memory_budget"] == 2 << 30 and "memory budget" in logs[-1]
    entry, builds = build(2 << 30)
    assert builds == 1 and logs[-1].endswith(f"up to date ({entry['file']})")
    engine.write_bytes(b"swapped")  # the right name, other bytes: rebuilt
    entry, builds = build(2 << 30)
    assert builds == 2 and any("is not the file the build recorded" in m for m in logs)
    assert entry["report"]["engine_sha256"] == sha256_file(engine)
    entry, builds = build(None)  # weight streaming off: another engine
    assert builds == 3 and entry["memory_budget"] is None and not entry["key"]["settings"]["weight_streaming"]
