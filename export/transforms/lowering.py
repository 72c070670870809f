"""bf16 graphs for TensorRT. A strongly typed network takes every layer's precision from the ONNX graph
(TensorRT 11 has no BF16 builder flag), so an engine is bf16 only where its graph is: this module lowers
the exported fp32 graphs (and the FP8 graph's high-precision part) to bf16 with NVIDIA Model Optimizer's
AutoCast, keeping the graph inputs and outputs float32 so the runtime does not change.

Kept in float32 (measured on the tiny checkpoint, transformer stage 0, rel_l2 against fp32):
- the arguments of every Sin/Cos (the sinusoidal timestep embedding and the rotary embedding) and the
  Sin/Cos themselves: t * freq at t ~ 1000 has a bf16 spacing of 4, which turns the embedding into noise
  (rel_l2 0.154 with them in bf16, 0.010 without).
- nodes matched by the user's ``--keep-fp32`` regexes.

The lowered graphs cannot run in ONNX Runtime on CPU (it has no bf16 Conv), so the check on CPU runs
them in ONNX's reference evaluator (``onnx.reference``), which computes each op in the graph's own
dtypes, against the diffusers / transformers module in fp32.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ...errors import UserError
from ...fsutil import sha256_file
from ...specs import GraphSpec

SINUSOID_OPS = ("Sin", "Cos")
SHAPE_OPS = ("Shape", "Size")  # read only their input's shape: the walk below stops there


def sinusoid_feeders(model) -> list[str]:
    """Names of the nodes that compute the inputs of Sin/Cos, back to the graph inputs and weights (a
    Shape node ends the walk: the rotary grid reads the latents' shape, not their values)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    keep: set[str] = set()
    stack = [i for node in model.graph.node if node.op_type in SINUSOID_OPS for i in node.input]
    while stack:
        node = producers.get(stack.pop())
        if node is None or node.name in keep:
            continue
        keep.add(node.name)
        if node.op_type not in SHAPE_OPS:
            stack.extend(node.input)
    return sorted(keep)


def _optimized_copy(src: Path, dst: Path) -> None:
    """The exported graph after onnxscript's full optimizer, with shape inference: it turns the
    exporter's SplitToSequence/SequenceAt (torch.split with symbolic sizes) into Split, which AutoCast
    cannot type (ONNX Runtime then refuses the lowered graph: "expected seq(tensor(float))")."""
    import onnx_ir as ir
    import onnxscript.optimizer

    model = ir.load(src)
    onnxscript.optimizer.optimize(model)
    ir.save(model, dst, external_data=dst.name + ".data")


def lower_graph(src: Path, dst: Path, keep_fp32: Sequence[str] = ()) -> dict:
    """Write ``dst`` (+ ``dst.data``): ``src`` in bf16 but for the float32 nodes above. Returns the
    recipe and the node counts per precision."""
    import onnx
    from modelopt.onnx.autocast import convert_to_mixed_precision

    with tempfile.TemporaryDirectory(prefix="helios-lower-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        _optimized_copy(Path(src), optimized)
        feeders = sinusoid_feeders(onnx.load(optimized, load_external_data=False))
        patterns = [f"^{_escape(n)}$" for n in feeders] + list(keep_fp32)
        logging.getLogger("modelopt").setLevel(logging.ERROR)
        # data_max / init_max = inf: no reference run (it would load every weight into ONNX Runtime);
        # the precision of each node is set by the rules above alone
        model = convert_to_mixed_precision(str(optimized), low_precision_type="bf16", nodes_to_exclude=patterns,
                                           op_types_to_exclude=list(SINUSOID_OPS), data_max=np.inf,
                                           init_max=np.inf, keep_io_types=True)
    counts = _precision_counts(model)
    onnx.save(model, dst, save_as_external_data=True, location=dst.name + ".data", size_threshold=1024)
    return {"tool": f"modelopt.onnx.autocast {_modelopt_version()}", "low_precision": "bf16",
            "keep_fp32": list(keep_fp32), "fp32_ops": list(SINUSOID_OPS) + ["sinusoid arguments"],
            "nodes": counts}


def lower_chunk(src: Path, dst: Path, graph: GraphSpec, keep_fp32: Sequence[str] = ()) -> dict:
    """The VAE decoder's chunk graph: its first and step graphs are taken back out of it, lowered one by
    one and composed again (export/transforms/vae_chunk.py). The caches between the copies stay float32 (the parts'
    inputs and outputs), and so does the uint8 conversion added by the composition (bf16 cannot tell
    254.6 from 255)."""
    from .vae_chunk import split_parts, write_chunk_decoder

    frames = int(graph.inputs[0].dims[2])
    with tempfile.TemporaryDirectory(prefix="helios-lower-chunk-") as tmp:
        first, step = split_parts(Path(src), Path(tmp))
        recipes = [lower_graph(p, Path(tmp) / f"{p.stem}.bf16.onnx", keep_fp32) for p in (first, step)]
        write_chunk_decoder(Path(tmp) / "first.bf16.onnx", Path(tmp) / "step.bf16.onnx", Path(dst), graph, 1024)
    first_counts, step_counts = recipes[0]["nodes"], recipes[1]["nodes"]
    nodes = {k: first_counts[k] + (frames - 1) * step_counts[k] for k in first_counts}
    return {**recipes[1], "nodes": nodes, "composed": "first + step lowered, then composed per chunk"}


def _escape(name: str) -> str:
    import re

    return re.escape(name)


def _modelopt_version() -> str:
    import modelopt

    return getattr(modelopt, "__version__", "unknown")


def _precision_counts(model) -> dict[str, int]:
    """How many compute nodes produce bf16 and how many float32 outputs (Casts and shape ops aside)."""
    import onnx

    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)}
    counts = {"bf16": 0, "fp32": 0}
    for node in model.graph.node:
        if node.op_type in ("Cast", "Shape", "Constant") or not node.output:
            continue
        t = types.get(node.output[0])
        if t == onnx.TensorProto.BFLOAT16:
            counts["bf16"] += 1
        elif t == onnx.TensorProto.FLOAT:
            counts["fp32"] += 1
    return counts


def write_lowered(src: Path, out_dir: Path, file: str, keep_fp32: Sequence[str] = (),
                  chunk: GraphSpec | None = None) -> dict:
    """Lower ``src`` into ``out_dir/file`` atomically (a temporary folder, then a move of both files);
    ``chunk``: the spec of ``src`` when it is a composed VAE chunk graph. Returns the manifest record
    {file, data, file_sha256, data_sha256, recipe}."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{file}.partial-", dir=out_dir))
    try:
        if chunk is not None:
            recipe = lower_chunk(src, tmp / file, chunk, keep_fp32)
        else:
            recipe = lower_graph(src, tmp / file, keep_fp32)
        data = file + ".data"
        record = {"file": file, "data": data, "file_sha256": sha256_file(tmp / file),
                  "data_sha256": sha256_file(tmp / data), "recipe": recipe}
        (tmp / data).replace(out_dir / data)
        (tmp / file).replace(out_dir / file)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def bf16_file(graph_file: str) -> str:
    return f"{Path(graph_file).stem}.bf16.onnx"


def lower_artifacts(artifacts, components: Iterable[str] | None = None, keep_fp32: Sequence[str] = (),
                    log=print) -> dict:
    """bf16 graphs for every graph of the components, recorded in the manifest under ``bf16`` (the FP8
    graph is lowered by ``quantize --precision fp8`` itself)."""
    from ...artifacts import Artifacts, write_manifest

    arts = Artifacts.open(artifacts)
    comps = list(components or arts.components)
    for c in comps:
        arts.require(c)
        arts.verify_files(c)
    for c in comps:
        entry = arts.manifest["components"][c]
        folder = arts.root / c
        lowered = {}
        for graph in arts.spec(c).graphs:
            log(f"{c}/{graph.file} -> {bf16_file(graph.file)}")
            composed = "composed_of" in entry["graphs"][graph.name]  # recorded by the export (vae_chunk)
            lowered[graph.name] = write_lowered(folder / graph.file, folder, bf16_file(graph.file), keep_fp32,
                                               chunk=graph if composed else None)
        entry["bf16"] = lowered
        write_manifest(arts.root, arts.manifest)
    return arts.manifest
