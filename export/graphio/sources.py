"""Sources: one tensor's bytes, produced on demand in blocks of rows (export/graphio/__init__.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx_ir as ir

BLOCK_BYTES = 64 << 20  # bytes of a tensor converted at once on its way to disk


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


class _HashWriter:
    def __init__(self):
        self.hash = hashlib.sha256()

    def write(self, data) -> int:
        self.hash.update(data)
        return len(data)


def digest(src: Source) -> str:
    """sha256 of a source's bytes, computed block by block."""
    writer = _HashWriter()
    src.tofile(writer)
    return writer.hash.hexdigest()
