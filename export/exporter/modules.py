"""The reference modules (diffusers / transformers) built from a checkpoint's configs, and the thin
wrappers that give each exported graph the inputs and outputs its spec names.

Rotary embeddings are computed inside the transformer graph from the frame indices: the computation
is a few small elementwise ops next to attention (well under 0.1% of the FLOPs), TensorRT fuses it,
and it keeps the runtime free of a second implementation of Helios' multi-scale rotary layout (the
history patches average-pool their rotary tables, which would otherwise have to be re-derived on the
host and passed as several large tensors per stage).
"""

from __future__ import annotations

import torch

from ...checkpoints.checkpoint import Checkpoint
from ...model.specs import GraphSpec
from .vae_steps import VaeChunkDecoder, VaeFirstStep, VaeStep, cache_layout


def build_module(ckpt: Checkpoint, component: str, load_weights: bool = True):
    """The reference module for a component: loaded in float32, or with its parameters on ``meta``
    (no weights in memory; buffers real)."""
    if component in ("vae_decoder", "vae_encoder"):
        from diffusers import AutoencoderKLWan as cls
        folder = "vae"
    elif component == "transformer":
        from diffusers import HeliosTransformer3DModel as cls
        folder = "transformer"
    else:
        from transformers import UMT5EncoderModel as cls
        folder = "text_encoder"
    path = ckpt.path / folder
    if load_weights:
        return cls.from_pretrained(path, torch_dtype=torch.float32).eval()
    from accelerate import init_empty_weights

    # parameters on meta (no memory); buffers (computed in __init__, not in the checkpoint) stay real
    with init_empty_weights(include_buffers=False):
        if folder == "text_encoder":
            from transformers import UMT5Config
            return cls(UMT5Config.from_pretrained(path)).eval()
        return cls.from_config(cls.load_config(path)).eval()


class NamedInputs(torch.nn.Module):
    """Calls ``model`` with the graph's inputs as keyword arguments (names from the spec) and returns
    its first output."""

    def __init__(self, model, graph: GraphSpec, kind: str):
        super().__init__()
        self.model, self.names, self.kind = model, [t.name for t in graph.inputs], kind

    def forward(self, *tensors):
        kwargs = dict(zip(self.names, tensors))
        if self.kind == "text_encoder":
            return self.model(**kwargs).last_hidden_state
        return self.model(**kwargs, return_dict=False)[0]


def graph_module(model, component: str, graph: GraphSpec):
    """The torch module whose export is ``graph``."""
    if component == "vae_decoder" and graph.name == "model":
        return VaeChunkDecoder(model)
    if component in ("vae_decoder", "vae_encoder"):
        direction = "decode" if component == "vae_decoder" else "encode"
        layout = cache_layout(model, direction) if _on_meta(model) else cache_layout(_meta_copy(model), direction)
        cls = VaeFirstStep if graph.name == "first" else VaeStep
        return cls(model, direction, layout)
    return NamedInputs(model, graph, component)


def _on_meta(model) -> bool:
    return next(model.parameters()).device.type == "meta"


def _meta_copy(model):
    import copy
    return copy.deepcopy(model).to("meta")
