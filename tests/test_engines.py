"""Engine profiles, keys, the TensorRT probe and the TensorRT runner's checks: everything about
engines that runs without a GPU (the GPU side is tests/test_tensorrt_gpu.py)."""

from __future__ import annotations

import pytest

from helios_deploy.artifacts import FORMAT
from helios_deploy.errors import UserError
from helios_deploy.export.tensorrt import engines as E
from helios_deploy.export.tensorrt import probe
from helios_deploy.model.specs import resolve_shape, spec_to_json

from .conftest import HEIGHT, MAX_TEXT_LENGTH, TEXT_LENGTH, WIDTH


@pytest.fixture(scope="module")
def specs(tiny_ckpt):
    from helios_deploy.checkpoints.checkpoint import Checkpoint
    from helios_deploy.model.specs import build_specs

    return build_specs(Checkpoint(tiny_ckpt).configs, HEIGHT, WIDTH, TEXT_LENGTH, MAX_TEXT_LENGTH,
                       ["transformer", "text_encoder"])


@pytest.fixture(scope="module")
def graph(specs):
    return specs["transformer"].graphs[0]


# -- profiles -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("component", ["transformer", "text_encoder"])
def test_one_exact_profile_per_operating_point(specs, component):
    graph = specs[component].graphs[0]
    profs = E.profiles(graph)
    assert len(profs) == len(graph.operating_points)
    for point, prof in zip(graph.operating_points, profs):
        assert list(prof) == [t.name for t in graph.inputs]
        for t in graph.inputs:
            shape = resolve_shape(t, point.dims)
            assert prof[t.name] == (shape, shape, shape)


def test_transformer_profiles_follow_the_pyramid(graph):
    heights = [p["hidden_states"][1][3] for p in E.profiles(graph)]
    assert heights == sorted(heights) and len(set(heights)) == 3  # stage0 < stage1 < stage2


def test_max_batch_widens_only_the_batch_axis(graph):
    for prof in E.profiles(graph, max_batch=3):
        for lo, opt, hi in prof.values():
            assert lo == opt and hi[0] == 3 and hi[1:] == opt[1:]
    with pytest.raises(UserError, match="outside the exported batch range"):
        E.profiles(graph, max_batch=graph.ranges["batch"][1] + 1)


def test_select_profile_finds_each_stage_and_nothing_else(graph):
    profs = E.profiles(graph)
    for i, prof in enumerate(profs):
        assert E.select_profile(profs, {n: s[1] for n, s in prof.items()}) == i
    odd = {n: s[1] for n, s in profs[0].items()}
    odd["hidden_states"] = (1, 16, 9, 6, 6)
    assert E.select_profile(profs, odd) is None


def _engine_io(graph):
    io = {t.name: ("input", t.dtype) for t in graph.inputs}
    io.update({t.name: ("output", t.dtype) for t in graph.outputs})
    return io


def test_audit_engine_collects_every_mismatch(graph):
    profs = E.profiles(graph)
    assert E.audit_engine(graph, _engine_io(graph), profs) == []
    io = _engine_io(graph)
    io["timestep"] = ("input", "int32")
    del io["noise_pred"]
    io["extra"] = ("output", "float32")
    problems = E.audit_engine(graph, io, profs[:2])
    text = "\n".join(problems)
    assert "timestep" in text and "noise_pred: missing" in text and "extra" in text
    assert "2 optimization profiles, expected 3" in text
    swapped = [profs[1], profs[0], profs[2]]
    assert any("profile stage0" in p for p in E.audit_engine(graph, _engine_io(graph), swapped))


# -- settings and keys ----------------------------------------------------------------------------------


def test_build_settings_validate():
    assert E.BuildSettings().opt_level == 4
    assert "timing_cache" not in E.BuildSettings(timing_cache="/tmp/t.cache").key()
    for bad in (dict(precision="fp16"), dict(opt_level=7), dict(workspace=0)):
        with pytest.raises(UserError):
            E.BuildSettings(**bad)


@pytest.fixture
def key_inputs(tmp_path, graph):
    onnx, data = tmp_path / "model.onnx", tmp_path / "model.onnx.data"
    onnx.write_bytes(b"graph-v1")
    data.write_bytes(b"weights-v1")
    return dict(onnx_path=onnx, data_path=data, profile_list=E.profiles(graph), settings=E.BuildSettings(),
                trt_version="10.9.0", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")


def test_engine_key_is_stable(key_inputs):
    key = E.engine_key(**key_inputs)
    assert key == E.engine_key(**key_inputs) and len(key) == 64
    assert E.engine_filename("model.onnx", key) == f"model.{key[:16]}.engine"


@pytest.mark.parametrize("change", ["graph", "weights", "profiles", "opt_level", "precision", "trt", "gpu", "cc"])
def test_engine_key_changes_with_each_ingredient(key_inputs, graph, change):
    before = E.engine_key(**key_inputs)
    k = dict(key_inputs)
    if change == "graph":
        k["onnx_path"].write_bytes(b"graph-v2")
    elif change == "weights":
        k["data_path"].write_bytes(b"weights-v2")
    elif change == "profiles":
        k["profile_list"] = E.profiles(graph, max_batch=2)
    elif change == "opt_level":
        k["settings"] = E.BuildSettings(opt_level=3)
    elif change == "precision":
        k["settings"] = E.BuildSettings(precision="fp8")
    else:
        field = {"trt": "trt_version", "gpu": "gpu_name", "cc": "compute_capability"}[change]
        k[field] = {"trt": "11.0.0", "gpu": "NVIDIA A100-SXM4-80GB", "cc": "8.0"}[change]
    assert E.engine_key(**k) != before


def _fields(graph, **over):
    args = dict(graph_sha256="a" * 64, weights_sha256="b" * 64, profile_list=E.profiles(graph),
                settings=E.BuildSettings(), trt_version="10.9.0", gpu_name="NVIDIA H100", compute_capability="9.0")
    args.update(over)
    return E.key_fields(**args)


def test_key_fields_survive_the_manifest(graph):
    import json

    fields = _fields(graph)
    assert json.loads(json.dumps(fields)) == fields
    E.check_engine_key(json.loads(json.dumps(fields)), _fields(graph))  # tuples vs lists: no change


@pytest.mark.parametrize("over, needle", [
    (dict(graph_sha256="c" * 64), "ONNX graph"),
    (dict(weights_sha256="d" * 64), "weights"),
    (dict(profile_list=[]), "optimization profiles"),
    (dict(settings=E.BuildSettings(opt_level=2)), "opt_level 4 -> 2"),
    (dict(trt_version="11.0.0"), "TensorRT version: 10.9.0 -> 11.0.0"),
    (dict(gpu_name="NVIDIA L40S"), "GPU: NVIDIA H100 -> NVIDIA L40S"),
    (dict(compute_capability="8.9"), "compute capability: 9.0 -> 8.9"),
])
def test_check_engine_key_names_what_changed(graph, over, needle):
    with pytest.raises(UserError) as e:
        E.check_engine_key(_fields(graph), _fields(graph, **over), "transformer/model")
    message = str(e.value)
    assert needle in message and "--rebuild" in message and "transformer/model" in message
    assert len(E.key_changes(_fields(graph), _fields(graph, **over))) == 1  # only what changed is named


# -- the probe ----------------------------------------------------------------------------------------


def test_probe_finds_no_tensorrt_here_and_does_not_raise():
    info = probe.probe_tensorrt()
    assert set(info) == {"tensorrt", "gpu", "compute_capability", "error"}
    assert info["tensorrt"] is None and "tensorrt" in info["error"]


def test_require_gpu_tensorrt_names_what_is_missing():
    with pytest.raises(UserError) as e:
        probe.require_gpu_tensorrt()
    assert "tensorrt" in str(e.value) and "--backend onnxruntime" in str(e.value)


def test_a_crashing_probe_is_an_error_not_a_crash():
    info = probe.probe_tensorrt(code="import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert info["tensorrt"] is None and "SIGSEGV" in info["error"]


def test_a_crash_after_tensorrt_keeps_what_was_found():
    code = ('import json, os, signal; print("HELIOS_PROBE " + json.dumps({"tensorrt": "10.9.0", "errors": [], '
            '"step": "gpu"}), flush=True); os.kill(os.getpid(), signal.SIGSEGV)')
    info = probe.probe_tensorrt(code=code)
    assert info["tensorrt"] == "10.9.0" and info["gpu"] is None
    assert "SIGSEGV" in info["error"] and "GPU" in info["error"]


def test_a_failing_or_hanging_probe_is_an_error():
    failed = probe.probe_tensorrt(code="raise SystemExit('driver exploded')")
    assert "driver exploded" in failed["error"]
    hung = probe.probe_tensorrt(code="import time; time.sleep(30)", timeout=1)
    assert "did not finish" in hung["error"]


# -- the runner's checks before any TensorRT call ----------------------------------------------------


def _manifest(specs, engines=None) -> dict:
    comp = {"spec": spec_to_json(specs["transformer"]),
            "graphs": {"model": {"file": "model.onnx", "data": "model.onnx.data"}}}
    if engines is not None:
        comp["engines"] = engines
    return {"format": FORMAT, "components": {"transformer": comp}}


def _runner(tmp_path, manifest, graph, device="cuda"):
    from helios_deploy.runtime.runners.tensorrt import TensorRTRunner

    return TensorRTRunner(tmp_path, manifest, "transformer", graph, device)


def test_runner_without_engines_says_run_build(tmp_path, specs, graph):
    with pytest.raises(UserError, match="no TensorRT engine for transformer/model; run helios-deploy build"):
        _runner(tmp_path, _manifest(specs), graph).activate()


def test_make_runner_reaches_the_tensorrt_runner(tmp_path, specs, graph):
    from helios_deploy.runtime.runners import make_runner

    with pytest.raises(UserError, match="run helios-deploy build"):
        make_runner("tensorrt", tmp_path, _manifest(specs, {}), "transformer", graph, "cuda").activate()


def test_runner_with_a_missing_engine_file_or_on_cpu(tmp_path, specs, graph):
    record = E.engine_record("model.0123456789abcdef.engine", _fields(graph))
    with pytest.raises(UserError, match="is missing"):
        _runner(tmp_path, _manifest(specs, {"model": record}), graph)
    with pytest.raises(UserError, match="CUDA devices"):
        _runner(tmp_path, _manifest(specs, {"model": record}), graph, device="cpu")


def test_runner_activation_without_tensorrt_is_a_user_error(tmp_path, specs, graph):
    record = E.engine_record("model.0123456789abcdef.engine", _fields(graph))
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / record["file"]).write_bytes(b"not an engine")
    runner = _runner(tmp_path, _manifest(specs, {"model": record}), graph)
    with pytest.raises(UserError, match="tensorrt"):
        runner.activate()
    assert not runner.is_active


def test_runtime_key_takes_platform_and_manifest_hashes(graph):
    from helios_deploy.runtime.runners.tensorrt import runtime_key

    recorded = _fields(graph)
    now = runtime_key(recorded, {"tensorrt": "10.9.0", "gpu": "NVIDIA H100", "compute_capability": "9.0"},
                      {"file_sha256": "a" * 64, "data_sha256": "e" * 64})
    assert E.key_changes(recorded, now) == [f"weights: {'b' * 12} -> {'e' * 12}"]


# -- the weight-streaming budget: --memory-budget is for all weights, weight_streaming_budget_v2 for the
#    streamable ones


@pytest.mark.parametrize("budget, total, streamable, expected", [
    (None, 10 << 30, 8 << 30, None),  # no budget: every weight stays on the device
    (12 << 30, 10 << 30, 8 << 30, None),  # every weight fits
    (10 << 30, 10 << 30, 8 << 30, None),  # exactly
    (6 << 30, 10 << 30, 8 << 30, 4 << 30),  # 2 GiB cannot be streamed: 4 of the 8 streamable stay
    (2 << 30, 10 << 30, 8 << 30, 0),  # only the non-streamable ones stay: stream every streamable weight
    (6 << 30, 6 << 30, 0, None),  # nothing streamable, all fits
])
def test_weight_streaming_budget_subtracts_the_weights_that_cannot_stream(budget, total, streamable, expected):
    assert E.weight_streaming_budget(budget, total, streamable) == (expected, None)


def test_a_budget_below_the_weights_that_cannot_stream_is_a_user_error():
    with pytest.raises(UserError, match="below the engine's weights TensorRT cannot stream") as e:
        E.weight_streaming_budget(1 << 30, 10 << 30, 8 << 30)
    assert f"at least {2 << 30} bytes" in str(e.value)
    with pytest.raises(UserError):
        E.weight_streaming_budget(5 << 30, 6 << 30, 0)  # nothing streamable and too little room


@pytest.mark.parametrize("budget, streamable, expected", [(6 << 30, 8 << 30, 6 << 30), (9 << 30, 8 << 30, None)])
def test_without_a_total_weights_size_the_budget_is_a_streamable_budget_and_says_so(budget, streamable, expected):
    value, warning = E.weight_streaming_budget(budget, None, streamable)
    assert value == expected and "streamable weights only" in warning


def test_without_streamable_weights_size_nothing_is_applied_and_it_says_so():
    value, warning = E.weight_streaming_budget(6 << 30, 10 << 30, None)
    assert value is None and "not applied" in warning


def test_only_weight_streaming_on_off_is_part_of_the_key():
    a, b = E.BuildSettings(memory_budget=8 << 30).key(), E.BuildSettings(memory_budget=16 << 30).key()
    assert a == b and a["weight_streaming"] is True and "memory_budget" not in a
    assert E.BuildSettings().key()["weight_streaming"] is False
    assert E.BuildSettings(memory_budget=1).key() != E.BuildSettings().key()


# -- dtypes and the engine file ----------------------------------------------------------------------------


def test_trt_dtype_reads_the_member_name():
    import enum

    DataType = enum.IntEnum("DataType", "FLOAT HALF INT8 INT32 BOOL UINT8 FP8 BF16 INT64", start=0)
    assert str(DataType.BF16) == "7"  # a native IntEnum binding: str() is no name at all
    assert [E.trt_dtype(d) for d in (DataType.FLOAT, DataType.BF16, DataType.INT64, DataType.UINT8, DataType.FP8)] == \
        ["float32", "bfloat16", "int64", "uint8", "float8_e4m3fn"]


def _engine_entry(data: bytes) -> dict:
    import hashlib

    return {"report": {"engine_bytes": len(data), "engine_sha256": hashlib.sha256(data).hexdigest()}}


def test_engine_file_problem_checks_size_then_sha256(tmp_path):
    path = tmp_path / "model.engine"
    entry = _engine_entry(b"engine v1")
    assert E.engine_file_problem(entry, path) == "missing"
    path.write_bytes(b"engine v1")
    assert E.engine_file_problem(entry, path) is None
    path.write_bytes(b"engine v22")
    assert "10 bytes, the build wrote 9" in E.engine_file_problem(entry, path)
    path.write_bytes(b"engine v2")
    assert "sha256" in E.engine_file_problem(entry, path)
    assert "older helios-deploy" in E.engine_file_problem({"report": {}}, path)


def test_check_engine_bytes_refuses_other_bytes(tmp_path):
    entry = _engine_entry(b"engine v1")
    E.check_engine_bytes(entry, b"engine v1", tmp_path / "model.engine")
    E.check_engine_bytes(entry, bytearray(b"engine v1"), tmp_path / "model.engine")  # any buffer
    with pytest.raises(UserError, match="not the one `build` recorded") as e:
        E.check_engine_bytes(entry, b"engine v2", tmp_path / "model.engine")
    assert "--rebuild" in str(e.value)
