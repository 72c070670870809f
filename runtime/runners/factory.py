"""The choice of backend: the one module that knows every runner (after Polygraphy, where the backends import
``base`` and never the reverse). A backend is imported only when it is asked for, so a host without TensorRT or
diffusers imports this module as well."""

from __future__ import annotations

from pathlib import Path

from ...errors import UserError
from ...model.specs import GraphSpec
from .base import BACKENDS, Runner, onnx_file


def make_runner(backend: str, root: Path, manifest: dict, component: str, graph: GraphSpec, device: str,
                precision: str = "fp32", low_memory: bool = False) -> Runner:
    """The runner for one graph of one component, imported only when its backend is used."""
    if backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(root / component / onnx_file(manifest, component, graph, precision), graph,
                                 component, device, prepack=not low_memory)
    if backend == "torch":
        from .torch_ref import TorchRunner

        return TorchRunner(manifest, graph, component, device)
    if backend == "tensorrt":
        from .tensorrt import TensorRTRunner

        return TensorRTRunner(root, manifest, component, graph, device)
    raise UserError(f"unknown backend {backend!r}", expected=", ".join(BACKENDS))
