"""The three Helios checkpoints and what tells them apart: pipeline class, ``is_distilled``,
``is_cfg_zero_star`` and the scheduler class (read from model_index.json and the scheduler config at
export, recorded in the manifest, read back by the runtime and the cost model).

| variant   | pipeline              | scheduler                          | loop                    | guidance        |
|-----------|-----------------------|------------------------------------|-------------------------|-----------------|
| base      | HeliosPipeline        | HeliosScheduler (stages 1)         | one stage, ~50 steps    | CFG, scale 5    |
| mid       | HeliosPyramidPipeline | HeliosScheduler (stages 3)         | 3 pyramid stages        | CFG (CFG-Zero*) |
| distilled | HeliosPyramidPipeline | HeliosDMDScheduler, is_distilled   | 3 pyramid stages, DMD   | none            |

The request defaults are the reference's: ``HeliosPipeline.__call__`` (50 steps, guidance 5.0) and
``HeliosPyramidPipeline.__call__`` for Mid (10,10,10 steps, guidance 5.0, CFG-Zero* zero-init on the
first step(s)). Distilled keeps this project's defaults (1,1,1, no guidance, as the official scripts
run it with guidance 1.0; diffusers' own default guidance 5.0 does not apply to a distilled model).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

from ..errors import UserError

VARIANTS = ("base", "mid", "distilled")
PIPELINE_CLASSES = ("HeliosPipeline", "HeliosPyramidPipeline")
PYRAMID_STAGES = 3

# The reference's defaults per variant (see the module docstring).
DEFAULTS = {
    "base": {"num_inference_steps": 50, "guidance_scale": 5.0, "negative_prompt": ""},
    "mid": {"pyramid_steps": (10, 10, 10), "guidance_scale": 5.0, "negative_prompt": "", "use_zero_init": True,
            "zero_steps": 1},
    "distilled": {"pyramid_steps": (1, 1, 1), "guidance_scale": 1.0, "amplify_first_chunk": False},
}


@dataclass(frozen=True)
class Variant:
    name: str  # base | mid | distilled
    pipeline_class: str
    is_distilled: bool
    is_cfg_zero_star: bool
    scheduler_class: str  # HeliosScheduler | HeliosDMDScheduler

    @property
    def pyramid(self) -> bool:
        return self.pipeline_class == "HeliosPyramidPipeline"

    @property
    def guided(self) -> bool:
        """Whether the variant runs classifier-free guidance by default (Base and Mid)."""
        return DEFAULTS[self.name]["guidance_scale"] > 1.0

    @property
    def defaults(self) -> dict:
        return dict(DEFAULTS[self.name])

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping) -> "Variant":
        return cls(**{k: d[k] for k in ("name", "pipeline_class", "is_distilled", "is_cfg_zero_star",
                                        "scheduler_class")})

    @classmethod
    def from_manifest(cls, manifest: Mapping) -> "Variant":
        """The manifest's record, or (artifacts exported before it was recorded) the checkpoint's
        model_index.json and scheduler config the manifest holds."""
        if "variant" in manifest:
            return cls.from_json(manifest["variant"])
        return variant_of(manifest["checkpoint"]["model_index"], manifest["scheduler_config"])


def _scheduler_class(model_index: Mapping, scheduler_config: Mapping) -> str:
    entry = model_index.get("scheduler")
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]:
        return str(entry[1])
    return str(scheduler_config.get("_class_name", ""))


def variant_of(model_index: Mapping, scheduler_config: Mapping) -> Variant:
    """Which Helios checkpoint this is; a UserError for a combination the reference cannot run."""
    cls = model_index.get("_class_name")
    if cls not in PIPELINE_CLASSES:
        raise UserError("wrong pipeline class in model_index.json", found=str(cls),
                        expected=" or ".join(PIPELINE_CLASSES) + " (Helios-Base / Helios-Mid, Helios-Distilled)",
                        fix="export a Helios checkpoint saved by diffusers' HeliosPipeline or HeliosPyramidPipeline")
    scheduler = _scheduler_class(model_index, scheduler_config)
    stages = int(scheduler_config.get("stages", PYRAMID_STAGES))
    distilled = cls == "HeliosPyramidPipeline" and bool(model_index.get("is_distilled", False))
    cfg_zero_star = cls == "HeliosPyramidPipeline" and bool(model_index.get("is_cfg_zero_star", False))
    name = "base" if cls == "HeliosPipeline" else ("distilled" if distilled else "mid")
    want = {"base": ("HeliosScheduler", 1), "mid": ("HeliosScheduler", PYRAMID_STAGES),
            "distilled": ("HeliosDMDScheduler", PYRAMID_STAGES)}[name]
    if (scheduler, stages) != want:
        raise UserError(f"the {cls} checkpoint ({name}) has a scheduler its pipeline cannot run",
                        found=f"{scheduler or 'no scheduler class'} with stages={stages}",
                        expected=f"{want[0]} with stages={want[1]}",
                        fix="use the scheduler folder that came with the checkpoint")
    if name != "distilled" and scheduler_config.get("scheduler_type", "unipc") not in ("unipc", "euler"):
        raise UserError("unsupported HeliosScheduler scheduler_type",
                        found=repr(scheduler_config.get("scheduler_type")), expected="unipc or euler")
    return Variant(name, cls, distilled, cfg_zero_star, scheduler)
