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

from .graph import IN_FLIGHT_BYTES, INLINE_BYTES, SOURCE, Graph, link_data, stub, stub_key
from .sources import (BLOCK_BYTES, ArraySource, FileSource, Mapped, Source, Whole, cast, digest, safetensors_source,
                      transposed)

__all__ = ["ArraySource", "BLOCK_BYTES", "FileSource", "Graph", "INLINE_BYTES", "IN_FLIGHT_BYTES", "Mapped", "SOURCE",
           "Source", "Whole", "cast", "digest", "link_data", "safetensors_source", "stub", "stub_key", "transposed"]
