"""FP8 attention (issue 30): Q/DQ where TensorRT's fused FP8 attention wants them, checked with Model
Optimizer's own pattern matcher, recorded in the manifest, calibrated through the real sampler, and its accuracy
against the diffusers reference (per call and whole video; the 12-chunk drift is in test_long_stream.py)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from .conftest import FP8_PROMPTS, run_cli


def _entry(root):
    return json.loads((root / "manifest.json").read_text())["components"]["transformer"]["fp8"]


def _fp8_mha_matches(path) -> list[int]:
    """For each Softmax of the graph: how many nodes Model Optimizer's FP8 fMHA-v2 matcher finds with Q/DQ
    (3: BMM1, Softmax, BMM2; 0: not TensorRT's FP8 attention pattern)."""
    import onnx_graphsurgeon as gs
    from modelopt.onnx.quantization.graph_utils import match_fp8_mha_pattern

    graph = gs.import_onnx(onnx.load(str(path), load_external_data=False))
    return [len(match_fp8_mha_pattern(graph, n, True)) for n in graph.nodes if n.op == "Softmax"]


def test_attention_qdq_is_tensorrt_fp8_mha_pattern(quantized_attention, quantized):
    entry = _entry(quantized_attention)
    folder = quantized_attention / "transformer"
    # 2 blocks x (self + cross attention), every one FP8, in the FP8 graph and in its bf16 lowering (what TensorRT builds)
    assert len(entry["attention"]["nodes"]) == 4 and not entry["attention"]["kept"]
    assert _fp8_mha_matches(folder / entry["file"]) == [3, 3, 3, 3]
    assert _fp8_mha_matches(folder / entry["bf16"]["file"]) == [3, 3, 3, 3]
    # the check can fail: the linears-only graph has the softmax and matmuls, not the FP8 pattern
    plain = _entry(quantized)
    assert "attention" not in plain and _fp8_mha_matches(quantized / "transformer" / plain["file"]) == [0, 0, 0, 0]

    from helios_deploy.export.transforms.attention import SOFTMAX_SCALE, attention_problems

    fp8 = onnx.load(str(folder / entry["file"]))
    assert attention_problems(fp8, entry["attention"]["nodes"]) == []
    lin = onnx.load(str(quantized / "transformer" / plain["file"]))
    assert len(attention_problems(lin, entry["attention"]["nodes"])) == 4 * 4  # every BMM input of every attention
    # TensorRT's rule: the attention scale (sqrt on Q and on K) is applied before the QuantizeLinear
    producer = {o: n for n in fp8.graph.node for o in n.output}
    for rec in entry["attention"]["nodes"]:
        bmm1 = next(n for n in fp8.graph.node if n.name == rec["bmm1"])
        for x in bmm1.input:
            q = producer[producer[x].input[0]]
            assert q.op_type == "QuantizeLinear" and producer[q.input[0]].op_type == "Mul", rec
        assert rec["head_size"] == 16
    assert entry["attention"]["softmax_scale"] == pytest.approx(1 / 448) and SOFTMAX_SCALE == np.float32(1 / 448)
    # Q, K and V calibrated through the sampler: one scale each, from the recorded ranges (softmax: fixed)
    scales = entry["attention"]["scales"]
    assert len(scales) == 4 * 4 and sum(v == pytest.approx(1 / 448) for v in scales.values()) == 4
    assert entry["recipe"]["attention_matmuls"] == "fp8" and plain["recipe"]["attention_matmuls"] == "high precision"
    assert entry["calibration"]["fp8_attention"] is True and entry["calibration"]["sha256"] != plain["calibration"]["sha256"]
    assert entry["calibration"]["calls"] == 12  # 2 prompts x 2 chunks x 3 stages, as the linears'


def test_fp8_attention_accuracy_against_diffusers(tiny_ckpt, quantized_attention, quantized):
    """Targets (docs/quantize-and-build.md): the FP8 linears' own, per call cosine >= 0.99 and rel_l2 <= 0.08,
    whole video >= 30 dB per chunk against the fp32 diffusers pipeline."""
    from helios_deploy.artifacts import Artifacts
    from helios_deploy.export.exporter.run import reference_loader
    from helios_deploy.export.parity.compare import OrtGraph, compare_component
    from helios_deploy.export.parity.fp8 import FP8_COSINE, FP8_REL_L2
    from helios_deploy.export.parity.pipeline import PSNR_THRESHOLD, PipelineCase, psnr, run_pipeline_psnr
    from helios_deploy.checkpoints.checkpoint import Checkpoint
    from helios_deploy.runtime import Pipeline

    arts = Artifacts.open(quantized_attention)
    spec = arts.spec("transformer")
    path = quantized_attention / "transformer" / _entry(quantized_attention)["file"]
    result = compare_component("transformer", spec, lambda: {"model": OrtGraph(path, spec.graph("model"))},
                               lambda: reference_loader(Checkpoint(tiny_ckpt), ())("transformer"), threshold=FP8_REL_L2,
                               precision="fp8", min_cosine=FP8_COSINE)
    print("fp8 attention per call:", [(c["name"], round(c["cosine"], 5), round(c["rel_l2"], 4)) for c in result["cases"]])
    assert len(result["cases"]) == 5 and result["passed"]
    pipe = Pipeline.from_artifacts(quantized_attention, precision="fp8")
    video = run_pipeline_psnr(tiny_ckpt, pipe, cases=(PipelineCase("t2v_111"),))
    print("fp8 attention PSNR per chunk:", video["cases"][0]["psnr_db"])
    assert video["passed"] and min(video["cases"][0]["psnr_db"]) >= PSNR_THRESHOLD
    # really FP8 attention: another video than the linears-only FP8 graph's
    linears = Pipeline.from_artifacts(quantized, precision="fp8").generate(FP8_PROMPTS[0], num_frames=33, output="float")
    ours = pipe.generate(FP8_PROMPTS[0], num_frames=33, output="float")
    assert np.abs(ours - linears).max() > 1e-3 and psnr(ours, linears) < 60


def test_fp8_attention_cli_and_bad_input(artifacts, tmp_path, capsys):
    import shutil

    root = shutil.copytree(artifacts, tmp_path / "arts")
    prompts = tmp_path / "p.txt"
    prompts.write_text(FP8_PROMPTS[0] + "\n")
    code, _, err = run_cli(["quantize", root, "--precision", "bf16", "--fp8-attention"], capsys)
    assert code == 1 and "--fp8-attention is an option of --precision fp8" in err and "Traceback" not in err
    # every block kept in high precision: no attention can be FP8, one message, nothing written
    before = sorted(p.name for p in (root / "transformer").iterdir())
    code, _, err = run_cli(["quantize", root, "--fp8-attention", "--calibration-prompts", prompts,
                            "--keep-high-precision", r"^blocks\.", "--calibration-chunks", 1], capsys)
    assert code == 1 and "no attention of transformer can be FP8" in err and "Traceback" not in err
    assert sorted(p.name for p in (root / "transformer").iterdir()) == before


def test_stress_checkpoint_has_peaked_attention(tiny_ckpt, tmp_path):
    """The stress checkpoint scales exactly the self-attention's Q/K norm gains, and the reference pipeline's
    attention gets sharply peaked (docs/quantize-and-build.md gives FP8 attention's numbers on it)."""
    from safetensors.torch import load_file

    from helios_deploy.export.parity.stress import attention_peak, write_peaked_checkpoint

    peaked = write_peaked_checkpoint(tiny_ckpt, tmp_path / "peaked", factor=8.0)
    before, after = {}, {}
    for shard in sorted((tiny_ckpt / "transformer").glob("*.safetensors")):
        before.update(load_file(str(shard)))
        after.update(load_file(str(peaked / "transformer" / shard.name)))
    scaled = [k for k in before if not (before[k] == after[k]).all()]
    assert sorted(scaled) == sorted(f"blocks.{b}.attn1.norm_{x}.weight" for b in (0, 1) for x in "qk")
    assert all((after[k] == before[k] * 8.0).all() for k in scaled)
    base, peak = attention_peak(tiny_ckpt), attention_peak(peaked)
    print("attention peak (mean largest probability per row):", base, peak)
    assert peak["mean_max_prob"] > 2 * base["mean_max_prob"] and peak["share_max_above_0.5"] > 0.3


def test_gpu_check_runs_each_fp8_variant():
    """gpu-check (make gpu-check) runs the fp8_variants check after its own: linears only, + attention and + VAE
    convolutions, each built, compared with ONNX Runtime's FP8 graph and timed (export/tensorrt/gpucheck_fp8.py;
    GPU only)."""
    from helios_deploy.export.tensorrt import gpucheck  # noqa: F401 - registers the checks
    from helios_deploy.export.tensorrt.gpucheck_fp8 import VARIANTS, fp8_variants
    from helios_deploy.export.tensorrt.gpuchecks import CHECKS

    assert ("fp8_variants", fp8_variants) in CHECKS and VARIANTS == {"fp8": (False, False), "fp8+attn": (True, False),
                                                           "fp8+attn+vae": (True, True)}


def test_adherence_report_counts_flips(quantized_attention):
    """The FP8 report's adherence part (fp8_parity_report(adherence=True)): fp32 and FP8 runtimes on the same
    prompts x seeds, flips where their verdicts differ. The random tiny checkpoint draws no shapes, so no video
    matches; the trained checkpoint's numbers are in docs/quantize-and-build.md."""
    from helios_deploy.artifacts import Artifacts
    from helios_deploy.export.parity.fp8 import ADHERENCE_MAX_DROP, adherence_report

    prompts = ["a red square moving left", "a blue circle moving up"]
    r = adherence_report(Artifacts.open(quantized_attention), prompts=prompts, seeds=(0,))
    assert r["videos"] == 2 and set(r["share"]) == {"fp32", "fp8"} and r["max_drop"] == ADHERENCE_MAX_DROP
    assert r["drop"] == pytest.approx(r["share"]["fp32"]["share"] - r["share"]["fp8"]["share"])
    assert len(r["flips"]) >= abs(r["share"]["fp32"]["matched"] - r["share"]["fp8"]["matched"])
    assert r["passed"] == (r["drop"] <= ADHERENCE_MAX_DROP)
