"""The VAE decoder of one chunk as one graph, composed from the exported ``first`` and ``step`` graphs.

The runtime decodes a chunk (9 latent frames -> 33 video frames) with a fresh causal cache every time.
Run as first + 8 steps, every call hands 25 cache tensors back and forth through the host, which
cost more host time per chunk than the whole sampler (see the runtime note in export/exporter/vae_steps.py).
Here the calls are joined at the ONNX level instead of re-tracing the loop (which the exporter unrolls
slowly): one copy of the ``first`` graph, then ``frames - 1`` copies of the ``step`` graph, each
cache output wired to the next copy's cache input, the videos concatenated along time. Every copy reads
the same weights (initializers are shared by name, and ``first``'s equal ones are merged into them),
so the file holds the weights once. Cache outputs of the last copy are dead and pruned.

The graph also returns the chunk as the frames users get: uint8 [B, T, H, W, 3], computed as the
reference pipeline post-processes (x / 2 + 0.5 clamped to [0, 1], then x * 255 rounded half to even
as its PIL conversion), so the conversion runs on the device and only a quarter of the bytes leave it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from ..graphio import Graph, digest


def _renamed(node, rename, prefix: str):
    import onnx

    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        raise ValueError(f"VAE node {node.name} has a subgraph; the chunk composer does not handle control flow")
    new = onnx.NodeProto()
    new.CopyFrom(node)
    new.name = prefix + node.name
    new.input[:] = [rename(v) for v in node.input]
    new.output[:] = [rename(v) for v in node.output]
    return new


def _prune(nodes: list, outputs: set[str]) -> list:
    """Only the nodes the graph outputs depend on, in their original (topological) order."""
    needed, keep = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(v for v in node.input if v)
    return keep[::-1]


def _const(name: str, values, dtype=np.int64):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def _value_info(tensor):
    from onnx import TensorProto, helper

    dtypes = {"float32": TensorProto.FLOAT, "uint8": TensorProto.UINT8}
    return helper.make_tensor_value_info(tensor.name, dtypes[tensor.dtype], list(tensor.dims))


def _merged_names(first: Graph, step: Graph, out: Graph) -> tuple[list, dict]:
    """The composed graph's initializers and, per part, initializer name -> name in the composed graph:
    step's as they are (every step copy shares them), first's merged into step's where their bytes are
    equal (compared block by block, never a whole model in memory), else under their own prefix."""
    initializers = [out.adopt(t, step) for t in step.proto.graph.initializer]
    names = {"step": {t.name: t.name for t in step.proto.graph.initializer}, "first": {}}
    step_inits = step.initializers()
    for t in first.proto.graph.initializer:
        twin = step_inits.get(t.name)
        if twin is not None and _same(first.source(t.name), step.source(t.name)):
            names["first"][t.name] = t.name
            continue
        names["first"][t.name] = "first/" + t.name
        initializers.append(out.adopt(t, first, "first/" + t.name))
    return initializers, names


def _same(a, b) -> bool:
    return a.dtype == b.dtype and a.dims == b.dims and digest(a) == digest(b)


def compose_decoder(first: Graph, step: Graph, graph) -> Graph:
    """The chunk decoder composed from the ``first`` and ``step`` graphs (weights stay in their sources),
    with the inputs and outputs of ``graph`` (the vae_decoder spec's chunk graph): latents
    [B, z, frames, h, w] -> video [B, 3, T, 8h, 8w] float32 in [-1, 1] and frames uint8 [B, T, 8h, 8w, 3]."""
    from onnx import TensorProto, helper

    latents = graph.inputs[0].name
    video, pixels = (t.name for t in graph.outputs)
    frames = int(graph.inputs[0].dims[2])
    fp, sp = first.proto.graph, step.proto.graph
    caches_in = [i.name for i in sp.input][1:]
    caches_out = {"first": [o.name for o in fp.output][1:], "step": [o.name for o in sp.output][1:]}
    if not len(caches_in) == len(caches_out["first"]) == len(caches_out["step"]):
        raise ValueError(f"first has {len(caches_out['first'])} cache outputs, step {len(caches_in)} cache inputs "
                         f"and {len(caches_out['step'])} cache outputs")
    out = Graph(onnx.ModelProto())
    initializers, names = _merged_names(first, step, out)
    nodes, videos = [], []
    for k in range(frames):
        part, kind, prefix = (fp, "first", "first/") if k == 0 else (sp, "step", f"step{k}/")
        wiring = {part.input[0].name: prefix + latents, **names[kind]}
        if k > 0:  # cache_in_i <- the previous copy's cache_out_i
            previous, source = ("first/", "first") if k == 1 else (f"step{k - 1}/", "step")
            wiring.update({c_in: previous + c_out for c_in, c_out in zip(caches_in, caches_out[source])})
        rename = lambda v, wiring=wiring, prefix=prefix: wiring.get(v, prefix + v) if v else v  # noqa: E731
        starts, ends = f"{prefix}slice_start", f"{prefix}slice_end"
        initializers += [_const(starts, [k]), _const(ends, [k + 1])]
        nodes.append(helper.make_node("Slice", [latents, starts, ends, "chunk/axis_time"], [prefix + latents],
                                      name=f"{prefix}slice_latents"))
        nodes += [_renamed(n, rename, prefix) for n in part.node]
        videos.append(prefix + part.output[0].name)
    initializers += [_const("chunk/axis_time", [2]), _const("chunk/half", 0.5, np.float32),
                     _const("chunk/zero", 0.0, np.float32), _const("chunk/one", 1.0, np.float32),
                     _const("chunk/scale", 255.0, np.float32)]
    nodes += _postprocess(videos, video, pixels, TensorProto.UINT8)
    nodes = _prune(nodes, {video, pixels})
    graph_proto = helper.make_graph(
        nodes, "vae_decoder_chunk", [_value_info(t) for t in graph.inputs], [_value_info(t) for t in graph.outputs],
        initializer=initializers)
    out.proto = helper.make_model(graph_proto, opset_imports=list(step.proto.opset_import),
                                  ir_version=step.proto.ir_version, producer_name="helios-deploy",
                                  doc_string=__doc__.split("\n\n")[0])
    out.prune_initializers()
    return out


def _postprocess(videos: list[str], video: str, pixels: str, uint8: int) -> list:
    """Concatenate the copies' videos; the reference's postprocess: x / 2 + 0.5 (equal bit for bit to
    x * 0.5 + 0.5), clamp, * 255, round half to even, uint8, channels last."""
    from onnx import helper

    return [
        helper.make_node("Concat", videos, [video], axis=2, name="chunk/concat_video"),
        helper.make_node("Mul", [video, "chunk/half"], ["chunk/scaled"], name="chunk/scale_half"),
        helper.make_node("Add", ["chunk/scaled", "chunk/half"], ["chunk/unit"], name="chunk/shift_half"),
        helper.make_node("Clip", ["chunk/unit", "chunk/zero", "chunk/one"], ["chunk/clipped"], name="chunk/clip"),
        helper.make_node("Mul", ["chunk/clipped", "chunk/scale"], ["chunk/pixels"], name="chunk/scale_255"),
        helper.make_node("Round", ["chunk/pixels"], ["chunk/rounded"], name="chunk/round"),
        helper.make_node("Cast", ["chunk/rounded"], ["chunk/uint8"], to=uint8, name="chunk/to_uint8"),
        helper.make_node("Transpose", ["chunk/uint8"], [pixels], perm=[0, 2, 3, 4, 1], name="chunk/channels_last"),
    ]


def write_chunk_decoder(first: Graph, step: Graph, out_path: Path, graph) -> int:
    """Compose ``graph`` and save it with its weights streamed into ``out_path.name + ".data"``; returns the
    node count."""
    composed = compose_decoder(first, step, graph)
    composed.save(out_path)
    return len(composed.proto.graph.node)


def export_chunk_decoder(ckpt, graph, out_dir: Path, opset: int, layout, sizes) -> dict:
    """Export the decoder's first and step graphs (in a scratch folder) and compose ``graph.file`` from
    them; returns the export info of the composed graph."""
    import shutil
    import time

    from ...model.specs import vae_step_graphs
    from ..exporter.graph import export_graph

    t0 = time.perf_counter()
    parts = out_dir / ".parts"
    first, step = vae_step_graphs("decode", int(ckpt.configs["vae"]["z_dim"]), 3, layout, sizes)
    try:
        infos = [export_graph(ckpt, "vae_decoder", g, parts, opset) for g in (first, step)]
        traced = time.perf_counter()
        nodes = write_chunk_decoder(Graph.load(parts / first.file), Graph.load(parts / step.file),
                                    out_dir / graph.file, graph)
    finally:
        shutil.rmtree(parts, ignore_errors=True)
    return {"file": graph.file, "data": graph.file + ".data", "nodes": nodes,
            "composed_of": {g.name: {"nodes": i["nodes"], "initializers": i["initializers"]}
                            for g, i in zip((first, step), infos)},
            "export_seconds": round(traced - t0, 3), "write_seconds": round(time.perf_counter() - traced, 3)}


def split_parts(chunk: Graph) -> tuple[Graph, Graph]:
    """The ``first`` graph and one ``step`` graph taken back out of a chunk graph (weights stay in their
    sources), for work that is per part: AutoCast's time grows much faster than the graph (bf16 lowering of
    the tiny chunk graph took minutes, its two parts seconds)."""
    import re

    from onnx.utils import Extractor

    g = chunk.proto.graph
    latents = g.input[0].name
    produced = {o for n in g.node for o in n.output}
    caches = sorted((v for v in produced if re.fullmatch(r"first/cache_out_\d+", v)),
                    key=lambda v: int(v.rsplit("_", 1)[1]))
    concat = next(n for n in g.node if n.name == "chunk/concat_video")
    extractor = Extractor(onnx.shape_inference.infer_shapes(chunk.proto))  # weightless: no weights read
    first = extractor.extract_model(["first/" + latents], [concat.input[0], *caches])
    step = extractor.extract_model(["step1/" + latents, *caches],
                                   [concat.input[1], *(c.replace("first/", "step1/", 1) for c in caches)])
    _unprefixed(first, "first/", {})
    _unprefixed(step, "step1/", {c: c.replace("first/cache_out_", "cache_in_", 1) for c in caches})
    return Graph(first, chunk.sources), Graph(step, chunk.sources)


def _unprefixed(model: onnx.ModelProto, prefix: str, renames: dict[str, str]) -> None:
    """A part as compose_decoder takes it: the copy's prefix taken off its nodes, values and own
    initializers (``renames`` first: the step's cache inputs, named after the copy that fed them), so that
    composing the parts again gives back the same names."""
    def name(v: str) -> str:
        return renames.get(v, v[len(prefix):] if v.startswith(prefix) else v)

    g = model.graph
    for node in g.node:
        node.name = name(node.name)
        node.input[:] = [name(v) if v else v for v in node.input]
        node.output[:] = [name(v) for v in node.output]
    for value in (*g.input, *g.output, *g.value_info, *g.initializer):
        value.name = name(value.name)
