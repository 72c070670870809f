"""What the cost model describes: the three component configs (from a checkpoint folder or built in)
and the workload (variant, video size, steps, guidance, text length), each validated into a UserError.

Only config.json files are read: no weights, no tokenizer, so a folder holding just the configs of a
checkpoint is enough for capacity planning.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import UserError
from ..model.specs import PYRAMID_STAGES, check_video_size, size_multiple
from ..model.variants import DEFAULTS, VARIANTS, variant_of

BUILTIN = ("helios-14b",)
MAX_TEXT_LENGTH = 512  # UMT5's longest prompt in the pipeline (its max_sequence_length limit)
CONFIG_FILES = {"transformer": "transformer/config.json", "text_encoder": "text_encoder/config.json",
                "vae": "vae/config.json"}
# The UMT5-XXL encoder Helios (and Wan 2.1) use; the other UMT5Config fields keep their defaults.
UMT5_XXL = dict(d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24, vocab_size=256384,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                relative_attention_max_distance=128, is_encoder_decoder=False)


@dataclass(frozen=True)
class ModelConfigs:
    """Complete configs (class defaults filled in, as from_config would) of the three components."""

    source: str  # checkpoint folder or built-in name
    transformer: dict
    text_encoder: dict
    vae: dict
    variant: str | None = None  # base | mid | distilled, from the checkpoint's model_index.json (None: not known)


@dataclass(frozen=True)
class Workload:
    """One prompt's work: chunks of 33 frames at height x width; steps[s] transformer calls at pyramid stage s
    (Base: steps[0] calls at the full size), each at batch 2 when ``guided`` (conditional + unconditional)."""

    height: int
    width: int
    text_length: int
    steps: tuple[int, ...]
    variant: str = "distilled"
    guided: bool = False


def _init_defaults(cls) -> dict:
    """Keyword defaults of a diffusers model's __init__ (the config from_config() starts from)."""
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _public(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def model_configs(transformer: dict, text_encoder: dict, vae: dict, source: str = "configs") -> ModelConfigs:
    """Complete configs from (partial) config dicts, as from_config / UMT5Config would fill them in."""
    from diffusers import AutoencoderKLWan, HeliosTransformer3DModel
    from transformers import UMT5Config

    cls_name = transformer.get("_class_name", "HeliosTransformer3DModel")
    if cls_name != "HeliosTransformer3DModel":
        raise UserError("the transformer is not a Helios transformer", found=f"_class_name {cls_name!r}",
                        expected="HeliosTransformer3DModel", fix="point to a Helios checkpoint")
    t = {**_init_defaults(HeliosTransformer3DModel), **_public(transformer)}
    v = {**_init_defaults(AutoencoderKLWan), **_public(vae)}
    te = UMT5Config.from_dict(_public(text_encoder)).to_dict()
    return ModelConfigs(source, t, te, v)


def _read_config(root: Path, rel: str) -> dict:
    path = root / rel
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"checkpoint is missing {rel}", found=f"no file {path}",
                        expected="a checkpoint in diffusers layout with transformer/, text_encoder/ and vae/ configs",
                        fix="point to the folder that holds model_index.json, or use --config helios-14b") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON", found=str(e),
                        fix="re-download or re-save the checkpoint") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a config object", found=type(data).__name__, fix="re-download the checkpoint")
    return data


def load_configs(checkpoint: str | Path | None = None, config: str | None = None) -> ModelConfigs:
    """The component configs of a checkpoint folder, or of a built-in model (``config="helios-14b"``)."""
    if (checkpoint is None) == (config is None):
        raise UserError("say which model to cost", found="both a checkpoint and --config" if checkpoint else "neither",
                        expected="a checkpoint folder or --config " + " | ".join(BUILTIN),
                        fix="e.g. helios-deploy cost --config helios-14b")
    if config is not None:
        if config not in BUILTIN:
            raise UserError(f"unknown built-in config {config!r}", expected=" or ".join(BUILTIN),
                            fix="use --config helios-14b or pass a checkpoint folder")
        # HeliosTransformer3DModel() and AutoencoderKLWan() defaults are the 14B configs
        return model_configs({}, UMT5_XXL, {}, config)
    root = Path(checkpoint)
    if not root.is_dir():
        raise UserError(f"checkpoint folder {root} does not exist",
                        fix="pass the folder of a Helios checkpoint in diffusers layout, or use --config helios-14b")
    cfgs = {name: _read_config(root, rel) for name, rel in CONFIG_FILES.items()}
    configs = model_configs(cfgs["transformer"], cfgs["text_encoder"], cfgs["vae"], str(root))
    if (root / "model_index.json").is_file():  # which variant (a folder of configs only: say --variant)
        scheduler = root / "scheduler" / "scheduler_config.json"
        sched = _read_config(root, "scheduler/scheduler_config.json") if scheduler.is_file() else {}
        return replace(configs, variant=variant_of(_read_config(root, "model_index.json"), sched).name)
    return configs


def parse_steps(value: str | tuple | list, variant: str = "distilled") -> tuple[int, ...]:
    """``"1,1,1"`` -> (1, 1, 1): transformer calls per pyramid stage, each at least 1; Base: ``"50"`` -> (50,)."""
    stages = 1 if variant == "base" else PYRAMID_STAGES
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value)
    try:
        steps = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        steps = ()
    if len(steps) != stages or min(steps) < 1:
        fix = ("e.g. --steps 50 (Helios-Base has one stage: its number of inference steps)" if variant == "base" else
               "e.g. --steps 1,1,1 (the fastest distilled setting) or --steps 2,2,2 (the shipped script)")
        raise UserError(f"bad --steps {value!r}", found=str(value),
                        expected=f"{stages} comma-separated whole number(s) >= 1, one per "
                        f"{'denoising run' if variant == 'base' else 'pyramid stage'}", fix=fix)
    return steps


def resolve_variant(configs: ModelConfigs, variant: str | None) -> str:
    """The variant asked for, else the checkpoint's, else distilled (the built-in configs)."""
    if variant is None:
        return configs.variant or "distilled"
    if variant not in VARIANTS:
        raise UserError(f"unknown variant {variant!r}", expected=" | ".join(VARIANTS))
    if configs.variant is not None and variant != configs.variant:
        raise UserError(f"{configs.source} is a Helios-{configs.variant.capitalize()} checkpoint",
                        found=f"--variant {variant}", fix="leave --variant out for a checkpoint")
    return variant


def check_workload(configs: ModelConfigs, height: int, width: int, text_length: int,
                   steps: str | tuple | list | None, variant: str | None = None,
                   guidance_scale: float | None = None) -> Workload:
    check_video_size(height, width, size_multiple(configs.transformer, configs.vae))
    if not isinstance(text_length, int) or not 1 <= text_length <= MAX_TEXT_LENGTH:
        raise UserError(f"bad --text-length {text_length}", expected=f"1..{MAX_TEXT_LENGTH} tokens",
                        fix="use 226, the pipeline's default max_sequence_length")
    variant = resolve_variant(configs, variant)
    d = DEFAULTS[variant]
    if steps is None:
        steps = (d["num_inference_steps"],) if variant == "base" else d["pyramid_steps"]
    scale = d["guidance_scale"] if guidance_scale is None else float(guidance_scale)
    if variant == "distilled" and scale != 1.0:
        raise UserError("Helios-Distilled runs without guidance", found=f"--guidance-scale {scale}",
                        fix="leave --guidance-scale out for the distilled model")
    return Workload(height, width, text_length, parse_steps(steps, variant), variant, scale > 1.0)
