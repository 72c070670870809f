"""The refit side of the fake `tensorrt` module (tests/fake_tensorrt.py): builder flags REFIT, REFIT_IDENTICAL,
STRIP_PLAN; ``Refitter``, ``OnnxParserRefitter``, ``Weights``; an engine's serialization config.

A fake plan is JSON naming the engine's weights (ONNX initializer name -> sha256 of its bytes, as the ONNX
parser names weights after the initializers), whether it is refittable and whether it was stripped. The fake
refuses what the API documents as an error: set_named_weights of an unknown name or another element count
(returns False), refitting a non-refittable engine, refit_cuda_engine while weights are missing (False; a
stripped engine misses all of them until refitted), and weights whose host memory was freed before
refit_cuda_engine (TensorRT reads it then).
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import json
import weakref
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from . import fake_tensorrt as F

BuilderFlag = enum.IntEnum("BuilderFlag", "FP16 WEIGHT_STREAMING REFIT REFIT_IDENTICAL STRIP_PLAN", start=0)
SerializationFlag = enum.IntEnum("SerializationFlag", "EXCLUDE_WEIGHTS EXCLUDE_LEAN_RUNTIME INCLUDE_REFIT", start=0)


def onnx_weights(path) -> dict[str, np.ndarray]:
    """The initializers of an ONNX file (external data read)."""
    model = onnx.load(str(path), load_external_data=True)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


class FakeRefitTensorRT(F.FakeTensorRT):
    def __init__(self, graph, strip_plan: bool = True, **options):
        super().__init__(graph, **options)
        flags = BuilderFlag if strip_plan else enum.IntEnum("BuilderFlag", "FP16 WEIGHT_STREAMING REFIT", start=0)
        self.BuilderFlag, self.SerializationFlag = flags, SerializationFlag
        self.OnnxParser = lambda network, logger: _Parser(self, network)
        self.Builder = lambda logger: _Builder(self)
        self.Runtime = lambda logger: _Runtime(self)
        self.Refitter = lambda engine, logger: FakeRefitter(self, engine)
        self.OnnxParserRefitter = lambda refitter, logger: FakeParserRefitter(self, refitter)
        self.Weights = FakeWeights


class _Network(F.FakeNetwork):
    _state = F.FakeNetwork._state | {"onnx_path"}  # the fake's own record of the file it was parsed from


class _Parser(F.FakeParser):
    def parse_from_file(self, path: str) -> bool:
        self.network.onnx_path = path
        return super().parse_from_file(path)


class _Builder(F.FakeBuilder):
    def create_network(self, flags: int = 0):
        self._call("create_network", flags)
        return _Network(self.trt, flags)

    def build_serialized_network(self, network, config):
        super().build_serialized_network(network, config)
        flags = {f.name for f in config.flags}
        stripped = "STRIP_PLAN" in flags
        weights = {n: (None if stripped else digest(a)) for n, a in onnx_weights(network.onnx_path).items()}
        plan = {"weights": weights, "refittable": bool(flags & {"REFIT", "REFIT_IDENTICAL"}), "stripped": stripped}
        return F.FakeHostMemory(self.trt, json.dumps(plan, sort_keys=True).encode())


class _Engine(F.FakeEngine):
    """A FakeEngine that knows its weights (digests; None in a stripped plan) and can be serialized again."""

    _state = F.FakeEngine._state | {"weights", "refittable", "stripped"}

    def create_serialization_config(self):
        return _SerializationConfig()

    def serialize_with_config(self, config):
        return _serialize(self.trt, self, config)


class _Runtime(F.FakeRuntime):
    def deserialize_cuda_engine(self, data):
        engine = super().deserialize_cuda_engine(data)
        object.__setattr__(engine, "__class__", _Engine)  # the base fake builds a plain FakeEngine
        plan = json.loads(bytes(data))
        engine.weights, engine.refittable, engine.stripped = plan["weights"], plan["refittable"], plan["stripped"]
        return engine


class _SerializationConfig:
    def __init__(self):
        self.flags = set()

    def set_flag(self, flag) -> bool:
        self.flags.add(flag)
        return True

    def clear_flag(self, flag) -> bool:
        self.flags.discard(flag)
        return True


def _serialize(trt, engine, config):
    trt.calls.append((engine.label, "serialize_with_config", sorted(f.name for f in config.flags)))
    strip = SerializationFlag.EXCLUDE_WEIGHTS in config.flags
    weights = {n: (None if strip else w) for n, w in engine.weights.items()}
    refittable = engine.refittable and SerializationFlag.INCLUDE_REFIT in config.flags
    plan = {"weights": weights, "refittable": refittable, "stripped": strip}
    return F.FakeHostMemory(trt, json.dumps(plan, sort_keys=True).encode())


class FakeWeights:
    """trt.Weights over a numpy array: a pointer, not a copy (the array must outlive refit_cuda_engine)."""

    def __init__(self, array, ptr: int | None = None, count: int | None = None):
        if ptr is not None:  # Weights(type, ptr, count): the types numpy lacks (BF16, FP8), by their element size
            size = {F.DataType.BF16: 2, F.DataType.FP8: 1}[array]
            self.array, self.size = (lambda: True), count
            self.digest = hashlib.sha256(ctypes.string_at(ptr, size * count)).hexdigest()
            return
        if array.dtype.name in ("bfloat16", "float8_e4m3fn"):
            raise TypeError(f"Weights(ndarray) does not take a {array.dtype.name} array")
        self.array, self.size = weakref.ref(array), array.size
        self.digest = digest(array)

    @classmethod
    def internal(cls, array: np.ndarray) -> "FakeWeights":
        """Weights the ONNX parser refitter hands over itself (any dtype; it keeps the array)."""
        w = cls.__new__(cls)
        w.array, w.size, w.digest = (lambda: array), array.size, digest(array)
        return w


class FakeRefitter(F._Obj):
    _state = F._Obj._state | {"engine", "pending", "filled"}

    def __init__(self, trt, engine):
        super().__init__(trt, "refitter")
        if not engine.refittable:
            raise AssertionError("Refitter on an engine built without REFIT / REFIT_IDENTICAL")
        self.engine, self.pending = engine, {}
        self.filled = not engine.stripped

    def get_all_weights(self) -> list[str]:
        return list(self.engine.weights)

    def set_named_weights(self, name: str, weights: FakeWeights) -> bool:
        self._call("set_named_weights", name)
        if name not in self.engine.weights:
            return False
        self.pending[name] = weights
        return True

    def get_missing_weights(self) -> list[str]:
        """A stripped engine misses every weight until refitted; ``trt.combined`` ({name: [names]}) stands for
        weights TensorRT combined at build time: setting one makes the others missing until they are set."""
        if not self.filled:
            return [n for n in self.engine.weights if n not in self.pending]
        combined = getattr(self.trt, "combined", {})
        return sorted({o for n in self.pending for o in combined.get(n, ()) if o not in self.pending})

    def refit_cuda_engine(self) -> bool:
        self._call("refit_cuda_engine", len(self.pending))
        if self.get_missing_weights():
            return False
        for name, w in self.pending.items():
            if w.array() is None:
                raise AssertionError(f"the host memory of weight {name} was freed before refit_cuda_engine")
            self.engine.weights[name] = w.digest
        self.pending, self.filled = {}, True
        return True


class FakeParserRefitter(F._Obj):
    _state = F._Obj._state | {"refitter", "_arrays"}
    _api = frozenset({"num_errors"})

    def __init__(self, trt, refitter: FakeRefitter):
        super().__init__(trt, "parser_refitter")
        self.refitter, self.num_errors, self._arrays = refitter, 0, {}

    def refit_from_file(self, path: str) -> bool:
        self._call("refit_from_file", Path(path).name)
        self._arrays = onnx_weights(path)  # the parser keeps the weights it hands over
        return all(self.refitter.set_named_weights(n, FakeWeights.internal(a)) for n, a in self._arrays.items()
                   if n in self.refitter.engine.weights)

    def get_error(self, i):
        raise IndexError(i)
