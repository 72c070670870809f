"""`verify` on CPU: its comparison core (Polygraphy's Comparator over our runners) against the diffusers
reference modules, that it fails what is off target, and one clear error without a GPU. The engines
themselves are verified by the gpu tests (tests/test_tensorrt_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from helios_deploy.artifacts import Artifacts
from helios_deploy.export.tensorrt.verify import TARGETS, compare_runners, verify_graph
from helios_deploy.runtime.runners import make_runner

from .conftest import run_cli


def _runners(artifacts, component, graph_name="model"):
    arts = Artifacts.open(artifacts)
    graph = arts.spec(component).graph(graph_name)
    ort = make_runner("onnxruntime", arts.root, arts.manifest, component, graph, "cpu")
    ref = make_runner("torch", arts.root, arts.manifest, component, graph, "cpu")
    return arts, graph, ort, ref


@pytest.mark.parametrize("component", ["transformer", "text_encoder"])
def test_comparator_core_passes_the_export_against_the_reference(artifacts, tiny_ckpt, component):
    """ONNX Runtime on the export as the candidate, the diffusers / transformers module as the reference,
    at every operating point: the fp32 target holds."""
    arts, graph, ort, ref = _runners(artifacts, component)
    result = verify_graph(arts, component, graph, ort, ref, "fp32")
    assert [c["name"] for c in result["cases"]] == [p.name for p in graph.operating_points]
    assert result["passed"], result["cases"]
    assert all(c["rel_l2"] <= TARGETS["fp32"].rel_l2 for c in result["cases"])


def test_comparator_core_fails_what_is_off_target(artifacts, tiny_ckpt):
    """A candidate 3% off the reference passes the fp8 target and fails the fp32 one."""
    arts, graph, ort, ref = _runners(artifacts, "text_encoder")

    class Off(type(ort)):
        def _infer_impl(self, feeds):
            out = super()._infer_impl(feeds)
            g = torch.Generator().manual_seed(0)
            return {k: v + 0.03 * v.std() * torch.randn(v.shape, generator=g) for k, v in out.items()}

    off = Off(ort.path, graph, "text_encoder", "cpu")
    from helios_deploy.export.parity.compare import example_inputs

    feeds = [example_inputs(arts.spec("text_encoder"), graph, dict(p.dims), 0) for p in graph.operating_points]
    names = [p.name for p in graph.operating_points]
    loose = compare_runners(ref, off, feeds, names, TARGETS["fp8"])
    strict = compare_runners(ref, off, feeds, names, TARGETS["fp32"])
    assert all(r["passed"] for r in loose) and not any(r["passed"] for r in strict)
    assert 0.01 < strict[0]["rel_l2"] < 0.08


def test_verify_without_gpu_names_what_is_missing(artifacts, capsys):
    from helios_deploy.export.tensorrt.probe import current_platform

    info = current_platform()
    if info["gpu"] and info["tensorrt"]:
        pytest.skip("TensorRT and a GPU are present: the gpu tests verify engines")
    code, out, err = run_cli(["verify", artifacts], capsys)
    assert code == 1 and "tensorrt" in err.lower() and "GPU" in err and "Traceback" not in err
