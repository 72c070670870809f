"""Issue 28 (TensorRT round 3): one test per desk-review finding, each driving the real build / refit / runner /
repository code through the faithful fakes of the TensorRT bindings (tests/fake_tensorrt.py,
tests/fake_tensorrt_refit.py, tests/fake_cuda.py). Finding 2 (weight-stripped engines refitted only with their
build weights) is tests/test_lora.py::test_weight_stripped_engine_is_refitted_only_with_its_build_weights."""

from __future__ import annotations

import inspect
import json
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from helios_deploy.errors import UserError
from helios_deploy.export.tensorrt import builder as B
from helios_deploy.export.tensorrt import engines as E
from helios_deploy.export.tensorrt import refit as RF
from helios_deploy.model.specs import resolve_shape

from .conftest import HEIGHT, MAX_TEXT_LENGTH, TEXT_LENGTH, WIDTH
from .fake_tensorrt_refit import FakeRefitTensorRT, digest

N_WEIGHTS, WEIGHT_ELEMS = 8, 4096  # 16 KiB fp32 each


@pytest.fixture(scope="module")
def specs(tiny_ckpt):
    from helios_deploy.checkpoints.checkpoint import Checkpoint
    from helios_deploy.model.specs import build_specs

    return build_specs(Checkpoint(tiny_ckpt).configs, HEIGHT, WIDTH, TEXT_LENGTH, MAX_TEXT_LENGTH,
                       ["text_encoder", "transformer"])


def _onnx(path, graph, seed: int, n: int = N_WEIGHTS):
    """A graph with the spec's inputs (all the fake parser reads) and ``n`` fp32 initializers drawn from ``seed``."""
    types = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64}
    inputs = [helper.make_tensor_value_info(t.name, types[t.dtype], None) for t in graph.inputs]
    out = helper.make_tensor_value_info("out", types[graph.inputs[0].dtype], None)
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal(WEIGHT_ELEMS).astype(np.float32), f"w{i}") for i in range(n)]
    nodes = [helper.make_node("Identity", [graph.inputs[0].name], ["out"])]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", inputs, [out], initializer=inits)), path)
    return path


def _fake(monkeypatch, graph, **options):
    trt = FakeRefitTensorRT(graph, **options)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def _refit(trt, engine_path, onnx_path, names):
    """refit_plan as it is called: from the engine file (or, in the code before issue 28, from its bytes)."""
    if "engine_path" in inspect.signature(RF.refit_plan).parameters:
        return RF.refit_plan(trt, engine_path, onnx_path, names)
    return RF.refit_plan(trt, engine_path.read_bytes(), onnx_path, names)


@pytest.fixture
def refittable(tmp_path, monkeypatch, specs):
    """A refittable text-encoder engine built by the fake from weights v1, and the graph with weights v2."""
    graph = specs["text_encoder"].graphs[0]
    trt = _fake(monkeypatch, graph)
    v1, v2 = _onnx(tmp_path / "v1.onnx", graph, 1), _onnx(tmp_path / "v2.onnx", graph, 2)
    engine = tmp_path / "model.engine"
    B.build_engine(v1, graph, engine, E.BuildSettings(refittable=True), inspect=False, log=lambda m: None)
    return trt, engine, v2


def _weights(path) -> dict[str, str]:
    return {t.name: digest(numpy_helper.to_array(t)) for t in onnx.load(str(path)).graph.initializer}


# -- 1. refit reads no freed memory and holds one group at a time -------------------------------------------------


def test_1_refit_holds_one_group_at_a_time_and_unsets_it_before_release(refittable, monkeypatch):
    """The Refitter keeps and re-reads every weight until it is unset; Weights(ndarray) pins the array for its
    whole life. With groups of 3 weights, at most one group is held at any refit_cuda_engine and each weight is
    read once; the engine ends with exactly the new weights."""
    trt, engine, v2 = refittable
    group = 3 * WEIGHT_ELEMS * 4
    monkeypatch.setattr(RF, "GROUP_BYTES", group)
    names = [f"w{i}" for i in range(N_WEIGHTS)]
    plan = _refit(trt, engine, v2, names)
    assert trt.pinned_peak <= group, f"the Refitter held {trt.pinned_peak} bytes at once (group: {group})"
    assert sum(trt.refit_reads) == N_WEIGHTS and len(trt.refit_reads) == 3
    assert json.loads(bytes(plan))["weights"] == _weights(v2)
    assert len(trt.named("unset_named_weights")) == N_WEIGHTS


# -- 3. plan models never serve a weight-stripped engine -------------------------------------------------------


def test_3_plan_models_of_weight_stripped_engines_are_refused(artifacts, tmp_path):
    from helios_deploy.artifacts import Artifacts, write_manifest
    from helios_deploy.serving.repository import RepoOptions, write_repository

    from .test_triton import T2V_GRAPHS, _with_fake_engines

    arts = _with_fake_engines(artifacts, tmp_path / "arts", T2V_GRAPHS)
    a = Artifacts.open(arts)
    a.manifest["components"]["transformer"]["engines"]["model"]["key"]["settings"]["strip_weights"] = True
    write_manifest(arts, a.manifest)
    with pytest.raises(UserError, match="weight-stripped engines cannot be served as tensorrt_plan models"):
        write_repository(arts, tmp_path / "repo", RepoOptions(backend="onnxruntime", reference=True, plan_models=True,
                                                              triton_release="26.02"))
    assert not (tmp_path / "repo").exists()


# -- 4. plan models: the -py3 image's TensorRT is not the trtllm table's ---------------------------------------


def test_4_plan_models_never_get_a_py3_release_from_the_trtllm_table():
    from helios_deploy.serving.containers import deployment

    with pytest.raises(UserError, match="no table of the -py3 images' TensorRT") as e:
        deployment("10.11.0.33", plan_models=True)  # the trtllm table says 25.10 ships 10.11; its -py3 is CUDA 13
    assert "--triton-release" in str(e.value)
    chosen = deployment("10.11.0.33", plan_models=True, release="25.10")  # the user's choice, checked at start
    assert chosen.image == "nvcr.io/nvidia/tritonserver:25.10-py3" and chosen.release == "25.10"
    without = deployment("10.11.0.33", plan_models=False)  # the Python backend: the trtllm image that ships it
    assert without.image == "nvcr.io/nvidia/tritonserver:25.10-trtllm-python-py3"


# -- 5. TensorRT 11.3: REFIT may drop a GEMM bias --------------------------------------------------------------


def test_5_refittable_builds_are_refused_on_tensorrt_11_3(specs):
    graph = specs["text_encoder"].graphs[0]
    with pytest.raises(UserError, match="cannot build refittable engines") as e:
        B.refit_flags(FakeRefitTensorRT(graph, version="11.3.0"), E.BuildSettings(refittable=True))
    assert "bias" in str(e.value)
    trt = FakeRefitTensorRT(graph, version="11.2.1")
    assert [f.name for f in B.refit_flags(trt, E.BuildSettings(refittable=True))] == ["REFIT"]


# -- 6. one copy of the engine at a time ------------------------------------------------------------------------


def test_6_refit_maps_the_engine_file_and_releases_the_engine_before_the_plan_is_written(refittable):
    trt, engine, v2 = refittable
    plan = _refit(trt, engine, v2, ["w0"])
    assert [c[2] for c in trt.named("deserialized_from")] == ["mmap"]  # no private bytes copy of the file
    assert not isinstance(plan, bytes), "the serialised plan was copied into bytes"
    assert "engine" not in trt.alive_kinds() and "refitter" not in trt.alive_kinds()  # released before writing


# -- 7. one profile per refittable engine, where TensorRT says so -------------------------------------------------


def test_7_a_refused_profile_stops_the_build_with_one_message(specs, tmp_path, monkeypatch):
    graph = specs["transformer"].graphs[0]
    assert len(graph.operating_points) > 1
    _fake(monkeypatch, graph, refit_one_profile=True)
    path = _onnx(tmp_path / "t.onnx", graph, 0, n=1)
    with pytest.raises(UserError, match="refused the optimization profile of operating point") as e:
        B.build_engine(path, graph, tmp_path / "t.engine", E.BuildSettings(refittable=True), inspect=False,
                       log=lambda m: None)
    assert "one optimization profile" in str(e.value) and not (tmp_path / "t.engine").exists()
    trt = _fake(monkeypatch, graph, refit_one_profile=False)  # a TensorRT that takes them all
    B.build_engine(path, graph, tmp_path / "t.engine", E.BuildSettings(refittable=True), inspect=False,
                   log=lambda m: None)
    assert trt.named("build_serialized_network")[-1][3] == len(graph.operating_points)


# -- 8. fp32 builds without TF32 ----------------------------------------------------------------------------------


def test_8_fp32_builds_turn_tf32_off_and_the_key_says_so(specs, tmp_path, monkeypatch):
    graph = specs["text_encoder"].graphs[0]
    trt = _fake(monkeypatch, graph)
    path = _onnx(tmp_path / "m.onnx", graph, 0, n=1)
    B.build_engine(path, graph, tmp_path / "a.engine", E.BuildSettings(), inspect=False, log=lambda m: None)
    assert "TF32" not in {f.name for f in trt.named("build_serialized_network")[0][2]}  # on by default in TensorRT
    B.build_engine(path, graph, tmp_path / "b.engine", E.BuildSettings(tf32=True), inspect=False, log=lambda m: None)
    assert "TF32" in {f.name for f in trt.named("build_serialized_network")[1][2]}
    assert E.BuildSettings().key()["tf32"] is False and E.BuildSettings(tf32=True).key() != E.BuildSettings().key()
    assert "tf32" not in E.BuildSettings(precision="bf16").key()


# -- 9. --max-batch: each batch on its own point's profile ------------------------------------------------------


def test_9_select_profile_prefers_the_profile_tuned_for_the_shapes():
    one = {"x": ((1, 4), (1, 4), (2, 4))}  # a batch-1 point widened by --max-batch 2
    two = {"x": ((2, 4), (2, 4), (2, 4))}  # the batch-2 point
    assert E.select_profile([one, two], {"x": (2, 4)}) == 1
    assert E.select_profile([one, two], {"x": (1, 4)}) == 0
    assert E.select_profile([one], {"x": (2, 4)}) == 0 and E.select_profile([two], {"x": (1, 4)}) is None


# -- 10. no CUDA-graph capture each time the batch changes within a profile -----------------------------------------


def test_10_alternating_batches_within_a_profile_capture_once_per_shape(tmp_path, monkeypatch, specs):
    from .test_tensorrt_runner import Setup, _expected

    graph = specs["transformer"].graphs[0]
    lo, hi = graph.ranges.get("batch", (1, 1))
    if hi < 2:
        pytest.skip("the tiny transformer's exported batch range has no batch 2")
    s = Setup(tmp_path, monkeypatch, specs, graph, fake_trt_options={"max_batch": 2})
    runner = s.runner(cuda_graph=True).activate()
    point = graph.operating_points[0]
    for step, batch in enumerate([1, 2, 1, 2, 1, 2]):
        dims = {**point.dims, "batch": batch}
        g = torch.Generator().manual_seed(step)
        feeds = {t.name: (torch.randn(resolve_shape(t, dims), generator=g) if t.dtype == "float32" else
                          torch.randint(0, 9, resolve_shape(t, dims), generator=g)) for t in graph.inputs}
        out = runner.infer(feeds)["noise_pred"]
        assert out.shape[0] == batch and torch.allclose(out, torch.full_like(out, _expected(feeds, 0)))
    assert runner.captures == 2 and len(s.trt.named("capture")) == 2


# -- 11. minor: missing weights to a fixed point; INCLUDE_REFIT only where it exists and matters ----------------------


def test_11_missing_weights_are_asked_for_until_none_is_missing(refittable):
    trt, engine, v2 = refittable
    trt.combined = {"w0": ["w1"], "w1": ["w2"]}  # setting w1 (asked for by w0) makes w2 missing in turn
    plan = _refit(trt, engine, v2, ["w0"])
    assert sorted(c[2] for c in trt.named("set_named_weights")) == ["w0", "w1", "w2"]
    weights = json.loads(bytes(plan))["weights"]
    new = _weights(v2)
    assert all(weights[n] == new[n] for n in ("w0", "w1", "w2"))


def test_11_include_refit_exists_from_10_14_and_only_matters_for_stripped_engines(specs):
    graph = specs["text_encoder"].graphs[0]
    assert not hasattr(FakeRefitTensorRT(graph, version="10.8.0").SerializationFlag, "INCLUDE_REFIT")
    assert hasattr(FakeRefitTensorRT(graph, version="10.14.1").SerializationFlag, "INCLUDE_REFIT")
    assert "INCLUDE_REFIT" not in inspect.getsource(RF.refit_plan).split('"""')[-1]  # not set for REFIT engines
