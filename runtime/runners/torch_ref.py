"""PyTorch runner over the reference modules (diffusers / transformers), with exactly the I/O of the
exported graphs: how users bisect a parity problem (e.g. `--backend transformer=torch`). The runtime
imports diffusers only through this runner, only when it is chosen."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ...errors import UserError
from ...model.specs import GraphSpec
from .base import Runner


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, manifest: dict, graph: GraphSpec, component: str, device: str):
        super().__init__(graph, component, device)
        self.manifest = manifest
        recorded = manifest["checkpoint"]
        self.checkpoint = checkpoint = Path(recorded["path"])
        if not checkpoint.is_dir() and not recorded.get("hub"):
            raise UserError(f"the torch backend needs the checkpoint the artifacts came from: {checkpoint} is missing",
                            fix="restore the checkpoint there, or use another backend")

    def _activate_impl(self) -> None:
        from ...artifacts import Artifacts
        from ...checkpoints.checkpoint import Checkpoint
        from ...export.exporter.modules import build_module, graph_module

        # its folder, or (exported from a Hub id, folder gone) the Hub id at the commit the export resolved
        ckpt = Checkpoint.from_record(self.manifest["checkpoint"])
        self.checkpoint = ckpt.path
        Artifacts(ckpt.path, self.manifest).check_checkpoint(ckpt.identity)  # same weights as exported
        module = build_module(ckpt, self.component).to(self.device)
        self.module = graph_module(module, self.component, self.graph).eval()

    def _infer_impl(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            out = self.module(*[feeds[t.name] for t in self.graph.inputs])
        outs = out if isinstance(out, tuple) else (out,)
        return {t.name: o for t, o in zip(self.graph.outputs, outs)}

    def _deactivate_impl(self) -> None:
        del self.module
