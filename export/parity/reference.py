"""The reference modules (diffusers / transformers) with their weights streamed from the checkpoint, for
parity runs at any model size.

``from_pretrained`` in fp32 holds the whole model (57 GB for the 14B transformer) beside the ONNX Runtime
session being compared with it. Here the module is built on the meta device (buffers real), and each
submodule's own parameters are read from the safetensors shards just before its forward runs (bf16 -> fp32,
exact, the values ``from_pretrained(torch_dtype=float32)`` gives) and dropped again when the loaded weights
exceed a small budget, least recently used first (a module whose forward is still running is never
dropped). A transformer block is loaded, used and released; a small VAE stays loaded across its frame loop.
Embedding tables are never loaded: their forward reads only the rows of the token ids it is given.

Peak memory of a parity run is then ONNX Runtime's one copy of the graph's weights plus the budget plus one
module's weights, instead of two copies of the model.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from ...checkpoints.checkpoint import Checkpoint
from ...errors import UserError
from ..exporter.graph import weight_sources
from ..exporter.modules import build_module
from ..graphio import safetensors_source

BUDGET_BYTES = 512 << 20  # loaded weights kept between forwards (beyond the modules running right now)


class _Weights:
    """Loads and drops the direct parameters of submodules, within a byte budget (LRU)."""

    def __init__(self, ckpt: Checkpoint, component: str, keys: dict[str, str | None], budget: int):
        self.index, self.keys, self.budget = ckpt.index_for(component), keys, budget
        self.loaded: OrderedDict[int, tuple[torch.nn.Module, int]] = OrderedDict()
        self.running: dict[int, int] = {}
        self.prefixes: dict[int, str] = {}

    def source(self, name: str):
        key = self.keys.get(name)
        if key is None:
            raise UserError(f"the checkpoint has no weight for parameter {name}",
                            fix="the checkpoint is partial or from another model: re-download it")
        return safetensors_source(self.index.folder / self.index.weight_map[key], key)

    def load(self, module: torch.nn.Module) -> None:
        ident = id(module)
        self.running[ident] = self.running.get(ident, 0) + 1
        if ident in self.loaded:
            self.loaded.move_to_end(ident)
            return
        size = 0
        for local, param in list(module._parameters.items()):
            if param is None:
                continue
            array = self.source(self.prefixes[ident] + local).numpy()
            value = torch.from_numpy(np.ascontiguousarray(array.astype(np.float32)) if array.dtype != np.float32
                                     else np.ascontiguousarray(array))
            module._parameters[local] = torch.nn.Parameter(value.reshape(param.shape), requires_grad=False)
            size += value.numel() * 4
        self.loaded[ident] = (module, size)

    def done(self, module: torch.nn.Module) -> None:
        ident = id(module)
        self.running[ident] -= 1
        total = sum(size for _, size in self.loaded.values())
        for other in list(self.loaded):
            if total <= self.budget:
                break
            if self.running.get(other, 0) > 0:
                continue
            mod, size = self.loaded.pop(other)
            for local, param in list(mod._parameters.items()):
                if param is not None:
                    mod._parameters[local] = torch.nn.Parameter(torch.empty(param.shape, device="meta"),
                                                                requires_grad=False)
            total -= size


def _embedding_forward(weights: _Weights, name: str, module: torch.nn.Embedding):
    """nn.Embedding's forward reading only the rows it needs (F.embedding without max_norm is W[ids])."""
    if module.max_norm is not None:
        raise NotImplementedError(f"{name}: embedding with max_norm")

    def forward(ids: torch.Tensor) -> torch.Tensor:
        src = weights.source(name + ".weight")
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        rows = torch.from_numpy(src.rows(unique.tolist()).astype(np.float32))
        return rows[inverse].reshape(*ids.shape, rows.shape[-1])

    return forward


def reference_module(ckpt: Checkpoint, component: str, budget: int = BUDGET_BYTES) -> torch.nn.Module:
    """The component's reference module (float32, eval) whose weights are read from the checkpoint as its
    submodules run (module docstring)."""
    module = build_module(ckpt, component, load_weights=False)
    keys, _ = weight_sources(ckpt, component, module)
    weights = _Weights(ckpt, component, keys, budget)
    for name, sub in module.named_modules(remove_duplicate=True):
        prefix = f"{name}." if name else ""
        if isinstance(sub, torch.nn.Embedding):
            sub.forward = _embedding_forward(weights, name, sub)
            continue
        if not any(p is not None for p in sub._parameters.values()):
            continue
        weights.prefixes[id(sub)] = prefix
        sub.register_forward_pre_hook(lambda m, args: weights.load(m))
        sub.register_forward_hook(lambda m, args, out: weights.done(m))
    module.helios_streamed_weights = weights  # kept alive with the module (and inspectable in tests)
    return module.eval()
