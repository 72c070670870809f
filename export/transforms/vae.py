"""FP8 convolutions in the Wan VAE decoder (``quantize --precision fp8 --fp8-vae``): FP8 E4M3 Q/DQ on the
input and the weight of every convolution of the decoder's chunk graph that TensorRT runs in FP8, calibrated
through the real sampler loop as the transformer's linear layers are.

Placement (TensorRT, "Explicit Quantization": a weighted layer runs in a quantized precision when its input
is read from a DequantizeLinear fed by a QuantizeLinear and its weight from a DequantizeLinear of a quantized
initializer; NVIDIA Model Optimizer 0.47's ONNX FP8 mode quantizes ``Conv`` that way: per-tensor activation
Q/DQ, per-output-channel weights, ``modelopt/onnx/quantization/fp8.py``, ``fp8_supported_op_types``):

    x -> Q -> DQ -> Conv <- DQ <- W (FP8 initializer, one scale per output channel, axis 0)

Which convolutions (Model Optimizer 0.47 ``graph_utils.find_nodes_from_convs_to_exclude(graph, "fp8")``, what its
FP8 mode excludes for TensorRT, and TensorRT 10.x's release notes, "Limitations": "There are no optimized FP8
Convolutions for Group Convolutions and Depthwise Convolutions", quoted in NVIDIA/TensorRT#4524):
- the weight is a constant (an initializer), ``group == 1``;
- the filter has at most 32 elements (``filter_size > 32`` is excluded for FP8): 3x3x3 causal convolutions (27),
  3x1x1 time convolutions, 3x3 upsampling and 1x1 convolutions qualify;
- input and output channels at least ``min_channels``: Model Optimizer requires >= 16 for the kernels and, in FP8
  mode, excludes <= 16 as slower than FP16 (``_MIN_CHANNELS_FP8``), so the default is 17. The tiny test VAEs
  have 8 and 16 channels: the tests pass 16, TensorRT's kernel floor.

Kept in high precision by name (``KEEP``), whatever the rule says: the two convolutions that read the latents
(``post_quant_conv``, ``decoder.conv_in``: their 16 input channels carry the whole picture; at real width the
channel rule keeps them too) and ``decoder.conv_out`` (3 output channels: the pixels whose error the PSNR
measures). The causal caches stay float32: a Q/DQ pair feeds only its convolution, never the cache tensors handed
to the next frame (the Concat of cache and frame is quantized on its way into the convolution only); the
RMS norms, SiLUs, the mid-block attention's matmuls and the uint8 conversion are not convolutions.

The chunk graph is one ``first`` copy and eight ``step`` copies of the decoder sharing their weights
(export/transforms/vae_chunk.py). Every step copy gets the same activation scale (the max over all step copies
and calls), so the bf16 lowering, which takes the ``first`` and one ``step`` part out, lowers them and composes
them again (lowering.lower_chunk), rebuilds the same graph. Weights are quantized one tensor at a time as they
are written (export/graphio), like the linear layers'.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np
import onnx
from onnx import helper

from ...errors import UserError
from ..graphio import Graph
from ..graphio.sources import Source
from .qdq import FP8, FP8_MAX, _activation_pair, fp8_scale, replace_nodes

COMPONENT = "vae_decoder"
MAX_FILTER = 32  # Model Optimizer: FP8 conv excluded when the filter has more elements
MIN_CHANNELS = 17  # Model Optimizer's FP8 mode: excluded when input or output channels <= 16
KERNEL_MIN_CHANNELS = 16  # Model Optimizer: "The input and output channels should be >= 16"
KEEP = {
    r"^vae\.post_quant_conv\.": "reads the latents (first convolution; z_dim input channels)",
    r"^vae\.decoder\.conv_in\.": "reads the latents (z_dim input channels)",
    r"^vae\.decoder\.conv_out\.": "writes the pixels (last convolution; 3 output channels)",
}
PLACEMENT = ("x -> QuantizeLinear -> DequantizeLinear -> Conv <- DequantizeLinear(axis 0) <- FP8 weight; "
             "per-tensor activation, per-output-channel weight (Model Optimizer 0.47 ONNX FP8 mode)")


@dataclass(frozen=True)
class Conv:
    node: str
    layer: str  # the module: the weight's name without ".weight"
    weight: str
    activation: str
    dims: tuple[int, ...]
    group: int

    @property
    def filter_size(self) -> int:
        return int(np.prod(self.dims[2:], dtype=np.int64))


def conv_layers(graph: Graph) -> list[Conv]:
    """Every Conv of the graph, in order (one per copy of the decoder)."""
    inits = graph.initializers()
    out = []
    for n in graph.proto.graph.node:
        if n.op_type != "Conv":
            continue
        w = inits.get(n.input[1])
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        out.append(Conv(n.name, re.sub(r"\.weight$", "", n.input[1]), n.input[1], n.input[0],
                        tuple(int(d) for d in w.dims) if w is not None else (), int(attrs.get("group", 1))))
    return out


def exclusion(conv: Conv, min_channels: int = MIN_CHANNELS) -> str | None:
    """Why ``conv`` stays in high precision (None: FP8)."""
    for pattern, reason in KEEP.items():
        if re.search(pattern, conv.weight):
            return reason
    if not conv.dims:
        return "its weight is not a constant"
    if conv.group != 1:
        return f"group {conv.group}: TensorRT has no FP8 group/depthwise convolution"
    if conv.filter_size > MAX_FILTER:
        return f"filter of {conv.filter_size} elements (FP8 convolutions: at most {MAX_FILTER})"
    out_ch, in_ch = conv.dims[0], conv.dims[1]
    if min(out_ch, in_ch) < min_channels:
        return f"{in_ch} input / {out_ch} output channels (FP8: at least {min_channels})"
    return None


def step_key(tensor: str) -> str:
    """The tensor's name shared by every step copy (``step3/cat_5`` -> ``step/cat_5``)."""
    return re.sub(r"^step\d+/", "step/", tensor)


@dataclass
class VaePlan:
    """The decoder's chunk graph and which of its convolutions become FP8."""

    graph: Graph
    convs: list[Conv]
    targets: list[str]  # Conv node names (every copy)
    kept: dict[str, str]  # layer -> reason
    min_channels: int
    component: str = COMPONENT
    warnings: list[str] = field(default_factory=list)
    attention: list = field(default_factory=list)  # none: calibrate() reads it for shapes

    def calibrated_rows(self) -> dict[str, int]:
        wanted = set(self.targets)
        return {c.activation: 1 for c in self.convs if c.node in wanted}


def plan_vae(graph: Graph, min_channels: int = MIN_CHANNELS, log: Callable[[str], None] = print) -> VaePlan:
    convs = conv_layers(graph)
    kept = {c.layer: r for c in convs if (r := exclusion(c, min_channels)) is not None}
    targets = [c.node for c in convs if c.layer not in kept]
    if not targets:
        raise UserError("--fp8-vae: no convolution of the VAE decoder can be FP8",
                        found=f"{len({c.layer for c in convs})} convolutions, every one excluded (e.g. "
                              f"{next(iter(kept.items()), ('', ''))})",
                        expected=f"convolutions with >= {min_channels} input and output channels and filters of at "
                                 f"most {MAX_FILTER} elements", fix="drop --fp8-vae for this checkpoint")
    plan = VaePlan(graph, convs, targets, kept, min_channels)
    log(f"{COMPONENT}: {len({c.layer for c in convs}) - len(kept)} of {len({c.layer for c in convs})} convolutions "
        f"to FP8 ({len(targets)} nodes over the chunk's copies) ...")
    return plan


class PerChannelFP8(Source):
    """``src`` [O, ...] quantized to FP8 with one scale per output channel (row), block by block."""

    def __init__(self, src: Source, scale: np.ndarray):
        super().__init__(FP8, src.dims, src.name)
        self.src, self.scale = src, np.asarray(scale, np.float32)

    def rows_per_block(self) -> int:
        return self.src.rows_per_block()

    def blocks(self) -> Iterator[np.ndarray]:
        start = 0
        for block in self.src.blocks():
            rows = block.shape[0]
            scale = self.scale[start:start + rows].reshape((rows,) + (1,) * (block.ndim - 1))
            scaled = block.astype(np.float32, copy=False) / scale
            scaled += np.float32(0.0)  # -0.0 -> +0.0, as modelopt's W / scale + zero_point
            np.clip(scaled, -FP8_MAX, FP8_MAX, out=scaled)
            yield scaled.astype(ml_dtypes.float8_e4m3fn)
            start += rows


def row_amax(src: Source) -> np.ndarray:
    """max |W| per output channel (row), read block by block."""
    return np.concatenate([np.max(np.abs(b.astype(np.float32, copy=False)).reshape(b.shape[0], -1), axis=1)
                           for b in src.blocks()])


def _weight_dq(graph: Graph, w: str) -> onnx.NodeProto:
    src = graph.source(w)
    scale = fp8_scale(row_amax(src))
    graph.set_initializer(w, PerChannelFP8(src, scale))
    graph.set_initializer(f"{w}_scale", scale)
    graph.set_initializer(f"{w}_zero_point", np.zeros(scale.shape, dtype=ml_dtypes.float8_e4m3fn))
    return helper.make_node("DequantizeLinear", [w, f"{w}_scale", f"{w}_zero_point"], [f"{w}_DequantizeLinear_Output"],
                            name=f"{w}_DequantizeLinear", axis=0)


def insert_conv_qdq(graph: Graph, targets: Sequence[str], amax: Mapping[str, float]) -> dict[str, float]:
    """FP8 Q/DQ on the input and weight of the Conv nodes ``targets`` (in place). ``amax``: max |x| per activation
    tensor; step copies share the max of their group (``step_key``). Returns {activation: scale}."""
    g = graph.proto.graph
    wanted = set(targets)
    nodes = [n for n in g.node if n.name in wanted]
    if len(nodes) != len(wanted):
        raise ValueError(f"no Conv named {sorted(wanted - {n.name for n in nodes})[:3]}")
    pooled: dict[str, float] = {}
    for n in nodes:
        if n.input[0] not in amax:
            raise ValueError(f"no calibrated range for {n.name}'s input {n.input[0]}")
        key = step_key(n.input[0])
        pooled[key] = max(pooled.get(key, 0.0), float(amax[n.input[0]]))
    activations = sorted({n.input[0] for n in nodes})
    pairs = {x: _activation_pair(graph, x, pooled[step_key(x)]) for x in activations}
    producers = {o for n in g.node for o in n.output}
    out = [p for x in activations if x not in producers for p in pairs[x]]
    done: set[str] = set()
    for node in list(g.node):
        if node.name in wanted:
            w = node.input[1]
            if w not in done:
                out.append(_weight_dq(graph, w))
                done.add(w)
            node.input[1] = f"{w}_DequantizeLinear_Output"
            node.input[0] = f"{node.input[0]}_DequantizeLinear_Output"
        out.append(node)
        out += [p for o in node.output if o in pairs for p in pairs[o]]
    replace_nodes(g, out, done)
    return {x: float(fp8_scale(pooled[step_key(x)])) for x in activations}


def conv_precision(model: onnx.ModelProto) -> dict[str, str]:
    """Per convolution node: "fp8" when its input is read from DequantizeLinear <- QuantizeLinear and its weight
    from a per-output-channel DequantizeLinear (axis 0) of an FP8 initializer; "fp32" when neither; "broken:
    ..." for anything in between (a half-quantized convolution TensorRT would not run in FP8)."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    fp8 = {i.name: i for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN}
    dims = {i.name: tuple(i.dims) for i in g.initializer}
    out = {}
    for n in (n for n in g.node if n.op_type == "Conv"):
        dq_x, dq_w = producer.get(n.input[0]), producer.get(n.input[1])
        x_ok = (dq_x is not None and dq_x.op_type == "DequantizeLinear" and dq_x.input[0] in producer
                and producer[dq_x.input[0]].op_type == "QuantizeLinear")
        w_ok = (dq_w is not None and dq_w.op_type == "DequantizeLinear" and dq_w.input[0] in fp8
                and {a.name: a.i for a in dq_w.attribute}.get("axis", 1) == 0
                and dims.get(dq_w.input[1]) == (fp8[dq_w.input[0]].dims[0],))
        out[n.name] = "fp8" if x_ok and w_ok else "fp32" if not (x_ok or dq_w is not None) else \
            f"broken: input {'ok' if x_ok else 'not Q/DQ'}, weight {'ok' if w_ok else 'not a per-channel FP8 DQ'}"
    return out


def vae_record(plan: VaePlan, scales: Mapping[str, float], graph_path: Path) -> dict:
    """The manifest's ``fp8`` fields for the decoder (besides the files): layers, kept layers and why, scales."""
    layers = sorted({c.layer for c in plan.convs})
    fp8_layers = {c.layer for c in plan.convs if c.node in set(plan.targets)}
    return {"layer_precision": {layer: "fp8" if layer in fp8_layers else "fp32" for layer in layers},
            "kept": [{"layer": k, "reason": v} for k, v in sorted(plan.kept.items())],
            "rule": {"op": "Conv", "min_channels": plan.min_channels, "max_filter_elements": MAX_FILTER,
                     "group": 1, "keep": dict(KEEP), "placement": PLACEMENT,
                     "sources": "TensorRT Explicit Quantization; TensorRT 10.x release notes (Limitations); "
                                "Model Optimizer 0.47 find_nodes_from_convs_to_exclude (fp8)"},
            "nodes": len(plan.targets), "activation_scales": len(set(map(step_key, scales))),
            "warnings": plan.warnings}


def quantize_vae(plan: VaePlan, runner, out: Path, spec_graph, files: tuple[str, str],
                 log: Callable[[str], None]) -> dict:
    """Q/DQ on the planned convolutions with the calibrated ranges, written to ``out`` (the FP8 chunk graph and its
    bf16 lowering, composed per chunk as the export's: ``files``); returns the component's manifest entry."""
    from ...artifacts import file_record
    from ...measure.memory import measure_peak
    from .lowering import write_lowered
    from .prepare import weight_bytes

    FP8_FILE, FP8_BF16_FILE = files  # noqa: N806
    nodes = list({c.weight: c.node for c in reversed(plan.convs)}.values())  # one node per (shared) weight
    fp32_bytes = weight_bytes(plan.graph.proto, nodes)
    with measure_peak() as memory:
        scales = insert_conv_qdq(plan.graph, plan.targets, runner.amax)
        plan.graph.save(out / FP8_FILE)
    precision = conv_precision(plan.graph.proto)
    wrong = {k: v for k, v in precision.items() if (v == "fp8") != (k in set(plan.targets))}
    if wrong:
        raise RuntimeError(f"{COMPONENT}: FP8 convolutions misplaced: {list(wrong.items())[:3]}")
    log(f"{COMPONENT}: lowering {FP8_FILE} to bf16 outside the FP8 convolutions for TensorRT ...")
    with measure_peak() as lowering_memory:
        lowered = write_lowered(out / FP8_FILE, out, FP8_BF16_FILE, chunk=spec_graph)
    return {**file_record(out, FP8_FILE, FP8_FILE + ".data"), **vae_record(plan, scales, out / FP8_FILE),
            "weight_bytes": {"fp32_graph": fp32_bytes, "fp8_graph": weight_bytes(plan.graph.proto, nodes)},
            "bf16": {**lowered, "memory": lowering_memory}, "memory": {"qdq": memory}}


def vae_recipe() -> dict:
    import modelopt

    return {"tool": "helios-deploy streamed Q/DQ (Model Optimizer's FP8 recipe for Conv)",
            "modelopt_version": modelopt.__version__, "quantize_mode": "fp8", "format": "float8e4m3fn",
            "calibration_method": "max", "high_precision_dtype": "fp32", "quantized_ops": ["Conv"]}
