"""Graphs: a weightless ModelProto plus the sources of its large initializers (export/graphio/__init__.py)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx.external_data_helper import uses_external_data

from .sources import ArraySource, FileSource, Source, cast

INLINE_BYTES = 1024  # tensors up to this size stay inside model.onnx (ONNX Runtime reads shape constants early)
IN_FLIGHT_BYTES = 256 << 20  # bytes onnx_ir may hold while writing external data
SOURCE = "helios-source:"  # external-data location prefix of a stub


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
