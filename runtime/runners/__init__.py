"""One runner protocol for every backend (ONNX Runtime, TensorRT, PyTorch reference)."""

from .base import Runner
from .factory import make_runner

__all__ = ["Runner", "make_runner"]
