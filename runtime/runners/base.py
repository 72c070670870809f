"""The runner protocol (after Polygraphy's runners): public activate / infer / deactivate do the
checks; each backend fills in small ``_impl`` methods. Runners take and return named torch tensors on
their device, one graph each. This module never imports a backend: the backends import it, and the choice of
backend lives above them (runners/factory.py)."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Mapping

import torch

from ...errors import UserError
from ...model.specs import GraphSpec, bind_symbols

BACKENDS = ("onnxruntime", "tensorrt", "torch")  # what runners/factory.py can make
_DTYPES = {"float32": torch.float32, "int64": torch.int64}


class Runner:
    backend = "base"

    def __init__(self, graph: GraphSpec, component: str, device: str):
        self.graph, self.component, self.device = graph, component, torch.device(device)
        self.is_active = False
        self._first = graph.inputs[0].name
        self._names = frozenset(t.name for t in graph.inputs)
        self._dtypes = [(t.name, _DTYPES[t.dtype]) for t in graph.inputs]
        self._seen_shapes: set[tuple] = set()  # input shapes already checked against the spec
        self.reset_stats()

    def activate(self) -> "Runner":
        if not self.is_active:
            self._activate_impl()
            self.is_active = True
        return self

    def infer(self, feeds: Mapping[str, torch.Tensor], check: bool | None = None) -> dict[str, torch.Tensor]:
        """Run the graph. Names and dtypes are checked against the spec on every call (microseconds);
        shapes the first time each input shape is seen, or on every call with check=True."""
        if not self.is_active:
            raise RuntimeError(f"{self.component}/{self.graph.name} runner used before activate()")
        if check is not False:
            self._check_names_dtypes(feeds)
            shape = tuple(feeds[self._first].shape)
            if check or shape not in self._seen_shapes:
                bind_symbols(self.graph, {k: v.shape for k, v in feeds.items()})
                self._seen_shapes.add(shape)
        t0 = time.perf_counter()
        out = self._infer_impl(feeds)
        dt = time.perf_counter() - t0
        self.seconds += dt
        self.calls += 1
        shape = tuple(feeds[self._first].shape)
        self.seconds_by_shape[shape] += dt
        self.calls_by_shape[shape] += 1
        return out

    def reset_stats(self) -> None:
        """Wall time spent inside the backend (host overhead = the rest), in total and by the shape of
        the first input (which tells the pyramid stages apart)."""
        self.seconds, self.calls = 0.0, 0
        self.seconds_by_shape: dict[tuple, float] = defaultdict(float)
        self.calls_by_shape: dict[tuple, int] = defaultdict(int)

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate_impl()
            self.is_active = False

    def _check_names_dtypes(self, feeds: Mapping[str, torch.Tensor]) -> None:
        if feeds.keys() != self._names:
            raise UserError(f"{self.component}/{self.graph.name}: wrong inputs", found=", ".join(sorted(feeds)),
                            expected=", ".join(t.name for t in self.graph.inputs))
        bad = [f"{n} is {feeds[n].dtype}" for n, dt in self._dtypes if feeds[n].dtype != dt]
        if bad:
            raise UserError(f"{self.component}/{self.graph.name}: wrong input dtypes", found="; ".join(bad))

    # backends implement these
    def _activate_impl(self) -> None:
        raise NotImplementedError

    def _infer_impl(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _deactivate_impl(self) -> None:
        pass


def graph_record(manifest: dict, component: str, graph: str, precision: str = "fp32") -> tuple[dict, str]:
    """The manifest record of the ONNX graph the onnxruntime backend loads, and the step that wrote it: with
    precision fp8, the quantized graph when the component has one (the transformer must; components without
    one run fp32)."""
    entry = manifest["components"][component]
    if precision not in ("fp32", "fp8"):
        raise UserError(f"unknown precision {precision!r}", expected="fp32 or fp8")
    if precision == "fp8" and graph == "model":
        if entry.get("fp8"):
            return entry["fp8"], "quantize"
        if component == "transformer":
            raise UserError("these artifacts have no FP8 transformer graph",
                            fix="run `helios-deploy quantize ARTIFACTS --precision fp8` first")
    return entry["graphs"][graph], "export"


def onnx_file(manifest: dict, component: str, graph: GraphSpec, precision: str = "fp32") -> str:
    """The ONNX file of ``graph`` at ``precision`` (see graph_record)."""
    return graph_record(manifest, component, graph.name, precision)[0]["file"]
