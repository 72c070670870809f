"""Exported ONNX against the diffusers/transformers reference modules at every operating point,
batch 2 and an unseen shape; plus the manifest and artifact layout."""

import json

import onnx
import pytest

from helios_deploy.artifacts import Artifacts
from helios_deploy.model.specs import COMPONENTS

from .conftest import run_cli


def test_every_component_has_a_parity_fixture(parity):
    """Guard: a component without parity cases fails here."""
    assert set(parity["components"]) == set(COMPONENTS)


@pytest.mark.parametrize("component", COMPONENTS)
def test_parity_against_reference(parity, artifacts, component):
    result = parity["components"][component]
    spec = Artifacts.open(artifacts).spec(component)
    names = [c["name"] for c in result["cases"]]
    # every operating point, batch 2, and a shape the export never saw
    assert [p.name for p in spec.operating_points] == names[: len(spec.operating_points)]
    assert any(c["dims"]["batch"] == 2 for c in result["cases"])
    assert "unseen_shape" in names
    for case in result["cases"]:
        assert case["rel_l2"] <= 1e-4, case
        assert case["cosine"] > 0.99999, case
    assert result["passed"]


def test_manifest_describes_artifacts(artifacts, tiny_ckpt):
    from helios_deploy.checkpoints.checkpoint import Checkpoint
    from helios_deploy.fsutil import sha256_file

    arts = Artifacts.open(artifacts)
    m = arts.manifest
    assert m["checkpoint"]["identity"] == Checkpoint(tiny_ckpt).identity
    assert m["helios_deploy_version"] and m["opset"] == 20 and m["precision"] == "fp32"
    assert m["scheduler_config"]["_class_name"] == "HeliosDMDScheduler"
    assert (artifacts / "tokenizer" / "tokenizer.json").is_file()
    for name in COMPONENTS:
        spec = arts.spec(name)
        for g in spec.graphs:
            info = m["components"][name]["graphs"][g.name]
            path = artifacts / name / g.file
            assert sha256_file(path) == info["file_sha256"]
            model = onnx.load(str(path), load_external_data=False)
            # graph I/O is exactly the spec's
            assert [i.name for i in model.graph.input] == [t.name for t in g.inputs]
            assert [o.name for o in model.graph.output] == [t.name for t in g.outputs]
            # weights live in external data beside the graph; only tiny constants stay inline
            inline = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
            assert all(len(t.raw_data) <= 1024 for t in inline)
            external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
            assert external and all(e.value == info["data"] for t in external for e in t.external_data if e.key == "location")
    assert (artifacts / "transformer" / "model.onnx").stat().st_size < (artifacts / "transformer" / "model.onnx.data").stat().st_size


def test_parity_cli_writes_report(tiny_ckpt, artifacts, tmp_path, capsys):
    report = tmp_path / "parity.json"
    code, out, err = run_cli(["parity", tiny_ckpt, artifacts, "--json", report, "--components", "text_encoder"], capsys)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["passed"] is True
    case = data["components"]["text_encoder"]["cases"][0]
    assert {"name", "max_abs_err", "rel_l2", "cosine"} <= set(case)
    assert data["components"]["text_encoder"]["precision"] == "fp32"


def test_export_audit_runs_and_fails_with_a_table(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """The export's audit passes against the true reference and fails (exit 1, table, nothing left
    behind) when the reference disagrees."""

    from helios_deploy.export.exporter import run as export_run

    out = tmp_path / "good"
    code, stdout, err = run_cli(["export", tiny_ckpt, "-o", out, "--height", 64, "--width", 128,
                                 "--components", "text_encoder", "--max-text-length", 32], capsys)
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["audit"]["text_encoder"]["passed"]

    real = export_run.reference_module

    def perturbed(ckpt, component):
        module = real(ckpt, component)  # the final norm's output 1% off: a reference that disagrees
        module.encoder.final_layer_norm.register_forward_hook(lambda m, args, out: out * 1.01)
        return module

    monkeypatch.setattr(export_run, "reference_module", perturbed)
    bad = tmp_path / "bad"
    code, stdout, err = run_cli(["export", tiny_ckpt, "-o", bad, "--height", 64, "--width", 128,
                                 "--components", "text_encoder", "--max-text-length", 32], capsys)
    assert code == 1
    assert "audit check(s) failed" in err and "parity" in err and "text_encoder" in err
    assert not bad.exists() and not list(tmp_path.glob(".bad*"))
