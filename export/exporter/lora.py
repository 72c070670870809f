"""LoRA adapters fused into the exported weights, one tensor (one block of rows) at a time.

An adapter file is read the way diffusers reads it for Helios (``HeliosLoraLoaderMixin.lora_state_dict``:
the diffusers/PEFT layout written by ``save_lora_weights``, and the Wan-style ``diffusion_model.*`` /
``lora_unet_*`` layouts it converts), and its LoraConfig is the one ``load_lora_adapter`` would build
(diffusers' ``_create_lora_config``: safetensors metadata, else ranks from the tensors). Per targeted Linear
layer, exactly as PEFT merges it (``LoraLayer.merge`` after diffusers' ``set_adapters``/``fuse_lora``):

    W' = W + (B @ A) * scaling,   scaling = scale * alpha / r   (alpha / sqrt(r) with rslora)
    b' = b + lora_B.bias * scaling                              (adapters with lora_bias / Wan ``diff_b``)

in float32 (the exported graph's dtype, and the dtype of the fp32 reference PEFT merges into). Several
adapters are added in the order given. The adapter itself (rank-r matrices) is held in memory; the model's
weights are streamed: ``fused`` wraps a weight's source so each block of rows is fused as it is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx_ir as ir

from ...errors import UserError
from ...fsutil import sha256_file
from ..graphio import Source

# The components an adapter may target, by key prefix: the transformer (what diffusers' Helios loader loads) and
# the text encoder (UMT5; loaded the way diffusers loads a transformers text encoder's adapter, through PEFT).
PREFIXES = {"transformer": "transformer.", "text_encoder": "text_encoder."}
_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")


@dataclass(frozen=True)
class Adapter:
    """One adapter file and the scale it is fused with (``fuse_lora(lora_scale=...)``)."""

    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, value: str) -> "Adapter":
        """``FILE`` or ``FILE:SCALE`` (as the CLI's --lora takes it)."""
        path, scale = value, 1.0
        head, sep, tail = value.rpartition(":")
        if sep and head:
            try:
                path, scale = head, float(tail)
            except ValueError:
                path = value
        if not math.isfinite(scale):
            raise UserError(f"--lora {value}: the scale is not a finite number", expected="FILE or FILE:SCALE")
        if not Path(path).is_file():
            raise UserError(f"LoRA adapter {path} does not exist", expected="a .safetensors adapter file (FILE[:SCALE])",
                            fix="pass the path of the adapter file, e.g. --lora my_lora.safetensors:0.8")
        return cls(Path(path), scale)

    def record(self) -> dict:
        """What the manifest records: the file, its sha256 and the scale."""
        return {"file": str(self.path.resolve()), "sha256": sha256_file(self.path), "scale": self.scale,
                "bytes": self.path.stat().st_size}

    @classmethod
    def from_record(cls, record: dict) -> "Adapter":
        """The adapter a manifest records, refused when the file is gone or is not the one that was fused."""
        path = Path(record["file"])
        if not path.is_file():
            raise UserError(f"the LoRA adapter these artifacts were fused with is missing: {path}",
                            fix="restore the adapter file at that path (its sha256 is in manifest.json)")
        if sha256_file(path) != record["sha256"]:
            raise UserError(f"the LoRA adapter {path} is not the file these artifacts were fused with",
                            found="its sha256 differs from the manifest's",
                            fix="restore the original adapter, or re-export / refit with this one")
        return cls(path, float(record["scale"]))


@dataclass
class Delta:
    """One adapter's low-rank update of one parameter: ``up @ down * scaling`` (``down`` None for a bias)."""

    up: np.ndarray  # [out, r] float32, or [out] for a bias
    down: np.ndarray | None  # [r, in] float32
    scaling: float

    def rows(self, start: int, stop: int) -> np.ndarray:
        out = self.up[start:stop].copy() if self.down is None else self.up[start:stop] @ self.down
        out *= np.float32(self.scaling)  # in place: one block-sized temporary
        return out


def read_adapter(path: Path) -> dict[str, tuple[dict, object]]:
    """component -> (its state dict with the component's prefix removed, its LoraConfig), for the components the
    adapter has keys for. The file is read the way diffusers' Helios loader reads it (its converters for Wan-style
    layouts); text-encoder keys are converted as diffusers' ``_load_lora_into_text_encoder`` converts them (old
    diffusers / kohya names to PEFT's); each LoraConfig from the file's metadata, else from the ranks."""
    import logging

    from diffusers.loaders.lora_pipeline import HeliosLoraLoaderMixin
    from diffusers.utils.peft_utils import _create_lora_config

    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)  # the converters' notes on keys they skip
    try:
        state, metadata = HeliosLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    except Exception as e:  # the converters raise ValueError / KeyError on layouts they do not know
        raise UserError(f"LoRA adapter {path} could not be read", found=f"{type(e).__name__}: {e}",
                        expected="a LoRA in the diffusers/PEFT layout (save_lora_weights) or a Wan-style "
                                 "layout diffusers converts (diffusion_model.*, lora_unet_*)") from None
    finally:
        logger.setLevel(level)
    other = sorted(k for k in state if not k.startswith(tuple(PREFIXES.values())))
    if other:
        raise UserError(f"LoRA adapter {path} has keys for modules other than the transformer and the text encoder",
                        found=f"{len(other)} keys, e.g. {', '.join(other[:4])}",
                        expected="transformer.* and text_encoder.* keys (Helios' transformer and UMT5 text encoder)",
                        fix="save the adapter with the transformer's and the text encoder's layers only")
    out = {}
    for component, prefix in PREFIXES.items():
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not part:
            continue
        if component == "text_encoder":
            part = _peft_keys(part)
        meta = {k[len(prefix):]: v for k, v in (metadata or {}).items() if k.startswith(prefix)} or None
        ranks = {f"^{k}": v.shape[1] for k, v in part.items() if "lora_B" in k and v.ndim > 1}
        # no LoraConfig without a rank: no A/B pair is complete, which plan_fusion reports key by key
        out[component] = (part, _create_lora_config(part, None, meta, ranks) if ranks or meta else None)
    if not out:
        raise UserError(f"LoRA adapter {path} has no LoRA weights", expected="transformer.* / text_encoder.* keys")
    return out


def _peft_keys(state: dict) -> dict:
    """A text encoder's adapter with PEFT's key names (``lora_A`` / ``lora_B``): as it is, or converted from the
    older diffusers / kohya names by diffusers' converters (as ``_load_lora_into_text_encoder`` converts them)."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    if all(".lora_A." in k or ".lora_B." in k for k in state):
        return state
    try:
        return convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
    except ValueError as e:
        raise UserError("a text-encoder adapter's keys are in no layout diffusers knows", found=str(e),
                        expected="text_encoder.<module>.lora_A.weight / lora_B.weight (PEFT)") from None


def adapter_components(adapter: "Adapter") -> list[str]:
    """The components ``adapter`` has weights for."""
    return list(read_adapter(adapter.path))


def _scaling(config, module_name: str, scale: float) -> float:
    from peft.utils.other import get_pattern_key

    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module_name), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module_name), config.lora_alpha)
    return scale * (alpha / math.sqrt(r) if config.use_rslora else alpha / r)


def _f32(t) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().numpy())


@dataclass
class Fusion:
    """Parameter name -> the deltas of every adapter that targets it, in the adapters' order; ``adapters``: those
    with weights for this component."""

    adapters: list[Adapter]
    deltas: dict[str, list[Delta]] = field(default_factory=dict)

    def targets(self) -> list[str]:
        return sorted(self.deltas)

    def fused(self, name: str, src: Source) -> Source:
        """``src`` (parameter ``name``) with the adapters' deltas added, or ``src`` when none targets it."""
        deltas = self.deltas.get(name)
        return src if not deltas else Fused(src, deltas)


def _check_layer(module_name: str, layer, entry: dict, problems: list[str]) -> None:
    import torch

    keys = f"{module_name}.lora_A/B"
    if not isinstance(layer, torch.nn.Linear):
        problems.append(f"{keys}: targets a {type(layer).__name__}, only Linear layers are fused")
        return
    down, up = entry.get("lora_A.weight"), entry.get("lora_B.weight")
    if down is None or up is None:
        problems.append(f"{keys}: has {'lora_B' if down is None else 'lora_A'} without its pair")
        return
    want_down, want_up = (down.shape[0], layer.in_features), (layer.out_features, down.shape[0])
    if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
        problems.append(f"{keys}: shapes {list(down.shape)} / {list(up.shape)}, the layer ({layer.in_features} -> "
                        f"{layer.out_features}) needs {list(want_down)} / {list(want_up)}")
    if "lora_B.bias" in entry and layer.bias is None:
        problems.append(f"{module_name}.lora_B.bias: the layer has no bias")


def _by_module(state: dict, problems: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for key, value in state.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            problems.append(f"{key}: not a LoRA A/B weight (DoRA, LoKr and other adapter types are not fused)")
            continue
        out.setdefault(key[:-len(suffix)], {})[suffix[1:]] = value
    return out


def plan_fusion(adapters: Sequence[Adapter], module, component: str = "transformer") -> Fusion:
    """Match every adapter's ``component`` keys against ``module`` (that component's model, weights on meta is
    fine); one UserError naming every key that matches no layer or does not fit its layer's shape. An adapter
    without keys for the component adds nothing to it."""
    fusion = Fusion([])
    layers = dict(module.named_modules())
    for adapter in adapters:
        parts = read_adapter(adapter.path)
        if component not in parts:
            continue
        fusion.adapters.append(adapter)
        state, config = parts[component]
        if getattr(config, "use_dora", False):
            raise UserError(f"LoRA adapter {adapter.path} is a DoRA adapter", expected="a plain LoRA",
                            fix="merge it with PEFT first, or use a plain LoRA")
        problems: list[str] = []
        for name, entry in _by_module(state, problems).items():
            if name not in layers:
                problems.append(f"{name}.lora_A/B: no such layer in the {component}")
                continue
            _check_layer(name, layers[name], entry, problems)
            if problems:
                continue
            s = _scaling(config, name, adapter.scale)
            fusion.deltas.setdefault(f"{name}.weight", []).append(
                Delta(_f32(entry["lora_B.weight"]), _f32(entry["lora_A.weight"]), s))
            if "lora_B.bias" in entry:
                fusion.deltas.setdefault(f"{name}.bias", []).append(Delta(_f32(entry["lora_B.bias"]), None, s))
        if problems:
            raise UserError(f"LoRA adapter {adapter.path} does not fit this checkpoint's {component}",
                            found=f"{len(problems)} problem(s): " + "; ".join(problems[:8]),
                            expected=f"keys that name the {component}'s Linear layers, with A [r, in] and B [out, r]",
                            fix="use an adapter trained for this model (Helios / Wan 14B layout, UMT5-XXL)")
    return fusion


class Fused(Source):
    """A float32 weight with LoRA deltas added, block of rows by block of rows: each block is converted to
    float32 (a new array, as the plain export's cast makes) and the deltas are added to it in place, a few
    rows at a time, so the fusion costs no more than ``DELTA_BYTES`` above the plain export."""

    DELTA_BYTES = 16 << 20

    def __init__(self, src: Source, deltas: Sequence[Delta]):
        super().__init__(ir.DataType.FLOAT, src.dims, src.name)
        self.src, self.deltas = src, list(deltas)

    def rows_per_block(self) -> int:
        return self.src.rows_per_block()

    def blocks(self) -> Iterator[np.ndarray]:
        start = 0
        for block in self.src.blocks():
            out = block.astype(np.float32)  # always a copy: the source's block is never written to
            row = max(1, out[:1].nbytes)
            step = max(1, self.DELTA_BYTES // row)
            for lo in range(0, out.shape[0], step):
                hi = min(lo + step, out.shape[0])
                for d in self.deltas:
                    out[lo:hi] += d.rows(start + lo, start + hi).reshape(out[lo:hi].shape)
            start += out.shape[0]
            yield out


def manifest_adapters(manifest: dict) -> list[Adapter]:
    """The adapters a manifest records (each file checked against its sha256), in the order they were fused."""
    return [Adapter.from_record(r) for r in manifest.get("lora") or []]


def _load_text_encoder_adapters(text_encoder, adapters: Sequence[Adapter]):
    """The text encoder's reference: each adapter's ``text_encoder.*`` weights (read as ``read_adapter`` reads
    them) put on the transformers model by PEFT (``inject_adapter_in_model`` + ``set_peft_model_state_dict``, the
    calls diffusers' ``_load_lora_into_text_encoder`` reaches through transformers' ``load_adapter``, which asks
    for a newer PEFT than PyPI has), weighted with their scales (``set_scale``, as diffusers'
    ``set_adapters_for_text_encoder``) and merged by PEFT (``merge``, as ``fuse_text_encoder_lora``)."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    scales = {}
    for i, adapter in enumerate(adapters):
        part = read_adapter(adapter.path).get("text_encoder")
        if part is None:
            continue
        (state, config), name = part, f"adapter{i}"
        inject_adapter_in_model(config, text_encoder, adapter_name=name)
        result = set_peft_model_state_dict(text_encoder, state, adapter_name=name)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"PEFT did not load {result.unexpected_keys[:4]} into the text encoder")
        scales[name] = adapter.scale
    for module in text_encoder.modules():
        if isinstance(module, LoraLayer):
            names = [n for n in scales if n in module.lora_A]
            for n in names:
                module.set_scale(n, scales[n])
            if names:
                module.merge(adapter_names=names)
    return text_encoder


def fuse_into_pipeline(pipe, adapters: Sequence[Adapter]):
    """A diffusers Helios pipeline with the adapters loaded, weighted and fused: the transformer's with
    ``load_lora_weights`` / ``set_adapters`` / ``fuse_lora``, the text encoder's as diffusers loads a
    transformers text encoder's."""
    names, weights = [], []
    for i, adapter in enumerate(adapters):
        if "transformer" in adapter_components(adapter):
            names.append(f"adapter{i}")
            weights.append(adapter.scale)
            pipe.load_lora_weights(str(adapter.path), adapter_name=names[-1])
    if names:
        pipe.set_adapters(names, adapter_weights=weights)
        pipe.fuse_lora(components=["transformer"], adapter_names=names)
    _load_text_encoder_adapters(pipe.text_encoder, adapters)
    return pipe


def fused_reference(ckpt, adapters: Sequence[Adapter], component: str = "transformer"):
    """The fp32 reference ``component`` (diffusers' HeliosTransformer3DModel or transformers' UMT5EncoderModel)
    with the adapters loaded the way diffusers loads them, weighted with their scales and fused: the parity
    reference of a fused export."""
    import torch
    from diffusers import HeliosTransformer3DModel
    from diffusers.loaders.lora_pipeline import HeliosLoraLoaderMixin

    if component == "text_encoder":
        from transformers import UMT5EncoderModel

        model = UMT5EncoderModel.from_pretrained(ckpt.path / "text_encoder", torch_dtype=torch.float32).eval()
        return _load_text_encoder_adapters(model, adapters).eval()
    model = HeliosTransformer3DModel.from_pretrained(ckpt.path / "transformer", torch_dtype=torch.float32).eval()
    names, weights = [], []
    for i, adapter in enumerate(adapters):
        state, metadata = HeliosLoraLoaderMixin.lora_state_dict(str(adapter.path), return_lora_metadata=True)
        if not any(k.startswith(PREFIXES["transformer"]) for k in state):
            continue
        names.append(f"adapter{i}")
        weights.append(adapter.scale)
        HeliosLoraLoaderMixin.load_lora_into_transformer(state, transformer=model, adapter_name=names[-1],
                                                         metadata=metadata)
    if names:
        model.set_adapters(names, weights=weights)
        model.fuse_lora(adapter_names=names)  # merged layers run their base layer only
    return model.eval()
