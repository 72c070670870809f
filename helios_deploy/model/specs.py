"""One declarative spec per component: the single source of truth for tensor names, dtypes, symbolic
dimensions and operating points.

Export dynamic shapes, example inputs, validation, TensorRT optimization profiles, runtime buffers and
Triton configs are all derived from these specs by small pure functions (here and in the modules that
use them). There is no second list of input names anywhere.

A dimension is an int (fixed), a symbol (``"batch"``), or a multiple of a symbol (``"latent_height*8"``).
Symbols shared between tensors tie their sizes together (as optimum's OnnxConfig does).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Sequence

from ..errors import UserError
from .sizes import Size, largest, size_name, sizes_or_one

# Fixed by the samplers (HeliosPipeline and HeliosPyramidPipeline defaults): 9 latent frames per chunk
# (33 video frames), history sizes long 16 / mid 2 / short 1 plus the first-frame prefix.
CHUNK_LATENT_FRAMES = 9
HISTORY_LONG, HISTORY_MID, HISTORY_SHORT = 16, 2, 2  # short = prefix + 1 frame
PYRAMID_STAGES = 3
MAX_BATCH = 4

_DIM = re.compile(r"^([a-z_]+)(?:\*(\d+))?$")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, int64, uint8
    dims: tuple  # int | "symbol" | "symbol*k"
    kind: str = "normal"  # how example values are drawn: normal, timestep, indices, token_ids, mask, video

    def symbols(self) -> list[str]:
        return [parse_dim(d)[0] for d in self.dims if isinstance(d, str)]


@dataclass(frozen=True)
class OperatingPoint:
    """A named, fully concrete shape assignment (for example one pyramid stage at one video size)."""

    name: str
    dims: Mapping[str, int]


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph: its tensors, the ranges of its symbols and its operating points."""

    name: str  # "model" for single-graph components; "first" / "step" for the VAE encoder
    file: str  # file name inside the component's artifact folder
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Range of every symbol: (min, max). Used for export constraints and TensorRT profiles.
    ranges: Mapping[str, tuple[int, int]]
    operating_points: tuple[OperatingPoint, ...]

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        return self.inputs + self.outputs

    def tensor(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor {name!r}")

    def symbols(self) -> list[str]:
        seen: list[str] = []
        for t in self.tensors:
            for s in t.symbols():
                if s not in seen:
                    seen.append(s)
        return seen

    def point(self, name: str) -> OperatingPoint:
        for p in self.operating_points:
            if p.name == name:
                return p
        raise KeyError(f"{self.name} has no operating point {name!r}")


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    graphs: tuple[GraphSpec, ...]
    # Component-level facts the runtime needs (for example the VAE's scale factors).
    attrs: Mapping[str, object] = field(default_factory=dict)

    def graph(self, name: str) -> GraphSpec:
        for g in self.graphs:
            if g.name == name:
                return g
        raise KeyError(f"{self.name} has no graph {name!r}")

    @property
    def operating_points(self) -> tuple[OperatingPoint, ...]:
        return self.graphs[0].operating_points


def parse_dim(dim: str) -> tuple[str, int]:
    m = _DIM.match(dim)
    if not m:
        raise ValueError(f"bad symbolic dim {dim!r}")
    return m.group(1), int(m.group(2) or 1)


def resolve_shape(tensor: TensorSpec, dims: Mapping[str, int]) -> tuple[int, ...]:
    """Concrete shape of ``tensor`` for the symbol values in ``dims``."""
    shape = []
    for d in tensor.dims:
        if isinstance(d, int):
            shape.append(d)
        else:
            sym, k = parse_dim(d)
            shape.append(dims[sym] * k)
    return tuple(shape)


def shapes_at(spec: GraphSpec, dims: Mapping[str, int], which: str = "inputs") -> dict[str, tuple[int, ...]]:
    return {t.name: resolve_shape(t, dims) for t in getattr(spec, which)}


def bind_symbols(spec: GraphSpec, shapes: Mapping[str, Iterable[int]]) -> dict[str, int]:
    """Infer symbol values from concrete input shapes, checking every fixed dim and every tie.

    Raises a UserError naming each tensor and axis that does not fit the spec.
    """
    values: dict[str, int] = {}
    problems = []
    for t in spec.inputs:
        if t.name not in shapes:
            problems.append(f"{t.name}: missing")
            continue
        shape = tuple(shapes[t.name])
        if len(shape) != len(t.dims):
            problems.append(f"{t.name}: rank {len(shape)}, expected {len(t.dims)} {list(t.dims)}")
            continue
        for axis, (size, d) in enumerate(zip(shape, t.dims)):
            if isinstance(d, int):
                if size != d:
                    problems.append(f"{t.name}[{axis}] = {size}, expected {d}")
                continue
            sym, k = parse_dim(d)
            if size % k:
                problems.append(f"{t.name}[{axis}] = {size}, expected a multiple of {k} ({d})")
                continue
            if values.setdefault(sym, size // k) != size // k:
                problems.append(f"{t.name}[{axis}] = {size} disagrees with {sym} = {values[sym]} ({d})")
    for sym, v in values.items():
        lo, hi = spec.ranges[sym]
        if not lo <= v <= hi:
            problems.append(f"{sym} = {v} outside the exported range [{lo}, {hi}]")
    if problems:
        raise UserError(
            f"inputs do not match the {spec.name} spec",
            found="; ".join(problems),
            expected=", ".join(f"{t.name}{list(t.dims)}" for t in spec.inputs),
        )
    return values


# ---------------------------------------------------------------------------------------------------
# The Helios specs, built from the checkpoint's component configs.


def size_multiple(transformer_cfg: Mapping, vae_cfg: Mapping) -> int:
    """Video height/width must be a multiple of this: VAE downsampling x two pyramid halvings x patch.

    The pipeline floors the size at each halving and doubles it back; stage 0 must also tile into
    transformer patches, so 384x640 works (384 = 6 * 64) while 96 (a multiple of 16) does not.
    """
    spatial = int(vae_cfg.get("scale_factor_spatial") or 8)
    patch_h = int(transformer_cfg["patch_size"][1])
    return spatial * (2 ** (PYRAMID_STAGES - 1)) * patch_h


def check_video_size(height: int, width: int, multiple: int) -> None:
    bad = [f"{n}={v}" for n, v in (("height", height), ("width", width)) if v <= 0 or v % multiple]
    if bad:
        raise UserError(
            f"unsupported video size {height}x{width}",
            found=", ".join(bad),
            expected=f"height and width positive multiples of {multiple} (VAE 8x, two pyramid halvings, patch 2), "
            "for example 384x640",
            fix=f"round to a multiple of {multiple}, e.g. {_round(height, multiple)}x{_round(width, multiple)}",
        )


def _round(v: int, m: int) -> int:
    return max(m, round(v / m) * m)


def sized_points(sizes: Sequence[Size], points_at) -> tuple[OperatingPoint, ...]:
    """The operating points of every size (``points_at(height, width)``), in size order. With several sizes
    each point's name says its size (``stage0@384x640``); one size keeps the plain names (``stage0``)."""
    if len(sizes) == 1:
        return tuple(points_at(*sizes[0]))
    return tuple(OperatingPoint(f"{p.name}@{size_name((h, w))}", p.dims) for h, w in sizes for p in points_at(h, w))


def frame_indices() -> dict[str, list[int]]:
    """Rotary frame indices as the pipeline sets them (keep_first_frame): prefix 0, long 1-16,
    mid 17-18, short 19 (short carries the prefix too), noisy chunk 20-28."""
    sizes = [1, HISTORY_LONG, HISTORY_MID, HISTORY_SHORT - 1, CHUNK_LATENT_FRAMES]
    idx, start = [], 0
    for n in sizes:
        idx.append(list(range(start, start + n)))
        start += n
    prefix, long, mid, short1, noisy = idx
    return {
        "indices_hidden_states": noisy,
        "indices_latents_history_short": prefix + short1,
        "indices_latents_history_mid": mid,
        "indices_latents_history_long": long,
    }


def _at_least_2(n: int) -> int:
    # an export example of 1 would make torch.export specialise the symbol, so ranges reach 2
    return max(2, n)


def transformer_points(lh: int, lw: int, text_length: int, variant: str = "distilled") -> tuple[OperatingPoint, ...]:
    """The shapes the sampler of ``variant`` calls the transformer at. Pyramid variants: the three stages
    (noisy latents at 1/4, 1/2, 1 of the latent size, counted in patches of 2); Base: the full latent
    size only. History latents are always at the full latent size, counted in units of 8 (the long
    history's patch). Guided variants (Base, Mid) call it at batch 2 (conditional and unconditional in one
    call), and at batch 1 with guidance off (``_unguided``); Distilled at batch 1."""
    fixed = {"latent_height": lh // 8, "latent_width": lw // 8, "text_length": text_length}
    if variant == "base":
        sizes = [("full", lh // 2, lw // 2)]
    else:
        sizes = [(f"stage{s}", lh // 2 ** (PYRAMID_STAGES - 1 - s) // 2, lw // 2 ** (PYRAMID_STAGES - 1 - s) // 2)
                 for s in range(PYRAMID_STAGES)]
    batches = [(2, ""), (1, "_unguided")] if variant in ("base", "mid") else [(1, "")]
    return tuple(OperatingPoint(name + suffix, {"batch": b, "stage_height": sh, "stage_width": sw, **fixed})
                 for b, suffix in batches for name, sh, sw in sizes)


def transformer_spec(cfg: Mapping, sizes: Sequence[Size], text_length: int, max_text_length: int,
                     variant: str = "distilled") -> ComponentSpec:
    """The transformer as ``variant``'s sampler calls it at every video size of ``sizes`` (its operating
    points per size; symbol ranges reaching the largest). The pyramid pipeline feeds int64 timesteps (it
    truncates them); HeliosPipeline (Base) feeds the scheduler's float timesteps, so Base's graph takes
    float32 (example values: see export/parity/compare.py)."""
    c = int(cfg["in_channels"])
    height, width = sizes[0]
    lh, lw = (v // 8 for v in largest(sizes))
    points = sized_points(sizes, lambda h, w: transformer_points(h // 8, w // 8, text_length, variant))
    timestep = (TensorSpec("timestep", "float32", ("batch",)) if variant == "base"
                else TensorSpec("timestep", "int64", ("batch",), kind="timestep"))
    hist = lambda n: ("batch", c, n, "latent_height*8", "latent_width*8")  # noqa: E731
    noisy = ("batch", c, CHUNK_LATENT_FRAMES, "stage_height*2", "stage_width*2")
    idx = frame_indices()
    graph = GraphSpec(
        name="model", file="model.onnx",
        inputs=(
            TensorSpec("hidden_states", "float32", noisy),
            timestep,
            TensorSpec("encoder_hidden_states", "float32", ("batch", "text_length", int(cfg["text_dim"]))),
            *(TensorSpec(name, "int64", ("batch", len(v)), kind="indices") for name, v in idx.items()),
            TensorSpec("latents_history_short", "float32", hist(HISTORY_SHORT)),
            TensorSpec("latents_history_mid", "float32", hist(HISTORY_MID)),
            TensorSpec("latents_history_long", "float32", hist(HISTORY_LONG)),
        ),
        outputs=(TensorSpec("noise_pred", "float32", noisy),),
        ranges={
            "batch": (1, MAX_BATCH),
            "stage_height": (1, _at_least_2(lh // 2)), "stage_width": (1, _at_least_2(lw // 2)),
            "latent_height": (1, _at_least_2(lh // 8)), "latent_width": (1, _at_least_2(lw // 8)),
            "text_length": (1, max_text_length),
        },
        operating_points=tuple(points),
    )
    return ComponentSpec("transformer", (graph,), attrs={
        "height": height, "width": width, "patch_size": list(cfg["patch_size"]), "in_channels": c,
        "text_dim": int(cfg["text_dim"]), "frame_indices": idx, "variant": variant,
    })


def text_encoder_spec(cfg: Mapping, text_length: int, max_text_length: int) -> ComponentSpec:
    graph = GraphSpec(
        name="model", file="model.onnx",
        inputs=(
            TensorSpec("input_ids", "int64", ("batch", "text_length"), kind="token_ids"),
            TensorSpec("attention_mask", "int64", ("batch", "text_length"), kind="mask"),
        ),
        outputs=(TensorSpec("last_hidden_state", "float32", ("batch", "text_length", int(cfg["d_model"]))),),
        ranges={"batch": (1, MAX_BATCH), "text_length": (1, max_text_length)},
        operating_points=(OperatingPoint("prompt", {"batch": 1, "text_length": text_length}),),
    )
    return ComponentSpec("text_encoder", (graph,), attrs={
        "vocab_size": int(cfg["vocab_size"]), "max_text_length": max_text_length, "text_length": text_length,
    })


def _vae_attrs(cfg: Mapping) -> dict:
    return {
        "z_dim": int(cfg["z_dim"]),
        "latents_mean": list(cfg["latents_mean"]),
        "latents_std": list(cfg["latents_std"]),
        "scale_factor_spatial": int(cfg.get("scale_factor_spatial") or 8),
        "scale_factor_temporal": int(cfg.get("scale_factor_temporal") or 4),
        "chunk_latent_frames": CHUNK_LATENT_FRAMES,
        "chunk_frames": (CHUNK_LATENT_FRAMES - 1) * 4 + 1,
    }


def _cache_tensors(layout: Iterable[Sequence[int]], prefix: str) -> tuple[TensorSpec, ...]:
    """Cache tensors from the VAE's layout: (channels, frames, spatial scale vs the latent size)."""
    return tuple(
        TensorSpec(f"{prefix}_{i}", "float32", ("batch", ch, frames, f"latent_height*{scale}", f"latent_width*{scale}"))
        for i, (ch, frames, scale) in enumerate(layout)
    )


def vae_step_graphs(direction: str, x_ch: int, y_ch: int, layout, sizes: Sequence[Size]) -> tuple[GraphSpec, ...]:
    """The first and step graphs of one VAE direction (see export/exporter/vae_steps.py): the encoder's graphs, and
    the pieces the decoder's chunk graph is composed of. One operating point per video size."""
    height, width = largest(sizes)
    ranges = {"batch": (1, MAX_BATCH), "latent_height": (1, _at_least_2(height // 8)),
              "latent_width": (1, _at_least_2(width // 8))}
    point = sized_points(sizes, lambda h, w: (OperatingPoint("chunk", {"batch": 1, "latent_height": h // 8,
                                                                       "latent_width": w // 8}),))
    video = lambda n: ("batch", 3, n, "latent_height*8", "latent_width*8")  # noqa: E731
    latent = lambda ch: ("batch", ch, 1, "latent_height", "latent_width")  # noqa: E731
    if direction == "decode":
        x_first, x_step, y_first, y_step = latent(x_ch), latent(x_ch), video(1), video(4)
        names = ("latents", "video")
    else:
        x_first, x_step, y_first, y_step = video(1), video(4), latent(y_ch), latent(y_ch)
        names = ("video", "moments")
    kind = "video" if direction == "encode" else "normal"
    first = GraphSpec("first", "first.onnx", (TensorSpec(names[0], "float32", x_first, kind),),
                      (TensorSpec(names[1], "float32", y_first), *_cache_tensors(layout, "cache_out")), ranges, point)
    step = GraphSpec("step", "model.onnx",
                     (TensorSpec(names[0], "float32", x_step, kind), *_cache_tensors(layout, "cache_in")),
                     (TensorSpec(names[1], "float32", y_step), *_cache_tensors(layout, "cache_out")), ranges, point)
    return first, step


def vae_decoder_spec(cfg: Mapping, sizes: Sequence[Size], layout) -> ComponentSpec:
    """One graph decoding a whole chunk: 9 latent frames -> 33 video frames, float32 in [-1, 1] as the
    reference's ``vae.decode`` and uint8 channels-last as the pipeline's output (export/transforms/vae_chunk.py)."""
    z = int(cfg["z_dim"])
    first, _ = vae_step_graphs("decode", z, 3, layout, sizes)
    frames = (CHUNK_LATENT_FRAMES - 1) * 4 + 1
    hw = ("latent_height*8", "latent_width*8")
    latents = ("batch", z, CHUNK_LATENT_FRAMES, "latent_height", "latent_width")
    chunk = GraphSpec("model", "model.onnx", (TensorSpec("latents", "float32", latents),),
                      (TensorSpec("video", "float32", ("batch", 3, frames, *hw)),
                       TensorSpec("frames", "uint8", ("batch", frames, *hw, 3))),
                      first.ranges, first.operating_points)
    return ComponentSpec("vae_decoder", (chunk,), attrs=_vae_attrs(cfg))


def vae_encoder_spec(cfg: Mapping, sizes: Sequence[Size], layout) -> ComponentSpec:
    # outputs DiagonalGaussian parameters (mean and log-variance on the channel axis), as
    # AutoencoderKLWan returns them: sampling draws random numbers, so it stays with the caller
    z = int(cfg["z_dim"])
    return ComponentSpec("vae_encoder", vae_step_graphs("encode", 3, 2 * z, layout, sizes), attrs=_vae_attrs(cfg))


COMPONENTS = ("transformer", "text_encoder", "vae_decoder", "vae_encoder")


def build_specs(configs: Mapping[str, Mapping], height: int, width: int, text_length: int, max_text_length: int,
                components: Iterable[str] = COMPONENTS, vae_layouts: Mapping[str, list] | None = None,
                variant: str = "distilled", sizes: Sequence[Size] | None = None) -> dict[str, ComponentSpec]:
    """Specs for the requested components of a checkpoint whose configs are ``configs`` (by folder), at
    ``sizes`` (several video sizes from one set of graphs; default the one ``height`` x ``width``).

    ``vae_layouts`` gives the VAE cache layout per direction ("decode", "encode"), learned from the
    VAE module by the exporter (export/exporter/vae_steps.py); ``variant`` (helios_deploy.model.variants) decides
    the transformer's operating points and timestep type.
    """
    sizes = sizes_or_one(height, width, sizes)
    for h, w in sizes:
        check_video_size(h, w, size_multiple(configs["transformer"], configs["vae"]))
    if not 1 <= text_length <= max_text_length:
        raise UserError(
            f"text length {text_length} is outside 1..{max_text_length}",
            fix="pass --text-length no larger than --max-text-length",
        )
    layouts = vae_layouts or {}
    builders = {
        "transformer": lambda: transformer_spec(configs["transformer"], sizes, text_length, max_text_length, variant),
        "text_encoder": lambda: text_encoder_spec(configs["text_encoder"], text_length, max_text_length),
        "vae_decoder": lambda: vae_decoder_spec(configs["vae"], sizes, layouts["decode"]),
        "vae_encoder": lambda: vae_encoder_spec(configs["vae"], sizes, layouts["encode"]),
    }
    return {name: builders[name]() for name in components}


def spec_to_json(spec: ComponentSpec) -> dict:
    return json.loads(json.dumps(asdict(spec)))


def _graph_from_json(d: Mapping) -> GraphSpec:
    tensors = lambda key: tuple(TensorSpec(t["name"], t["dtype"], tuple(t["dims"]), t.get("kind", "normal")) for t in d[key])  # noqa: E731
    return GraphSpec(
        name=d["name"], file=d["file"], inputs=tensors("inputs"), outputs=tensors("outputs"),
        ranges={k: tuple(v) for k, v in d["ranges"].items()},
        operating_points=tuple(OperatingPoint(p["name"], dict(p["dims"])) for p in d["operating_points"]),
    )


def spec_from_json(d: Mapping) -> ComponentSpec:
    return ComponentSpec(d["name"], tuple(_graph_from_json(g) for g in d["graphs"]), dict(d.get("attrs", {})))
