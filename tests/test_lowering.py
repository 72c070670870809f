"""bf16 graphs for strongly typed TensorRT builds: lowered with Model Optimizer's AutoCast, checked on
CPU in ONNX's reference evaluator against the diffusers / transformers modules in fp32, and used by
`build --precision bf16` (and by fp8 builds outside the FP8 layers)."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

from helios_deploy.artifacts import Artifacts

from .conftest import run_cli

LOWERED = ("transformer", "text_encoder", "vae_decoder")


@pytest.fixture(scope="module")
def lowered(artifacts, tmp_path_factory):
    from helios_deploy.export.transforms.lowering import lower_artifacts

    root = tmp_path_factory.mktemp("bf16") / "arts"
    shutil.copytree(artifacts, root)
    lower_artifacts(root, LOWERED, log=lambda m: None)
    return root


@pytest.fixture(scope="module")
def bf16_parity(tiny_ckpt, lowered):
    from helios_deploy.export.parity.bf16 import bf16_report

    return bf16_report(tiny_ckpt, lowered, LOWERED)


def _types(model):
    return {v.name: v.type.tensor_type.elem_type
            for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}


def test_lowered_graphs_are_bf16_with_float32_io(lowered):
    arts = Artifacts.open(lowered)
    for c in LOWERED:
        for g in arts.spec(c).graphs:
            record = arts.manifest["components"][c]["bf16"][g.name]
            arts.verify_record(c, record)
            model = onnx.load(lowered / c / record["file"])
            inits = {i.name: i for i in model.graph.initializer}
            weights = [inits[x] for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")
                       for x in n.input if x in inits]  # the layers' weights
            assert weights and all(i.data_type == onnx.TensorProto.BFLOAT16 for i in weights), (c, g.name)
            types = _types(model)
            float_io = [t for t in g.tensors if t.dtype == "float32"]
            assert all(types[t.name] == onnx.TensorProto.FLOAT for t in float_io)  # the runtime is unchanged
            assert record["recipe"]["nodes"]["bf16"] > record["recipe"]["nodes"]["fp32"]


def test_sinusoid_arguments_stay_float32(lowered):
    """The timestep and rotary embeddings' Sin/Cos and everything computing their arguments."""
    from helios_deploy.export.transforms.lowering import sinusoid_feeders

    model = onnx.load(lowered / "transformer" / "model.bf16.onnx")
    types = _types(model)
    feeders = set(sinusoid_feeders(model))
    trig = [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    assert trig and feeders
    for node in model.graph.node:
        if node.op_type in ("Sin", "Cos") or (node.name in feeders and node.op_type in ("Mul", "Einsum", "Div")):
            assert types[node.output[0]] != onnx.TensorProto.BFLOAT16, node.name  # float32 (or int64 indices)


@pytest.mark.slow
@pytest.mark.parametrize("component", LOWERED)
def test_bf16_graphs_match_the_reference(bf16_parity, component):
    """Every parity case (operating points, batch 2, an unseen shape) within bf16 accuracy of the fp32
    diffusers / transformers module (measured: rel_l2 0.010 transformer, 0.027 UMT5, 0.024 VAE)."""
    comp = bf16_parity["components"][component]
    assert comp["precision"] == "bf16" and comp["cases"]
    for case in comp["cases"]:
        assert case["rel_l2"] <= 0.05 and case["cosine"] >= 0.999, case
    assert comp["passed"]


def test_bf16_build_plan_uses_the_lowered_graphs(lowered, artifacts, capsys):
    code, out, err = run_cli(["build", lowered, "--dry-run", "--precision", "bf16", "--components", "transformer"],
                             capsys)
    assert code == 0, err
    bf16 = json.loads(out)["components"]["transformer"]["model"]
    code, out, _ = run_cli(["build", lowered, "--dry-run", "--precision", "fp32", "--components", "transformer"],
                           capsys)
    fp32 = json.loads(out)["components"]["transformer"]["model"]
    assert bf16["onnx"] == "transformer/model.bf16.onnx" and fp32["onnx"] == "transformer/model.onnx"
    assert bf16["key"] != fp32["key"]
    record = Artifacts.open(lowered).manifest["components"]["transformer"]["bf16"]["model"]
    assert bf16["key_fields"]["graph_sha256"] == record["file_sha256"]


def test_bf16_build_without_lowering_says_what_to_run(artifacts, capsys):
    code, _, err = run_cli(["build", artifacts, "--dry-run", "--precision", "bf16", "--components", "text_encoder"],
                           capsys)
    assert code == 1 and "quantize ARTIFACTS --precision bf16" in err and "Traceback" not in err


def test_modified_lowered_graph_is_refused(lowered, tmp_path, capsys):
    arts = tmp_path / "arts"
    shutil.copytree(lowered, arts)
    data = arts / "text_encoder" / "model.bf16.onnx.data"
    with open(data, "r+b") as f:  # same size, other bytes: the hash build checks
        f.seek(64)
        f.write(b"\x7f")
    args = ["build", arts, "--dry-run", "--precision", "bf16", "--components", "text_encoder"]
    code, _, err = run_cli(args, capsys)
    assert code == 1 and "modified after it was written" in err
    with open(data, "ab") as f:  # another size: the check every command makes when it opens artifacts
        f.write(b"\0")
    code, _, err = run_cli(args, capsys)
    assert code == 1 and "do not match their manifest" in err and "model.bf16.onnx.data" in err


def test_parity_cli_reports_bf16(tiny_ckpt, lowered, capsys):
    code, out, err = run_cli(["parity", tiny_ckpt, lowered, "--precision", "bf16", "--components", "text_encoder"],
                             capsys)
    assert code == 0, err
    assert "text_encoder (bf16): PASS" in out and "parity passed" in out
    code, _, err = run_cli(["parity", tiny_ckpt, lowered, "--precision", "bf16", "--pipeline"], capsys)
    assert code == 1 and "verify" in err
