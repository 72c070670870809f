"""A recording fake of the torch.cuda calls the TensorRT runner makes (its ``TorchCuda``), on CPU tensors: the
"device" tensors are the ones allocated here (TensorRT may be given their addresses), streams and devices are
bookkeeping only. Calls go to the fake tensorrt module's log (tests/fake_tensorrt.py), so one log shows the
order of stream and TensorRT calls."""

from __future__ import annotations

import contextlib
import itertools

import torch


class FakeStream:
    def __init__(self, cuda, handle: int, device: int):
        self.cuda, self.handle, self.device = cuda, handle, device

    cuda_stream = property(lambda self: self.handle)

    def wait_stream(self, other):
        self.cuda.trt.calls.append(("stream", "wait_stream", self.handle, other.handle))

    def synchronize(self):
        self.cuda.trt.calls.append(("stream", "synchronize", self.handle))


class FakeGraph:
    def __init__(self, cuda):
        self.cuda, self.kernels = cuda, []

    def replay(self):
        self.cuda.trt.calls.append(("graph", "replay", len(self.kernels)))
        for kernel in self.kernels:
            kernel()


class FakeCuda:
    """The runner's ``TorchCuda`` on CPU tensors: "device" tensors are the ones allocated here."""

    def __init__(self, trt, devices: int = 2):
        self.trt, trt.cuda = trt, self
        self.current_device_index = 0
        self.handles = itertools.count(1)
        self.current = {i: FakeStream(self, 0, i) for i in range(devices)}  # the legacy default streams
        self.tensors: dict[int, torch.Tensor] = {}
        self.capturing = None
        self.last_error: str | None = None  # the CUDA runtime's sticky-until-read last error

    def available(self) -> bool:
        return True

    def current_device(self) -> int:
        return self.current_device_index

    @contextlib.contextmanager
    def device(self, device):
        before, self.current_device_index = self.current_device_index, torch.device(device).index
        try:
            yield
        finally:
            self.current_device_index = before

    def current_stream(self, device):
        return self.current[torch.device(device).index]

    def new_stream(self, device):
        stream = FakeStream(self, next(self.handles), torch.device(device).index)
        self.trt.calls.append(("cuda", "new_stream", stream.handle, self.current_device_index))
        return stream

    @contextlib.contextmanager
    def use_stream(self, stream):
        before, self.current[stream.device] = self.current[stream.device], stream
        try:
            yield
        finally:
            self.current[stream.device] = before

    def new_graph(self):
        return FakeGraph(self)

    @contextlib.contextmanager
    def capture(self, graph, stream):
        """Like torch.cuda.graph: a capture something invalidated raises when it ends (and the graph is unusable:
        replaying it raises)."""
        if stream.handle == 0:
            raise RuntimeError("CUDA graphs cannot be captured on the legacy default stream")
        self.trt.calls.append(("cuda", "capture", stream.handle))
        self.capturing = (graph, stream.handle)
        try:
            yield
        finally:
            self.capturing = None
        if self.last_error is not None:
            graph.kernels = [self._broken]
            raise RuntimeError(f"CUDA error: {self.last_error} (capture_end)")

    def _broken(self):
        raise AssertionError("a CUDA graph whose capture failed was replayed")

    def invalidate_capture(self, error: str) -> None:
        self.last_error = error

    def clear_error(self) -> str:
        error, self.last_error = self.last_error, None
        self.trt.calls.append(("cuda", "clear_error", error))
        return str(error)

    def empty(self, shape, dtype, device):
        return self.register(torch.empty(shape, dtype=dtype))

    def register(self, x: torch.Tensor) -> torch.Tensor:
        """Make ``x`` a "device" tensor (TensorRT may be given its address)."""
        if x.numel():
            self.tensors[x.data_ptr()] = x
        return x

    def tensor_at(self, ptr: int) -> torch.Tensor:
        assert ptr in self.tensors, f"address {ptr:#x} is not a device tensor"
        return self.tensors[ptr]

    def on(self, x, device) -> bool:
        return self.tensors.get(x.data_ptr()) is x

    def to(self, x, device):
        return self.register(x.clone())

    def record_stream(self, x, stream):
        self.trt.calls.append(("cuda", "record_stream", x.data_ptr(), stream.handle))
