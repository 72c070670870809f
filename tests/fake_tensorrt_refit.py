"""The refit side of the fake `tensorrt` module (tests/fake_tensorrt.py): builder flags REFIT, REFIT_IDENTICAL,
STRIP_PLAN; ``Refitter``, ``OnnxParserRefitter``, ``Weights``; an engine's serialization.

A fake plan is JSON naming the engine's weights (ONNX initializer name -> sha256 of its bytes, as the ONNX
parser names weights after the initializers; None while stripped), each weight's type and element count, the
build-time digests, its profiles and how it was built. It behaves as the binding and the headers say
(NvInferRuntime.h IRefitter, python/src/infer/pyFoundationalTypes.cpp Weights, pyCore.cpp):
- the Refitter keeps every weight it was given until ``unset_named_weights`` and reads all of them again at each
  ``refit_cuda_engine`` (weights "can be unset and released ... after refitCudaEngine returns");
- ``Weights(type, pointer, count)`` keeps nothing alive and is read at refit time (freed or reused memory gives
  other bytes); ``Weights(ndarray)`` pins the array for the Refitter's whole life (the binding's keep_alive), and
  ``pinned_peak`` records the most bytes a Refitter held at one ``refit_cuda_engine``;
- ``set_named_weights`` returns False for an unknown name, another element count or another type;
- a REFIT_IDENTICAL engine refitted with other weights than its build's is undefined behaviour: refused loudly;
- ``SerializationFlag.INCLUDE_REFIT`` exists from 10.14 only and matters only for a weight-stripping engine
  serialised with its weights (10.14.1 release notes); other refittable engines stay refittable;
- refit_cuda_engine returns False while weights are missing (a stripped engine misses all until refitted;
  ``trt.combined`` ({name: [names]}) stands for weights TensorRT combined at build time).
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from . import fake_tensorrt as F

BuilderFlag = enum.IntEnum("BuilderFlag", "FP16 WEIGHT_STREAMING TF32 REFIT REFIT_IDENTICAL STRIP_PLAN", start=0)
SerializationFlag = enum.IntEnum("SerializationFlag", "EXCLUDE_WEIGHTS EXCLUDE_LEAN_RUNTIME INCLUDE_REFIT", start=0)
SerializationFlag_10_8 = enum.IntEnum("SerializationFlag", "EXCLUDE_WEIGHTS EXCLUDE_LEAN_RUNTIME", start=0)
TYPES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "float8_e4m3fn": "FP8", "int8": "INT8",
         "int32": "INT32", "int64": "INT64"}
SIZES = {"FLOAT": 4, "HALF": 2, "BF16": 2, "FP8": 1, "INT8": 1, "INT32": 4, "INT64": 8}


def onnx_weights(path) -> dict[str, np.ndarray]:
    """The initializers of an ONNX file (external data read)."""
    model = onnx.load(str(path), load_external_data=True)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


class FakeRefitTensorRT(F.FakeTensorRT):
    def __init__(self, graph, strip_plan: bool = True, **options):
        super().__init__(graph, **options)
        flags = BuilderFlag if strip_plan else enum.IntEnum("BuilderFlag", "FP16 WEIGHT_STREAMING TF32 REFIT", start=0)
        self.BuilderFlag = flags
        self.SerializationFlag = SerializationFlag if F._version(self.__version__) >= (10, 14) \
            else SerializationFlag_10_8
        self.OnnxParser = lambda network, logger: _Parser(self, network)
        self.Builder = lambda logger: _Builder(self)
        self.Runtime = lambda logger: _Runtime(self)
        self.Refitter = lambda engine, logger: FakeRefitter(self, engine)
        self.OnnxParserRefitter = lambda refitter, logger: FakeParserRefitter(self, refitter)
        self.Weights = FakeWeights
        self.pinned_peak = 0  # most bytes one Refitter held (pinned or pointed at) at a refit_cuda_engine
        self.refit_reads: list[int] = []  # weights read by each refit_cuda_engine


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
        arrays = onnx_weights(network.onnx_path)
        build = {n: digest(a) for n, a in arrays.items()}
        plan = {"weights": {n: (None if stripped else d) for n, d in build.items()}, "build": build,
                "meta": {n: [TYPES[a.dtype.name], int(a.size)] for n, a in arrays.items()},
                "refittable": bool(flags & {"REFIT", "REFIT_IDENTICAL"}), "identical": "REFIT_IDENTICAL" in flags,
                "stripped": stripped, "strip_plan": stripped, "profiles": F.profile_json(config)}
        return F.FakeHostMemory(self.trt, json.dumps(plan, sort_keys=True).encode())


class _Engine(F.FakeEngine):
    """A FakeEngine that knows its weights (digests; None in a stripped plan) and can be serialized again."""

    _state = F.FakeEngine._state | {"plan"}

    weights = property(lambda self: self.plan["weights"])
    refittable = property(lambda self: self.plan["refittable"])
    stripped = property(lambda self: self.plan["stripped"])

    def create_serialization_config(self):
        return _SerializationConfig()

    def serialize_with_config(self, config):
        return _serialize(self.trt, self, config)

    def serialize(self):
        return _serialize(self.trt, self, _SerializationConfig())


class _Runtime(F.FakeRuntime):
    def deserialize_cuda_engine(self, data):
        engine = super().deserialize_cuda_engine(data)
        object.__setattr__(engine, "__class__", _Engine)  # the base fake builds a plain FakeEngine
        engine.plan = json.loads(bytes(data))
        self.trt.calls.append((engine.label, "deserialized_from", type(data).__name__))
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
    names = {f.name for f in config.flags}
    trt.calls.append((engine.label, "serialize_with_config", sorted(names)))
    strip = "EXCLUDE_WEIGHTS" in names
    plan = dict(engine.plan, weights={n: (None if strip else w) for n, w in engine.weights.items()}, stripped=strip)
    if engine.plan["strip_plan"] and not strip and "INCLUDE_REFIT" not in names:
        plan["refittable"] = False  # a weight-stripping engine serialised with its weights (10.14.1 notes)
    return F.FakeHostMemory(trt, json.dumps(plan, sort_keys=True).encode())


class FakeWeights:
    """trt.Weights. Over an ndarray it pins the array (the binding keeps it alive); ``Weights(type, ptr, count)``
    keeps nothing alive: its memory is read when the Refitter reads it (refit_cuda_engine)."""

    def __init__(self, array, ptr: int | None = None, count: int | None = None):
        if ptr is not None:  # Weights(type, ptr, count)
            self.type, self.ptr, self.size, self.pinned = array.name, ptr, count, None
            return
        if array.dtype.name not in ("float32", "float16", "int8", "int32", "int64"):
            raise TypeError(f"Weights(ndarray) does not take a {array.dtype.name} array")
        self.type, self.size, self.pinned = TYPES[array.dtype.name], array.size, np.ascontiguousarray(array)

    @property
    def nbytes(self) -> int:
        return self.size * SIZES[self.type]

    def read(self) -> str:
        """The digest of the bytes as they are now (what TensorRT uploads)."""
        if self.pinned is not None:
            return digest(self.pinned)
        return hashlib.sha256(ctypes.string_at(self.ptr, self.nbytes)).hexdigest()

    @classmethod
    def internal(cls, array: np.ndarray) -> "FakeWeights":
        """Weights the ONNX parser refitter hands over itself (any dtype; it keeps the array)."""
        w = cls.__new__(cls)
        w.type, w.size, w.pinned, w.ptr = TYPES[array.dtype.name], array.size, np.ascontiguousarray(array), None
        return w


class FakeRefitter(F._Obj):
    _state = F._Obj._state | {"engine", "held", "filled"}

    def __init__(self, trt, engine):
        super().__init__(trt, "refitter")
        if not engine.refittable:
            raise AssertionError("Refitter on an engine built without REFIT / REFIT_IDENTICAL")
        self.engine, self.held = engine, {}
        self.filled = not engine.stripped

    def get_all_weights(self) -> list[str]:
        return list(self.engine.weights)

    def set_named_weights(self, name: str, weights: FakeWeights) -> bool:
        self._call("set_named_weights", name)
        meta = self.engine.plan["meta"].get(name)
        if meta is None or weights.size != meta[1] or weights.type != meta[0]:
            return False  # unknown name, other count or other type
        self.held[name] = weights
        return True

    def unset_named_weights(self, name: str) -> bool:
        self._call("unset_named_weights", name)
        return self.held.pop(name, None) is not None

    def get_missing_weights(self) -> list[str]:
        """A stripped engine misses every weight until refitted; weights combined with a set one (``trt.combined``,
        which may chain) are missing until they are set too."""
        if not self.filled:
            return [n for n in self.engine.weights if n not in self.held]
        combined = getattr(self.trt, "combined", {})
        return sorted({o for n in self.held for o in combined.get(n, ()) if o not in self.held})

    def refit_cuda_engine(self) -> bool:
        self._call("refit_cuda_engine", len(self.held))
        if self.get_missing_weights():
            return False
        self.trt.pinned_peak = max(self.trt.pinned_peak, sum(w.nbytes for w in self.held.values()))
        self.trt.refit_reads.append(len(self.held))
        for name, w in self.held.items():  # every weight it holds is read again
            got = w.read()
            if self.engine.plan["identical"] and got != self.engine.plan["build"][name]:
                raise AssertionError(f"REFIT_IDENTICAL engine refitted with other weights than its build's ({name}): "
                                     "undefined behaviour (NvInfer.h BuilderFlag::kREFIT_IDENTICAL)")
            self.engine.weights[name] = got
        self.filled = True
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
