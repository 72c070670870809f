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

import contextlib
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ...artifacts import Artifacts, file_record, install
from ...fsutil import staging
from ...measure.memory import measure_peak, release_memory
from ...model.specs import GraphSpec
from ..graphio import Graph, stub, stub_key
from .prepare import prepare

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


@contextlib.contextmanager
def autocast_without_weights():
    """Run Model Optimizer's AutoCast on a weightless graph (export/graphio.py). modelopt 0.47's
    ``convert_to_mixed_precision`` loads every weight (``onnx.external_data_helper.
    load_external_data_for_model``) and converts initializers in memory (``PrecisionConverter.
    _convert_initializer_data``): a 14B model would need its fp32 and bf16 weights in RAM at once (the bf16
    lowering of a 2-block real-width graph was killed at 23.9 GB). While active, external data is not loaded,
    and a stub converted to bf16 stays a stub that records the new dtype; ``Graph.save`` then writes its
    source cast to bf16, block by block, with the same rounding (numpy / ml_dtypes round to nearest even, as
    AutoCast's own conversion). Anything else that tried to read a stub's bytes would fail loudly (its
    location is not a file): AutoCast decides precisions from the graph alone when its reference run and
    initializer range check are off (``data_max=inf``, ``init_max=None``). Its ``onnx.checker`` calls check
    the weightless graph (``check_weightless``)."""
    import onnx.external_data_helper as edh
    from modelopt.onnx import utils as modelopt_utils
    from modelopt.onnx.autocast import precisionconverter as pc

    original_load = edh.load_external_data_for_model
    original_convert = pc.PrecisionConverter._convert_initializer_data
    original_check = modelopt_utils.check_model

    def convert(self, init, from_type, to_type):
        key = stub_key(init)
        if key is None:
            return original_convert(self, init, from_type, to_type)
        return stub(init.name, to_type.onnx_type, init.dims, key)

    edh.load_external_data_for_model = lambda model, base_dir=None: None
    pc.PrecisionConverter._convert_initializer_data = convert
    modelopt_utils.check_model = check_weightless
    try:
        yield
    finally:
        edh.load_external_data_for_model = original_load
        pc.PrecisionConverter._convert_initializer_data = original_convert
        modelopt_utils.check_model = original_check


def check_weightless(model) -> None:
    """``onnx.checker`` on a weightless graph: the checker requires an external tensor's location to be a
    regular file (it never reads it), so the stubs point to an empty placeholder beside a copy of the graph."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="helios-check-") as tmp:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        for t in copy.graph.initializer:
            if stub_key(t) is not None:
                next(e for e in t.external_data if e.key == "location").value = "weights.placeholder"
        (Path(tmp) / "weights.placeholder").touch()
        onnx.save_model(copy, str(Path(tmp) / "model.onnx"))
        onnx.checker.check_model(str(Path(tmp) / "model.onnx"))


def lower(graph: Graph, keep_fp32: Sequence[str] = ()) -> tuple[Graph, dict]:
    """``graph`` (prepared: export/transforms/prepare.py) in bf16 but for the float32 nodes above; the weights
    stay sources (converted ones are cast as they are written). Returns the lowered graph and its recipe."""
    from modelopt.onnx.autocast import convert_to_mixed_precision

    feeders = sinusoid_feeders(graph.proto)
    patterns = [f"^{re.escape(n)}$" for n in feeders] + list(keep_fp32)
    logging.getLogger("modelopt").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="helios-lower-") as tmp, autocast_without_weights():
        path = graph.save_weightless(Path(tmp) / "weightless.onnx")
        # data_max = inf: no reference run (it would run every weight in ONNX Runtime); init_max = None: no
        # initializer range check (it would read every weight); the precision of each node is set by the
        # rules above alone
        model = convert_to_mixed_precision(str(path), low_precision_type="bf16", nodes_to_exclude=patterns,
                                           op_types_to_exclude=list(SINUSOID_OPS), data_max=np.inf,
                                           init_max=None, keep_io_types=True)
    recipe = {"tool": f"modelopt.onnx.autocast {_modelopt_version()}", "low_precision": "bf16",
              "keep_fp32": list(keep_fp32), "fp32_ops": list(SINUSOID_OPS) + ["sinusoid arguments"],
              "nodes": _precision_counts(model)}
    return Graph(model, graph.sources), recipe


def lower_graph(src: Path, dst: Path, keep_fp32: Sequence[str] = ()) -> dict:
    """Write ``dst`` (+ ``dst.data``): ``src`` prepared and lowered, weights streamed. Returns the recipe."""
    lowered, recipe = lower(prepare(Graph.load(src)), keep_fp32)
    lowered.save(dst)
    return recipe


def lower_chunk(src: Path, dst: Path, graph: GraphSpec, keep_fp32: Sequence[str] = ()) -> dict:
    """The VAE decoder's chunk graph: its first and step graphs are taken back out of it, lowered one by
    one and composed again (export/transforms/vae_chunk.py). The caches between the copies stay float32
    (the parts' inputs and outputs), and so does the uint8 conversion added by the composition (bf16 cannot
    tell 254.6 from 255)."""
    from .vae_chunk import compose_decoder, split_parts

    frames = int(graph.inputs[0].dims[2])
    parts = [lower(prepare(part), keep_fp32) for part in split_parts(Graph.load(src))]
    composed = compose_decoder(parts[0][0], parts[1][0], graph)
    composed.save(dst)
    first_counts, step_counts = parts[0][1]["nodes"], parts[1][1]["nodes"]
    nodes = {k: first_counts[k] + (frames - 1) * step_counts[k] for k in first_counts}
    return {**parts[1][1], "nodes": nodes, "composed": "first + step lowered, then composed per chunk"}


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


def write_lowered(src: Path, work: Path, file: str, keep_fp32: Sequence[str] = (),
                  chunk: GraphSpec | None = None) -> dict:
    """Lower ``src`` into ``work/file`` (+ data); ``chunk``: the spec of ``src`` when it is a composed VAE
    chunk graph. Returns the manifest record {file, data, sizes, sha256s, recipe}."""
    if chunk is not None:
        recipe = lower_chunk(src, work / file, chunk, keep_fp32)
    else:
        recipe = lower_graph(src, work / file, keep_fp32)
    return {**file_record(work, file, file + ".data"), "recipe": recipe}


def bf16_file(graph_file: str) -> str:
    return f"{Path(graph_file).stem}.bf16.onnx"


def lower_artifacts(artifacts, components: Iterable[str] | None = None, keep_fp32: Sequence[str] = (),
                    log=print) -> dict:
    """bf16 graphs for every graph of the components, recorded in the manifest under ``bf16`` (the FP8
    graph is lowered by ``quantize --precision fp8`` itself). Everything is written in a work folder first
    and moved into place, with the manifest, only when every graph is done."""
    arts = Artifacts.open(artifacts)
    comps = list(components or arts.components)
    for c in comps:
        arts.require(c)
        arts.verify_files(c)
    manifest = json.loads(json.dumps(arts.manifest))
    with staging(arts.root, "bf16") as work:
        moves = []
        for c in comps:
            entry = manifest["components"][c]
            (work / c).mkdir()
            lowered = {}
            for graph in arts.spec(c).graphs:
                log(f"{c}/{graph.file} -> {bf16_file(graph.file)}")
                composed = "composed_of" in entry["graphs"][graph.name]  # recorded by the export (vae_chunk)
                release_memory()
                with measure_peak() as memory:
                    record = write_lowered(arts.root / c / graph.file, work / c, bf16_file(graph.file), keep_fp32,
                                           chunk=graph if composed else None)
                lowered[graph.name] = {**record, "memory": memory}
                moves += [(work / c / record["data"], arts.root / c / record["data"]),
                          (work / c / record["file"], arts.root / c / record["file"])]
            entry["bf16"] = lowered
        install(arts.root, moves, manifest)
    arts.manifest = manifest
    return manifest
