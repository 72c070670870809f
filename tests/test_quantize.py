"""FP8 quantization of the tiny checkpoint: FP8 weights where the recipe says, fp32 elsewhere, accuracy
against the diffusers reference (per operating point and the whole video), the runtime on FP8 graphs,
and bad input. The tiny transformer has 2 blocks, so the default recipe (first/last 3 blocks kept) would
quantize nothing: the tests pass an explicit keep set that leaves the blocks' linear layers in FP8."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from .conftest import FP8_KEEP, FP8_PROMPTS, run_cli

KEEP, PROMPTS = FP8_KEEP, FP8_PROMPTS  # the recipe and calibration prompts of the `quantized` fixture (conftest)


def _copy(artifacts: Path, dst: Path) -> Path:
    shutil.copytree(artifacts, dst)
    return dst


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def fp8_graphs(quantized):
    entry = json.loads((quantized / "manifest.json").read_text())["components"]["transformer"]["fp8"]
    fp8 = onnx.load(str(quantized / "transformer" / entry["file"]))
    fp32 = onnx.load(str(quantized / "transformer" / "model.onnx"))
    return entry, fp8, fp32


def _weight_of(model: onnx.ModelProto, node_name: str):
    """(initializer feeding the node's weight input, whether it passes through a DequantizeLinear)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == node_name)
    src, via_dq = node.input[1], False
    while src in producer and producer[src].op_type in ("DequantizeLinear", "Transpose"):
        via_dq |= producer[src].op_type == "DequantizeLinear"
        src = producer[src].input[0]
    return inits.get(src), via_dq


def test_block_linears_have_fp8_weights(fp8_graphs):
    entry, fp8, _ = fp8_graphs
    precision = entry["layer_precision"]
    blocks = [n for n in precision if n.startswith("blocks.")]
    # 2 blocks x (attn1 q,k,v,out + attn2 q,k,v,out + ffn 2) linear layers
    assert len(blocks) == 20 and all(precision[n] == "fp8" for n in blocks)
    for name in blocks:
        init, via_dq = _weight_of(fp8, name)
        assert via_dq and init is not None and init.data_type == onnx.TensorProto.FLOAT8E4M3FN, name
    # activations: calibrated Q -> DQ in front of every FP8 layer (q/k/v share one on their common input)
    producer = {o: n for n in fp8.graph.node for o in n.output}
    for node in (n for n in fp8.graph.node if n.name in blocks):
        dq = producer[node.input[0]]
        assert dq.op_type == "DequantizeLinear" and producer[dq.input[0]].op_type == "QuantizeLinear", node.name


def test_quantized_weights_take_a_quarter_of_fp32(fp8_graphs):
    """Each FP8 layer's weight: same shape as in the fp32 export, one byte per value instead of four."""
    entry, fp8, fp32 = fp8_graphs
    before = after = 0
    for name in (n for n, p in entry["layer_precision"].items() if p == "fp8"):
        w8, _ = _weight_of(fp8, name)
        w32, _ = _weight_of(fp32, name.split("/", 1)[1])  # the export's own node name
        assert w32.data_type == onnx.TensorProto.FLOAT and sorted(w32.dims) == sorted(w8.dims)
        assert len(w8.raw_data) == int(np.prod(w8.dims))
        before += int(np.prod(w32.dims)) * 4
        after += len(w8.raw_data)
    assert before > 0 and after * 4 == before
    assert entry["weight_bytes"]["fp8_graph"]["fp8"] == after


def test_kept_layers_and_attention_stay_fp32(fp8_graphs):
    entry, fp8, _ = fp8_graphs
    precision = entry["layer_precision"]
    kept = [n for n in precision if not n.startswith("blocks.")]
    assert any(n.startswith("condition_embedder.") for n in kept) and any(n.startswith("proj_out/") for n in kept)
    assert any(n.startswith("patch_") for n in kept)
    for name in kept:
        assert precision[name] == "fp32"
        init, via_dq = _weight_of(fp8, name)
        assert not via_dq and init is not None and init.data_type == onnx.TensorProto.FLOAT, name
    producer = {o: n for n in fp8.graph.node for o in n.output}
    attention = [n for n in fp8.graph.node if n.op_type == "MatMul" and n.name not in precision]
    assert attention and all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear"
                             for n in attention for i in n.input)


def test_manifest_records_recipe_and_calibration(quantized, fp8_graphs):
    from helios_deploy.export.transforms.calibration import calibration_hash
    from helios_deploy.fsutil import sha256_file

    entry, _, _ = fp8_graphs
    assert entry["recipe"]["modelopt_version"] == "0.47.0" and entry["recipe"]["quantize_mode"] == "fp8"
    assert entry["keep_high_precision"] == KEEP
    cal = entry["calibration"]
    # 2 prompts x 2 chunks x 3 stages, one call each, at three different shapes
    assert cal["calls"] == 12 and len(cal["shapes"]) == 3 and set(cal["shapes"].values()) == {4}
    assert cal["variant"] == "distilled" and cal["sampling"]["pyramid_steps"] == [1, 1, 1]
    settings = {k: cal[k] for k in ("chunks", "seed", "variant", "sampling", "method", "video", "text_length",
                                    "checkpoint", "device")}
    assert cal["sha256"] == calibration_hash(PROMPTS, settings)
    assert cal["sha256"] != calibration_hash(PROMPTS[:1], settings)
    for key in ("file", "data"):
        assert sha256_file(quantized / "transformer" / entry[key]) == entry[f"{key}_sha256"]
    assert not list((quantized / "transformer").glob(".fp8.partial-*"))


def test_fp8_parity_against_diffusers(tiny_ckpt, quantized):
    from helios_deploy.export.parity.fp8 import FP8_COSINE, FP8_REL_L2
    from helios_deploy.export.parity.pipeline import PSNR_THRESHOLD
    from helios_deploy.export.parity.report import parity_report

    report = parity_report(tiny_ckpt, quantized, precision="fp8", pipeline=True)
    cases = report["components"]["transformer"]["cases"]
    assert {"stage0", "stage1", "stage2"} <= {c["name"] for c in cases}
    for c in cases:
        assert c["cosine"] >= FP8_COSINE and c["rel_l2"] <= FP8_REL_L2, c
        assert c["max_abs_err"] > 1e-4, c  # it is really the FP8 graph, not the fp32 one
    for c in report["pipeline"]["cases"]:
        assert len(c["psnr_db"]) == 2 and min(c["psnr_db"]) >= PSNR_THRESHOLD, c
    assert report["passed"]


def test_generate_fp8_video(quantized, tmp_path, capsys):
    from helios_deploy.export.parity.pipeline import PSNR_THRESHOLD, psnr
    from helios_deploy.runtime import Pipeline

    out = tmp_path / "fp8.mp4"
    code, stdout, err = run_cli(["generate", quantized, "--prompt", "a cat", "--precision", "fp8", "-o", out], capsys)
    assert code == 0, err
    assert out.stat().st_size > 0 and "33 frames" in stdout
    fp32 = Pipeline.from_artifacts(quantized).generate("a cat", num_frames=33, output="float")
    fp8 = Pipeline.from_artifacts(quantized, precision="fp8").generate("a cat", num_frames=33, output="float")
    assert np.abs(fp8 - fp32).max() > 1e-3
    assert psnr(fp8, fp32) >= PSNR_THRESHOLD


def test_generate_fp8_without_quantize_is_a_user_error(artifacts, tmp_path, capsys):
    code, _, err = run_cli(["generate", artifacts, "--prompt", "a cat", "--precision", "fp8", "-o",
                            tmp_path / "x.mp4"], capsys)
    assert code == 1 and "helios-deploy quantize" in err and "Traceback" not in err
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.parametrize("content", ["", "\n  \n", b"\xff\xfe\x00\x81 not text", None])
def test_bad_calibration_file(artifacts, tmp_path, capsys, content):
    root = _copy(artifacts, tmp_path / "arts")
    before = _snapshot(root)
    path = tmp_path / "prompts.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)  # not UTF-8 text
    elif content is not None:
        path.write_text(content)  # None: the file does not exist
    code, _, err = run_cli(["quantize", root, "--calibration-prompts", path, "--keep-high-precision", "^proj_out/"], capsys)
    assert code == 1 and "calibration prompts file" in err and "Traceback" not in err
    assert _snapshot(root) == before


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a host without CUDA")
def test_cuda_calibration_without_cuda_is_refused_before_any_work(artifacts, tmp_path, capsys):
    root = _copy(artifacts, tmp_path / "arts")
    before = _snapshot(root)
    code, _, err = run_cli(["quantize", root, "--device", "cuda", "--keep-high-precision", "^proj_out/"], capsys)
    assert code == 1 and "CUDA" in err and "--device cpu" in err and "Traceback" not in err
    assert "calibrating" not in err and _snapshot(root) == before


def test_modified_onnx_is_refused_and_nothing_written(artifacts, tmp_path, capsys):
    root = _copy(artifacts, tmp_path / "arts")
    data = root / "transformer" / "model.onnx.data"
    with open(data, "r+b") as f:  # same size, other bytes: caught by the hash quantize checks
        f.seek(100)
        f.write(b"\x7f")
    before = _snapshot(root)
    code, _, err = run_cli(["quantize", root, "--keep-high-precision", "^proj_out/"], capsys)
    assert code == 1 and "modified after export" in err and "Traceback" not in err
    assert _snapshot(root) == before
    with open(data, "ab") as f:  # another size: caught by the size check every command makes on open
        f.write(b"\0")
    before = _snapshot(root)
    code, _, err = run_cli(["quantize", root, "--keep-high-precision", "^proj_out/"], capsys)
    assert code == 1 and "do not match their manifest" in err and "model.onnx.data" in err and "changed" in err
    assert "Traceback" not in err and _snapshot(root) == before


def test_unmatched_regex_warns_and_default_recipe_on_two_blocks(artifacts, tmp_path, capsys):
    root = _copy(artifacts, tmp_path / "arts")
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    args = ["quantize", root, "--calibration-prompts", prompts, "--calibration-chunks", "1"]
    code, out, err = run_cli([*args, "--keep-high-precision", "^proj_out/", "--keep-high-precision", "^no_such_layer"], capsys)
    assert code == 0, err
    assert "warning: --keep-high-precision '^no_such_layer' matches no node" in err
    assert "fp8" in out
    # the default recipe keeps the first and last 3 blocks: with 2 blocks nothing is left to quantize
    root2 = _copy(artifacts, tmp_path / "arts2")
    before = _snapshot(root2)
    code, _, err = run_cli(["quantize", root2, "--calibration-prompts", prompts, "--calibration-chunks", "1"], capsys)
    assert code == 1 and "every block stays in high precision" in err and "nothing to quantize" in err
    assert _snapshot(root2) == before


def test_default_recipe_keeps_edge_blocks():
    from helios_deploy.export.transforms.quantize import default_keep, resolve_keep

    names = [f"blocks.{b}.attn1.to_q/n{b}" for b in range(40)] + ["proj_out/n", "patch_short/c", "condition_embedder.x/n"]
    matched, warnings = resolve_keep(default_keep("transformer", 40), names)
    kept_blocks = sorted({int(n.split(".")[1]) for n in matched if n.startswith("blocks.")})
    assert kept_blocks == [0, 1, 2, 37, 38, 39] and not warnings
    assert {"proj_out/n", "patch_short/c", "condition_embedder.x/n"} <= set(matched)


def test_fp8_graph_is_lowered_to_bf16_for_tensorrt(tiny_ckpt, quantized, fp8_graphs):
    """What an fp8 engine is built from: the same Q/DQ graph and FP8 weights, bf16 outside them (a strongly
    typed network takes its precision from the graph). Run in onnx.reference (ONNX Runtime's CPU provider
    has no bf16 Conv), it meets the FP8 targets against the diffusers module at every parity case."""
    from helios_deploy.artifacts import Artifacts
    from helios_deploy.checkpoints.checkpoint import Checkpoint
    from helios_deploy.export.parity.bf16 import ReferenceGraph
    from helios_deploy.export.exporter.modules import build_module
    from helios_deploy.export.parity.compare import compare_component

    entry, fp8, _ = fp8_graphs
    arts = Artifacts.open(quantized)
    lowered = entry["bf16"]
    arts.verify_record("transformer", lowered)
    model = onnx.load(str(quantized / "transformer" / lowered["file"]))
    # weights (not the scalar zero points, which AutoCast duplicates where they are shared)
    count = lambda m, t: sum(1 for i in m.graph.initializer if i.data_type == t and len(i.dims) >= 2)  # noqa: E731
    assert count(model, onnx.TensorProto.FLOAT8E4M3FN) == count(fp8, onnx.TensorProto.FLOAT8E4M3FN) > 0
    assert count(model, onnx.TensorProto.BFLOAT16) > 0
    spec = arts.spec("transformer")
    graph = spec.graph("model")
    result = compare_component("transformer", spec, {"model": ReferenceGraph(quantized / "transformer" / lowered["file"],
                                                                             graph)},
                               build_module(Checkpoint(tiny_ckpt), "transformer"), threshold=0.08)
    assert len(result["cases"]) == 5
    for case in result["cases"]:
        assert case["rel_l2"] <= 0.08 and case["cosine"] >= 0.99, case


def test_fp8_build_plan_uses_the_lowered_fp8_graph(quantized, capsys):
    code, out, err = run_cli(["build", quantized, "--dry-run", "--precision", "fp8", "--components", "transformer"],
                             capsys)
    assert code == 0, err
    plan = json.loads(out)["components"]["transformer"]["model"]
    entry = json.loads((quantized / "manifest.json").read_text())["components"]["transformer"]["fp8"]
    assert plan["onnx"] == "transformer/model.fp8.bf16.onnx" and plan["precision"] == "fp8"
    assert plan["key_fields"]["graph_sha256"] == entry["bf16"]["file_sha256"]
    # the other components of an fp8 build are bf16 engines: they need their lowered graphs
    code, _, err = run_cli(["build", quantized, "--dry-run", "--precision", "fp8", "--components", "vae_decoder"],
                           capsys)
    assert code == 1 and "quantize ARTIFACTS --precision bf16" in err


def test_calibration_closes_the_text_encoder_before_the_transformer_runs(artifacts):
    """UMT5 encodes the calibration prompts first and its session is closed: no transformer call runs while
    the text encoder's weights are loaded (at 14B: 23 GB of fp32 UMT5 beside 57 GB of transformer)."""
    from helios_deploy.export.transforms.calibration import run_calibration
    from helios_deploy.runtime import Pipeline

    pipe = Pipeline.from_artifacts(artifacts, low_memory=True)
    loaded, transformer = [], pipe._transformer

    def spy(feeds):
        loaded.append(sorted({c for c, _ in pipe._runners}))
        return transformer(feeds)

    pipe._transformer = spy
    run_calibration(pipe, {}, PROMPTS, chunks=1, seed=0)
    assert len(loaded) == len(PROMPTS) * 3  # one chunk of three pyramid stages per prompt
    assert all("text_encoder" not in components and "transformer" in components for components in loaded[1:])
    assert "text_encoder" not in loaded[0]


def test_calibration_frees_each_activation_after_its_reduction(tmp_path):
    """The calibration graph's reductions run as soon as their activation is made, so a calibrated activation
    is freed as in the plain graph (ONNX Runtime's default order ran them after the whole graph: every
    activation alive at once; the real-width Wan decoder chunk at 64x64 peaked 0.96 GB above its plain graph).
    A chain of 16 Mul nodes with 16 MB activations, all calibrated: the call's peak stays within a few
    activations (about 16 of them without the fix) and the running maxima are the real ones."""
    import numpy as np
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from helios_deploy.export.transforms.calibration import RangeRunner, calibration_graph
    from helios_deploy.measure.memory import peak_rss_bytes, reset_peak, rss_bytes
    from helios_deploy.model.specs import GraphSpec, TensorSpec

    n, steps, mb = 1 << 22, 16, 16e6
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, n])  # noqa: E731
    nodes = [helper.make_node("Mul", [f"y{i}", f"c{i}"], [f"y{i + 1}"], name=f"mul_{i}") for i in range(steps)]
    scales = [numpy_helper.from_array(np.array(2.0, np.float32), f"c{i}") for i in range(steps)]
    model = helper.make_model(helper.make_graph(nodes, "chain", [value("y0")], [value(f"y{steps}")], scales),
                              opset_imports=[helper.make_opsetid("", 18)])
    src = tmp_path / "model.onnx"
    onnx.save(model, str(src), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    activations = [f"y{i}" for i in range(1, steps)]
    (tmp_path / "work").mkdir()
    path, outputs = calibration_graph(src, activations, tmp_path / "work")
    spec = GraphSpec("model", "model.onnx", (TensorSpec("y0", "float32", (1, n)),),
                     (TensorSpec(f"y{steps}", "float32", (1, n)),), {}, ())
    runner = RangeRunner(path, spec, "transformer", "cpu", outputs, {x: 1 for x in activations}).activate()
    x = torch.ones(1, n)
    runner.infer({"y0": x})  # the first call allocates ORT's own buffers
    if not reset_peak():
        import pytest

        pytest.skip("the kernel does not allow resetting the resident-memory high-water mark")
    start = rss_bytes()
    out = runner.infer({"y0": x})
    growth = peak_rss_bytes() - start
    assert float(out[f"y{steps}"][0, 0]) == 2.0 ** steps
    assert [runner.amax[a] for a in activations] == [2.0 ** i for i in range(1, steps)]
    print(f"calibration call: peak {growth / 1e6:.0f} MB above the start, activations of {mb / 1e6:.0f} MB")
    assert growth < 6 * mb
