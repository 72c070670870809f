"""Parity of exported graphs (ONNX Runtime, CPU) against the reference modules (diffusers /
transformers), at every operating point, at batch 2 and at one shape not used at export.

Inputs are drawn once per case from the spec; the reference runs first and ours second, on the same
arrays, and the two are compared with max_abs_err, rel_l2 and cosine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ...measure.memory import release_memory
from ...model.specs import ComponentSpec, GraphSpec, resolve_shape
from ...runtime.vae import run_chunk

FP32_REL_L2 = 1e-4


@dataclass(frozen=True)
class Case:
    name: str
    dims: Mapping[str, int]


def cases(spec: ComponentSpec) -> list[Case]:
    """Every operating point, the first one at batch 2, and one shape not used at export."""
    graph = spec.graphs[0]
    out = [Case(p.name, dict(p.dims)) for p in graph.operating_points]
    first = dict(graph.operating_points[0].dims)
    out.append(Case(f"{graph.operating_points[0].name}_batch2", {**first, "batch": 2}))
    unseen = {**first, "batch": 3}
    for sym, (lo, hi) in graph.ranges.items():
        if sym != "batch" and sym in first and hi > lo:
            mid = lo + (hi - lo) // 2
            unseen[sym] = mid if mid != first[sym] else hi
    out.append(Case("unseen_shape", unseen))
    return out


def example_inputs(spec: ComponentSpec, graph: GraphSpec, dims: Mapping[str, int], seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs of the right shapes and meaningful values for ``graph`` at ``dims``."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for t in graph.inputs:
        shape = resolve_shape(t, dims)
        if t.kind == "timestep":
            out[t.name] = rng.integers(0, 1000, shape).astype(np.int64)
        elif t.kind == "indices":
            row = np.asarray(spec.attrs["frame_indices"][t.name], dtype=np.int64)
            out[t.name] = np.broadcast_to(row, shape).copy()
        elif t.kind == "token_ids":
            out[t.name] = rng.integers(0, int(spec.attrs["vocab_size"]), shape).astype(np.int64)
        elif t.kind == "mask":
            lengths = rng.integers(1, shape[1] + 1, shape[0])
            out[t.name] = (np.arange(shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        elif t.kind == "video":
            out[t.name] = rng.uniform(-1, 1, shape).astype(np.float32)
        else:
            out[t.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def chunk_input(spec: ComponentSpec, dims: Mapping[str, int], seed: int) -> np.ndarray:
    """A whole chunk of video (33 frames) for the VAE encoder's chunk-level comparison."""
    x = spec.graph("step").inputs[0]
    shape = list(resolve_shape(x, dims))
    shape[2] = spec.attrs["chunk_frames"]
    rng = np.random.default_rng(seed)
    if x.kind == "video":
        return rng.uniform(-1, 1, shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def metrics(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    a, b = np.asarray(ours, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    if a.shape != b.shape:
        return {"max_abs_err": float("inf"), "rel_l2": float("inf"), "cosine": 0.0}
    diff = a - b
    nb = np.linalg.norm(b)
    denom = np.linalg.norm(a) * nb
    return {
        "max_abs_err": float(np.max(np.abs(diff))) if diff.size else 0.0,
        "rel_l2": float(np.linalg.norm(diff) / nb) if nb > 0 else float(np.linalg.norm(diff)),
        "cosine": float(a @ b / denom) if denom > 0 else float(np.allclose(a, b)),
    }


def reference_output(component: str, module, graph_inputs: Mapping[str, np.ndarray] | np.ndarray) -> np.ndarray:
    """The reference module's output for the same inputs."""
    with torch.no_grad():
        if component == "vae_decoder":  # the chunk graph's "video" (its uint8 "frames": tests/test_vae_steps.py)
            return module.decode(torch.from_numpy(graph_inputs["latents"]), return_dict=False)[0].numpy()
        if component == "vae_encoder":
            return module.encode(torch.from_numpy(graph_inputs)).latent_dist.parameters.numpy()
        kwargs = {k: torch.from_numpy(v) for k, v in graph_inputs.items()}
        if component == "text_encoder":
            return module(**kwargs).last_hidden_state.numpy()
        return module(**kwargs, return_dict=False)[0].numpy()


class OrtGraph:
    """An ONNX Runtime session over one exported graph, called with and returning arrays in spec order."""

    def __init__(self, path: Path, graph: GraphSpec):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # one copy of the weights in the session (no prepacked duplicate): parity holds this session and the
        # streamed reference (export/parity/reference.py) at once
        opts.add_session_config_entry("session.disable_prepacking", "1")
        opts.enable_cpu_mem_arena = False  # activations freed after each run, not kept for the largest shape
        self.graph = graph
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        feeds = {t.name: a for t, a in zip(self.graph.inputs, arrays)}
        return self.session.run([t.name for t in self.graph.outputs], feeds)


def our_output(component: str, spec: ComponentSpec, sessions: Mapping[str, OrtGraph], inputs) -> np.ndarray:
    if component == "vae_encoder":
        wrap = lambda s: (lambda *xs: [torch.from_numpy(y) for y in s(*[x.numpy() for x in xs])])  # noqa: E731
        return run_chunk(wrap(sessions["first"]), wrap(sessions["step"]), torch.from_numpy(inputs), "encode").numpy()
    graph = spec.graphs[0]
    return sessions[graph.name](*[inputs[t.name] for t in graph.inputs])[0]


def _case_inputs(component: str, spec: ComponentSpec, case: Case, seed: int):
    if component == "vae_encoder":
        return chunk_input(spec, case.dims, seed)
    return example_inputs(spec, spec.graphs[0], case.dims, seed)


def compare_component(component: str, spec: ComponentSpec, sessions, module, seed: int = 0,
                      threshold: float = FP32_REL_L2, precision: str = "fp32", min_cosine: float | None = None) -> dict:
    """All parity cases of one component: {"precision", "passed", "cases": [...]}. A case passes with
    rel_l2 <= threshold (and cosine >= min_cosine when given: the FP8 targets).

    ``module`` and ``sessions`` may be loaders (called without arguments): the reference then runs first, over
    every case, and is released before the sessions are made, so one copy of the model's weights is in memory
    at a time. ``sessions`` returning None (a graph failed its checks) gives a failed result without cases."""
    reference = module if isinstance(module, torch.nn.Module) else module()
    runs = []
    for i, case in enumerate(cases(spec)):
        inputs = _case_inputs(component, spec, case, seed + i)
        runs.append((case, inputs, reference_output(component, reference, inputs)))
    del reference, module
    release_memory()
    opened = sessions if isinstance(sessions, Mapping) else sessions()
    out = {"precision": precision, "threshold_rel_l2": threshold, "passed": opened is not None, "cases": []}
    for case, inputs, ref in runs if opened is not None else ():
        m = metrics(our_output(component, spec, opened, inputs), ref)
        ok = m["rel_l2"] <= threshold and (min_cosine is None or m["cosine"] >= min_cosine)
        out["cases"].append({"name": case.name, "dims": dict(case.dims), **m, "passed": ok})
    out["passed"] = out["passed"] and all(r["passed"] for r in out["cases"])
    if min_cosine is not None:
        out["threshold_cosine"] = min_cosine
    return out
