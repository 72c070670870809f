"""Reading, rewriting and writing ONNX graphs whose weights live in external data, one tensor at a time.

Every graph operation of helios-deploy (the export's weight binding, naming/folding/splitting for the
quantizer, FP8 Q/DQ, bf16 lowering, the VAE chunk composition, the calibration graph) works on a ``Graph``:

- ``proto``: the ModelProto *without weights*. Every initializer above ``INLINE_BYTES`` is a stub: its name,
  dtype and dims, and an external-data location ``helios-source:<key>`` naming where its bytes come from. It
  is a few hundred KB even for the 14B transformer, so onnx tools (shape inference, the checker, Model
  Optimizer's AutoCast) can read and rewrite it; the 2 GB protobuf limit never applies.
- ``sources``: key -> ``Source``, an object that produces one tensor's bytes on demand, in blocks of rows:
  a range of an existing external data file, a tensor of a safetensors shard, or a function of another
  source (transposed, cast, quantized to FP8).

``Graph.save`` writes the graph and streams every source into the new external data file through onnx_ir
(``ir.save`` calls each tensor's ``tofile``), so memory holds one block of one tensor at a time (a whole
tensor only where a transform needs it whole, e.g. a transpose), whatever the model's size. A stub whose
dtype differs from its source's (bf16 lowering changes the type of an initializer, not its bytes) is
written as that source cast to the stub's dtype.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import onnx_ir as ir
from onnx.external_data_helper import uses_external_data

INLINE_BYTES = 1024  # tensors up to this size stay inside model.onnx (ONNX Runtime reads shape constants early)
BLOCK_BYTES = 64 << 20  # bytes of a tensor converted at once on its way to disk
IN_FLIGHT_BYTES = 256 << 20  # bytes onnx_ir may hold while writing external data
SOURCE = "helios-source:"  # external-data location prefix of a stub


# ---------------------------------------------------------------------------------------------------
# Sources: one tensor's bytes, on demand


class Source(ir.LazyTensor):
    """One tensor, produced in blocks of rows (C order, the tensor's dtype) by ``blocks()``.

    ``tofile`` (what ``ir.save`` calls) writes block by block; ``numpy()`` materialises the whole tensor
    (for transforms that need it whole, one tensor at a time). A lazy tensor of onnx_ir, so it can be an
    initializer's value in an ``ir.Model``."""

    def __init__(self, dtype: ir.DataType, shape, name: str | None = None):
        super().__init__(lambda: ir.Tensor(self.numpy(), name=self.name), dtype=ir.DataType(dtype),
                         shape=ir.Shape(tuple(int(d) for d in shape)), name=name)

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(self._shape.numpy())

    def rows_per_block(self) -> int:
        dims = self.dims
        if not dims or dims[0] == 0:
            return 1
        row = max(1, self.nbytes // dims[0])
        return max(1, BLOCK_BYTES // row)

    def blocks(self) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def numpy(self) -> np.ndarray:
        dims = self.dims
        if not dims:
            return next(iter(self.blocks())).reshape(())
        out = np.empty(dims, dtype=self.dtype.numpy())
        start = 0
        for block in self.blocks():
            out[start:start + block.shape[0]] = block
            start += block.shape[0]
        if start != dims[0]:
            raise RuntimeError(f"source {self.name or self!r} produced {start} rows, expected {dims[0]}")
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)

    def __dlpack__(self, *, stream=None):
        raise NotImplementedError("a Source has no device memory; call numpy()")

    def __dlpack_device__(self):
        raise NotImplementedError("a Source has no device memory; call numpy()")

    def tobytes(self) -> bytes:
        return b"".join(np.ascontiguousarray(b).tobytes() for b in self.blocks())

    def tofile(self, file) -> None:
        written = 0
        for block in self.blocks():
            data = np.ascontiguousarray(block).view(np.uint8)
            file.write(memoryview(data.reshape(-1)))
            written += data.size
        if written != self.nbytes:
            raise RuntimeError(f"source {self.name or self!r} wrote {written} bytes, expected {self.nbytes}")


class FileSource(Source):
    """A tensor stored at ``offset`` in a file (an external data file), read with plain reads (no mmap, so
    nothing stays resident after a block is written)."""

    def __init__(self, path: Path, offset: int, dtype: ir.DataType, shape, name: str | None = None):
        super().__init__(dtype, shape, name)
        self.path, self.offset = Path(path), int(offset)

    def blocks(self) -> Iterator[np.ndarray]:
        dims, np_dtype = self.dims, self.dtype.numpy()
        if not dims:
            yield self._read(0, 1).reshape(())
            return
        row = int(np.prod(dims[1:], dtype=np.int64))
        step = self.rows_per_block()
        with open(self.path, "rb") as f:
            for start in range(0, dims[0], step):
                rows = min(step, dims[0] - start)
                f.seek(self.offset + start * row * np_dtype.itemsize)
                buf = np.empty(rows * row * np_dtype.itemsize, dtype=np.uint8)
                if f.readinto(memoryview(buf)) != buf.size:
                    raise EOFError(f"{self.path} ends inside tensor {self.name!r} (truncated external data)")
                yield buf.view(np_dtype).reshape((rows, *dims[1:]))

    def rows(self, indices) -> np.ndarray:
        """Rows ``indices`` (of axis 0) only, one read each: an embedding lookup without the table."""
        dims, np_dtype = self.dims, self.dtype.numpy()
        row = int(np.prod(dims[1:], dtype=np.int64))
        out = np.empty((len(indices), *dims[1:]), dtype=np_dtype)
        with open(self.path, "rb") as f:
            for i, r in enumerate(indices):
                if not 0 <= r < dims[0]:
                    raise IndexError(f"row {r} of {self.name!r}, which has {dims[0]}")
                f.seek(self.offset + int(r) * row * np_dtype.itemsize)
                view = out[i].reshape(-1).view(np.uint8)
                if f.readinto(memoryview(view)) != view.size:
                    raise EOFError(f"{self.path} ends inside tensor {self.name!r} (truncated)")
        return out

    def _read(self, start: int, count: int) -> np.ndarray:
        np_dtype = self.dtype.numpy()
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * np_dtype.itemsize)
            buf = f.read(count * np_dtype.itemsize)
        if len(buf) != count * np_dtype.itemsize:
            raise EOFError(f"{self.path} ends inside tensor {self.name!r} (truncated external data)")
        return np.frombuffer(buf, dtype=np_dtype).copy()


class ArraySource(Source):
    """An array already in memory (scales, zero points, small derived tensors)."""

    def __init__(self, array: np.ndarray, name: str | None = None):
        array = np.asarray(array)
        if not array.flags.c_contiguous:
            array = array.copy(order="C")
        super().__init__(ir.DataType.from_numpy(array.dtype), array.shape, name)
        self.array = array

    def blocks(self) -> Iterator[np.ndarray]:
        if self.array.ndim == 0:
            yield self.array.reshape(1)
            return
        step = self.rows_per_block()
        for start in range(0, self.array.shape[0], step):
            yield self.array[start:start + step]

    def numpy(self) -> np.ndarray:
        return self.array


class Mapped(Source):
    """``fn`` applied to each block of ``src`` (elementwise or per-row functions only): casts, FP8."""

    def __init__(self, src: Source, dtype: ir.DataType, fn: Callable[[np.ndarray], np.ndarray],
                 name: str | None = None):
        super().__init__(dtype, src.dims, name or src.name)
        self.src, self.fn = src, fn

    def rows_per_block(self) -> int:
        return self.src.rows_per_block()

    def blocks(self) -> Iterator[np.ndarray]:
        np_dtype = self.dtype.numpy()
        for block in self.src.blocks():
            out = self.fn(block)
            if out.dtype != np_dtype or out.shape != block.shape:
                raise RuntimeError(f"transform of {self.name!r} returned {out.dtype} {out.shape}, "
                                   f"expected {np_dtype} {block.shape}")
            yield out


class Whole(Source):
    """``fn`` applied to the whole of ``src`` (a transpose): one tensor in memory while it is written."""

    def __init__(self, src: Source, dtype: ir.DataType, shape, fn: Callable[[np.ndarray], np.ndarray],
                 name: str | None = None):
        super().__init__(dtype, shape, name or src.name)
        self.src, self.fn = src, fn

    def blocks(self) -> Iterator[np.ndarray]:
        out = np.ascontiguousarray(self.fn(self.src.numpy()))
        if out.shape != self.dims:
            raise RuntimeError(f"transform of {self.name!r} returned shape {out.shape}, expected {self.dims}")
        yield out.reshape((1,) if not out.shape else out.shape)


def cast(src: Source, dtype: ir.DataType) -> Source:
    """``src`` converted to ``dtype`` block by block (round to nearest even, as numpy / ml_dtypes cast)."""
    dtype = ir.DataType(dtype)
    if dtype == src.dtype:
        return src
    np_dtype = dtype.numpy()
    return Mapped(src, dtype, lambda b: b.astype(np_dtype))


def transposed(src: Source, perm) -> Source:
    perm = tuple(int(p) for p in perm) if perm else tuple(reversed(range(len(src.dims))))
    shape = tuple(src.dims[p] for p in perm)
    return Whole(src, src.dtype, shape, lambda a: a.transpose(perm))


# ---------------------------------------------------------------------------------------------------
# Graphs: a weightless proto plus sources


def stub(name: str, dtype: int, dims, key: str) -> onnx.TensorProto:
    """An initializer without bytes whose data is the source ``key``."""
    t = onnx.TensorProto(name=name, data_type=int(dtype), dims=[int(d) for d in dims])
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value=SOURCE + key)
    return t


def stub_key(tensor: onnx.TensorProto) -> str | None:
    """The source key of a stub, else None."""
    if not uses_external_data(tensor):
        return None
    location = next((e.value for e in tensor.external_data if e.key == "location"), "")
    return location[len(SOURCE):] if location.startswith(SOURCE) else None


def _external_info(tensor: onnx.TensorProto) -> tuple[str, int, int | None]:
    info = {e.key: e.value for e in tensor.external_data}
    return info["location"], int(info.get("offset", 0)), int(info["length"]) if "length" in info else None


class Graph:
    """A weightless ModelProto and the sources of its large initializers (see the module docstring)."""

    def __init__(self, proto: onnx.ModelProto, sources: dict[str, Source] | None = None):
        self.proto = proto
        self.sources: dict[str, Source] = dict(sources or {})
        self._keys = itertools.count()

    @classmethod
    def load(cls, path: str | Path) -> "Graph":
        """The graph at ``path`` without reading its weights: each external initializer becomes a stub whose
        source is its range of the data file."""
        path = Path(path)
        proto = onnx.load(str(path), load_external_data=False)
        graph = cls(proto)
        for t in proto.graph.initializer:
            if not uses_external_data(t):
                continue
            location, offset, length = _external_info(t)
            src = FileSource(path.parent / location, offset, t.data_type, t.dims, t.name)
            if length is not None and length != src.nbytes:
                raise ValueError(f"{path}: initializer {t.name} has {length} bytes of external data, its type "
                                 f"and dims need {src.nbytes}")
            key = graph.add_source(src, t.name)
            t.CopyFrom(stub(t.name, t.data_type, t.dims, key))
        return graph

    # -- sources ------------------------------------------------------------------------------------
    def add_source(self, src: Source, hint: str = "t") -> str:
        key = f"{next(self._keys)}:{hint}"
        self.sources[key] = src
        return key

    def source(self, name: str) -> Source:
        """The bytes of initializer ``name`` (a source for stubs, an array source for inline tensors)."""
        t = self.initializer(name)
        key = stub_key(t)
        if key is None:
            return ArraySource(onnx.numpy_helper.to_array(t), name)
        src = self.sources[key]
        return cast(src, t.data_type) if int(src.dtype) != t.data_type else src

    def adopt(self, tensor: onnx.TensorProto, owner: "Graph", name: str | None = None) -> onnx.TensorProto:
        """A copy of ``owner``'s initializer ``tensor`` (renamed to ``name``) whose source, for a stub, is
        registered in this graph: how initializers move between graphs without their bytes."""
        out = onnx.TensorProto()
        out.CopyFrom(tensor)
        out.name = name or tensor.name
        key = stub_key(tensor)
        if key is not None:
            out.CopyFrom(stub(out.name, tensor.data_type, tensor.dims, self.add_source(owner.sources[key], out.name)))
        return out

    def initializer(self, name: str) -> onnx.TensorProto:
        for t in self.proto.graph.initializer:
            if t.name == name:
                return t
        raise KeyError(name)

    def initializers(self) -> dict[str, onnx.TensorProto]:
        return {t.name: t for t in self.proto.graph.initializer}

    def set_initializer(self, name: str, value: Source | np.ndarray) -> onnx.TensorProto:
        """Add (or replace) initializer ``name``: inline when small, else a stub for ``value``."""
        src = value if isinstance(value, Source) else ArraySource(np.asarray(value), name)
        if src.nbytes <= INLINE_BYTES:
            t = onnx.numpy_helper.from_array(src.numpy(), name)
            if int(src.dtype) != t.data_type:  # bf16 / fp8 arrays: numpy_helper stores their raw bytes
                t = onnx.helper.make_tensor(name, int(src.dtype), src.dims, src.tobytes(), raw=True)
        else:
            t = stub(name, src.dtype, src.dims, self.add_source(src, name))
        for i, old in enumerate(self.proto.graph.initializer):
            if old.name == name:
                self.proto.graph.initializer[i].CopyFrom(t)
                return self.proto.graph.initializer[i]
        self.proto.graph.initializer.append(t)
        return self.proto.graph.initializer[-1]

    def prune_initializers(self) -> None:
        """Drop initializers no node (or graph output) reads, and sources no stub names."""
        g = self.proto.graph
        used = {v for n in g.node for v in n.input} | {o.name for o in g.output}
        keep = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)
        live = {stub_key(t) for t in keep} - {None}
        self.sources = {k: v for k, v in self.sources.items() if k in live}

    # -- writing ------------------------------------------------------------------------------------
    def resolved(self) -> dict[str, Source]:
        """Initializer name -> the source written for it (cast to the stub's dtype where they differ)."""
        out = {}
        for t in self.proto.graph.initializer:
            key = stub_key(t)
            if key is None:
                continue
            if key not in self.sources:
                raise KeyError(f"initializer {t.name} names source {key!r}, which this graph does not have")
            src = self.sources[key]
            if tuple(t.dims) != src.dims:
                raise ValueError(f"initializer {t.name} has dims {list(t.dims)}, its source {list(src.dims)}")
            out[t.name] = cast(src, t.data_type) if int(src.dtype) != t.data_type else src
        return out

    def save(self, path: str | Path) -> dict:
        """Write ``path`` and its external data ``path.name + ".data"`` (weights streamed one tensor at a
        time). Returns the byte counts of both files."""
        path = Path(path)
        resolved = self.resolved()
        model = ir.serde.deserialize_model(self.proto)  # stubs become external tensors that are never read
        for graph in (model.graph, *model.graph.subgraphs()):
            for name, value in graph.initializers.items():
                if name in resolved:
                    src = resolved[name]
                    src.name = name
                    value.const_value = src
        path.parent.mkdir(parents=True, exist_ok=True)
        data = path.name + ".data"
        ir.save(model, path, external_data=data, size_threshold_bytes=INLINE_BYTES,
                max_in_flight_bytes=IN_FLIGHT_BYTES)
        data_path = path.parent / data
        if not data_path.exists():  # a graph without large tensors still gets its (empty) data file
            data_path.touch()
        return {"file_bytes": path.stat().st_size, "data_bytes": data_path.stat().st_size}

    def save_referencing(self, path: str | Path) -> Path:
        """The proto with each stub pointing at its bytes where they already are: every source must be a
        range of a file in ``path``'s folder (link it there first: ``link_data``). For graphs that differ from
        an existing one only in small tensors (the calibration graph), so nothing large is written."""
        path = Path(path)
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        for t in proto.graph.initializer:
            key = stub_key(t)
            if key is None:
                continue
            src = self.sources[key]
            here = path.parent / src.path.name if isinstance(src, FileSource) else None
            if here is None or not here.exists() or not os.path.samefile(here, src.path) or int(src.dtype) != t.data_type:
                raise ValueError(f"initializer {t.name} is not stored in {path.parent} as it is; save() it instead")
            del t.external_data[:]
            for k, v in (("location", src.path.name), ("offset", str(src.offset)), ("length", str(src.nbytes))):
                t.external_data.add(key=k, value=v)
        onnx.save_model(proto, str(path))
        return path

    def save_weightless(self, path: str | Path) -> Path:
        """The proto alone (stubs unresolved), for tools that take a path and never read weights."""
        onnx.save_model(self.proto, str(path))
        return Path(path)


class _HashWriter:
    def __init__(self):
        import hashlib

        self.hash = hashlib.sha256()

    def write(self, data) -> int:
        self.hash.update(data)
        return len(data)


def digest(src: Source) -> str:
    """sha256 of a source's bytes, computed block by block."""
    writer = _HashWriter()
    src.tofile(writer)
    return writer.hash.hexdigest()


def link_data(src_graph: Path, dst_dir: Path) -> None:
    """Make ``src_graph``'s external data file visible under the same name in ``dst_dir`` without copying
    it (a hard link, else a symbolic link), for graphs written there that reference it."""
    data = Path(str(src_graph) + ".data")
    target = Path(dst_dir) / data.name
    if target.exists():
        return
    try:
        os.link(data, target)
    except OSError:
        os.symlink(data.resolve(), target)


_SAFETENSORS_DTYPES = {"BF16": ir.DataType.BFLOAT16, "F16": ir.DataType.FLOAT16, "F32": ir.DataType.FLOAT,
                       "F64": ir.DataType.DOUBLE, "I64": ir.DataType.INT64, "I32": ir.DataType.INT32,
                       "I16": ir.DataType.INT16, "I8": ir.DataType.INT8, "U8": ir.DataType.UINT8,
                       "BOOL": ir.DataType.BOOL, "F8_E4M3": ir.DataType.FLOAT8E4M3FN}


def safetensors_source(shard: Path, key: str, name: str | None = None) -> FileSource:
    """Tensor ``key`` of a safetensors file as it is stored, read with plain reads from its offset (the
    format: 8-byte header length, JSON header with dtype, shape and data offsets, then the data). Unlike
    reading through safetensors' memory map, the pages read do not stay resident: a 2.1 GB bf16 embedding
    table costs one block of memory, not 2.1 GB."""
    import json
    import struct

    with open(shard, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    entry = header.get(key)
    if entry is None:
        raise KeyError(f"{shard} has no tensor {key!r}")
    if entry["dtype"] not in _SAFETENSORS_DTYPES:
        raise ValueError(f"{shard}: tensor {key} has dtype {entry['dtype']}, which helios-deploy does not read")
    begin, _ = entry["data_offsets"]
    return FileSource(Path(shard), 8 + n + begin, _SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"], name or key)
