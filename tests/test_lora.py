"""LoRA adapters fused into the exported transformer (export --lora), checked against diffusers with the same
adapters loaded (HeliosLoraLoaderMixin), weighted (set_adapters) and fused (fuse_lora); the manifest's record of
them; bad adapters; FP8 on fused weights. The adapters are made by PEFT on the tiny transformer
(helios_deploy/checkpoints/tiny_lora.py) in the diffusers layout and in the Wan-style layout diffusers converts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from .conftest import FP8_KEEP, FP8_PROMPTS, HEIGHT, MAX_TEXT_LENGTH, TEXT_LENGTH, WIDTH, run_cli

SCALES = (0.7, 1.3)


@pytest.fixture(scope="session")
def adapters(tiny_ckpt, tmp_path_factory) -> tuple[Path, Path]:
    """(diffusers layout, rank 4, alpha 8; Wan-style layout, rank 2, alpha 1, other seed)."""
    from helios_deploy.checkpoints.tiny_lora import write_tiny_lora

    folder = tmp_path_factory.mktemp("lora")
    return (write_tiny_lora(tiny_ckpt, folder / "style.safetensors", "diffusers", rank=4, alpha=8.0, seed=0),
            write_tiny_lora(tiny_ckpt, folder / "wan.safetensors", "wan", rank=2, alpha=1.0, seed=1))


@pytest.fixture(scope="session")
def fused(tiny_ckpt, artifacts, adapters, tmp_path_factory) -> Path:
    """The transformer exported through the CLI with both adapters (audit on: parity against diffusers' fused
    reference before anything is moved into place); the other components copied from the plain export of the
    same checkpoint (LoRA touches only the transformer)."""
    from helios_deploy.artifacts import Artifacts, write_manifest

    out = tmp_path_factory.mktemp("lora-arts") / "fused"
    args = ["export", tiny_ckpt, "-o", out, "--height", HEIGHT, "--width", WIDTH, "--components", "transformer",
            "--text-length", TEXT_LENGTH, "--max-text-length", MAX_TEXT_LENGTH]
    for path, scale in zip(adapters, SCALES):
        args += ["--lora", f"{path}:{scale}"]
    from helios_deploy.cli import main

    assert main([str(a) for a in args]) == 0
    arts, plain = Artifacts.open(out), Artifacts.open(artifacts)
    for c in ("text_encoder", "vae_decoder", "vae_encoder"):
        shutil.copytree(plain.root / c, out / c)
        arts.manifest["components"][c] = json.loads(json.dumps(plain.manifest["components"][c]))
    write_manifest(out, arts.manifest)
    return out


def test_fused_export_matches_diffusers_fuse_lora(tiny_ckpt, fused):
    from helios_deploy.export.parity.audit import open_sessions
    from helios_deploy.export.parity.compare import compare_component
    from helios_deploy.export.parity.reference import reference_module
    from helios_deploy.export.parity.report import parity_report
    from helios_deploy.artifacts import Artifacts
    from helios_deploy.checkpoints.checkpoint import Checkpoint

    report = parity_report(tiny_ckpt, fused, components=["transformer"])
    cases = report["components"]["transformer"]["cases"]
    assert {"stage0", "stage1", "stage2", "unseen_shape"} <= {c["name"] for c in cases}
    for c in cases:
        assert c["rel_l2"] <= 1e-4, c
    assert report["passed"]
    # the adapters matter: the same graph against the checkpoint without them is far off
    spec = Artifacts.open(fused).spec("transformer")
    plain = compare_component("transformer", spec, lambda: open_sessions(fused, spec, []),
                              lambda: reference_module(Checkpoint(tiny_ckpt), "transformer"))
    assert min(c["rel_l2"] for c in plain["cases"]) > 1e-2


@pytest.mark.parametrize("layout", [0, 1], ids=["diffusers", "wan"])
def test_each_layout_fuses_like_peft(tiny_ckpt, adapters, layout):
    """Every fused weight, one adapter at a time, against the weight PEFT's merge leaves in diffusers' model."""
    import torch

    from helios_deploy.checkpoints.checkpoint import Checkpoint
    from helios_deploy.export.exporter.lora import Adapter, fused_reference, plan_fusion
    from helios_deploy.export.exporter.modules import build_module
    from helios_deploy.export.graphio import safetensors_source

    ckpt, adapter = Checkpoint(tiny_ckpt), Adapter(adapters[layout], SCALES[layout])
    fusion = plan_fusion([adapter], build_module(ckpt, "transformer", load_weights=False))
    reference = fused_reference(ckpt, [adapter]).state_dict()
    index = ckpt.index_for("transformer")
    assert len(fusion.targets()) == 20  # 2 blocks x (4 self-attention + 4 cross-attention + 2 ffn) linears
    for name in fusion.targets():
        base = safetensors_source(index.folder / index.weight_map[name], name)
        ours = fusion.fused(name, base).numpy()
        ref = reference[name.replace(".weight", ".base_layer.weight")] if name.replace(".weight", ".base_layer.weight") \
            in reference else reference[name]
        np.testing.assert_allclose(ours, ref.to(torch.float32).numpy(), rtol=1e-6, atol=1e-6)
        assert np.abs(ours - base.numpy().astype(np.float32)).max() > 1e-3, name


def test_runtime_on_fused_artifacts_matches_the_pipeline_with_the_lora(tiny_ckpt, fused, cholesky_float64):
    """The streaming runtime on the fused export against diffusers' HeliosPyramidPipeline with the same adapters
    loaded by load_lora_weights, weighted and fused (the adapters read from the manifest), one chunk."""
    from helios_deploy.export.exporter.lora import manifest_adapters
    from helios_deploy.export.parity.pipeline import PipelineCase, run_pipeline_parity
    from helios_deploy.runtime import Pipeline

    adapters = manifest_adapters(json.loads((fused / "manifest.json").read_text()))
    result = run_pipeline_parity(tiny_ckpt, Pipeline.from_artifacts(fused), cases=[PipelineCase("t2v_111")], chunks=1,
                                 adapters=adapters)
    assert [len(c["max_abs_err_per_chunk"]) for c in result["cases"]] == [1]
    assert result["passed"], result
    plain = run_pipeline_parity(tiny_ckpt, Pipeline.from_artifacts(fused), cases=[PipelineCase("t2v_111")], chunks=1)
    assert not plain["passed"]  # without the adapters the reference video is another one


def test_manifest_records_each_adapter(fused, adapters):
    from helios_deploy.fsutil import sha256_file

    m = json.loads((fused / "manifest.json").read_text())
    assert [(Path(r["file"]), r["sha256"], r["scale"]) for r in m["lora"]] == \
        [(p.resolve(), sha256_file(p), s) for p, s in zip(adapters, SCALES)]
    assert len(m["components"]["transformer"]["lora_targets"]) == 20
    assert m["components"]["transformer"]["lora"] == m["lora"] and "lora" not in m["components"]["text_encoder"]


def test_parity_refuses_an_adapter_that_changed(adapters, tmp_path):
    from helios_deploy.errors import UserError
    from helios_deploy.export.exporter.lora import Adapter, manifest_adapters

    copy = Path(shutil.copy(adapters[0], tmp_path / "a.safetensors"))
    manifest = {"lora": [Adapter(copy, 0.5).record()]}
    assert manifest_adapters(manifest)[0].scale == 0.5
    copy.write_bytes(copy.read_bytes()[:-1] + b"\0")
    with pytest.raises(UserError, match="not the file these artifacts were fused with"):
        manifest_adapters(manifest)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(edit(tensors), str(dst), metadata=metadata)
    return dst


@pytest.mark.parametrize("case", ["no_such_layer", "wrong_shape", "other_module", "text_encoder_unpaired",
                                  "text_encoder_not_exported", "not_lora"])
def test_bad_adapter_is_one_error_naming_the_keys(tiny_ckpt, adapters, tmp_path, capsys, case):
    import torch

    def edit(t):
        if case == "no_such_layer":
            return {k.replace("blocks.1.", "blocks.7."): v for k, v in t.items()}
        if case == "wrong_shape":
            key = "transformer.blocks.0.attn1.to_q.lora_A.weight"
            return {**t, key: torch.zeros(t[key].shape[0], t[key].shape[1] + 3)}
        if case == "other_module":
            return {**t, "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": torch.zeros(4, 8)}
        if case.startswith("text_encoder"):
            return {**t, "text_encoder.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": torch.zeros(4, 8)}
        return {**t, "transformer.blocks.0.attn1.to_q.lora_magnitude_vector": torch.zeros(8)}

    bad = _rewrite(adapters[0], tmp_path / "bad.safetensors", edit)
    out = tmp_path / "out"
    components = "transformer" if case == "text_encoder_not_exported" else "transformer,text_encoder"
    code, _, err = run_cli(["export", tiny_ckpt, "-o", out, "--height", HEIGHT, "--width", WIDTH, "--components",
                            components, "--no-audit", "--lora", f"{bad}:0.5"], capsys)
    assert code == 1 and "Traceback" not in err, err
    expected = {"no_such_layer": "blocks.7.attn1.to_q.lora_A/B: no such layer",
                "wrong_shape": "blocks.0.attn1.to_q.lora_A/B: shapes",
                "other_module": "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight",
                "text_encoder_unpaired": "encoder.block.0.layer.0.SelfAttention.q.lora_A/B: has lora_A without its pair",
                "text_encoder_not_exported": "weights for text_encoder, which is not exported",
                "not_lora": "blocks.0.attn1.to_q.lora_magnitude_vector"}[case]
    assert expected in err and (str(bad) in err or case == "text_encoder_not_exported"), err
    assert not out.exists()


def test_missing_adapter_file_and_bad_scale(tiny_ckpt, adapters, tmp_path, capsys):
    base = ["export", tiny_ckpt, "-o", tmp_path / "o", "--components", "transformer", "--no-audit"]
    code, _, err = run_cli([*base, "--lora", tmp_path / "nope.safetensors"], capsys)
    assert code == 1 and "does not exist" in err
    code, _, err = run_cli([*base, "--lora", f"{adapters[0]}:nan"], capsys)
    assert code == 1 and "not a finite number" in err


@pytest.fixture(scope="module")
def fused_fp8(fused, tmp_path_factory) -> Path:
    """A copy of the fused export quantized once (_quantize_fp8); the tests that change it work on their own copy."""
    tmp = tmp_path_factory.mktemp("lora-fp8")
    root = Path(shutil.copytree(fused, tmp / "arts"))
    _quantize_fp8(root, tmp)
    return root


def test_fp8_on_fused_weights(tiny_ckpt, fused_fp8, tmp_path):
    """quantize --precision fp8 calibrates the fused model and its FP8 graph tracks diffusers' fused model."""
    from helios_deploy.export.parity.fp8 import FP8_COSINE, FP8_REL_L2
    from helios_deploy.export.parity.report import parity_report

    root = Path(shutil.copytree(fused_fp8, tmp_path / "arts"))
    m = json.loads((root / "manifest.json").read_text())
    precision = m["components"]["transformer"]["fp8"]["layer_precision"]
    assert [v for k, v in precision.items() if k.startswith("blocks.")] == ["fp8"] * 20
    report = parity_report(tiny_ckpt, root, precision="fp8")
    for c in report["components"]["transformer"]["cases"]:
        assert c["cosine"] >= FP8_COSINE and c["rel_l2"] <= FP8_REL_L2, c
        assert c["max_abs_err"] > 1e-4, c  # really the FP8 graph
    assert report["passed"]


# -- refit: other adapters on an export and its engines ---------------------------------------------------


def _refit(root: Path, *specs: str, capsys=None):
    from helios_deploy.export.tensorrt.refit import refit_artifacts
    from helios_deploy.export.exporter.lora import Adapter

    return refit_artifacts(root, [Adapter.parse(s) for s in specs], log=lambda m: None)


def test_refit_swaps_the_fused_adapters(tiny_ckpt, fused, adapters, tmp_path, capsys):
    """refit (no engines: the ONNX part) puts another adapter in; parity against diffusers with that adapter
    fused; --no-lora goes back to the plain weights (parity against the plain reference)."""
    from helios_deploy.export.parity.report import parity_report

    root = Path(shutil.copytree(fused, tmp_path / "arts"))
    code, out, err = run_cli(["refit", root, "--lora", f"{adapters[0]}:0.4"], capsys)
    assert code == 0, err
    m = json.loads((root / "manifest.json").read_text())
    assert [(r["scale"], Path(r["file"])) for r in m["lora"]] == [(0.4, adapters[0].resolve())]
    assert m["refit"]["fuse_write_seconds"] > 0 and "weights fused and written" in out
    report = parity_report(tiny_ckpt, root, components=["transformer"])
    assert report["passed"] and max(c["rel_l2"] for c in report["components"]["transformer"]["cases"]) <= 1e-4
    code, _, err = run_cli(["refit", root, "--no-lora"], capsys)
    assert code == 0, err
    m = json.loads((root / "manifest.json").read_text())
    assert m["lora"] == [] and m["components"]["transformer"]["lora_targets"] == []
    report = parity_report(tiny_ckpt, root, components=["transformer"])
    assert report["passed"]
    code, _, err = run_cli(["refit", root], capsys)
    assert code == 1 and "--no-lora" in err


@pytest.fixture
def fake_trt(monkeypatch, fused):
    import sys

    from helios_deploy.artifacts import Artifacts
    from helios_deploy.export.tensorrt import build as build_module, probe

    from .fake_tensorrt_refit import FakeRefitTensorRT
    from .test_tensorrt_runner import PLATFORM

    def make(**options):
        # a TensorRT that takes several profiles in a refittable engine (the documented one-profile rule is
        # tests/test_tensorrt_round3.py's; `make gpu-check` records what a real one does)
        options.setdefault("refit_one_profile", False)
        trt = FakeRefitTensorRT(Artifacts.open(fused).spec("transformer").graph("model"), **options)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(build_module, "require_gpu_tensorrt", lambda index=0: PLATFORM)
        monkeypatch.setattr(probe, "require_gpu_tensorrt", lambda index=0: PLATFORM)
        return trt

    return make


def _build(root: Path, precision: str = "fp32", **settings):
    from helios_deploy.export.tensorrt.build import build
    from helios_deploy.export.tensorrt.engines import BuildSettings

    if (root / "transformer" / "model.bf16.onnx").is_file():
        precision = "bf16"
    build(root, ["transformer"], BuildSettings(precision=precision, **settings), log=lambda m: None)
    return json.loads((root / "manifest.json").read_text())["components"]["transformer"]["engines"]["model"]


def test_refit_sets_only_the_changed_weights_on_a_refittable_engine(fused, adapters, fake_trt, tmp_path):
    from .fake_tensorrt_refit import digest, onnx_weights

    trt = fake_trt()
    root = Path(shutil.copytree(fused, tmp_path / "arts"))
    before = _build(root, refittable=True)
    assert "REFIT" in {f.name for f in trt.named("build_serialized_network")[0][2]}
    assert before["lora"] == json.loads((root / "manifest.json").read_text())["lora"]
    old_weights = onnx_weights(root / "transformer" / "model.onnx")
    combined = "model.blocks.0.attn1.to_q.bias"  # stands for a weight TensorRT combined with to_q's at build time
    trt.combined = {"model.blocks.0.attn1.to_q.weight": [combined]}
    record = _refit(root, f"{adapters[1]}:0.9")
    m = json.loads((root / "manifest.json").read_text())
    entry, graph = m["components"]["transformer"]["engines"]["model"], m["components"]["transformer"]["graphs"]["model"]
    new_weights = onnx_weights(root / "transformer" / "model.onnx")
    changed = sorted(n for n in new_weights if digest(new_weights[n]) != digest(old_weights[n]))
    assert len(changed) == 20 and all(n.startswith("model.blocks.") for n in changed)
    # only the weights that changed, and the one TensorRT asked for again (get_missing_weights)
    assert sorted(c[2] for c in trt.named("set_named_weights")) == sorted([*changed, combined])
    assert [c[2] for c in trt.named("refit_cuda_engine")] == [21]
    plan = json.loads((root / "transformer" / entry["file"]).read_bytes())
    assert plan["weights"] == {n: digest(a) for n, a in new_weights.items()} and plan["refittable"]
    assert entry["key"]["weights_sha256"] == graph["data_sha256"] != before["key"]["weights_sha256"]
    assert entry["lora"] == m["lora"] and m["lora"][0]["scale"] == 0.9
    assert not (root / "transformer" / before["file"]).exists()
    assert record["engines"]["transformer/model"] == {**record["engines"]["transformer/model"], "mode": "refit",
                                                      "weights": 20}


def test_refit_relowers_and_refits_a_bf16_engine(fused, adapters, fake_trt, tmp_path):
    """A refittable bf16 engine (from `quantize --precision bf16`): the bf16 graph is lowered again from the new
    fp32 weights with its recipe, and the engine gets the bf16 weights that changed (Weights(BF16, ptr, count))."""
    from helios_deploy.export.transforms.lowering import lower_artifacts

    from .fake_tensorrt_refit import digest, onnx_weights

    trt = fake_trt()
    root = Path(shutil.copytree(fused, tmp_path / "arts"))
    lower_artifacts(root, ["transformer"], log=lambda m: None)
    before = _build(root, refittable=True)
    bf16_path = root / "transformer" / "model.bf16.onnx"
    old = onnx_weights(bf16_path)
    _refit(root, f"{adapters[0]}:1.5")
    m = json.loads((root / "manifest.json").read_text())
    comp = m["components"]["transformer"]
    new = onnx_weights(bf16_path)
    changed = sorted(n for n in new if n not in old or digest(new[n]) != digest(old[n]))
    assert len(changed) == 20 and {new[n].dtype.name for n in changed} == {"bfloat16"}  # the block linears
    assert sorted(c[2] for c in trt.named("set_named_weights")) == changed
    entry = comp["engines"]["model"]
    plan = json.loads((root / "transformer" / entry["file"]).read_bytes())
    assert plan["weights"] == {n: digest(a) for n, a in new.items()}
    assert entry["key"]["weights_sha256"] == comp["bf16"]["model"]["data_sha256"] != before["key"]["weights_sha256"]


def test_refit_requantizes_an_fp8_graph_and_refits_its_engine(tiny_ckpt, fused_fp8, adapters, fake_trt, tmp_path):
    """An FP8 export of the fused weights (quantize --precision fp8) with a refittable fp8 engine, refitted to
    another adapter: the changed layers' FP8 weights are quantized again with per-channel scales from the new
    weights, the activation scales stay the calibration's, the engine gets exactly the lowered graph's changed
    weights (FP8 through Weights(FP8, pointer, count)); the FP8 graph tracks diffusers' model with the new
    adapter fused within the FP8 thresholds."""
    from helios_deploy.export.parity.fp8 import FP8_COSINE, FP8_REL_L2
    from helios_deploy.export.parity.report import parity_report

    from .fake_tensorrt_refit import digest, onnx_weights

    trt = fake_trt()
    root = Path(shutil.copytree(fused_fp8, tmp_path / "arts"))  # quantize --precision fp8 of the fused export
    before = _build(root, precision="fp8", refittable=True)
    fp8_path, low_path = root / "transformer" / "model.fp8.onnx", root / "transformer" / "model.fp8.bf16.onnx"
    old_fp8, old_low = onnx_weights(fp8_path), onnx_weights(low_path)
    record = _refit(root, f"{adapters[0]}:0.9")
    m = json.loads((root / "manifest.json").read_text())
    comp = m["components"]["transformer"]
    new_fp8, new_low = onnx_weights(fp8_path), onnx_weights(low_path)
    changed = sorted(n for n in new_fp8 if digest(new_fp8[n]) != digest(old_fp8[n]))
    weights = [n for n in changed if new_fp8[n].dtype.name == "float8_e4m3fn"]
    assert len(weights) == 20 and changed == sorted(weights + [f"{n}_scale" for n in weights])  # activations kept
    assert comp["fp8"]["refit"]["fp8_weights_requantized"] == 20
    low_changed = sorted(n for n in new_low if digest(new_low[n]) != digest(old_low[n]))
    assert set(weights) <= set(low_changed)
    assert sorted(c[2] for c in trt.named("set_named_weights")) == low_changed
    entry = comp["engines"]["model"]
    plan = json.loads((root / "transformer" / entry["file"]).read_bytes())
    assert plan["weights"] == {n: digest(a) for n, a in new_low.items()}
    assert entry["key"]["weights_sha256"] == comp["fp8"]["bf16"]["data_sha256"] != before["key"]["weights_sha256"]
    assert record["engines"]["transformer/model"]["weights"] == len(low_changed)
    report = parity_report(tiny_ckpt, root, precision="fp8")
    for c in report["components"]["transformer"]["cases"]:
        assert c["cosine"] >= FP8_COSINE and c["rel_l2"] <= FP8_REL_L2, c
    assert report["passed"]


def test_refit_refuses_engines_it_cannot_refit(fused, adapters, fake_trt, tmp_path, capsys):
    fake_trt()
    root = Path(shutil.copytree(fused, tmp_path / "arts"))
    _build(root)  # not refittable
    before = (root / "manifest.json").read_bytes()
    code, _, err = run_cli(["refit", root, "--lora", adapters[0]], capsys)
    assert code == 1 and "built without --refittable" in err and "Traceback" not in err
    assert (root / "manifest.json").read_bytes() == before


def test_weight_stripped_engine_is_refitted_only_with_its_build_weights(fused, adapters, fake_trt, tmp_path,
                                                                      monkeypatch):
    """A weight-stripped engine (STRIP_PLAN + REFIT_IDENTICAL) is refitted at load from the very ONNX files it was
    built from, and from nothing else (NvInfer.h: other weights are undefined behaviour): after `refit` changes
    the weights it is stale (its record untouched, the runner refuses it naming `build`), `build` rebuilds it, and
    the rebuilt engine loads with the new weights. Plan models of stripped engines are refused (Triton's
    tensorrt backend never refits a plan)."""
    from helios_deploy.artifacts import Artifacts
    from helios_deploy.errors import UserError
    from helios_deploy.export.tensorrt import builder as B
    from helios_deploy.export.tensorrt.engines import BuildSettings
    from helios_deploy.runtime.runners import tensorrt as R
    from helios_deploy.serving.repository import RepoOptions, write_repository

    from .fake_cuda import FakeCuda
    from .fake_tensorrt_refit import digest, onnx_weights
    from .test_tensorrt_runner import PLATFORM

    trt = fake_trt()
    monkeypatch.setattr(R, "require_gpu_tensorrt", lambda index=0: PLATFORM)
    monkeypatch.setattr(R.TensorRTRunner, "cuda", FakeCuda(trt))
    root = Path(shutil.copytree(fused, tmp_path / "arts"))
    before = _build(root, strip_weights=True)
    assert {"STRIP_PLAN", "REFIT_IDENTICAL"} <= {f.name for f in trt.named("build_serialized_network")[0][2]}

    def load():
        arts = Artifacts.open(root)
        runner = R.TensorRTRunner(root, arts.manifest, "transformer", arts.spec("transformer").graph("model"), "cuda")
        runner.activate()
        return runner._engine

    assert load().weights == {n: digest(a) for n, a in onnx_weights(root / "transformer" / "model.onnx").items()}
    loaded = len(trt.named("set_named_weights"))  # the load's refit from the ONNX
    record = _refit(root, f"{adapters[0]}:0.25")  # no GPU work, and the engine is not touched
    with pytest.raises(UserError, match="stale") as stale:  # never refitted with the new weights
        load()
    assert "rebuild" in str(stale.value)
    assert record["engines"]["transformer/model"]["rebuild"] and len(trt.named("set_named_weights")) == loaded
    m = json.loads((root / "manifest.json").read_text())
    assert m["components"]["transformer"]["engines"]["model"] == before
    after = _build(root, strip_weights=True)  # the stale engine is rebuilt from the new graph
    assert after["digest"] != before["digest"]
    assert load().weights == {n: digest(a) for n, a in onnx_weights(root / "transformer" / "model.onnx").items()}
    with pytest.raises(UserError, match="weight-stripped engines cannot be served as tensorrt_plan models"):
        write_repository(root, tmp_path / "repo", RepoOptions(backend="onnxruntime", reference=True, plan_models=True,
                                                              triton_release="26.03"))
    old = fake_trt(strip_plan=False)
    with pytest.raises(UserError, match="cannot build weight-stripped plans"):
        B.refit_flags(old, BuildSettings(strip_weights=True))


def _engine_against_ort(root: Path, onnx_file: str) -> float:
    """rel_l2 of the transformer's TensorRT engine (the one the manifest names) against ONNX Runtime on
    ``onnx_file``, at the first operating point (GPU)."""
    import torch

    from helios_deploy.artifacts import Artifacts
    from helios_deploy.export.parity.compare import OrtGraph, example_inputs
    from helios_deploy.runtime.runners.tensorrt import TensorRTRunner

    arts = Artifacts.open(root)
    spec = arts.spec("transformer")
    graph = spec.graph("model")
    runner = TensorRTRunner(root, arts.manifest, "transformer", graph, "cuda")
    ort = OrtGraph(root / "transformer" / onnx_file, graph)
    feeds = example_inputs(spec, graph, graph.operating_points[0].dims, seed=0)
    runner.activate()
    try:
        got = runner.infer({k: torch.from_numpy(v).cuda() for k, v in feeds.items()})
    finally:
        runner.deactivate()
    ref = ort(*[feeds[t.name] for t in graph.inputs])[0]
    ours = next(iter(got.values())).float().cpu().numpy()
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def _quantize_fp8(root: Path, tmp_path: Path) -> None:
    """quantize --precision fp8 of the transformer: one prompt, one chunk, the block linears in FP8."""
    from helios_deploy.export.transforms.quantize import quantize_artifacts

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(FP8_PROMPTS[0] + "\n")
    quantize_artifacts(root, ["transformer"], prompts_file=prompts, keep=FP8_KEEP, chunks=1, seed=0, log=lambda m: None)


@pytest.mark.gpu
def test_refit_on_a_gpu(fused, adapters, tmp_path):
    """On a GPU: a refittable fp32 engine of the fused export, refitted to another adapter, runs like ONNX Runtime
    on the refitted graph."""
    from helios_deploy.export.tensorrt import probe

    info = probe.probe_tensorrt()
    if info["tensorrt"] is None or info["gpu"] is None:
        pytest.skip(f"needs TensorRT and an NVIDIA GPU: {info['error']}")
    root = Path(shutil.copytree(fused, tmp_path / "arts"))
    _build(root, refittable=True)
    _refit(root, f"{adapters[0]}:0.5")
    assert _engine_against_ort(root, "model.onnx") <= 1e-3


@pytest.mark.gpu
def test_fp8_refit_on_a_gpu(fused, adapters, tmp_path):
    """On a GPU: a refittable fp8 engine (FP8 graph of the fused export), refitted to another adapter (FP8 weights
    and their scales set through the Refitter), runs like ONNX Runtime on the refitted FP8 graph; where TensorRT
    does not take new Q/DQ scales, refit must fail with its one message, not produce a wrong engine."""
    from helios_deploy.errors import UserError
    from helios_deploy.export.tensorrt import probe

    info = probe.probe_tensorrt()
    if info["tensorrt"] is None or info["gpu"] is None:
        pytest.skip(f"needs TensorRT and an NVIDIA GPU: {info['error']}")
    root = Path(shutil.copytree(fused, tmp_path / "arts"))
    _quantize_fp8(root, tmp_path)
    _build(root, precision="fp8", refittable=True)
    try:
        _refit(root, f"{adapters[0]}:0.5")
    except UserError as e:
        pytest.fail(f"TensorRT did not refit the fp8 engine (record this in docs/lora.md): {e}")
    assert _engine_against_ort(root, "model.fp8.onnx") <= 5e-2  # the fp8 engine the manifest names


def test_triton_repository_names_the_served_adapters(fused, adapters, tmp_path):
    from helios_deploy.fsutil import sha256_file
    from helios_deploy.serving.configs import parse_config
    from helios_deploy.serving.repository import RepoOptions, write_repository

    write_repository(fused, tmp_path / "repo", RepoOptions(backend="onnxruntime", reference=True))
    cfg = parse_config((tmp_path / "repo" / "helios" / "config.pbtxt").read_text())
    assert cfg.parameters["lora"].string_value == ",".join(
        f"{p.name}:{s}:{sha256_file(p)[:12]}" for p, s in zip(adapters, SCALES))
    readme = (tmp_path / "repo" / "README.md").read_text()
    assert all(str(p.resolve()) in readme for p in adapters) and "helios-deploy refit" in readme


def test_refit_of_refittable_engines_without_a_gpu_is_one_error(fused, adapters, fake_trt, monkeypatch, tmp_path,
                                                                  capsys):
    """Engines built refittable (through the fake), then refit on this CPU host with the real probe: one clear
    error before anything is written."""
    fake_trt()
    root = Path(shutil.copytree(fused, tmp_path / "arts"))
    _build(root, refittable=True)
    monkeypatch.undo()  # the real tensorrt probe (a child process): no TensorRT, no GPU here
    before = {p.name: p.read_bytes() for p in (root / "transformer").iterdir()}
    code, _, err = run_cli(["refit", root, "--lora", adapters[0]], capsys)
    assert code == 1 and "cannot run here" in err and "Traceback" not in err, err
    assert {p.name: p.read_bytes() for p in (root / "transformer").iterdir()} == before
    assert not [p for p in root.iterdir() if ".partial-" in p.name]


TE_SCALES = (0.6, 1.2)


@pytest.fixture(scope="session")
def te_adapters(tiny_ckpt, tmp_path_factory) -> tuple[Path, Path]:
    """(transformer + UMT5 text encoder, diffusers/PEFT layout; text encoder only, other seed and rank)."""
    from helios_deploy.checkpoints.tiny_lora import write_tiny_lora

    folder = tmp_path_factory.mktemp("lora-te")
    return (write_tiny_lora(tiny_ckpt, folder / "both.safetensors", rank=4, alpha=8.0, seed=5, text_encoder="also"),
            write_tiny_lora(tiny_ckpt, folder / "te.safetensors", rank=2, alpha=4.0, seed=7, text_encoder="only"))


@pytest.fixture(scope="session")
def fused_te(tiny_ckpt, artifacts, te_adapters, tmp_path_factory) -> Path:
    """Transformer and text encoder exported through the CLI with both adapters (audit on: each against its
    fused reference); the VAE copied from the plain export."""
    from helios_deploy.artifacts import Artifacts, write_manifest
    from helios_deploy.cli import main

    out = tmp_path_factory.mktemp("lora-te-arts") / "fused"
    args = ["export", tiny_ckpt, "-o", out, "--height", HEIGHT, "--width", WIDTH, "--components",
            "transformer,text_encoder", "--text-length", TEXT_LENGTH, "--max-text-length", MAX_TEXT_LENGTH]
    for path, scale in zip(te_adapters, TE_SCALES):
        args += ["--lora", f"{path}:{scale}"]
    assert main([str(a) for a in args]) == 0
    arts, plain = Artifacts.open(out), Artifacts.open(artifacts)
    for c in ("vae_decoder", "vae_encoder"):
        shutil.copytree(plain.root / c, out / c)
        arts.manifest["components"][c] = json.loads(json.dumps(plain.manifest["components"][c]))
    write_manifest(out, arts.manifest)
    return out


def _component_parity(tiny_ckpt, root: Path, component: str, adapters=None) -> list[float]:
    """rel_l2 per case of ``component``'s graphs against the reference: the manifest's adapters fused (None), or
    the given ones (() for the plain checkpoint)."""
    from helios_deploy.artifacts import Artifacts
    from helios_deploy.checkpoints.checkpoint import Checkpoint
    from helios_deploy.export.exporter.lora import manifest_adapters
    from helios_deploy.export.exporter.run import reference_loader
    from helios_deploy.export.parity.audit import open_sessions
    from helios_deploy.export.parity.compare import compare_component

    arts = Artifacts.open(root)
    adapters = manifest_adapters(arts.manifest) if adapters is None else adapters
    spec = arts.spec(component)
    result = compare_component(component, spec, lambda: open_sessions(root, spec, []),
                               lambda: reference_loader(Checkpoint(tiny_ckpt), adapters)(component))
    return [c["rel_l2"] for c in result["cases"]]


def test_text_encoder_lora_matches_peft_on_umt5(tiny_ckpt, fused_te, te_adapters):
    """The text encoder's graph with both adapters fused against transformers' UMT5EncoderModel with the same
    adapters put on by PEFT, weighted and merged; the transformer against diffusers' fuse_lora; the manifest
    says which adapters each component holds."""
    from helios_deploy.fsutil import sha256_file

    for component in ("text_encoder", "transformer"):
        assert max(_component_parity(tiny_ckpt, fused_te, component)) <= 1e-4
    assert min(_component_parity(tiny_ckpt, fused_te, "text_encoder", ())) > 1e-2  # the adapters matter
    m = json.loads((fused_te / "manifest.json").read_text())
    te, tr = m["components"]["text_encoder"], m["components"]["transformer"]
    assert len(te["lora_targets"]) == 14  # 2 UMT5 layers x (q, k, v, o, wi_0, wi_1, wo)
    assert [r["sha256"] for r in te["lora"]] == [sha256_file(p) for p in te_adapters]
    assert [r["sha256"] for r in tr["lora"]] == [sha256_file(te_adapters[0])] and len(tr["lora_targets"]) == 20


def test_runtime_with_a_text_encoder_lora_matches_the_pipeline(tiny_ckpt, fused_te, cholesky_float64):
    """The runtime on the export (UMT5 and transformer fused) against HeliosPyramidPipeline with the adapters on
    its transformer (load_lora_weights) and on its text encoder (PEFT), one chunk."""
    from helios_deploy.export.exporter.lora import Adapter, manifest_adapters
    from helios_deploy.export.parity.pipeline import PipelineCase, run_pipeline_parity
    from helios_deploy.runtime import Pipeline

    adapters = manifest_adapters(json.loads((fused_te / "manifest.json").read_text()))
    pipe, case = Pipeline.from_artifacts(fused_te), [PipelineCase("t2v_111")]
    result = run_pipeline_parity(tiny_ckpt, pipe, cases=case, chunks=1, adapters=adapters)
    assert result["passed"], result
    # the text encoder's adapters matter to the video: the reference without the text-encoder-only one differs
    partial = run_pipeline_parity(tiny_ckpt, pipe, cases=case, chunks=1, adapters=[adapters[0]])
    assert not partial["passed"]


def test_refit_rewrites_the_text_encoder_and_the_repository(tiny_ckpt, fused_te, te_adapters, tmp_path, capsys):
    """refit to the text-encoder-only adapter: the transformer goes back to the checkpoint's weights, the text
    encoder gets the new adapter (parity against the references); a Triton repository that serves the artifacts
    by reference (--repository) and one that holds a copy (helios/artifacts) say which adapter they serve."""
    from helios_deploy.fsutil import sha256_file
    from helios_deploy.serving.configs import parse_config
    from helios_deploy.serving.repository import RepoOptions, write_repository

    root = Path(shutil.copytree(fused_te, tmp_path / "arts"))
    by_ref, copied = tmp_path / "repo-ref", tmp_path / "repo-copy"
    write_repository(root, by_ref, RepoOptions(backend="onnxruntime", reference=True))
    write_repository(root, copied, RepoOptions(backend="onnxruntime"))
    lora_of = lambda repo: parse_config((repo / "helios" / "config.pbtxt").read_text()).parameters["lora"].string_value
    assert lora_of(by_ref).count(":") == 4  # both adapters
    code, out, err = run_cli(["refit", root, "--lora", f"{te_adapters[1]}:0.3", "--repository", by_ref], capsys)
    assert code == 0, err
    want = f"te.safetensors:0.3:{sha256_file(te_adapters[1])[:12]}"
    assert lora_of(by_ref) == want and "reload its helios model" in out
    assert f"at scale 0.3 (sha256 {sha256_file(te_adapters[1])[:12]})" in (by_ref / "README.md").read_text()
    m = json.loads((root / "manifest.json").read_text())
    assert m["components"]["transformer"]["lora_targets"] == [] and m["components"]["transformer"]["lora"] == []
    assert len(m["components"]["text_encoder"]["lora_targets"]) == 14
    assert m["refit"]["components"] == ["transformer", "text_encoder"]
    assert max(_component_parity(tiny_ckpt, root, "text_encoder")) <= 1e-4
    assert max(_component_parity(tiny_ckpt, root, "transformer", ())) <= 1e-4  # the checkpoint's own weights
    # the copy inside a repository: refit of REPO/helios/artifacts updates that repository without --repository
    code, out, err = run_cli(["refit", copied / "helios" / "artifacts", "--no-lora"], capsys)
    assert code == 0, err
    assert lora_of(copied) == "none" and lora_of(by_ref) == want  # the other repository serves the other folder
    # a repository of other artifacts is refused before anything is written
    before = (root / "manifest.json").read_bytes()
    code, _, err = run_cli(["refit", root, "--no-lora", "--repository", copied], capsys)
    assert code == 1 and "serves other artifacts" in err and (root / "manifest.json").read_bytes() == before


@pytest.mark.slow
def test_lora_switch_on_a_running_triton_server(server_env, fused, adapters, tmp_path, capsys):
    """A deployment switching adapters, as its operator would: a repository holding a copy of the fused export,
    served by tritonserver (explicit model control, the repository's load_models.txt); `refit
    REPO/helios/artifacts --lora ...`, then POST v2/repository/models/helios/load. The stream before equals the
    runtime on the old weights, the stream after equals it on the refitted ones, and the served config names the
    new adapter."""
    import time
    import urllib.request

    from helios_deploy.fsutil import sha256_file
    from helios_deploy.runtime import Pipeline
    from helios_deploy.serving.client import HeliosClient
    from helios_deploy.serving.repository import RepoOptions, write_repository
    from helios_deploy.serving.server import LocalServer

    prompt, root, repo = "a red fox running through snow", Path(shutil.copytree(fused, tmp_path / "arts")), tmp_path / "repo"
    write_repository(root, repo, RepoOptions(backend="onnxruntime", chunk_seconds=0.05))
    served = repo / "helios" / "artifacts"

    def video(srv) -> np.ndarray:
        with HeliosClient(srv.grpc_url, timeout=300) as c:
            return np.concatenate([chunk.frames for chunk in c.stream(prompt, num_frames=33, seed=3)])

    with LocalServer(server_env, repo, tmp_path / "server.log") as srv:
        before = video(srv)
        code, out, err = run_cli(["refit", served, "--lora", f"{adapters[0]}:0.4"], capsys)
        assert code == 0 and "reload its helios model" in out, err
        t0 = time.perf_counter()
        load = urllib.request.Request(f"{srv.http_url}/v2/repository/models/helios/load", data=b"", method="POST")
        with urllib.request.urlopen(load, timeout=300) as r:
            assert r.status == 200
        reload_seconds = time.perf_counter() - t0
        after = video(srv)
        with urllib.request.urlopen(f"{srv.http_url}/v2/models/helios/config", timeout=30) as r:
            config = json.load(r)
    assert config["parameters"]["lora"]["string_value"] == f"{adapters[0].name}:0.4:{sha256_file(adapters[0])[:12]}"
    assert np.array_equal(before, Pipeline.from_artifacts(root).generate(prompt, num_frames=33, seed=3))
    assert np.array_equal(after, Pipeline.from_artifacts(served).generate(prompt, num_frames=33, seed=3))
    assert not np.array_equal(before, after)
    print(f"helios model reload after refit: {reload_seconds:.1f}s")
