"""FP8 E4M3 Q/DQ on a weightless graph, weights quantized one tensor at a time as they are written.

The recipe is NVIDIA Model Optimizer's ONNX FP8 recipe (``modelopt.onnx.quantization.quantize(...,
quantize_mode="fp8", dq_only=True)``), reproduced bit for bit (tests/test_streamed_transforms.py compares the
two on the tiny checkpoint): Model Optimizer's quantizer loads the whole model, runs shape inference and
ONNX Runtime calibration sessions on it in memory, which a 57 GB graph cannot do. Its arithmetic:

- per-tensor activation scales and per-output-channel weight scales start as ONNX Runtime's symmetric int8
  scale, ``float32(float64(amax) * 2 / 254)`` (1.0 where that is below float32's smallest normal), and are
  converted to FP8 the way Model Optimizer's ``int8_to_fp8`` does: ``scale * 448 / 127`` in float32;
- weights are stored as FP8 initializers: ``clip(W / scale + 0, -448, 448)`` rounded to nearest even
  (``_cast_fp8``), with a DequantizeLinear (axis 1, the MatMul's output channels) in front of the MatMul;
- activations get QuantizeLinear + DequantizeLinear with an FP8 zero point; layers that read the same
  activation (q, k, v) share one pair.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

from ..graphio import Graph, Mapped, Source

FP8 = TensorProto.FLOAT8E4M3FN
FP8_MAX = 448.0


def fp8_scale(amax) -> np.ndarray:
    """FP8 scale(s) for absolute maxima ``amax``, as Model Optimizer computes them (module docstring)."""
    amax = np.asarray(amax, dtype=np.float32)
    int8 = (amax.astype(np.float64) * 2 / 254).astype(np.float32)
    int8 = np.where(int8 < np.finfo(np.float32).tiny, np.float32(1.0), int8).astype(np.float32)
    return (int8 * np.float32(FP8_MAX) / np.float32(127.0)).astype(np.float32)


def column_amax(src: Source) -> np.ndarray:
    """max |W| per column (output channel of a MatMul weight [K, N]), read block by block."""
    out = None
    for block in src.blocks():
        m = np.max(np.abs(block.astype(np.float32, copy=False)), axis=0)
        out = m if out is None else np.maximum(out, m)
    return out


def fp8_weight(src: Source, scale: np.ndarray) -> Source:
    """``src`` [K, N] quantized per column to FP8, block by block as it is written."""
    scale = scale.reshape(1, -1)

    def quantize(block: np.ndarray) -> np.ndarray:
        scaled = block.astype(np.float32, copy=False) / scale  # one float32 temporary, then in place
        scaled += np.float32(0.0)  # -0.0 -> +0.0, as modelopt's ``W / scale + zero_point``
        np.clip(scaled, -FP8_MAX, FP8_MAX, out=scaled)
        return scaled.astype(ml_dtypes.float8_e4m3fn)

    return Mapped(src, FP8, quantize)


def _fp8_zeros(shape) -> np.ndarray:
    return np.zeros(shape, dtype=ml_dtypes.float8_e4m3fn)


def _quantize_weight(graph: Graph, node: onnx.NodeProto, done: dict) -> list[onnx.NodeProto]:
    """FP8 initializer + per-channel DequantizeLinear for the MatMul's weight (once per weight)."""
    w = node.input[1]
    if w not in done:
        src = graph.source(w)
        if len(src.dims) != 2:
            raise ValueError(f"{node.name}: weight {w} has shape {src.dims}, expected [K, N]")
        scale = fp8_scale(column_amax(src))
        graph.set_initializer(w, fp8_weight(src, scale))
        graph.set_initializer(f"{w}_scale", scale)
        graph.set_initializer(f"{w}_zero_point", _fp8_zeros(scale.shape))
        done[w] = helper.make_node("DequantizeLinear", [w, f"{w}_scale", f"{w}_zero_point"],
                                   [f"{w}_DequantizeLinear_Output"], name=f"{w}_DequantizeLinear", axis=1)
        node.input[1] = f"{w}_DequantizeLinear_Output"
        return [done[w]]
    node.input[1] = f"{w}_DequantizeLinear_Output"
    return []


def _activation_pair(graph: Graph, x: str, amax: float) -> list[onnx.NodeProto]:
    graph.set_initializer(f"{x}_scale", fp8_scale(amax).reshape(()))
    graph.set_initializer(f"{x}_zero_point", _fp8_zeros(()))
    return [helper.make_node("QuantizeLinear", [x, f"{x}_scale", f"{x}_zero_point"], [f"{x}_QuantizeLinear_Output"],
                             name=f"{x}_QuantizeLinear"),
            helper.make_node("DequantizeLinear", [f"{x}_QuantizeLinear_Output", f"{x}_scale", f"{x}_zero_point"],
                             [f"{x}_DequantizeLinear_Output"], name=f"{x}_DequantizeLinear")]


def insert_qdq(graph: Graph, targets: Sequence[str], amax: Mapping[str, float]) -> Graph:
    """FP8 Q/DQ on the MatMul nodes named ``targets`` of a prepared graph (weights are initializers [K, N]),
    with activation maxima ``amax`` (activation tensor name -> max |x| over the calibration run). In place."""
    g = graph.proto.graph
    wanted = set(targets)
    nodes = {n.name: n for n in g.node if n.name in wanted}
    missing = sorted(wanted - set(nodes))
    if missing:
        raise ValueError(f"no node named {missing[:3]} in the graph")
    inits = graph.initializers()
    activations = {nodes[t].input[0] for t in targets}
    absent = sorted(a for a in activations if a not in amax)
    if absent:
        raise ValueError(f"no calibrated range for activations {absent[:3]}")
    pairs = {x: _activation_pair(graph, x, amax[x]) for x in sorted(activations)}
    producers = {o: n.name for n in g.node for o in n.output}
    out: list[onnx.NodeProto] = [n for x in sorted(activations) if x not in producers for n in pairs[x]]
    weights: dict = {}
    for node in list(g.node):
        if node.name in wanted:
            if node.input[1] not in inits:
                raise ValueError(f"{node.name}: weight {node.input[1]} is not an initializer (prepare the graph first)")
            out += _quantize_weight(graph, node, weights)
            node.input[0] = f"{node.input[0]}_DequantizeLinear_Output"
        out.append(node)
        out += [n for o in node.output if o in pairs for n in pairs[o]]
    replace_nodes(g, out, weights)
    return graph


def replace_nodes(g: onnx.GraphProto, nodes: Sequence[onnx.NodeProto], fp8_weights) -> None:
    """The graph's nodes become ``nodes``; a weight in ``fp8_weights`` (now an FP8 initializer) keeps no stale
    float32 value_info (shape inference refuses it)."""
    del g.node[:]
    g.node.extend(nodes)
    for v in [v for v in g.value_info if v.name in fp8_weights]:
        g.value_info.remove(v)
