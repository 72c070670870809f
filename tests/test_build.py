"""`build`: the dry-run plan (profiles, precision, settings, cache key) without a GPU, the refusal of
modified graphs, and one clear error where TensorRT or the GPU is missing."""

import json
import shutil

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
                from helios_deploy.specs import resolve_shape
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


def test_modified_graph_is_refused(artifacts, tmp_path, capsys):
    arts = tmp_path / "arts"
    shutil.copytree(artifacts, arts)
    with open(arts / "text_encoder" / "model.onnx", "ab") as f:
        f.write(b"\0")
    code, _, err = run_cli(["build", arts, "--dry-run", "--precision", "fp32"], capsys)
    assert code == 1 and "modified after export" in err


def test_build_without_gpu_names_what_is_missing(artifacts, tmp_path, capsys):
    from helios_deploy.export.tensorrt.probe import current_platform

    if current_platform()["gpu"] and current_platform()["tensorrt"]:
        import pytest

        pytest.skip("TensorRT and a GPU are present")
    arts = tmp_path / "arts"
    shutil.copytree(artifacts, arts)
    before = sorted(p.name for p in (arts / "transformer").iterdir())
    code, _, err = run_cli(["build", arts, "--precision", "fp32"], capsys)
    assert code == 1 and "tensorrt" in err.lower() and "GPU" in err and "Traceback" not in err
    assert sorted(p.name for p in (arts / "transformer").iterdir()) == before  # nothing written
