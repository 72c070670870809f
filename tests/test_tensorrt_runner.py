"""The TensorRT runner's bookkeeping on CPU, driven through a recording fake of the `tensorrt` module and of
torch.cuda (tests/fake_tensorrt.py): one execution context per operating point with shared user-managed
activation memory, CUDA graphs never replayed on a changed context, the runner's own stream ordered against
the caller's, output shapes checked against the engine, the device guard, the weight-streaming budget, the
engine file's hash and the dtype names. The same paths on a real GPU: tests/test_tensorrt_gpu.py."""

from __future__ import annotations

import hashlib
import itertools
import sys

import pytest
import torch

from helios_deploy.artifacts import FORMAT
from helios_deploy.errors import UserError
from helios_deploy.export.tensorrt import engines as E
from helios_deploy.runtime.runners import tensorrt as R
from helios_deploy.model.specs import resolve_shape, spec_to_json

from .conftest import HEIGHT, MAX_TEXT_LENGTH, TEXT_LENGTH, WIDTH
from .fake_cuda import FakeCuda
from .fake_tensorrt import DataType, ExecutionContextAllocationStrategy, FakeTensorRT

PLATFORM = {"tensorrt": "10.14.1", "gpu": "NVIDIA H100", "compute_capability": "9.0", "error": None}
MUTATING = {"set_optimization_profile_async", "set_input_shape", "set_tensor_address", "set_device_memory"}


@pytest.fixture(scope="module")
def specs(tiny_ckpt):
    from helios_deploy.checkpoints.checkpoint import Checkpoint
    from helios_deploy.model.specs import build_specs

    return build_specs(Checkpoint(tiny_ckpt).configs, HEIGHT, WIDTH, TEXT_LENGTH, MAX_TEXT_LENGTH, ["transformer"])


@pytest.fixture(scope="module")
def graph(specs):
    return specs["transformer"].graphs[0]


class Setup:
    """A fake platform, an engine file and its manifest record, for one runner test."""

    def __init__(self, root, monkeypatch, specs, graph, memory_budget=None, engine=b"engine v1", recorded=None,
                 fake_trt_options=None):
        self.root, self.graph = root, graph
        self.trt = FakeTensorRT(graph, **(fake_trt_options or {}))
        self.cuda = FakeCuda(self.trt)
        monkeypatch.setitem(sys.modules, "tensorrt", self.trt)
        monkeypatch.setattr(R, "require_gpu_tensorrt", lambda index=0: PLATFORM)
        monkeypatch.setattr(R.TensorRTRunner, "cuda", self.cuda)
        fields = E.key_fields("a" * 64, "b" * 64, E.profiles(graph), E.BuildSettings(memory_budget=memory_budget),
                              PLATFORM["tensorrt"], PLATFORM["gpu"], PLATFORM["compute_capability"])
        file = E.engine_filename(graph.file, E.key_digest(fields))
        (root / "transformer").mkdir(exist_ok=True)
        (root / "transformer" / file).write_bytes(engine)
        recorded = engine if recorded is None else recorded
        report = {"engine_bytes": len(recorded), "engine_sha256": hashlib.sha256(recorded).hexdigest()}
        self.record = E.engine_record(file, fields, report, memory_budget)
        graphs = {"model": {"file": "model.onnx", "data": "model.onnx.data", "file_sha256": "a" * 64,
                            "data_sha256": "b" * 64}}
        self.manifest = {"format": FORMAT, "components": {"transformer": {
            "spec": spec_to_json(specs["transformer"]), "graphs": graphs, "engines": {"model": self.record}}}}

    def runner(self, device="cuda:1", **options) -> R.TensorRTRunner:
        return R.TensorRTRunner(self.root, self.manifest, "transformer", self.graph, device, **options)

    def feeds(self, point_index: int, seed: int, on_device: bool = False) -> dict[str, torch.Tensor]:
        point = self.graph.operating_points[point_index]
        g = torch.Generator().manual_seed(seed)
        out = {}
        for t in self.graph.inputs:
            shape = resolve_shape(t, point.dims)
            x = torch.randn(shape, generator=g) if t.dtype == "float32" else torch.randint(0, 9, shape, generator=g)
            out[t.name] = self.cuda.register(x) if on_device else x
        return out

    def context_calls(self) -> dict[str, list[tuple[int, tuple]]]:
        """Calls on each execution context, with their position in the whole call log."""
        out: dict[str, list] = {}
        for i, call in enumerate(self.trt.calls):
            if call[0].startswith("context#"):
                out.setdefault(call[0], []).append((i, call))
        return out


@pytest.fixture
def setup(tmp_path, monkeypatch, specs, graph):
    return lambda **kw: Setup(tmp_path, monkeypatch, specs, graph, **kw)


def _expected(feeds, profile: int) -> float:
    """What the fake engine computes: the sum of the inputs plus the profile index."""
    return sum(float(x.double().sum()) for x in feeds.values()) + profile


def _every_order(n: int) -> list[int]:
    return [i for perm in itertools.permutations(range(n)) for i in perm]  # 0,1,2,0,2,1,1,0,2,...


# -- 1. one context per operating point; CUDA graphs replay an untouched context ----------------------


@pytest.mark.parametrize("cuda_graph", [True, False])
def test_one_context_per_point_with_shared_user_managed_memory(setup, cuda_graph):
    s = setup()
    runner = s.runner(cuda_graph=cuda_graph).activate()
    points = len(s.graph.operating_points)
    order = _every_order(points)
    for step, i in enumerate(order):
        feeds = s.feeds(i, seed=step)
        out = runner.infer(feeds)["noise_pred"]
        assert torch.allclose(out, torch.full_like(out, _expected(feeds, i))), (step, i)

    created = s.trt.named("create_execution_context")
    assert [c[2] for c in created] == [ExecutionContextAllocationStrategy.USER_MANAGED] * points
    buffer = runner._activations
    assert buffer.numel() == max(s.trt.engines[0].memory)  # the largest profile's need, allocated once
    profiles = []
    for calls in s.context_calls().values():
        names = [c[1] for _, c in calls]
        selected = [c[2] for _, c in calls if c[1] == "set_optimization_profile_async"]
        assert len(selected) == 1, "each context selects its profile once"
        profiles += selected
        assert names.index("set_optimization_profile_async") < names.index("set_input_shape")
        assert names.count("set_input_shape") == len(s.graph.inputs), "input shapes are set once per context"
        memory = [c[2:] for _, c in calls if c[1] == "set_device_memory"]
        assert memory == [(buffer.data_ptr(), buffer.numel())], "every context shares the one activation buffer"
        assert names.index("set_device_memory") < names.index("execute_async_v3")
    assert sorted(profiles) == list(range(points))


def test_cuda_graph_context_is_never_touched_after_capture(setup):
    s = setup()
    graphed = s.runner(cuda_graph=True).activate()
    plain = s.runner(cuda_graph=False).activate()
    points = len(s.graph.operating_points)
    for step, i in enumerate(_every_order(points) * 2):
        feeds = s.feeds(i, seed=100 + step)
        ours, ref = graphed.infer(feeds)["noise_pred"], plain.infer(feeds)["noise_pred"]
        assert torch.equal(ours, ref), (step, i)
    assert graphed.captures == points  # one capture per point, however the points interleave
    assert len(s.trt.named("capture")) == points
    assert len(s.trt.named("replay")) == 2 * len(_every_order(points)) - points
    graphed = set(s.trt.engines[0].context_labels)
    for label, calls in s.context_calls().items():
        if label in graphed:
            captured = [i for i, c in calls if c[1] == "execute_async_v3" and c[4] == "captured"]
            assert len(captured) == 1
            assert max(i for i, c in calls if c[1] in MUTATING) < captured[0], f"{label} changed after capture"


def test_graphed_outputs_are_copies_unless_reused(setup):
    s = setup()
    runner = s.runner(cuda_graph=True).activate()
    first = runner.infer(s.feeds(0, seed=1))["noise_pred"]
    kept = first.clone()
    runner.infer(s.feeds(0, seed=2))
    assert torch.equal(first, kept)  # a later replay did not overwrite what an earlier call returned
    reused = s.runner(cuda_graph=True, reuse_outputs=True).activate()
    a = reused.infer(s.feeds(0, seed=1))["noise_pred"]
    b = reused.infer(s.feeds(0, seed=2))["noise_pred"]
    assert a.data_ptr() == b.data_ptr()


# -- 2. the runner's own stream, ordered against the caller's ----------------------------------------------


@pytest.mark.parametrize("cuda_graph", [True, False])
@pytest.mark.parametrize("caller_on_side_stream", [False, True])
def test_runs_on_its_own_stream_ordered_against_the_callers(setup, cuda_graph, caller_on_side_stream):
    s = setup()
    runner = s.runner(cuda_graph=cuda_graph, sync=False).activate()
    caller = s.cuda.new_stream("cuda:1") if caller_on_side_stream else s.cuda.current_stream("cuda:1")
    ours = runner._stream.handle
    assert ours not in (0, caller.handle)
    for step in range(3):
        feeds = s.feeds(step % 2, seed=step, on_device=True)
        start = len(s.trt.calls)
        with s.cuda.use_stream(caller):
            outs = runner.infer(feeds)
        calls = s.trt.calls[start:]
        enqueued = [i for i, c in enumerate(calls) if c[1] == "execute_async_v3"]
        enqueued += [i for i, c in enumerate(calls) if c[:2] == ("graph", "replay")]
        assert enqueued and all(calls[i][2] == ours for i in enqueued if calls[i][1] == "execute_async_v3")
        waits = [(i, c[2:]) for i, c in enumerate(calls) if c[1] == "wait_stream"]
        assert waits[0][1] == (ours, caller.handle) and waits[0][0] < min(enqueued)
        assert waits[-1][1] == (caller.handle, ours) and waits[-1][0] > max(enqueued)
        recorded = {c[2:] for c in calls[waits[-1][0]:] if c[1] == "record_stream"}
        assert {(y.data_ptr(), caller.handle) for y in outs.values()} <= recorded
        inputs = {c[2:] for c in calls[:min(enqueued)] if c[1] == "record_stream"}
        assert {(x.data_ptr(), ours) for x in feeds.values()} <= inputs  # the caller may free its feeds


def test_sync_waits_for_the_runners_stream(setup):
    s = setup()
    runner = s.runner(sync=True).activate()
    runner.infer(s.feeds(0, seed=0))
    assert s.trt.calls[-1] == ("stream", "synchronize", runner._stream.handle)


# -- 3. output shapes checked against the engine --------------------------------------------------------


def test_output_shapes_are_checked_once_per_point(setup):
    s = setup()
    runner = s.runner().activate()
    for step, i in enumerate(_every_order(len(s.graph.operating_points))):
        runner.infer(s.feeds(i, seed=step))
    for calls in s.context_calls().values():
        asked = [c[2] for _, c in calls if c[1] == "get_tensor_shape"]
        assert asked == [t.name for t in s.graph.outputs]
        names = [c[1] for _, c in calls]
        assert max(i for i, n in enumerate(names) if n == "set_input_shape") < names.index("get_tensor_shape")


def test_an_engine_computing_other_output_shapes_is_refused(setup):
    s = setup(fake_trt_options={"wrong_outputs": {"noise_pred": (1, 2, 3)}})
    runner = s.runner().activate()
    with pytest.raises(UserError, match="other output shapes") as e:
        runner.infer(s.feeds(0, seed=0))
    assert "noise_pred: engine [1, 2, 3], spec [" in str(e.value) and "--rebuild" in str(e.value)
    assert not s.trt.named("execute_async_v3")


# -- 4. the runner's device is current for activation and inference ------------------------------------


@pytest.mark.parametrize("cuda_graph", [True, False])
def test_a_runner_on_cuda1_works_on_cuda1_while_cuda0_is_current(setup, cuda_graph):
    s = setup()
    assert s.cuda.current_device() == 0
    runner = s.runner("cuda:1", cuda_graph=cuda_graph).activate()
    for step in range(4):
        runner.infer(s.feeds(step % 3, seed=step))
    assert s.cuda.current_device() == 0  # restored
    assert [c[4] for c in s.trt.named("deserialize_cuda_engine")] == [1]
    assert [c[3] for c in s.trt.named("new_stream")] == [1]
    devices = {c[3] for c in s.trt.named("execute_async_v3")}
    assert devices == {1}


# -- 5. the weight-streaming budget ----------------------------------------------------------------------


@pytest.mark.parametrize("memory_budget, expected", [
    (None, None),  # no streaming: nothing set
    (12_000, None),  # every weight (10000) fits
    (6_000, 4_000),  # 2000 cannot be streamed: 4000 of the 8000 streamable stay on the device
    (2_000, 0),  # only the non-streamable weights on the device: stream all the rest
])
def test_budget_is_set_before_any_context(setup, memory_budget, expected):
    s = setup(memory_budget=memory_budget)
    runner = s.runner().activate()
    runner.infer(s.feeds(0, seed=0))
    budgets = [i for i, c in enumerate(s.trt.calls) if c[1] == "weight_streaming_budget_v2"]
    first_context = next(i for i, c in enumerate(s.trt.calls) if c[1] == "create_execution_context")
    assert runner.weight_streaming_budget == expected
    assert [s.trt.calls[i][2] for i in budgets] == ([] if expected is None else [expected])
    assert all(i < first_context for i in budgets)


def test_a_budget_below_the_non_streamable_weights_is_a_user_error(setup):
    s = setup(memory_budget=1_000)
    runner = s.runner()
    with pytest.raises(UserError, match="below the engine's weights TensorRT cannot stream") as e:
        runner.activate()
    assert "2000 bytes of non-streamable" in str(e.value) and not runner.is_active


def test_without_total_weights_the_budget_is_a_streamable_budget_with_a_warning(setup):
    s = setup(memory_budget=6_000, fake_trt_options={"version": "10.9.0"})
    with pytest.warns(UserWarning, match="streamable weights only"):
        runner = s.runner().activate()
    assert runner.weight_streaming_budget == 6_000


# -- 8. the engine file is the one the build wrote ---------------------------------------------------------


@pytest.mark.parametrize("recorded, needle", [
    (b"another engine, other size", "bytes, the build wrote"),
    (b"engine v2", "sha256"),  # same size, other bytes
])
def test_a_swapped_engine_file_is_refused_before_loading(setup, recorded, needle):
    s = setup(recorded=recorded)
    runner = s.runner()
    with pytest.raises(UserError, match="is not the one `build` recorded") as e:
        runner.activate()
    assert needle in str(e.value) and "--rebuild" in str(e.value)
    assert not s.trt.named("deserialize_cuda_engine") and not runner.is_active


def test_an_engine_record_without_a_hash_is_refused(setup):
    s = setup()
    s.record["report"] = {}
    with pytest.raises(UserError, match="older helios-deploy"):
        s.runner().activate()


def test_the_recorded_engine_loads_once(setup):
    s = setup()
    s.runner().activate()
    assert [c[2] for c in s.trt.named("deserialize_cuda_engine")] == [len(b"engine v1")]


# -- 9. dtypes by name --------------------------------------------------------------------------------------


def test_engine_dtypes_are_read_by_name(setup):
    assert str(DataType.FLOAT) == "0"  # what parsing str() would have seen
    s = setup(fake_trt_options={"dtypes": {"hidden_states": DataType.BF16}})
    with pytest.raises(UserError, match="does not match") as e:
        s.runner().activate()
    assert "hidden_states: engine input bfloat16, spec input float32" in str(e.value)
    assert "noise_pred" not in str(e.value)  # every other tensor's dtype was read right


# -- 10. guided variants: batch-2 profiles (and batch 1 with guidance off) ----------------------------------


@pytest.mark.parametrize("variant", ["base", "mid"])
def test_guided_variants_run_each_point_on_its_own_profile(tmp_path, monkeypatch, tiny_ckpt, variant):
    """Base (float timestep) and Mid engines: one exact profile per operating point, the batch-2 points of
    guidance first, and each call runs on the profile of its batch and size."""
    from helios_deploy.checkpoints.checkpoint import Checkpoint
    from helios_deploy.model.specs import build_specs

    specs = build_specs(Checkpoint(tiny_ckpt).configs, HEIGHT, WIDTH, TEXT_LENGTH, MAX_TEXT_LENGTH, ["transformer"],
                        variant=variant)
    graph = specs["transformer"].graphs[0]
    s = Setup(tmp_path, monkeypatch, specs, graph)
    runner = s.runner().activate()
    batches = [p.dims["batch"] for p in graph.operating_points]
    assert batches == sorted(batches, reverse=True) and batches[0] == 2 and batches[-1] == 1
    for step, i in enumerate(_every_order(len(batches))[:12]):
        feeds = s.feeds(i, seed=step)
        out = runner.infer(feeds)["noise_pred"]
        assert out.shape[0] == batches[i]
        assert torch.allclose(out, torch.full_like(out, _expected(feeds, i))), (step, i)


# -- 11. the fake is as strict as the binding; what the stricter fake and issue 20 found -----------------------


def test_the_fake_refuses_unknown_attributes_and_pre_10_1_members(graph):
    from .fake_tensorrt import FakeEngine

    new = FakeTensorRT(graph, version="10.14.1")
    engine = FakeEngine(new, graph)
    engine.weight_streaming_budget_v2 = 10  # a real (property) attribute
    with pytest.raises(AttributeError, match="weight_streaming_budget_v3"):
        engine.weight_streaming_budget_v3 = 10  # misspelled: a pybind11 object refuses it
    context = engine.create_execution_context()
    with pytest.raises(AttributeError, match="device_memroy"):
        context.device_memroy = 0
    old = FakeTensorRT(graph, version="10.0.1")
    engine = FakeEngine(old, graph)
    for name in ("weight_streaming_budget_v2", "device_memory_size_v2", "get_device_memory_size_for_profile_v2",
                 "streamable_weights_size"):
        assert not hasattr(engine, name), name
    assert not hasattr(engine.create_execution_context(), "set_device_memory")
    assert not hasattr(old, "EngineStat") and not hasattr(FakeTensorRT(graph, version="10.9.0"), "EngineStat")
    with pytest.raises(RuntimeError, match="Error in set optimization profile"):
        FakeEngine(new, graph).create_execution_context().set_optimization_profile_async(99, 1)


def test_a_refused_profile_switch_names_the_profile(setup, monkeypatch):
    from .fake_tensorrt import FakeContext

    s = setup()

    def refuse(self, index, stream):
        raise RuntimeError("Error in set optimization profile.")

    monkeypatch.setattr(FakeContext, "set_optimization_profile_async", refuse)
    runner = s.runner().activate()
    point = s.graph.operating_points[1].name
    with pytest.raises(RuntimeError, match=rf"refused optimization profile 1 \({point}\).*Error in set optimization"):
        runner.infer(s.feeds(1, seed=0))


def test_no_activation_memory_reported_for_a_profile_that_needs_some_is_an_error(setup):
    s = setup(fake_trt_options={"shape_memory": {1: 0}})
    runner = s.runner().activate()
    runner.infer(s.feeds(0, seed=0))  # profile 0 reports its need
    with pytest.raises(RuntimeError, match="no activation memory for profile 1 .* needs 8192 bytes"):
        runner.infer(s.feeds(1, seed=0))
    assert len(s.trt.named("execute_async_v3")) == 1  # profile 1 never ran


def test_a_failed_capture_warns_once_clears_the_error_and_runs_that_point_without_a_graph(setup):
    s = setup(fake_trt_options={"uncapturable": {0}})
    graphed = s.runner(cuda_graph=True).activate()
    plain = s.runner(cuda_graph=False).activate()
    points = len(s.graph.operating_points)
    with pytest.warns(UserWarning, match="capture failed") as caught:
        for step, i in enumerate(_every_order(points) * 2):
            feeds = s.feeds(i, seed=200 + step)
            assert torch.equal(graphed.infer(feeds)["noise_pred"], plain.infer(feeds)["noise_pred"]), (step, i)
    failed = [str(w.message) for w in caught if "capture failed" in str(w.message)]
    assert len(failed) == 1 and "cudaErrorStreamCaptureUnsupported" in failed[0] and " at stage" in failed[0]
    assert [c[2] for c in s.trt.named("clear_error")] == ["cudaErrorStreamCaptureUnsupported"]
    assert s.cuda.last_error is None
    assert graphed.captures == points - 1  # the other points keep their graphs
    point0 = next(p for p in graphed._points.values() if p.profile == 0)
    assert point0.graph is None and point0.no_graph
    replays = len(s.trt.named("replay"))
    calls_at_other_points = sum(1 for i in _every_order(points) * 2 if i != 0)
    assert replays == calls_at_other_points - (points - 1)  # each graphed point's first call captures


def test_deactivation_releases_contexts_then_the_engine_with_the_runners_device_current(setup):
    import gc

    s = setup()
    runner = s.runner("cuda:1", cuda_graph=True).activate()
    for i in range(len(s.graph.operating_points)):
        runner.infer(s.feeds(i, seed=i))
    contexts = set(s.trt.engines[0].context_labels)
    runner.deactivate()
    gc.collect()
    released = [(c[0], c[2]) for c in s.trt.named("__del__") if c[0].split("#")[0] in ("context", "engine")]
    assert {label for label, _ in released} == contexts | {next(l for l, _ in released if l.startswith("engine"))}
    assert all(device == 1 for _, device in released), released
    assert released[-1][0].startswith("engine")  # the engine after every context
    assert s.cuda.current_device() == 0


def test_require_gpu_tensorrt_refuses_tensorrt_older_than_10_1(monkeypatch):
    from helios_deploy.export.tensorrt import probe

    old = {"tensorrt": "10.0.1.6", "gpu": "NVIDIA H100", "compute_capability": "9.0", "error": None}
    monkeypatch.setattr(probe, "current_platform", lambda index=0: old)
    with pytest.raises(UserError, match="TensorRT 10.0.1.6 here is too old") as e:
        probe.require_gpu_tensorrt()
    assert "10.1 or newer" in str(e.value) and "set_device_memory" in str(e.value)
    monkeypatch.setattr(probe, "current_platform", lambda index=0: {**old, "tensorrt": "10.1.0"})
    assert probe.require_gpu_tensorrt()["tensorrt"] == "10.1.0"
