"""Graph preparation shared by the FP8 quantizer and the bf16 lowering, and reading back what they did.

Everything here works on weightless graphs (export/graphio.py): node names, folded transposes and split
sequences change the graph, never load a weight (a folded transpose is a source that transposes its weight
when it is written, one tensor at a time).
- ``name_nodes_by_module``: torch's dynamo exporter names nodes ``node_MatMul_448``; the module path is
  only in the node's metadata (``pkg.torch.onnx.name_scopes``). Node names become
  ``blocks.0.attn1.to_q/node_MatMul_448`` so users' regexes (and modelopt's ``nodes_to_exclude``) can
  say which layers stay in high precision.
- ``fold_weight_transposes``: the exporter feeds linear weights through ``Transpose(W)``. FP8 weights must
  be initializers feeding a DequantizeLinear straight into the MatMul (what TensorRT fuses into an FP8
  GEMM), and AutoCast converts initializers to bf16 but casts computed tensors at run time; folding the
  transposes into initializers (what ONNX Runtime does at session start anyway) gives both.
- ``split_sequences``: ``torch.split`` exports as SplitToSequence + SequenceAt, which AutoCast cannot type
  (ONNX Runtime then refuses the lowered graph: "expected seq(tensor(float))"). A Split with the same
  split sizes is equivalent.
"""

from __future__ import annotations

import ast
import re
from collections import Counter, defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graphio import Graph, transposed

LINEAR_OPS = ("MatMul", "Gemm")
_SCOPES = "pkg.torch.onnx.name_scopes"
_NAMESPACE = "namespace"


def _meta(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def module_path(node: onnx.NodeProto) -> str | None:
    """``blocks.0.attn1.to_q`` for a node exported from that module (the export wraps the model as ``model``)."""
    raw = _meta(node).get(_SCOPES)
    if not raw:
        return None
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return None
    mods = [s for s in scopes if isinstance(s, str) and s.startswith("model.")]
    return mods[-1][len("model."):] if mods else None


def name_nodes_by_module(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        path = module_path(node)
        if path and not node.name.startswith(path + "/"):
            node.name = f"{path}/{node.name}"


def linear_nodes(model: onnx.ModelProto) -> list[str]:
    """MatMul/Gemm nodes that came from ``nn.Linear`` (not attention's Q.K^T / P.V products)."""
    return [n.name for n in model.graph.node
            if n.op_type in LINEAR_OPS and "aten.linear" in _meta(n).get(_NAMESPACE, "")]


def block_count(names) -> int:
    """Number of transformer blocks, from node names like ``blocks.12.ffn.net.2/...``."""
    ids = {int(m.group(1)) for n in names if (m := re.match(r"blocks\.(\d+)\.", n))}
    return max(ids) + 1 if ids else 0


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    out = {i.name: i for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = n.attribute[0].t
    return out


def fold_weight_transposes(graph: Graph) -> int:
    """Replace ``Transpose(initializer)`` by an initializer whose source is the transposed weight; returns
    how many were folded."""
    g = graph.proto.graph
    inits = graph.initializers()
    uses = Counter(i for n in g.node for i in n.input)
    keep, folded = [], 0
    for node in g.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
            graph.set_initializer(node.output[0], transposed(graph.source(node.input[0]), perm[0] if perm else None))
            uses[node.input[0]] -= 1
            folded += 1
        else:
            keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    graph.prune_initializers()
    return folded


def prepare(graph: Graph) -> Graph:
    """Module-qualified node names, folded weight transposes, Split for SplitToSequence (in place)."""
    name_nodes_by_module(graph.proto)
    fold_weight_transposes(graph)
    split_sequences(graph.proto)
    return graph


def split_sequences(model: onnx.ModelProto) -> int:
    """SplitToSequence(x, sizes) read only by SequenceAt(seq, constant i) -> Split(x, sizes) + Identity."""
    g = model.graph
    consts = _constants(g)
    readers = defaultdict(list)
    for n in g.node:
        for i in n.input:
            readers[i].append(n)
    shapes = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    done = 0
    for node in g.node:
        if node.op_type != "SplitToSequence" or len(node.input) < 2:
            continue
        count = _static_length(shapes.get(node.input[1]))
        ats = readers[node.output[0]]
        if count is None or not ats or any(a.op_type != "SequenceAt" or a.input[1] not in consts for a in ats):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("keepdims", 1) != 1:
            continue
        parts = [f"{node.output[0]}__{i}" for i in range(count)]
        node.CopyFrom(helper.make_node("Split", list(node.input), parts, name=node.name, axis=attrs.get("axis", 0)))
        for a in ats:
            index = int(numpy_helper.to_array(consts[a.input[1]])) % count
            a.CopyFrom(helper.make_node("Identity", [parts[index]], list(a.output), name=a.name))
        done += 1
    return done


def _static_length(value_info) -> int | None:
    if value_info is None:
        return None
    dims = value_info.type.tensor_type.shape.dim
    return dims[0].dim_value if len(dims) == 1 and dims[0].dim_value > 0 else None


def precision_map(model: onnx.ModelProto, nodes) -> dict[str, str]:
    """fp8 for each of ``nodes`` whose weight input is a DequantizeLinear of an FP8 initializer, else fp32."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    fp8 = {i.name for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN and len(i.dims) >= 2}
    by_name = {n.name: n for n in g.node}
    out = {}
    for name in nodes:
        node = by_name.get(name)
        weight = producer.get(node.input[1]) if node is not None and len(node.input) > 1 else None
        out[name] = "fp8" if weight is not None and weight.op_type == "DequantizeLinear" and weight.input[0] in fp8 else "fp32"
    return out


def weight_bytes(model: onnx.ModelProto, nodes) -> dict[str, int]:
    """Bytes of the weight initializers of ``nodes`` (reached through a DequantizeLinear if there is one)."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name: i for i in g.initializer}
    by_name = {n.name: n for n in g.node}
    total = {"fp8": 0, "fp32": 0}
    for name in nodes:
        node = by_name.get(name)
        if node is None or len(node.input) < 2:
            continue
        src = node.input[1]
        if src in producer and producer[src].op_type == "DequantizeLinear":
            src = producer[src].input[0]
        if src in inits:
            t = inits[src]
            size = int(np.prod(t.dims)) * (1 if t.data_type == onnx.TensorProto.FLOAT8E4M3FN else 4)
            total["fp8" if t.data_type == onnx.TensorProto.FLOAT8E4M3FN else "fp32"] += size
    return total
