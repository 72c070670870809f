"""PyTorch -> ONNX for one graph of one component, without materialising the weights.

The reference module is built with its parameters on the meta device and exported with
``torch.onnx.export(dynamo=True)``; every initializer of the resulting graph is then bound to a lazy
tensor that reads that one weight from its safetensors shard when the external-data file is written.
Each weight is converted (bf16 -> fp32) in slices of rows as it is written (export/graphio.py), so peak
memory is the exporter's own plus one slice, whatever the checkpoint's or its largest tensor's size.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ...checkpoints.checkpoint import Checkpoint
from ...errors import UserError
from ...model.specs import GraphSpec, parse_dim, resolve_shape
from .modules import build_module, graph_module
from .patches import export_patches
from ..graphio import IN_FLIGHT_BYTES, INLINE_BYTES, ArraySource, cast, safetensors_source



def export_dims(graph: GraphSpec) -> dict[str, int]:
    """Symbol values of the export example: batch 2 (a batch-1 example with a dynamic batch declared
    gives a graph that fails at batch 2) and every other symbol at the top of its range."""
    return {s: (2 if s == "batch" else hi) for s, (lo, hi) in graph.ranges.items()}


def dynamic_shapes(graph: GraphSpec) -> tuple:
    """torch.export dynamic shapes derived from the spec: one Dim per symbol, ``k * Dim`` for
    ``symbol*k``; shared symbols tie axes together."""
    dims = {s: torch.export.Dim(s, min=lo, max=hi) for s, (lo, hi) in graph.ranges.items()}
    per_input = []
    for t in graph.inputs:
        axes = {}
        for axis, d in enumerate(t.dims):
            if isinstance(d, str):
                sym, k = parse_dim(d)
                axes[axis] = dims[sym] if k == 1 else k * dims[sym]
        per_input.append(axes or None)
    return (tuple(per_input),)


def _example(graph: GraphSpec, device: str) -> tuple[torch.Tensor, ...]:
    dims = export_dims(graph)
    out = []
    for t in graph.inputs:
        shape = resolve_shape(t, dims)
        dtype = torch.int64 if t.dtype == "int64" else torch.float32
        out.append(torch.ones(shape, dtype=dtype, device=device))
    return tuple(out)


def weight_sources(ckpt: Checkpoint, component: str, module) -> tuple[dict, dict]:
    """(parameter name -> checkpoint key, buffer name -> tensor) for the module being exported,
    resolving tied parameters (e.g. UMT5's shared embedding) to whichever alias the checkpoint has."""
    index = ckpt.index_for(component)
    by_param: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(name)
    keys = {}
    for aliases in by_param.values():
        found = next((a for a in aliases if a in index.weight_map), None)
        for a in aliases:
            keys[a] = found
    # ties the library declares ({target: source}, e.g. UMT5's embed_tokens -> shared); parameters built
    # without weights are not tied yet, so resolve them by the declaration
    tied = getattr(module, "_tied_weights_keys", None)
    for target, source in (tied.items() if isinstance(tied, dict) else ()):
        if keys.get(target) is None and source in index.weight_map:
            keys[target] = source
    buffers = {n: b.detach().clone() for n, b in module.named_buffers() if b.device.type != "meta"}
    return keys, buffers


def _bind_weights(model, ckpt: Checkpoint, component: str, keys: dict, buffers: dict, prefix: str,
                  fusion=None) -> list[str]:
    """Replace each initializer's (meta) value with a source that streams it from the checkpoint (or the
    module's buffers) when the external data is written, with ``fusion``'s LoRA deltas added to the weights
    it targets (export/exporter/lora.py). Returns the names that could not be bound."""
    index = ckpt.index_for(component)
    missing, fused = [], set()
    for name, value in model.graph.initializers.items():
        local = name[len(prefix):] if name.startswith(prefix) else name
        dtype, shape = value.const_value.dtype, tuple(value.const_value.shape)
        if local in buffers:
            arr = buffers[local].to(torch.float32 if dtype.numpy() == np.float32 else buffers[local].dtype).numpy()
            value.const_value = ArraySource(arr.astype(dtype.numpy()), name=name)
        elif keys.get(local) is None:
            missing.append(local)
        else:
            stored = safetensors_source(index.folder / index.weight_map[keys[local]], keys[local])
            if stored.dims != shape:
                raise UserError(f"checkpoint weight {keys[local]} has shape {stored.dims}, the config implies {shape}",
                                fix="the config.json and the weights of this checkpoint do not belong together")
            if fusion is not None and local in fusion.deltas:
                stored, _ = fusion.fused(local, stored), fused.add(local)
            value.const_value = cast(stored, dtype)  # bf16 -> fp32 block by block as it is written
            value.const_value.name = name
    if fusion is not None and set(fusion.deltas) - fused:
        raise RuntimeError(f"LoRA targets not bound to an initializer: {sorted(set(fusion.deltas) - fused)[:4]}")
    return missing


def _optimize(model) -> None:
    """The exporter's usual clean-up (constant folding, dead code) without reading checkpoint weights:
    nodes that consume a lazy weight are never folded, so nothing large is loaded here."""
    import onnx_ir as ir
    import onnxscript.optimizer

    def should_fold(node):
        for v in node.inputs:
            if v is not None and isinstance(v.const_value, ir.LazyTensor):
                return False
        return None

    onnxscript.optimizer.optimize_ir(model, onnx_shape_inference=False, should_fold=should_fold)


def _strip_debug_metadata(model) -> None:
    """Drop the exporter's per-node Python stack traces (most of a small graph's bytes); keep the
    module name scopes, which map nodes back to layers (used by precision recipes)."""
    for node in model.graph.all_nodes():
        for key in ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node"):
            node.metadata_props.pop(key, None)


def export_graph(ckpt: Checkpoint, component: str, graph: GraphSpec, out_dir: Path, opset: int, fusion=None) -> dict:
    """Export one graph to ``out_dir/graph.file`` with its weights in external data beside it (with LoRA
    adapters fused in, given a ``fusion`` from export/exporter/lora.py)."""
    import onnx_ir as ir

    t0 = time.perf_counter()
    module = build_module(ckpt, component, load_weights=False)
    keys, buffers = weight_sources(ckpt, component, module)
    module.to("meta")
    wrapper = graph_module(module, component, graph).eval()
    # parameters keep their module path under the wrapper's attribute (model. or vae.)
    prefix = "vae." if component.startswith("vae") else "model."
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # registry chatter (torchvision ops etc.)
    with export_patches(component), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on axis names and deprecations
        program = torch.onnx.export(
            wrapper, _example(graph, "meta"), dynamo=True, opset_version=opset,
            input_names=[t.name for t in graph.inputs], output_names=[t.name for t in graph.outputs],
            dynamic_shapes=dynamic_shapes(graph), optimize=False, verbose=False,
        )
    model = program.model
    missing = _bind_weights(model, ckpt, component, keys, buffers, prefix, fusion)
    if missing:
        raise UserError(f"checkpoint lacks weights the {component} needs",
                        found=f"{len(missing)} missing, e.g. {', '.join(missing[:4])}",
                        expected=f"every parameter of the {component} in {ckpt.index_for(component).folder}",
                        fix="the checkpoint is partial or from another model: re-download it")
    _optimize(model)
    _strip_debug_metadata(model)
    traced = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / graph.file
    ir.save(model, path, external_data=graph.file + ".data", size_threshold_bytes=INLINE_BYTES,
            max_in_flight_bytes=IN_FLIGHT_BYTES)
    return {"file": graph.file, "data": graph.file + ".data", "nodes": len(model.graph),
            "initializers": len(model.graph.initializers),
            "export_seconds": round(traced - t0, 3), "write_seconds": round(time.perf_counter() - traced, 3)}
