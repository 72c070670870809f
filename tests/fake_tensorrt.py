"""A small recording fake of the `tensorrt` module (the TensorRT 10/11 Python API objects the build and the
runner use; the torch.cuda side is tests/fake_cuda.py), so CPU tests can drive the real build and runner code
and assert the call order and arguments the API requires.

Every call is appended to ``trt.calls`` as (object label, method, details). The fake refuses what the API
documentation says is an error or undefined, and computes outputs with a stand-in (every output filled with
the sum of the inputs plus the profile index), so a replayed CUDA graph can be told from a plain run:
- ``weight_streaming_budget_v2`` may only be set before the engine's first execution context;
- ``execute_async_v3`` needs every input shape and every tensor address set and, for a USER_MANAGED context,
  device memory at least ``update_device_memory_size_for_shapes()``; addresses must be tensors the fake
  allocated (device tensors);
- a CUDA graph replays the context state it captured: replaying it after any change to that context (profile,
  shapes, addresses, device memory) raises (capture on the legacy default stream raises in fake_cuda);
- ``set_timing_cache(None, ...)`` raises (pybind11 rejects None); ``create_timing_cache`` returns None for a
  truncated cache;
- like pybind11 objects, every class has a fixed set of attributes: assigning an unknown (misspelled) name
  raises AttributeError instead of creating it;
- the members TensorRT 10.1 added (``weight_streaming_budget_v2``, ``device_memory_size_v2``,
  ``get_device_memory_size_for_profile_v2``, ``streamable_weights_size``, ``set_device_memory``) exist only in a
  fake of version >= 10.1, ``EngineStat`` / ``get_engine_stat`` only from 10.14 (the runner's gate);
- ``set_optimization_profile_async`` raises RuntimeError on failure, as the binding does (it never returns
  False);
- ``BuilderFlag.TF32`` is set on a new config (TensorRT's default); ``add_optimization_profile`` returns -1 for a
  second profile of a REFIT / REFIT_IDENTICAL config while ``refit_one_profile`` is on (the documented rule, a
  switch because what a given TensorRT does is only known on a GPU); an engine the fake built has the profiles
  its config was given (so ``build --max-batch`` widens them), other engines the spec's (``max_batch`` option);
- every tracked object records its destruction (``__del__``) with the device that is current then.
It is not a simulator: kernels, streams and devices are bookkeeping only.
"""

from __future__ import annotations

import enum
import itertools
import json
import types
import weakref

import torch

from helios_deploy.export.tensorrt import engines as E
from helios_deploy.model.specs import bind_symbols, shapes_at


class DataType(enum.IntEnum):
    """Like a native enum binding: under Python 3.11+ ``str(DataType.FLOAT)`` is "0"; only ``.name`` names it."""

    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8


TensorIOMode = enum.IntEnum("TensorIOMode", "NONE INPUT OUTPUT", start=0)
ExecutionContextAllocationStrategy = enum.IntEnum("ExecutionContextAllocationStrategy",
                                                  "STATIC ON_PROFILE_CHANGE USER_MANAGED", start=0)
EngineStat = enum.IntEnum("EngineStat", "TOTAL_WEIGHTS_SIZE STRIPPED_WEIGHTS_SIZE", start=0)
BuilderFlag = enum.IntEnum("BuilderFlag", "FP16 WEIGHT_STREAMING TF32", start=0)
MemoryPoolType = enum.IntEnum("MemoryPoolType", "WORKSPACE", start=0)
NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", "EXPLICIT_BATCH STRONGLY_TYPED", start=0)
TO_TRT = {"float32": DataType.FLOAT, "int64": DataType.INT64, "uint8": DataType.UINT8}
CACHE_MAGIC = b"TC1|"


class Logger:
    WARNING = 2

    def __init__(self, severity=WARNING):
        self.severity = severity


V2_SINCE, ENGINE_STAT_SINCE = (10, 1), (10, 14)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:2])


class _Obj:
    """Tracked (``trt.alive``) and labelled; ``_call`` records a call. Attributes are fixed per class, as on a
    pybind11 object: ``_state`` names the fake's own bookkeeping, ``_api`` the writable TensorRT attributes; a
    property is set through its setter (or refused without one); any other name raises AttributeError.
    Members in ``_v2`` exist only when the fake's version is at least 10.1."""

    _state = frozenset({"trt", "label"})
    _api: frozenset = frozenset()
    _v2: frozenset = frozenset()

    def __init__(self, trt, kind: str):
        self.trt, self.label = trt, f"{kind}#{next(trt.counter)}"
        trt.alive.add(self)

    def __setattr__(self, name, value):
        if isinstance(getattr(type(self), name, None), property) or any(
                name in getattr(k, "_state", ()) or name in getattr(k, "_api", ()) for k in type(self).__mro__):
            return object.__setattr__(self, name, value)
        raise AttributeError(f"'tensorrt.{type(self).__name__}' object has no attribute '{name}'")

    def __getattribute__(self, name):
        if name in type(self)._v2 and _version(object.__getattribute__(self, "trt").__version__) < V2_SINCE:
            raise AttributeError(f"'tensorrt.{type(self).__name__}' object has no attribute '{name}' "
                                 "(TensorRT 10.1+)")
        return object.__getattribute__(self, name)

    def _call(self, method: str, *details):
        self.trt.calls.append((self.label, method, *details))

    def __del__(self):
        cuda = self.trt.cuda
        self.trt.calls.append((self.label, "__del__", cuda.current_device_index if cuda else None))


class FakeTensorRT(types.ModuleType):
    """``sys.modules["tensorrt"]`` for a test. ``graph`` is the GraphSpec every engine stands for;
    ``engine_options`` go to FakeEngine."""

    def __init__(self, graph, version: str = "10.14.1", gpu: str = "NVIDIA H100", refit_one_profile: bool = True,
                 **engine_options):
        super().__init__("tensorrt")
        self.__version__, self.gpu, self.graph, self.engine_options = version, gpu, graph, engine_options
        # IBuilderConfig::addOptimizationProfile's documentation: a refittable engine may have one profile (the
        # second returns -1). A switch, as what a given TensorRT does is settled by `make gpu-check` only.
        self.refit_one_profile = refit_one_profile
        self.calls: list[tuple] = []
        self.alive = weakref.WeakSet()
        self.counter = itertools.count()
        self.cuda = None  # tests/fake_cuda.FakeCuda, set by it
        self.engines: list = []  # weak proxies: a test never keeps an engine alive
        for e in (DataType, TensorIOMode, ExecutionContextAllocationStrategy, BuilderFlag, MemoryPoolType,
                  NetworkDefinitionCreationFlag, Logger):
            setattr(self, e.__name__, e)
        if _version(version) >= ENGINE_STAT_SINCE:
            self.EngineStat = EngineStat
        self.Builder = lambda logger: FakeBuilder(self)
        self.Runtime = lambda logger: FakeRuntime(self)
        self.OnnxParser = lambda network, logger: FakeParser(self, network)

    def named(self, method: str) -> list[tuple]:
        return [c for c in self.calls if c[1] == method]

    def alive_kinds(self) -> set[str]:
        return {o.label.split("#")[0] for o in self.alive}


# -- the build --------------------------------------------------------------------------------------------


PLAN_MAGIC = b"fake engine: "


def profile_json(config) -> list:
    return [{n: [list(x) for x in s] for n, s in p.shapes.items()} for p in config.profiles]


def plan_profiles(data) -> list | None:
    """The profiles a plan this fake built records ({name: (min, opt, max)} each), or None for other bytes."""
    raw = bytes(data[:len(PLAN_MAGIC)])
    if raw != PLAN_MAGIC:
        text = bytes(data)
        if not text.startswith(b"{"):
            return None
        profiles = json.loads(text).get("profiles")
    else:
        profiles = json.loads(bytes(data[len(PLAN_MAGIC):]))["profiles"]
    if profiles is None:
        return None
    return [{n: tuple(tuple(x) for x in s) for n, s in p.items()} for p in profiles]


class FakeHostMemory(bytearray):
    """IHostMemory: exposes the buffer protocol (tracked by identity)."""

    __hash__, __eq__ = object.__hash__, object.__eq__

    def __init__(self, trt, data: bytes):
        super().__init__(data)
        self.label = f"plan#{next(trt.counter)}"
        trt.alive.add(self)


class FakeNetwork(_Obj):
    _state = frozenset({"flags", "inputs"})

    def __init__(self, trt, flags: int):
        super().__init__(trt, "network")
        self.flags, self.inputs = flags, []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int):
        return types.SimpleNamespace(name=self.inputs[i])


class FakeParser(_Obj):
    _state = frozenset({"network", "num_errors"})

    def __init__(self, trt, network: FakeNetwork):
        super().__init__(trt, "parser")
        self.network, self.num_errors = network, 0  # keeps its network alive, as the binding does

    def parse_from_file(self, path: str) -> bool:
        import onnx

        self._call("parse_from_file", path)
        model = onnx.load(path, load_external_data=False)
        weights = {i.name for i in model.graph.initializer}
        self.network.inputs = [i.name for i in model.graph.input if i.name not in weights]
        return True


class FakeTimingCache(_Obj):
    _state = frozenset({"device", "entries"})

    def __init__(self, trt, device: str, entries: int = 0):
        super().__init__(trt, "timing_cache")
        self.device, self.entries = device, entries

    def serialize(self) -> bytes:
        return CACHE_MAGIC + f"{self.device}|{self.entries}".encode()


class FakeConfig(_Obj):
    _state = frozenset({"flags", "profiles", "pools", "cache"})
    _api = frozenset({"builder_optimization_level", "max_aux_streams", "profiling_verbosity"})

    def __init__(self, trt):
        super().__init__(trt, "config")
        self.flags, self.profiles, self.pools, self.cache = {trt.BuilderFlag.TF32}, [], {}, None  # TF32: on by default
        self.builder_optimization_level = 3

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def set_flag(self, flag):
        self._call("set_flag", flag)
        self.flags.add(flag)

    def clear_flag(self, flag):
        self._call("clear_flag", flag)
        self.flags.discard(flag)

    def add_optimization_profile(self, profile) -> int:
        refit = {f.name for f in self.flags} & {"REFIT", "REFIT_IDENTICAL"}
        if refit and self.trt.refit_one_profile and self.profiles:
            self._call("add_optimization_profile", -1)
            return -1  # the binding returns the index, -1 when refused (it does not raise)
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes):
        self._call("create_timing_cache", bytes(data))
        if not data:
            return FakeTimingCache(self.trt, self.trt.gpu)
        if not bytes(data).startswith(CACHE_MAGIC) or bytes(data).count(b"|") != 2:
            return None  # truncated or corrupt
        device, entries = bytes(data)[len(CACHE_MAGIC):].decode().split("|")
        return FakeTimingCache(self.trt, device, int(entries))

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        if cache is None:
            raise TypeError("set_timing_cache(): incompatible function arguments (cache: None)")
        self._call("set_timing_cache", cache.label, ignore_mismatch)
        if cache.device != self.trt.gpu and not ignore_mismatch:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class FakeProfile(_Obj):
    _state = frozenset({"shapes"})

    def __init__(self, trt):
        super().__init__(trt, "profile")
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class FakeBuilder(_Obj):
    def __init__(self, trt):
        super().__init__(trt, "builder")

    def create_network(self, flags: int = 0):
        self._call("create_network", flags)
        return FakeNetwork(self.trt, flags)

    def create_builder_config(self):
        return FakeConfig(self.trt)

    def create_optimization_profile(self):
        return FakeProfile(self.trt)

    def build_serialized_network(self, network, config):
        self._call("build_serialized_network", sorted(config.flags), len(config.profiles))
        if config.cache is not None:
            config.cache.entries += 1
        return FakeHostMemory(self.trt, PLAN_MAGIC + json.dumps({"profiles": profile_json(config)}).encode())


# -- the runtime ------------------------------------------------------------------------------------------


class FakeRuntime(_Obj):
    def __init__(self, trt):
        super().__init__(trt, "runtime")

    def deserialize_cuda_engine(self, data):
        device = self.trt.cuda.current_device_index if self.trt.cuda else None
        self._call("deserialize_cuda_engine", memoryview(data).nbytes, sorted(self.trt.alive_kinds()), device)
        engine = FakeEngine(self.trt, self.trt.graph, **self.trt.engine_options)
        built = plan_profiles(data)
        if built is not None:  # an engine this fake built has the profiles its config was given
            engine.profiles = built
        self.trt.engines.append(weakref.proxy(engine))
        return engine


class FakeEngine(_Obj):
    """An engine built from ``graph`` with one exact profile per operating point. It keeps weak references to
    its contexts (a context keeps its engine alive, as in the binding) and their labels."""

    _state = frozenset({"graph", "wrong_outputs", "profiles", "dtypes", "memory", "total_weights", "streamable",
                        "contexts", "context_labels", "_budget", "inputs", "names", "shape_memory",
                        "uncapturable"})
    _v2 = frozenset({"weight_streaming_budget_v2", "device_memory_size_v2", "get_device_memory_size_for_profile_v2",
                     "streamable_weights_size"})

    def __init__(self, trt, graph, dtypes=None, wrong_outputs=None, memory=None, total_weights=10_000,
                 streamable=8_000, shape_memory=None, uncapturable=(), max_batch=None):
        super().__init__(trt, "engine")
        self.uncapturable = set(uncapturable)  # profiles with a layer that cannot be captured into a CUDA graph
        self.shape_memory = dict(shape_memory or {})  # profile -> what update_device_memory_size_for_shapes says
        self.graph, self.wrong_outputs = graph, dict(wrong_outputs or {})
        self.profiles = E.profiles(graph, max_batch)  # built with --max-batch: the batch axis may grow
        self.dtypes = {t.name: TO_TRT[t.dtype] for t in graph.tensors} | dict(dtypes or {})
        self.memory = list(memory or [4096 * (i + 1) for i in range(len(self.profiles))])
        self.total_weights, self.streamable, self._budget = total_weights, streamable, None
        self.contexts, self.context_labels = weakref.WeakSet(), []
        self.inputs = [t.name for t in graph.inputs]
        self.names = self.inputs + [t.name for t in graph.outputs]

    streamable_weights_size = property(lambda self: self.streamable)
    num_io_tensors = property(lambda self: len(self.names))
    num_optimization_profiles = property(lambda self: len(self.profiles))
    device_memory_size_v2 = property(lambda self: max(self.memory))

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def get_tensor_profile_shape(self, name, i):
        return [list(s) for s in self.profiles[i][name]]

    def get_device_memory_size_for_profile_v2(self, i):
        return self.memory[i]

    def get_engine_stat(self, stat):
        if _version(self.trt.__version__) < ENGINE_STAT_SINCE:
            raise AttributeError("'tensorrt.ICudaEngine' object has no attribute 'get_engine_stat'")
        assert stat == EngineStat.TOTAL_WEIGHTS_SIZE
        return self.total_weights

    @property
    def weight_streaming_budget_v2(self):
        return self._budget

    @weight_streaming_budget_v2.setter
    def weight_streaming_budget_v2(self, value):
        self._call("weight_streaming_budget_v2", value)
        if self.contexts:
            raise AssertionError("weight_streaming_budget_v2 set after an execution context was created")
        self._budget = value

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        self._call("create_execution_context", strategy)
        context = FakeContext(self.trt, self, strategy)
        self.contexts.add(context)
        self.context_labels.append(context.label)
        return context

    def output_shapes(self, shapes):
        outs = shapes_at(self.graph, bind_symbols(self.graph, shapes), "outputs")
        return {n: tuple(self.wrong_outputs.get(n, s)) for n, s in outs.items()}


class FakeContext(_Obj):
    _state = frozenset({"engine", "strategy", "profile", "shapes", "addresses", "memory", "version"})
    _api = frozenset({"debug_sync", "name", "nvtx_verbosity"})
    _v2 = frozenset({"set_device_memory"})

    def __init__(self, trt, engine: FakeEngine, strategy):
        super().__init__(trt, "context")
        self.engine, self.strategy = engine, strategy
        self.profile, self.shapes, self.addresses, self.memory, self.version = 0, {}, {}, None, 0

    def _change(self, method, *details):
        self._call(method, *details)
        self.version += 1

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self._change("set_optimization_profile_async", index, stream)
        if not 0 <= index < self.engine.num_optimization_profiles:
            raise RuntimeError("Error in set optimization profile.")  # what the binding raises; never False
        self.profile, self.shapes = index, {}  # a profile switch invalidates the input shapes
        return True

    def set_input_shape(self, name, shape) -> bool:
        self._change("set_input_shape", name, tuple(shape))
        lo, _, hi = self.engine.profiles[self.profile][name]
        if len(shape) != len(lo) or not all(a <= s <= b for s, a, b in zip(shape, lo, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        self._call("get_tensor_shape", name)
        if name in self.engine.inputs:
            return list(self.shapes.get(name, ()))
        if set(self.shapes) != set(self.engine.inputs):
            return [-1]
        return list(self.engine.output_shapes(self.shapes)[name])

    def update_device_memory_size_for_shapes(self) -> int:
        self._call("update_device_memory_size_for_shapes")
        if set(self.shapes) != set(self.engine.inputs):
            return 0  # how the call reports a failure
        return self.engine.shape_memory.get(self.profile, self.engine.memory[self.profile])

    def set_device_memory(self, ptr: int, size: int):
        self._change("set_device_memory", ptr, size)
        self.memory = (ptr, size)

    def set_tensor_address(self, name, ptr) -> bool:
        self._change("set_tensor_address", name, ptr)
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        cuda = self.trt.cuda
        captured = cuda.capturing is not None and cuda.capturing[1] == stream
        self._call("execute_async_v3", stream, cuda.current_device_index, "captured" if captured else "run")
        assert set(self.shapes) == set(self.engine.inputs), f"{self.label}: input shapes not all set"
        assert set(self.addresses) == set(self.engine.names), f"{self.label}: tensor addresses not all set"
        if self.strategy == ExecutionContextAllocationStrategy.USER_MANAGED:
            assert self.memory is not None, f"{self.label}: USER_MANAGED context without device memory"
            assert self.memory[1] >= self.engine.memory[self.profile], f"{self.label}: device memory too small"
        state = (self.version, dict(self.addresses), self.profile)
        if captured and self.profile in self.engine.uncapturable:
            cuda.invalidate_capture("cudaErrorStreamCaptureUnsupported")
            return False  # enqueue fails; the capture is invalidated
        if captured:
            cuda.capturing[0].kernels.append(lambda: self._replay(state))
        else:
            self._compute(*state[1:])
        return True

    def _replay(self, state):
        version, addresses, profile = state
        if self.version != version:
            raise AssertionError(f"CUDA graph replayed on {self.label}, changed after capture")
        self._compute(addresses, profile)

    def _compute(self, addresses, profile):
        tensors = {n: self.trt.cuda.tensor_at(p) for n, p in addresses.items()}
        value = sum(float(tensors[n].double().sum()) for n in self.engine.inputs) + profile
        for name in self.engine.names[len(self.engine.inputs):]:
            out = tensors[name]
            assert tuple(out.shape) == self.engine.output_shapes(self.shapes)[name], f"{name}: wrong buffer shape"
            out.fill_(value if out.is_floating_point() else int(value) % 256)
