"""Each streamed graph transform against its in-memory counterpart on the tiny checkpoint: same graph, same
bytes. The streamed versions never hold a model's weights in memory (export/graphio.py); the in-memory ones
are what the libraries do when they are given whole models: the reference modules' state dicts
(from_pretrained), numpy on onnx.load'ed initializers, Model Optimizer's AutoCast and FP8 quantizer."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from .conftest import run_cli

KEEP = [r"^patch_", r"^condition_embedder\.", r"^proj_out/"]
PROMPTS = ["A cat and a dog baking a cake together in a kitchen.",
           "A drone shot over a snowy mountain ridge at sunrise."]


def _arrays(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _same_graph(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    def nodes(m):
        return [(n.op_type, n.name, list(n.input), list(n.output), [str(x) for x in n.attribute]) for n in m.graph.node]

    assert nodes(a) == nodes(b)
    assert [(i.name, i.type.tensor_type.elem_type) for i in a.graph.input] == \
        [(i.name, i.type.tensor_type.elem_type) for i in b.graph.input]
    assert [(o.name, o.type.tensor_type.elem_type) for o in a.graph.output] == \
        [(o.name, o.type.tensor_type.elem_type) for o in b.graph.output]


def _same_bytes(a: dict[str, onnx.TensorProto], b: dict[str, onnx.TensorProto]) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if a[k].data_type != b[k].data_type or list(a[k].dims) != list(b[k].dims)
           or numpy_helper.to_array(a[k]).tobytes() != numpy_helper.to_array(b[k]).tobytes()]
    assert not bad, bad[:5]


@pytest.mark.parametrize("component", ["transformer", "text_encoder", "vae_decoder"])
def test_export_streams_exactly_the_checkpoint_weights(tiny_ckpt, artifacts, component):
    """Every initializer the export streamed from the shards equals the parameter from_pretrained(fp32) loads."""
    from helios_deploy.checkpoints.checkpoint import Checkpoint
    from helios_deploy.export.exporter.modules import build_module

    state = build_module(Checkpoint(tiny_ckpt), component).state_dict()
    arrays = _arrays(artifacts / component / "model.onnx")
    prefix = "vae." if component.startswith("vae") else "model."
    matched = 0
    for name, value in arrays.items():
        local = re.sub(r"^(first|step\d+)/", "", name)
        local = local[len(prefix):] if local.startswith(prefix) else local
        if local in state and value.shape == tuple(state[local].shape):
            assert np.array_equal(value, state[local].numpy()), name
            matched += 1
    used = ("decoder.", "post_quant_conv.") if component == "vae_decoder" else ("",)  # the graph's part of the VAE
    assert matched >= 0.9 * len([k for k in state if k.startswith(used) and state[k].numel() > 1])


def test_prepare_folds_transposes_like_numpy(artifacts, tmp_path):
    from helios_deploy.export.graphio import Graph
    from helios_deploy.export.transforms.prepare import prepare

    src = artifacts / "transformer" / "model.onnx"
    original = onnx.load(str(src))
    inits = {t.name: t for t in original.graph.initializer}
    transposes = {n.output[0]: (n.input[0], list(n.attribute[0].ints)) for n in original.graph.node
                  if n.op_type == "Transpose" and n.input[0] in inits}
    assert len(transposes) > 20
    prepare(Graph.load(src)).save(tmp_path / "prepared.onnx")
    prepared = _arrays(tmp_path / "prepared.onnx")
    for out, (name, perm) in transposes.items():
        assert np.array_equal(prepared[out], numpy_helper.to_array(inits[name]).transpose(perm)), out
    assert not [n for n in onnx.load(str(tmp_path / "prepared.onnx")).graph.node
                if n.op_type in ("Transpose", "SplitToSequence") and n.input[0] in prepared]


def _autocast_in_memory(prepared: Path):
    """Model Optimizer's AutoCast as it runs on a whole model: weights loaded, converted in memory."""
    from modelopt.onnx.autocast import convert_to_mixed_precision

    from helios_deploy.export.transforms.lowering import SINUSOID_OPS, sinusoid_feeders

    feeders = sinusoid_feeders(onnx.load(str(prepared), load_external_data=False))
    return convert_to_mixed_precision(str(prepared), low_precision_type="bf16",
                                      nodes_to_exclude=[f"^{re.escape(n)}$" for n in feeders],
                                      op_types_to_exclude=list(SINUSOID_OPS), data_max=np.inf, init_max=None,
                                      keep_io_types=True)


@pytest.mark.parametrize("component", ["transformer", "text_encoder"])
def test_bf16_lowering_equals_autocast_on_the_whole_model(artifacts, tmp_path, component):
    from helios_deploy.export.graphio import Graph
    from helios_deploy.export.transforms.lowering import lower_graph
    from helios_deploy.export.transforms.prepare import prepare

    src = artifacts / component / "model.onnx"
    prepare(Graph.load(src)).save(tmp_path / "prepared.onnx")
    reference = _autocast_in_memory(tmp_path / "prepared.onnx")
    lower_graph(src, tmp_path / "streamed.onnx")
    streamed = onnx.load(str(tmp_path / "streamed.onnx"))
    _same_graph(streamed, reference)
    _same_bytes({t.name: t for t in streamed.graph.initializer}, {t.name: t for t in reference.graph.initializer})
    assert any(t.data_type == onnx.TensorProto.BFLOAT16 for t in streamed.graph.initializer)


def test_vae_chunk_split_and_composed_again_is_the_same_graph(artifacts, tmp_path):
    """The composition streams its parts' weights: split the exported chunk graph into its parts and
    compose them again: the same nodes, and every initializer the same bytes as the export wrote."""
    from helios_deploy.artifacts import Artifacts
    from helios_deploy.export.graphio import Graph
    from helios_deploy.export.transforms.vae_chunk import compose_decoder, split_parts

    src = artifacts / "vae_decoder" / "model.onnx"
    first, step = split_parts(Graph.load(src))
    compose_decoder(first, step, Artifacts.open(artifacts).spec("vae_decoder").graph("model")).save(tmp_path / "c.onnx")
    original, again = onnx.load(str(src)), onnx.load(str(tmp_path / "c.onnx"))
    _same_graph(again, original)
    _same_bytes({t.name: t for t in again.graph.initializer}, {t.name: t for t in original.graph.initializer})


# -- FP8: our streamed Q/DQ against Model Optimizer's quantizer on the whole model ---------------------


def _record_feeds(artifacts: Path, prompts, chunks: int, seed: int) -> list[dict]:
    """Every transformer call of the fp32 sampler loop (what Model Optimizer's calibration is given)."""
    from helios_deploy.runtime import Pipeline

    pipe = Pipeline.from_artifacts(artifacts)
    runner = pipe.runner("transformer")
    recorded, infer = [], runner.infer

    def wrapped(feeds, *args, **kwargs):
        recorded.append({k: v.detach().numpy().copy() for k, v in feeds.items()})
        return infer(feeds, *args, **kwargs)

    runner.infer = wrapped
    for i, prompt in enumerate(prompts):
        for _ in pipe.stream(prompt, num_frames=33 * chunks, seed=seed + i):
            pass
    return recorded


def _modelopt_fp8(artifacts: Path, feeds: list[dict], targets: list[str], excluded: list[str], out: Path) -> Path:
    from modelopt.onnx.quantization import quantize
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    from helios_deploy.export.graphio import Graph
    from helios_deploy.export.transforms.prepare import prepare

    class Reader(CalibrationDataReader):  # mixed shapes (the pyramid stages): one feed per run
        def __init__(self):
            self.rewind()

        def get_next(self):
            return next(self.it, None)

        def get_first(self):  # Model Optimizer's dry run for intermediate shapes
            return feeds[0]

        def rewind(self):
            self.it = iter(feeds)

    prepare(Graph.load(artifacts / "transformer" / "model.onnx")).save(out / "prepared.onnx")
    quantize(str(out / "prepared.onnx"), quantize_mode="fp8", calibration_data_reader=Reader(),
             calibration_method="max", calibration_eps=["cpu"], high_precision_dtype="fp32",
             op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=[re.escape(n) + "$" for n in targets],
             nodes_to_exclude=[re.escape(n) + "$" for n in excluded], disable_mha_qdq=True, dq_only=True,
             use_external_data_format=True, log_level="WARNING", output_path=str(out / "modelopt.onnx"))
    return out / "modelopt.onnx"  # Model Optimizer writes it (with its weights as external data) and returns None


def _fp8_layers(path: Path) -> dict[str, tuple]:
    """Per FP8 MatMul: (FP8 weight bytes, weight scales, activation scale)."""
    model = onnx.load(str(path))
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        w = producer.get(n.input[1]) if n.op_type == "MatMul" else None
        if w is not None and w.op_type == "DequantizeLinear" and w.input[0] in inits:
            a = producer[n.input[0]]
            out[n.name] = (inits[w.input[0]].raw_data, numpy_helper.to_array(inits[w.input[1]]),
                           numpy_helper.to_array(inits[a.input[1]]).reshape(()))
    return out


@pytest.mark.slow
def test_fp8_equals_model_optimizer_on_the_whole_model(artifacts, tmp_path):
    """Same layers, the same FP8 weight bytes and weight scales, activation scales equal to float32 rounding
    (our calibration runs the range outputs inside the sampler loop with ONNX Runtime's prepacking off; Model
    Optimizer's runs a second session on recorded inputs: ONNX Runtime's kernels differ in the last bits), and
    the same outputs."""
    import onnxruntime as ort

    from helios_deploy.artifacts import Artifacts
    from helios_deploy.export.parity.compare import example_inputs
    from helios_deploy.export.transforms.quantize import quantize_artifacts

    root = Path(shutil.copytree(artifacts, tmp_path / "arts"))
    quantize_artifacts(root, ["transformer"], prompts=PROMPTS, keep=KEEP, chunks=2, seed=0, log=lambda m: None)
    entry = json.loads((root / "manifest.json").read_text())["components"]["transformer"]["fp8"]
    targets = [n for n, p in entry["layer_precision"].items() if p == "fp8"]
    feeds = _record_feeds(artifacts, PROMPTS, chunks=2, seed=0)
    theirs = _modelopt_fp8(artifacts, feeds, targets, entry["excluded_nodes"], tmp_path)
    ours = root / "transformer" / entry["file"]
    a, b = _fp8_layers(ours), _fp8_layers(theirs)
    assert a.keys() == b.keys() and len(a) == len(targets) == 20
    for name in a:
        assert a[name][0] == b[name][0], f"{name}: FP8 weight bytes differ"
        assert np.array_equal(a[name][1], b[name][1]), f"{name}: weight scales differ"
        np.testing.assert_allclose(a[name][2], b[name][2], rtol=1e-5, err_msg=name)
    ops = lambda p: sorted(n.op_type for n in onnx.load(str(p), load_external_data=False).graph.node)  # noqa: E731
    assert ops(ours) == ops(theirs)
    spec = Artifacts.open(root).spec("transformer")
    graph = spec.graph("model")
    s_ours, s_theirs = ort.InferenceSession(str(ours)), ort.InferenceSession(str(theirs))
    for point in graph.operating_points:
        x = example_inputs(spec, graph, point.dims, 0)
        np.testing.assert_allclose(s_ours.run(None, x)[0], s_theirs.run(None, x)[0], rtol=1e-4, atol=1e-5)


def test_streamed_reference_equals_from_pretrained(tiny_ckpt, artifacts):
    """The parity reference with weights loaded per module gives from_pretrained's outputs (float32 rounding:
    torch's kernels depend on the weights' memory alignment)."""
    from helios_deploy.artifacts import Artifacts
    from helios_deploy.checkpoints.checkpoint import Checkpoint
    from helios_deploy.export.exporter.modules import build_module
    from helios_deploy.export.parity.compare import cases, chunk_input, example_inputs, reference_output
    from helios_deploy.export.parity.reference import reference_module

    ckpt, arts = Checkpoint(tiny_ckpt), Artifacts.open(artifacts)
    for component in ("transformer", "text_encoder", "vae_decoder", "vae_encoder"):
        spec = arts.spec(component)
        full, streamed = build_module(ckpt, component), reference_module(ckpt, component, budget=0)
        for i, case in enumerate(cases(spec)[:2]):
            x = chunk_input(spec, case.dims, i) if component == "vae_encoder" else \
                example_inputs(spec, spec.graphs[0], case.dims, i)
            np.testing.assert_allclose(reference_output(component, streamed, x), reference_output(component, full, x),
                                       rtol=1e-5, atol=1e-5, err_msg=f"{component} {case.name}")
        # budget 0: nothing stays loaded after the forward (every parameter back on the meta device)
        assert all(p.device.type == "meta" for p in streamed.parameters())
