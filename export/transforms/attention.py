"""FP8 attention (``quantize --precision fp8 --fp8-attention``): Q/DQ on the inputs of both attention matmuls,
placed as TensorRT's fused FP8 multi-head attention on Hopper needs them.

The rule (TensorRT's "Fused Attention" guide, method 2: an attention built from IMatrixMultiplyLayer +
ISoftMaxLayer is fused when Q (or K, or both by sqrt) is multiplied by the attention scale *before* BMM1;
NVIDIA Model Optimizer 0.47, ``modelopt/onnx/export/fp8_exporter.py`` ``FP8QuantExporter.post_process``, the
passes added for "TensorRT attention-v2 fusion" in Model-Optimizer PR #1289, and its pattern
``modelopt.onnx.quantization.graph_utils.match_fp8_mha_pattern``):

    Q -> DQ -> BMM1 -> (Mul/Div) -> (Add) -> Softmax -> Q -> DQ -> BMM2 -> Q -> DQ

- a DequantizeLinear feeds each BMM input *directly*: the attention-scaling Mul and K's Transpose come before
  the QuantizeLinear (Model Optimizer moves them there: ``_move_mul_before_qdq``, ``_move_transpose_before_qdq``).
  Our export already scales Q and K by sqrt(scale) before BMM1, so the pairs go on BMM1's two inputs as they are;
- the Softmax output gets a pair with the fixed scale 1/448 (``_insert_qdq_after_softmax``: softmax lies in
  [0, 1], so the scale is data-independent and saturates exactly at 1.0; no calibration);
- V (BMM2's other input) gets a calibrated per-tensor pair;
- BMM2's output is quantized by the FP8 ``to_out`` linear layer it feeds (through Transpose/Reshape, which the
  pattern allows), so an attention is made FP8 only when its ``to_out`` is an FP8 layer;
- head size 8 < h <= 256, else the attention stays in high precision
  (``find_nodes_from_mha_to_exclude``).

Q, K and V are calibrated as the linear layers' inputs are: the running max |x| over every call of the real
sampler loop (export/transforms/calibration.py), FP8 scale as ``qdq.fp8_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graphio import Graph
from .qdq import FP8_MAX, _fp8_zeros, fp8_scale

SOFTMAX_SCALE = np.float32(1.0 / FP8_MAX)  # Model Optimizer's _FP8_E4M3_SOFTMAX_SCALE
HEAD_SIZE = (8, 256)  # FP8 MHA only for 8 < head size <= 256 (Model Optimizer's rule)
_BETWEEN = ("Mul", "Div", "Add", "Cast")  # what may sit between BMM1 and Softmax
_PASS = ("Transpose", "Reshape")  # between BMM2 and the out projection


@dataclass(frozen=True)
class Attention:
    """One attention's nodes and the tensors its two matmuls read."""

    bmm1: str
    softmax: str
    bmm2: str
    query: str
    key: str
    probs: str
    value: str
    out_proj: str | None  # the linear layer BMM2's output feeds (through Transpose/Reshape)

    @property
    def calibrated(self) -> tuple[str, str, str]:
        return self.query, self.key, self.value


def find_attention(model: onnx.ModelProto, linear: Sequence[str]) -> list[Attention]:
    """BMM1 -> (Mul/Div/Add) -> Softmax -> BMM2 chains whose matmuls are not linear layers."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    linear = set(linear)
    found = []
    for sm in (n for n in g.node if n.op_type == "Softmax"):
        bmm1 = producer.get(sm.input[0])
        while bmm1 is not None and bmm1.op_type in _BETWEEN:
            bmm1 = producer.get(bmm1.input[0])
        readers = consumers.get(sm.output[0], [])
        if bmm1 is None or bmm1.op_type != "MatMul" or bmm1.name in linear or len(readers) != 1:
            continue
        bmm2 = readers[0]
        if bmm2.op_type != "MatMul" or bmm2.input[0] != sm.output[0] or bmm2.name in linear:
            continue
        found.append(Attention(bmm1.name, sm.name, bmm2.name, bmm1.input[0], bmm1.input[1], sm.output[0],
                               bmm2.input[1], _out_proj(bmm2.output[0], consumers, linear)))
    return found


def _out_proj(tensor: str, consumers: Mapping[str, list], linear: set) -> str | None:
    for _ in range(4):
        readers = consumers.get(tensor, [])
        if len(readers) != 1:
            return None
        if readers[0].name in linear:
            return readers[0].name
        if readers[0].op_type not in _PASS:
            return None
        tensor = readers[0].output[0]
    return None


def _pair(graph: Graph, x: str, scale: np.ndarray) -> tuple[list[onnx.NodeProto], str]:
    """QuantizeLinear + DequantizeLinear (FP8, per tensor) on ``x``; returns the nodes and the DQ output."""
    base = f"{x}_attention"
    graph.set_initializer(f"{base}_scale", np.asarray(scale, np.float32).reshape(()))
    graph.set_initializer(f"{base}_zero_point", _fp8_zeros(()))
    nodes = [helper.make_node("QuantizeLinear", [x, f"{base}_scale", f"{base}_zero_point"], [f"{base}_q"],
                              name=f"{base}_QuantizeLinear"),
             helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_scale", f"{base}_zero_point"], [f"{base}_dq"],
                              name=f"{base}_DequantizeLinear")]
    return nodes, f"{base}_dq"


def insert_attention_qdq(graph: Graph, attentions: Sequence[Attention], amax: Mapping[str, float]) -> dict:
    """FP8 Q/DQ on both matmuls of each attention (in place); returns {tensor: scale} as recorded."""
    g = graph.proto.graph
    absent = sorted(x for a in attentions for x in a.calibrated if x not in amax)
    if absent:
        raise ValueError(f"no calibrated range for attention inputs {absent[:3]}")
    plan: dict[str, list[tuple[int, str, np.ndarray]]] = {}
    for a in attentions:
        plan[a.bmm1] = [(0, a.query, fp8_scale(amax[a.query])), (1, a.key, fp8_scale(amax[a.key]))]
        plan[a.bmm2] = [(0, a.probs, SOFTMAX_SCALE), (1, a.value, fp8_scale(amax[a.value]))]
    scales, out = {}, []
    for node in list(g.node):
        for index, x, scale in plan.get(node.name, []):
            if node.input[index] != x:
                raise ValueError(f"{node.name}: input {index} is {node.input[index]}, expected {x}")
            nodes, dq = _pair(graph, x, scale)
            out += nodes
            node.input[index] = dq
            scales[x] = float(scale)
        out.append(node)
    del g.node[:]
    g.node.extend(out)
    return scales


def head_size_ok(size: int | None) -> bool:
    return size is not None and HEAD_SIZE[0] < size <= HEAD_SIZE[1]


def attention_problems(model: onnx.ModelProto, attentions: Sequence[Mapping[str, str]]) -> list[str]:
    """Where the FP8 attentions (manifest records: bmm1, softmax, bmm2 node names) miss the placement above:
    each BMM input read straight from DequantizeLinear <- QuantizeLinear, the softmax pair at 1/448 reading the
    Softmax output itself. One line per problem."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    by_name = {n.name: n for n in g.node}
    consts = {i.name: i for i in g.initializer}
    problems = []
    for a in attentions:
        nodes = [by_name.get(a[k]) for k in ("bmm1", "softmax", "bmm2")]
        if any(n is None for n in nodes):
            problems.append(f"{a['bmm1']}: a node of the attention is missing")
            continue
        bmm1, sm, bmm2 = nodes
        for node, i in ((bmm1, 0), (bmm1, 1), (bmm2, 0), (bmm2, 1)):
            dq = producer.get(node.input[i])
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear":
                problems.append(f"{node.name}: input {i} is not read from QuantizeLinear -> DequantizeLinear")
            elif node is bmm2 and i == 0:
                scale = consts.get(q.input[1])
                value = float(numpy_helper.to_array(scale)) if scale is not None else None
                if q.input[0] != sm.output[0] or value != float(SOFTMAX_SCALE):
                    problems.append(f"{node.name}: the softmax pair must read {sm.name}'s output with scale 1/448")
    return problems
