"""TensorRT engines built from the tiny artifacts and run on the GPU, against ONNX Runtime on the same
inputs. Skipped (with the probe's reason) where TensorRT or an NVIDIA GPU is missing: none of these has run
yet (no machine of this project has a GPU); the same bookkeeping runs on CPU through a fake of the tensorrt
module in tests/test_tensorrt_runner.py and tests/test_tensorrt_builder.py."""

from __future__ import annotations

import copy
import itertools
import shutil

import pytest
import torch

from helios_deploy.errors import UserError
from helios_deploy.export.tensorrt import engines as E
from helios_deploy.export.tensorrt import probe
from helios_deploy.export.tensorrt.builder import build_engine

pytestmark = pytest.mark.gpu

GRAPHS = [("transformer", "model"), ("text_encoder", "model"), ("vae_decoder", "model")]
FP32_REL_L2 = 1e-3  # fp32 engines, built with TF32 off (issue 28; gpu-check measures TF32 on too)
SAME_REL_L2 = 1e-6  # the same engine on the same inputs


@pytest.fixture(scope="session", autouse=True)
def tensorrt_platform():
    """Runs before the (slow) artifacts fixture, so a machine without a GPU skips at once."""
    info = probe.current_platform()
    if info["tensorrt"] is None or info["gpu"] is None:
        pytest.skip(f"needs TensorRT and an NVIDIA GPU: {info['error']}")
    return info


@pytest.fixture(scope="module")
def built(artifacts, tmp_path_factory, tensorrt_platform):
    """A copy of the tiny artifacts with an fp32 engine per graph, recorded as `build` will record them."""
    from helios_deploy.artifacts import Artifacts, write_manifest
    from helios_deploy.fsutil import sha256_file

    root = tmp_path_factory.mktemp("trt") / "artifacts"
    shutil.copytree(artifacts, root)
    arts = Artifacts.open(root)
    settings = E.BuildSettings(precision="fp32", timing_cache=str(root / "timing.cache"))
    info = tensorrt_platform
    for component in sorted({c for c, _ in GRAPHS}):
        entry = arts.manifest["components"][component]
        entry["engines"] = {}
        for graph in arts.spec(component).graphs:
            onnx = root / component / graph.file
            data = root / component / entry["graphs"][graph.name]["data"]
            fields = E.key_fields(sha256_file(onnx), sha256_file(data), E.profiles(graph), settings,
                                  info["tensorrt"], info["gpu"], info["compute_capability"])
            file = E.engine_filename(graph.file, E.key_digest(fields))
            report = build_engine(onnx, graph, root / component / file, settings)
            entry["engines"][graph.name] = E.engine_record(file, fields, report)
    write_manifest(root, arts.manifest)
    return Artifacts.open(root)


def _runner(built, component, graph_name, backend="tensorrt", **options):
    from helios_deploy.runtime.runners import make_runner
    from helios_deploy.runtime.runners.tensorrt import TensorRTRunner

    graph = built.spec(component).graph(graph_name)
    if backend == "tensorrt" and options:
        return TensorRTRunner(built.root, built.manifest, component, graph, "cuda", **options).activate()
    device = "cuda" if backend == "tensorrt" else "cpu"
    return make_runner(backend, built.root, built.manifest, component, graph, device).activate()


def _feeds(built, component, graph_name, point, seed):
    from helios_deploy.export.parity.compare import example_inputs

    spec = built.spec(component)
    return {k: torch.from_numpy(v) for k, v in example_inputs(spec, spec.graph(graph_name), point.dims, seed).items()}


def _rel_l2(ours: torch.Tensor, ref: torch.Tensor) -> float:
    a, b = ours.detach().double().cpu(), ref.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _on_gpu(feeds):
    return {k: v.cuda() for k, v in feeds.items()}


def test_every_engine_was_built_with_one_profile_per_operating_point(built):
    for component, graph_name in GRAPHS:
        record = built.manifest["components"][component]["engines"][graph_name]
        graph = built.spec(component).graph(graph_name)
        assert record["report"]["engine_bytes"] == (built.root / component / record["file"]).stat().st_size
        assert len(record["report"]["engine_sha256"]) == 64
        assert record["report"]["profiles"] == len(graph.operating_points) == len(record["key"]["profiles"])


@pytest.mark.parametrize("component, graph_name", GRAPHS)
def test_engine_matches_onnxruntime_at_every_operating_point(built, component, graph_name):
    trt, ort = _runner(built, component, graph_name), _runner(built, component, graph_name, "onnxruntime")
    for seed, point in enumerate(built.spec(component).graph(graph_name).operating_points):
        feeds = _feeds(built, component, graph_name, point, seed)
        ours, ref = trt.infer(_on_gpu(feeds)), ort.infer(feeds)
        assert set(ours) == set(ref)
        for name in ref:
            assert ours[name].shape == ref[name].shape and ours[name].device.type == "cuda"
            assert _rel_l2(ours[name], ref[name]) <= FP32_REL_L2, (point.name, name)


def test_profile_switching_across_the_pyramid_stages(built):
    trt, ort = _runner(built, "transformer", "model"), _runner(built, "transformer", "model", "onnxruntime")
    points = built.spec("transformer").graph("model").operating_points
    feeds = {p.name: _feeds(built, "transformer", "model", p, i) for i, p in enumerate(points)}
    ref = {name: ort.infer(f)["noise_pred"] for name, f in feeds.items()}
    first = {}
    for name in ["stage0", "stage1", "stage2", "stage0", "stage2", "stage1", "stage0"]:
        out = trt.infer(_on_gpu(feeds[name]))["noise_pred"]
        assert _rel_l2(out, ref[name]) <= FP32_REL_L2, name
        first.setdefault(name, out.clone())
        assert _rel_l2(out, first[name]) <= SAME_REL_L2, name


def _every_order(n: int) -> list[int]:
    return [i for perm in itertools.permutations(range(n)) for i in perm]  # 0,1,2,0,2,1,1,0,2,...


@pytest.mark.parametrize("component, graph_name", [("transformer", "model"), ("vae_decoder", "model")])
def test_cuda_graph_replays_equal_plain_runs_with_points_interleaved_in_every_order(built, component, graph_name):
    """One context per operating point: capturing one point's graph and running the others never changes what
    another point's graph replays."""
    plain = _runner(built, component, graph_name)
    graphed = _runner(built, component, graph_name, cuda_graph=True)
    points = list(built.spec(component).graph(graph_name).operating_points)
    kept = []
    for step, i in enumerate(_every_order(len(points)) * 2):
        feeds = _on_gpu(_feeds(built, component, graph_name, points[i], 100 + step))
        ours, ref = graphed.infer(feeds), plain.infer(feeds)
        for name in ref:
            assert _rel_l2(ours[name], ref[name]) <= SAME_REL_L2, (step, points[i].name, name)
        kept.append((ours, {k: v.clone() for k, v in ref.items()}))
    assert graphed.captures == len(points)
    for ours, ref in kept:  # outputs returned earlier were not overwritten by later replays
        for name in ref:
            assert _rel_l2(ours[name], ref[name]) <= SAME_REL_L2


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_outputs_are_ready_on_the_callers_side_stream(built, cuda_graph):
    """The runner's own stream waits for the caller's and the caller's waits for it: work the caller queues
    on its stream right after infer (no synchronisation) sees the outputs."""
    trt = _runner(built, "transformer", "model", cuda_graph=cuda_graph, sync=False)
    ort = _runner(built, "transformer", "model", "onnxruntime")
    points = built.spec("transformer").graph("model").operating_points
    side = torch.cuda.Stream()
    for step, i in enumerate(_every_order(len(points))):
        feeds = _feeds(built, "transformer", "model", points[i], step)
        with torch.cuda.stream(side):
            on_gpu = _on_gpu(feeds)  # written on the caller's stream
            doubled = trt.infer(on_gpu)["noise_pred"] * 2
            del on_gpu  # freed while the runner may still read it
        side.synchronize()
        assert _rel_l2(doubled / 2, ort.infer(feeds)["noise_pred"]) <= FP32_REL_L2, (step, points[i].name)


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_a_runner_on_cuda1_while_cuda0_is_current(built, cuda_graph):
    from helios_deploy.runtime.runners.tensorrt import TensorRTRunner

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    second = probe.current_platform(1)
    if (second["gpu"], second["compute_capability"]) != (probe.current_platform()["gpu"],
                                                         probe.current_platform()["compute_capability"]):
        pytest.skip(f"GPU 1 ({second['gpu']}) is not the model the engines were built on")
    torch.cuda.set_device(0)
    graph = built.spec("transformer").graph("model")
    runner = TensorRTRunner(built.root, built.manifest, "transformer", graph, "cuda:1", cuda_graph=cuda_graph)
    runner.activate()
    ort = _runner(built, "transformer", "model", "onnxruntime")
    for step, i in enumerate(_every_order(len(graph.operating_points))):
        feeds = _feeds(built, "transformer", "model", graph.operating_points[i], step)
        out = runner.infer({k: v.to("cuda:1") for k, v in feeds.items()})["noise_pred"]
        assert out.device == torch.device("cuda:1") and torch.cuda.current_device() == 0
        assert _rel_l2(out, ort.infer(feeds)["noise_pred"]) <= FP32_REL_L2, step


def test_vae_chunk_decodes_like_onnxruntime(built):
    """The composed chunk graph (first + 8 steps unrolled, uint8 frames) as an engine."""
    spec = built.spec("vae_decoder")
    x = torch.randn(1, *spec.graph("model").inputs[0].dims[1:3], *(spec.operating_points[0].dims[k]
                    for k in ("latent_height", "latent_width")), generator=torch.Generator().manual_seed(0))
    ours = _runner(built, "vae_decoder", "model").infer({"latents": x.cuda()})
    ref = _runner(built, "vae_decoder", "model", "onnxruntime").infer({"latents": x})
    assert _rel_l2(ours["video"], ref["video"]) <= FP32_REL_L2
    assert ours["frames"].dtype == torch.uint8
    assert (ours["frames"].cpu().int() - ref["frames"].int()).abs().max() <= 1  # rounding ties may differ


def test_shapes_without_a_profile_are_a_user_error(built):
    trt = _runner(built, "transformer", "model")
    point = built.spec("transformer").graph("model").operating_points[0]
    feeds = _on_gpu(_feeds(built, "transformer", "model", point, 0))
    feeds = {k: torch.cat([v, v]) for k, v in feeds.items()}  # batch 2: inside the export range, no profile
    with pytest.raises(UserError, match="no profile") as e:
        trt.infer(feeds)
    assert "stage0" in str(e.value) and "stage2" in str(e.value)


def test_a_stale_engine_is_refused(built):
    from helios_deploy.runtime.runners.tensorrt import TensorRTRunner

    manifest = copy.deepcopy(built.manifest)
    manifest["components"]["transformer"]["engines"]["model"]["key"]["tensorrt"] = "0.0.1"
    graph = built.spec("transformer").graph("model")
    with pytest.raises(UserError, match="TensorRT version: 0.0.1 ->"):
        TensorRTRunner(built.root, manifest, "transformer", graph, "cuda").activate()
    recorded = built.manifest["components"]["transformer"]["engines"]["model"]["key"]["tensorrt"]
    assert recorded == probe.current_platform()["tensorrt"]  # the deep copy was changed, not the manifest


def test_a_swapped_engine_is_refused(built, tmp_path):
    """Another engine under the transformer engine's name: refused before TensorRT loads it."""
    from helios_deploy.runtime.runners.tensorrt import TensorRTRunner

    root = tmp_path / "artifacts"
    shutil.copytree(built.root, root)
    engines = {c: built.manifest["components"][c]["engines"]["model"]["file"] for c in ("transformer", "text_encoder")}
    shutil.copyfile(root / "text_encoder" / engines["text_encoder"], root / "transformer" / engines["transformer"])
    graph = built.spec("transformer").graph("model")
    with pytest.raises(UserError, match="is not the one `build` recorded"):
        TensorRTRunner(root, built.manifest, "transformer", graph, "cuda").activate()


def test_a_truncated_timing_cache_falls_back_and_is_rewritten(built, tmp_path):
    cache = tmp_path / "timing.cache"
    cache.write_bytes((built.root / "timing.cache").read_bytes()[:100])
    graph = built.spec("text_encoder").graph("model")
    logged = []
    report = build_engine(built.root / "text_encoder" / graph.file, graph, tmp_path / "model.engine",
                          E.BuildSettings(precision="fp32", timing_cache=str(cache)), log=logged.append)
    assert report["engine_bytes"] > 0  # TensorRT may refuse the truncated bytes or read what it can: either way,
    assert all(str(cache) in m for m in logged), logged  # a warning names the file, and the build goes on
    assert cache.stat().st_size > 100  # rewritten whole after the build


@pytest.fixture(scope="module")
def built_streaming(artifacts, tmp_path_factory, tensorrt_platform):
    """The transformer built with weight streaming, through `build` (the budget's value is applied at load)."""
    from helios_deploy.artifacts import Artifacts
    from helios_deploy.export.tensorrt.build import build

    root = tmp_path_factory.mktemp("trt-ws") / "artifacts"
    shutil.copytree(artifacts, root)
    build(root, ["transformer"], E.BuildSettings(precision="fp32", memory_budget=1 << 40), log=lambda m: None)
    return Artifacts.open(root)


def test_weight_streaming_keeps_the_budget_on_the_device(built_streaming):
    from helios_deploy.runtime.runners.tensorrt import TensorRTRunner

    record = built_streaming.manifest["components"]["transformer"]["engines"]["model"]
    total, streamable = record["report"]["weights_bytes"], record["report"]["streamable_weights_bytes"]
    if not streamable:
        pytest.skip(f"TensorRT streams none of this engine's weights (total {total}, streamable {streamable})")
    if total is None:  # EngineStat.TOTAL_WEIGHTS_SIZE is read from TensorRT 10.14 on (engines.ENGINE_STAT_SINCE)
        pytest.skip("this TensorRT does not report the engine's total weights: the budget is not split")
    manifest = copy.deepcopy(built_streaming.manifest)
    fixed = total - streamable
    manifest["components"]["transformer"]["engines"]["model"]["memory_budget"] = fixed + streamable // 2
    graph = built_streaming.spec("transformer").graph("model")
    runner = TensorRTRunner(built_streaming.root, manifest, "transformer", graph, "cuda").activate()
    assert runner.weight_streaming_budget == streamable // 2
    assert runner._engine.weight_streaming_budget_v2 == streamable // 2
    ort = _runner(built_streaming, "transformer", "model", "onnxruntime")
    for seed, point in enumerate(graph.operating_points):
        feeds = _feeds(built_streaming, "transformer", "model", point, seed)
        out = runner.infer(_on_gpu(feeds))["noise_pred"]
        assert _rel_l2(out, ort.infer(feeds)["noise_pred"]) <= FP32_REL_L2, point.name
    manifest["components"]["transformer"]["engines"]["model"]["memory_budget"] = fixed - 1
    with pytest.raises(UserError, match="cannot stream"):
        TensorRTRunner(built_streaming.root, manifest, "transformer", graph, "cuda").activate()


def test_verify_passes_the_fp32_engines(built):
    """`verify`: every engine at every operating point and the pipeline on engines, within fp32 targets."""
    from helios_deploy.export.tensorrt.verify import verify

    report = verify(built.root, device="cuda")
    assert set(report["components"]) == {c for c, _ in GRAPHS}
    assert report["passed"], report
    assert report["pipeline"]["precision"] == "fp32" and len(report["pipeline"]["psnr_db_per_chunk"]) == 2


@pytest.fixture(scope="module")
def built_fp8(artifacts, tmp_path_factory, tensorrt_platform):
    """A copy of the tiny artifacts, quantized (blocks in FP8), lowered to bf16 and built at fp8 through
    the CLI path (`quantize`, `quantize --precision bf16`, `build --precision fp8`)."""
    from helios_deploy.export.tensorrt.build import build
    from helios_deploy.export.transforms.lowering import lower_artifacts
    from helios_deploy.export.transforms.quantize import quantize_artifacts

    root = tmp_path_factory.mktemp("trt8") / "artifacts"
    shutil.copytree(artifacts, root)
    quantize_artifacts(root, ["transformer"], prompts=["a cat in a kitchen", "a drone over snowy mountains"],
                       keep=[r"^patch_", r"^condition_embedder\.", r"^proj_out/"], chunks=2, log=lambda m: None)
    lower_artifacts(root, ["text_encoder", "vae_decoder"], log=lambda m: None)
    build(root, ["transformer", "text_encoder", "vae_decoder"], E.BuildSettings(precision="fp8"), log=lambda m: None)
    return root


def test_fp8_engines_build_from_the_lowered_graphs_and_verify(built_fp8):
    """FP8 transformer engine (bf16 outside its Q/DQ layers), bf16 text encoder and VAE engines: each within
    its target against ONNX Runtime fp32 at every operating point, and the pipeline within 30 dB."""
    from helios_deploy.artifacts import Artifacts
    from helios_deploy.export.tensorrt.verify import verify

    arts = Artifacts.open(built_fp8)
    record = arts.manifest["components"]["transformer"]["engines"]["model"]
    assert record["key"]["graph_sha256"] == arts.manifest["components"]["transformer"]["fp8"]["bf16"]["file_sha256"]
    report = verify(built_fp8, device="cuda")
    assert report["components"]["transformer"]["model"]["precision"] == "fp8"
    assert report["components"]["vae_decoder"]["model"]["precision"] == "bf16"
    assert report["passed"], report


# -- issue 20: what the fake stands in for, checked against the real binding ------------------------------------


def test_the_real_binding_behaves_as_the_fake_assumes(built):
    """The fake's rules (tests/fake_tensorrt.py) on the real objects: a profile switch to a profile that does not
    exist raises RuntimeError, an unknown attribute cannot be assigned, the 10.1 members exist, and
    update_device_memory_size_for_shapes reports the memory a profile needs once its shapes are set."""
    import tensorrt as trt

    record = built.manifest["components"]["transformer"]["engines"]["model"]
    with open(built.root / "transformer" / record["file"], "rb") as f:
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(f.read())
    for name in ("weight_streaming_budget_v2", "device_memory_size_v2", "get_device_memory_size_for_profile_v2",
                 "streamable_weights_size"):
        assert hasattr(engine, name), name
    with pytest.raises(AttributeError):
        engine.weight_streaming_budget_v3 = 0  # misspelled: pybind11 refuses it
    context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    stream = torch.cuda.Stream()
    with pytest.raises(RuntimeError):
        context.set_optimization_profile_async(engine.num_optimization_profiles, stream.cuda_stream)
    context.set_optimization_profile_async(0, stream.cuda_stream)
    graph = built.spec("transformer").graph("model")
    for name, (_, opt, _) in E.profiles(graph)[0].items():
        assert context.set_input_shape(name, opt)
    assert context.update_device_memory_size_for_shapes() == engine.get_device_memory_size_for_profile_v2(0) > 0
    # issue 28: a second context may use the same profile (the runner keeps one context per input shapes), and the
    # Refitter API the refit uses exists (unset_named_weights: a group is unset before its arrays are released)
    second = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    second.set_optimization_profile_async(0, stream.cuda_stream)
    for name in ("set_named_weights", "unset_named_weights", "get_missing_weights", "refit_cuda_engine"):
        assert hasattr(trt.Refitter, name), name
    assert hasattr(trt.BuilderFlag, "TF32") and hasattr(trt.IBuilderConfig, "clear_flag")


def test_engines_load_through_a_memory_map_and_the_container_check_reads_the_loaded_libnvinfer(built):
    import tensorrt as trt

    from helios_deploy.serving.containers import check_libnvinfer

    record = built.manifest["components"]["vae_decoder"]["engines"]["model"]
    with E.mapped_engine(built.root / "vae_decoder" / record["file"]) as data:
        E.check_engine_bytes(record, data, built.root / "vae_decoder" / record["file"])
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(data)
    assert engine is not None and engine.num_optimization_profiles == len(record["key"]["profiles"])
    assert check_libnvinfer(trt.__version__) == ".".join(trt.__version__.split(".")[:3])


def test_a_runner_torn_down_and_activated_again_runs_the_same(built):
    runner = _runner(built, "transformer", "model", cuda_graph=True)
    point = built.spec("transformer").graph("model").operating_points[0]
    feeds = _on_gpu(_feeds(built, "transformer", "model", point, 0))
    first = runner.infer(feeds)["noise_pred"].clone()
    runner.deactivate()
    torch.cuda.synchronize()
    again = runner.activate().infer(feeds)["noise_pred"]
    assert _rel_l2(again, first) <= SAME_REL_L2
    runner.deactivate()
