"""The component calls one prompt makes, with the shapes of their inputs and outputs.

Per prompt the text encoder runs once. Per 33-frame chunk (9 latent frames) the pyramid samplers (Mid,
Distilled) call the transformer ``steps[s]`` times at stage s, Base ``steps[0]`` times at the full size; a
guided step (Base, Mid with guidance) is one call at batch 2 (conditional and unconditional branches), an
unguided one a call at batch 1. The VAE decodes the chunk's 9 latents to 33 frames once. Transformer and text encoder shapes come from
the component specs (helios_deploy.model.specs), the single source of tensor names and sizes; the VAE call is
``AutoencoderKLWan.decode`` of one chunk, as the pipeline calls it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..model.specs import CHUNK_LATENT_FRAMES, shapes_at, text_encoder_spec, transformer_spec
from .configs import ModelConfigs, Workload


@dataclass(frozen=True)
class Call:
    """One kind of component call: where it runs, how often, and its tensors (name -> (shape, dtype))."""

    component: str  # transformer | text_encoder | vae_decoder
    point: str  # stage0.. | prompt | chunk
    per_chunk: int  # calls per 33-frame chunk (0: once per prompt)
    per_prompt: int  # calls per prompt that do not repeat per chunk
    inputs: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.component}/{self.point}"


def chunk_frames(configs: ModelConfigs) -> int:
    """Video frames per chunk: the first latent frame decodes to 1 frame, each further one to 4."""
    return (CHUNK_LATENT_FRAMES - 1) * int(configs.vae.get("scale_factor_temporal") or 4) + 1


def _tensors(tensors, shapes) -> dict:
    return {t.name: (tuple(shapes[t.name]), t.dtype) for t in tensors}


def transformer_calls(configs: ModelConfigs, wl: Workload) -> list[Call]:
    spec = transformer_spec(configs.transformer, [(wl.height, wl.width)], wl.text_length, wl.text_length, wl.variant)
    graph = spec.graphs[0]
    points = [p for p in graph.operating_points if p.dims["batch"] == (2 if wl.guided else 1)]
    calls = []
    for point, steps in zip(points, wl.steps):
        ins = _tensors(graph.inputs, shapes_at(graph, point.dims))
        outs = _tensors(graph.outputs, shapes_at(graph, point.dims, "outputs"))
        calls.append(Call("transformer", point.name, steps, 0, ins, outs))
    return calls


def text_encoder_call(configs: ModelConfigs, wl: Workload) -> Call:
    graph = text_encoder_spec(configs.text_encoder, wl.text_length, wl.text_length).graphs[0]
    point = graph.operating_points[0]
    return Call("text_encoder", point.name, 0, 1, _tensors(graph.inputs, shapes_at(graph, point.dims)),
                _tensors(graph.outputs, shapes_at(graph, point.dims, "outputs")))


def vae_decode_call(configs: ModelConfigs, wl: Workload) -> Call:
    s = int(configs.vae.get("scale_factor_spatial") or 8)
    z = int(configs.vae["z_dim"])
    latents = ((1, z, CHUNK_LATENT_FRAMES, wl.height // s, wl.width // s), "float32")
    video = ((1, int(configs.vae.get("out_channels") or 3), chunk_frames(configs), wl.height, wl.width), "float32")
    return Call("vae_decoder", "chunk", 1, 0, {"latents": latents}, {"video": video})


def prompt_calls(configs: ModelConfigs, wl: Workload) -> list[Call]:
    """Every kind of call, in the order the pipeline makes them."""
    return [text_encoder_call(configs, wl), *transformer_calls(configs, wl), vae_decode_call(configs, wl)]
