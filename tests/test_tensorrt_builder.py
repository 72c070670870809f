"""The TensorRT build calls on CPU, through the recording fake of the `tensorrt` module (tests/fake_tensorrt.py):
what the build holds is released before the engine is read back, the engine file's size and sha256 are
recorded, an unreadable or foreign timing cache falls back to an empty one with a warning, and the builder
flags (strongly typed, weight streaming) follow the settings and the TensorRT version."""

from __future__ import annotations

import hashlib
import sys

import onnx
import pytest
from onnx import TensorProto, helper

from helios_deploy.export.tensorrt import builder as B
from helios_deploy.export.tensorrt import engines as E

from .conftest import HEIGHT, MAX_TEXT_LENGTH, TEXT_LENGTH, WIDTH
from .fake_tensorrt import CACHE_MAGIC, BuilderFlag, FakeTensorRT, NetworkDefinitionCreationFlag


@pytest.fixture(scope="module")
def graph(tiny_ckpt):
    from helios_deploy.checkpoints.checkpoint import Checkpoint
    from helios_deploy.model.specs import build_specs

    specs = build_specs(Checkpoint(tiny_ckpt).configs, HEIGHT, WIDTH, TEXT_LENGTH, MAX_TEXT_LENGTH, ["text_encoder"])
    return specs["text_encoder"].graphs[0]


@pytest.fixture
def onnx_path(tmp_path, graph):
    """A graph with the spec's inputs (all the fake parser reads)."""
    types = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64}
    inputs = [helper.make_tensor_value_info(t.name, types[t.dtype], None) for t in graph.inputs]
    out = helper.make_tensor_value_info("out", TensorProto.INT64, None)
    nodes = [helper.make_node("Identity", [graph.inputs[0].name], ["out"])]
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", inputs, [out])), path)
    return path


@pytest.fixture
def fake(monkeypatch, graph):
    def make(**options):
        trt = FakeTensorRT(graph, **options)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return trt

    return make


def _build(onnx_path, graph, tmp_path, settings=E.BuildSettings(), inspect=True):
    logged = []
    report = B.build_engine(onnx_path, graph, tmp_path / "model.engine", settings, inspect=inspect, log=logged.append)
    return report, logged


# -- 6. nothing the build held is alive when the engine is read back -----------------------------------------


def test_network_parser_and_plan_are_released_before_the_engine_is_read_back(fake, onnx_path, graph, tmp_path):
    trt = fake()
    report, _ = _build(onnx_path, graph, tmp_path)
    (_, _, size, alive, _), = trt.named("deserialize_cuda_engine")
    assert not {"builder", "network", "parser", "config", "plan"} & set(alive), alive
    assert size == (tmp_path / "model.engine").stat().st_size  # read back from the file on disk
    assert report["device_memory_bytes"] == 4096 * len(graph.operating_points)  # the fake engine's largest profile
    assert report["weights_bytes"] == 10_000 and report["streamable_weights_bytes"] == 8_000


# -- 8. the engine file's own size and sha256 -----------------------------------------------------------------


def test_report_records_the_engine_files_size_and_sha256(fake, onnx_path, graph, tmp_path):
    fake()
    report, _ = _build(onnx_path, graph, tmp_path, inspect=False)
    data = (tmp_path / "model.engine").read_bytes()
    assert report["engine_bytes"] == len(data) and report["engine_sha256"] == hashlib.sha256(data).hexdigest()
    record = E.engine_record("model.engine", {"k": 1}, report, memory_budget=None)
    E.check_engine_bytes(record, data, tmp_path / "model.engine")  # what the runner checks at load


# -- 7. the timing cache ----------------------------------------------------------------------------------------


def _cache_settings(tmp_path, data: bytes | None) -> E.BuildSettings:
    path = tmp_path / "timing.cache"
    if data is not None:
        path.write_bytes(data)
    return E.BuildSettings(timing_cache=str(path))


@pytest.mark.parametrize("data, warning", [
    (CACHE_MAGIC + b"NVIDIA H1", "unreadable (truncated or corrupt)"),  # create_timing_cache returns None
    (CACHE_MAGIC + b"NVIDIA A100|7", "from another TensorRT version or GPU"),  # set_timing_cache returns False
])
def test_a_bad_timing_cache_falls_back_to_an_empty_one_with_a_warning(fake, onnx_path, graph, tmp_path, data, warning):
    trt = fake()
    settings = _cache_settings(tmp_path, data)
    _, logged = _build(onnx_path, graph, tmp_path, settings, inspect=False)
    assert len(logged) == 1 and warning in logged[0] and "timing.cache" in logged[0]
    attached = trt.named("set_timing_cache")
    assert attached and all(c[2].startswith("timing_cache#") for c in attached)
    assert trt.named("create_timing_cache")[-1][2] == b""  # the fallback: an empty cache
    assert (tmp_path / "timing.cache").read_bytes() == CACHE_MAGIC + b"NVIDIA H100|1"  # rewritten after the build


def test_a_good_timing_cache_is_used_and_kept(fake, onnx_path, graph, tmp_path):
    trt = fake()
    settings = _cache_settings(tmp_path, None)
    for n in (1, 2):
        _, logged = _build(onnx_path, graph, tmp_path, settings, inspect=False)
        assert logged == []
        assert (tmp_path / "timing.cache").read_bytes() == CACHE_MAGIC + f"NVIDIA H100|{n}".encode()
    assert [c[2] for c in trt.named("create_timing_cache")] == [b"", CACHE_MAGIC + b"NVIDIA H100|1"]


# -- builder flags ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version, flags", [("10.9.0", 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)),
                                            ("11.0.0", 0)])
def test_networks_are_strongly_typed(fake, onnx_path, graph, tmp_path, version, flags):
    trt = fake(version=version)
    _build(onnx_path, graph, tmp_path, inspect=False)
    assert [c[2] for c in trt.named("create_network")] == [flags]


@pytest.mark.parametrize("budget, streaming", [(None, False), (1 << 30, True), (2 << 30, True)])
def test_weight_streaming_flag_follows_the_budget(fake, onnx_path, graph, tmp_path, budget, streaming):
    trt = fake()
    report, _ = _build(onnx_path, graph, tmp_path, E.BuildSettings(memory_budget=budget), inspect=False)
    (_, _, flags, profiles), = trt.named("build_serialized_network")
    assert (BuilderFlag.WEIGHT_STREAMING in flags) == streaming and report["weight_streaming"] == streaming
    assert profiles == len(graph.operating_points)


def test_engine_and_cache_writes_leave_no_partial_files_and_clean_stale_ones(fake, onnx_path, graph, tmp_path):
    import subprocess

    fake()
    dead = subprocess.Popen(["true"])
    dead.wait()  # a process id that is gone: its partial is stale
    stale = tmp_path / f".model.engine.partial-{dead.pid}-abc"
    stale.write_bytes(b"half an engine")
    _build(onnx_path, graph, tmp_path, _cache_settings(tmp_path, None), inspect=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert (tmp_path / "model.engine").is_file() and (tmp_path / "timing.cache").is_file()
