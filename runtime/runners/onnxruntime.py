"""ONNX Runtime runner: CPU, or CUDA with I/O binding so tensors stay on the GPU between steps."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ...errors import UserError
from ...model.specs import GraphSpec, resolve_shape, bind_symbols
from .base import Runner

_NP = {"float32": np.float32, "int64": np.int64, "uint8": np.uint8}
_TORCH = {"float32": torch.float32, "int64": torch.int64, "uint8": torch.uint8}


def require_cuda() -> None:
    """One clear message, before any work, where ONNX Runtime on CUDA is asked for on a host without it."""
    import onnxruntime as ort

    if not torch.cuda.is_available():
        raise UserError("no CUDA device is visible to torch on this host",
                        fix="run on a GPU host, or pass --device cpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise UserError("ONNX Runtime has no CUDA execution provider here",
                        fix="install onnxruntime-gpu, or pass --device cpu")


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"
    execution_order = "DEFAULT"  # ort.ExecutionOrder's name (export/transforms/calibration.py's RangeRunner: PRIORITY_BASED)

    def __init__(self, path: Path, graph: GraphSpec, component: str, device: str, prepack: bool = True):
        super().__init__(graph, component, device)
        self.path, self.prepack = Path(path), prepack
        if not self.path.is_file():
            raise UserError(f"missing ONNX graph {self.path}", fix="re-run the export for this component")

    def _activate_impl(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.execution_order = getattr(ort.ExecutionOrder, self.execution_order)
        # ORT's intra-op threads spin after each run by default; between our calls the host work (torch
        # ops of the sampler) then competes with spinning threads for the same cores (measured on 2 cores:
        # 23.7 ms of host time per chunk with spinning, see the bench note)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not self.prepack:
            # ONNX Runtime's CPU MatMul repacks each weight into a second buffer (faster GEMMs, but the weights
            # are then twice in memory while the session starts); off, a session holds one copy of the weights
            # (measured on a real-width block: peak 2.76 GB instead of 3.17 GB for 2.43 GB of weights)
            opts.add_session_config_entry("session.disable_prepacking", "1")
        if self.device.type == "cuda":
            require_cuda()
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        self.output_names = [t.name for t in self.graph.outputs]

    def _infer_impl(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type == "cuda":
            return self._infer_cuda(feeds)
        arrays = {k: v.detach().contiguous().numpy() for k, v in feeds.items()}
        outs = self.session.run(self.output_names, arrays)
        return {n: torch.from_numpy(o) for n, o in zip(self.output_names, outs)}

    def _infer_cuda(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bind torch CUDA tensors by address (feeds elsewhere are copied to the device first: small
        host tensors such as the timestep); outputs are allocated from the spec's shapes."""
        dims = bind_symbols(self.graph, {k: v.shape for k, v in feeds.items()})
        binding = self.session.io_binding()
        index = self.device.index or 0
        for t in self.graph.inputs:
            x = feeds[t.name].to(self.device).contiguous()
            binding.bind_input(t.name, "cuda", index, _NP[t.dtype], tuple(x.shape), x.data_ptr())
        outs = {}
        for t in self.graph.outputs:
            y = torch.empty(resolve_shape(t, dims), dtype=_TORCH[t.dtype], device=self.device)
            binding.bind_output(t.name, "cuda", index, _NP[t.dtype], tuple(y.shape), y.data_ptr())
            outs[t.name] = y
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return outs

    def _deactivate_impl(self) -> None:
        del self.session
