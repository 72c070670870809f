"""FP8 calibration: the ranges a component's linear layers really see in the sampler loop.

The runtime Pipeline runs over the exported fp32 graphs on the calibration prompts, two chunks each (so the
second chunk has real history), at every exported video size, with each calibrated component's graph extended by ReduceMax(Abs(x)) and
Size(x) outputs for every activation that feeds an FP8 layer: every call (every step of all three pyramid
stages, each at its own shape) updates the running max of |x|, and nothing else is kept. The sessions read
the exported weights where they are (one copy in memory, no prepacked duplicate) on ONNX Runtime's CPU or
CUDA provider (``quantize --device``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from onnx import TensorProto, helper

from ...errors import UserError
from ...fsutil import sha256_bytes
from ...measure.memory import release_memory
from ...runtime.pipeline import PROMPT_CACHE_SIZE
from ...runtime.runners.onnxruntime import OnnxRuntimeRunner
from ..graphio import Graph, link_data
from .prepare import name_nodes_by_module

# Built-in calibration prompts: varied subjects, motion, lighting and camera work, like real requests.
DEFAULT_PROMPTS = (
    "A cat and a dog baking a cake together in a kitchen.",
    "A drone shot flying over a snowy mountain ridge at sunrise, golden light on the peaks.",
    "Close-up of rain drops falling on a city street at night, neon reflections in the puddles.",
    "A surfer riding a large turquoise wave, slow motion, water spraying into the air.",
    "An old man reading a newspaper on a park bench while pigeons walk around him.",
    "A timelapse of clouds moving over a desert with red rock formations.",
    "A red sports car driving along a coastal road, the camera tracking beside it.",
    "A child blowing soap bubbles in a sunny garden, shallow depth of field.",
)


def read_prompts(path: str | Path | None) -> list[str]:
    """One prompt per line (blank lines skipped); the built-in set when ``path`` is None."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the calibration prompts file {path}", found=type(e).__name__ + f": {e}",
                        expected="a readable UTF-8 text file, one prompt per line",
                        fix="check the path and permissions, or omit --calibration-prompts for the built-in set") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"the calibration prompts file {path} has no prompts", found="an empty file (or only blank lines)",
                        expected="one prompt per line", fix="add prompts, or omit --calibration-prompts")
    return prompts


def calibration_hash(prompts: Sequence[str], settings: dict) -> str:
    """sha256 over the prompts and every setting that changes the recorded inputs."""
    return sha256_bytes(json.dumps({"prompts": list(prompts), "settings": settings}, sort_keys=True).encode())


def calibration_graph(src: Path, activations: Sequence[str], work: Path,
                      shapes: Sequence[str] = ()) -> tuple[Path, dict[str, str]]:
    """``src`` plus two outputs per activation to calibrate: ReduceMax(Abs(x)) and Size(x) (scalars), and
    Shape(x) for those in ``shapes`` (an attention's V: its last dimension is the head size), written
    weightless into ``work`` beside a link to ``src``'s external data, so the calibration session reads the
    exported weights where they are (nothing is copied). Returns the graph and output name -> activation."""
    graph = Graph.load(src)
    name_nodes_by_module(graph.proto)
    g = graph.proto.graph
    outputs: dict[str, str] = {}
    after: dict[str, list] = {}  # activation -> its calibration nodes
    for i, x in enumerate(activations):
        amax, size = f"calibration/amax_{i}", f"calibration/size_{i}"
        after[x] = [helper.make_node("Abs", [x], [f"calibration/abs_{i}"], name=f"calibration/abs_{i}"),
                    helper.make_node("ReduceMax", [f"calibration/abs_{i}"], [amax], keepdims=0,
                                     name=f"calibration/reduce_max_{i}"),
                    helper.make_node("Size", [x], [size], name=f"calibration/size_{i}")]
        g.output.extend([helper.make_tensor_value_info(amax, TensorProto.FLOAT, []),
                         helper.make_tensor_value_info(size, TensorProto.INT64, [])])
        outputs[amax] = outputs[size] = x
        if x in shapes:
            shape = f"calibration/shape_{i}"
            after[x].append(helper.make_node("Shape", [x], [shape], name=shape))
            g.output.append(helper.make_tensor_value_info(shape, TensorProto.INT64, [None]))
            outputs[shape] = x
    _place_after_producers(g, after)
    link_data(src, work)
    path = work / src.name
    graph.save_referencing(path)
    return path, outputs


def _place_after_producers(g, after: Mapping[str, list]) -> None:
    """Put each activation's calibration nodes right after the node that makes it (graph inputs: first), for
    RangeRunner's priority-based execution order, which runs the ready node that comes first in the graph. In
    ONNX Runtime's default order (the graph's leaves and their ancestors, depth first) the reductions, leaves of
    their own, ran after the whole graph and every calibrated activation stayed alive until the end of the call:
    on the real-width Wan decoder chunk at 64x64 the calibration graph peaked 0.96 GB above the plain graph (0.98
    GB), an excess growing with the pixels; placed here and run in priority order, 0.18 GB above it."""
    made = {o for node in g.node for o in node.output}
    nodes = [n for x in after if x not in made for n in after[x]]
    for node in g.node:
        nodes.append(node)
        nodes.extend(n for o in node.output for n in after.get(o, ()))
    del g.node[:]
    g.node.extend(nodes)


class RangeRunner(OnnxRuntimeRunner):
    """A calibration graph run as the runtime's runner for its component: the sampler loop calls it like
    the exported graph, and it keeps, per activation, the running max |x| and the fewest rows seen. Its session
    runs in ONNX Runtime's priority-based order, so each reduction runs as soon as its activation is made
    (``_place_after_producers``) and the activation is freed as in the plain graph."""

    execution_order = "PRIORITY_BASED"

    def __init__(self, path: Path, graph, component: str, device: str, outputs: Mapping[str, str],
                 rows_of: Mapping[str, int]):
        super().__init__(path, graph, component, device, prepack=False)
        self.outputs, self.rows_of = dict(outputs), dict(rows_of)
        self.amax = {x: 0.0 for x in self.outputs.values()}
        self.min_rows = {x: None for x in self.outputs.values()}
        self.last_dim: dict[str, int] = {}  # activations with a Shape output: their last dimension
        self.shapes: Counter = Counter()

    def _activate_impl(self) -> None:
        super()._activate_impl()
        self.output_names = [t.name for t in self.graph.outputs] + list(self.outputs)

    def _infer_impl(self, feeds):
        arrays = {k: v.detach().cpu().contiguous().numpy() for k, v in feeds.items()}
        values = self.session.run(self.output_names, arrays)
        n = len(self.graph.outputs)
        for name, value in zip(self.output_names[n:], values[n:]):
            x = self.outputs[name]
            if name.startswith("calibration/amax_"):
                self.amax[x] = float(np.fmax(self.amax[x], value))
            elif name.startswith("calibration/shape_"):
                self.last_dim[x] = int(value[-1])
            else:
                rows = int(value) // self.rows_of[x]
                self.min_rows[x] = rows if self.min_rows[x] is None else min(self.min_rows[x], rows)
        self.shapes["x".join(map(str, arrays[self.graph.inputs[0].name].shape))] += 1
        return {t.name: torch.from_numpy(v).to(self.device) for t, v in zip(self.graph.outputs, values[:n])}


def run_calibration(pipe, runners: Mapping[str, RangeRunner], prompts: Sequence[str], chunks: int, seed: int,
                    **settings) -> None:
    """The real sampler loop over every prompt at every exported size (activation ranges grow with the token
    count: attention spreads over more tokens, and the VAE and norms see other statistics, so one size's
    ranges may clip another's), with ``runners`` (component -> RangeRunner) in place of the pipeline's
    runners for those components. The loop is the checkpoint's variant's own with its default settings
    (Distilled: DMD 1,1,1; Mid: 10,10,10 with CFG-Zero*; Base: 50 UniPC steps with guidance, batch 2), or
    ``settings`` (request settings such as pyramid_steps) where given."""
    for component, runner in runners.items():
        pipe.set_runner(component, "model", runner.activate())
    # UMT5 runs over a group of prompts (and a guided variant's negative prompt) first and its session is
    # closed before the transformer runs, so the two models' weights are never in memory together (unless
    # UMT5 itself is being calibrated); a group fits the pipeline's prompt cache.
    encode_first = "text_encoder" not in runners
    sampling = pipe.sampling(**settings)
    negative = [sampling.negative_prompt] if sampling.guidance is not None else []
    group = max(1, PROMPT_CACHE_SIZE - len(negative))
    try:
        for start in range(0, len(prompts), group):
            if encode_first:
                for prompt in (*prompts[start:start + group], *negative):
                    pipe.encode_prompt(prompt)
                pipe.release("text_encoder")
                release_memory()
            for height, width in pipe.sizes:
                for i, prompt in enumerate(prompts[start:start + group], start):
                    for _ in pipe.stream(prompt, num_frames=33 * chunks, seed=seed + i, height=height, width=width,
                                         **settings):
                        pass
    finally:
        pipe.close()
