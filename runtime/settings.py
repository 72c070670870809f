"""A request's sampler settings, resolved against the checkpoint's variant: unset settings take the
variant's reference defaults (helios_deploy.model.variants.DEFAULTS); a setting the variant does not have
(guidance on Distilled, pyramid steps on Base, amplify_first_chunk on Base or Mid, ...) is a UserError,
never silently ignored."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError
from ..model.variants import PYRAMID_STAGES, Variant
from .guidance import Guidance

_NAMES = {"base": "Helios-Base", "mid": "Helios-Mid", "distilled": "Helios-Distilled"}

# Upper bounds of a request (the API imports and reports them): one request must not hold the runners for
# hours nor grow the per-schedule caches without end. The references use 1-10 steps per pyramid stage
# (Distilled 1,1,1 / Mid 10,10,10), 50 for Helios-Base, guidance 5.0.
MAX_PYRAMID_STEPS = 50  # each pyramid stage
MAX_INFERENCE_STEPS = 100  # Helios-Base
MAX_GUIDANCE_SCALE = 20.0
MAX_SEED = 2 ** 63 - 1  # torch.Generator.manual_seed's range that also fits an INT64 (Triton) input


@dataclass(frozen=True)
class Sampling:
    steps: tuple[int, ...]  # per pyramid stage; Base: (num_inference_steps,)
    sampler: str  # dmd | unipc | euler
    guidance_scale: float
    negative_prompt: str | None  # with guidance only
    amplify_first_chunk: bool = False
    guidance: Guidance | None = None  # None: no unconditional branch

    def transformer_calls(self, chunks: int) -> int:
        """Transformer calls for ``chunks`` chunks (a guided step is one call at batch 2)."""
        return sum(self.steps) * chunks + (sum(self.steps) if self.amplify_first_chunk and chunks else 0)


def _not_for(variant: Variant, setting: str, fix: str) -> UserError:
    return UserError(f"{_NAMES[variant.name]} has no setting {setting}", found=f"{setting} was given",
                     expected=_expected(variant), fix=fix)


def _expected(variant: Variant) -> str:
    if variant.name == "base":
        return "num_inference_steps, guidance_scale, negative_prompt, sampler (unipc | euler)"
    if variant.name == "mid":
        return "pyramid_steps, guidance_scale, negative_prompt, sampler (unipc | euler), cfg_zero_star, use_zero_init, zero_steps"
    return "pyramid_steps, amplify_first_chunk"


def _steps(variant: Variant, pyramid_steps, num_inference_steps) -> tuple[int, ...]:
    if variant.name == "base":
        if pyramid_steps is not None:
            raise _not_for(variant, "pyramid_steps", "Helios-Base has no pyramid: pass num_inference_steps (--num-inference-steps)")
        n = variant.defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_INFERENCE_STEPS:
            raise UserError(f"num_inference_steps {n!r} invalid",
                            expected=f"an integer from 1 to {MAX_INFERENCE_STEPS}, e.g. 50")
        return (n,)
    if num_inference_steps is not None:
        raise _not_for(variant, "num_inference_steps", "pass pyramid_steps, steps per pyramid stage (--steps 2,2,2)")
    steps = variant.defaults["pyramid_steps"] if pyramid_steps is None else tuple(pyramid_steps)
    if len(steps) != PYRAMID_STAGES or any(not isinstance(s, int) or isinstance(s, bool) or not 1 <= s <= MAX_PYRAMID_STEPS
                                           for s in steps):
        raise UserError(f"pyramid steps {tuple(steps)} invalid",
                        expected=f"{PYRAMID_STAGES} integers from 1 to {MAX_PYRAMID_STEPS}, e.g. 1,1,1 or 2,2,2")
    return tuple(int(s) for s in steps)


def _guidance(variant: Variant, scale, negative_prompt, cfg_zero_star, use_zero_init,
              zero_steps) -> tuple[float, Guidance | None]:
    if variant.name == "distilled":
        if scale is not None and scale != 1.0:
            raise _not_for(variant, "guidance_scale", "leave guidance_scale out (or 1.0): the distilled model runs "
                           "without classifier-free guidance")
        if negative_prompt is not None:
            raise _not_for(variant, "negative_prompt", "leave negative_prompt out: the distilled model runs without "
                           "classifier-free guidance")
    scale = float(variant.defaults["guidance_scale"] if scale is None else scale)
    if not math.isfinite(scale) or not 1.0 <= scale <= MAX_GUIDANCE_SCALE:
        raise UserError(f"guidance_scale {scale} invalid",
                        expected=f"a number from 1 to {MAX_GUIDANCE_SCALE:g} (1: no guidance; 5.0 is the reference's)")
    if cfg_zero_star is not None and variant.name != "mid":
        raise _not_for(variant, "cfg_zero_star", "CFG-Zero* is a HeliosPyramidPipeline guidance (Helios-Mid)")
    zero_star = variant.is_cfg_zero_star if cfg_zero_star is None else bool(cfg_zero_star)
    if (use_zero_init is not None or zero_steps is not None) and not zero_star:
        raise _not_for(variant, "use_zero_init / zero_steps" + ("" if variant.name != "mid" else " without CFG-Zero*"),
                       "these belong to CFG-Zero* guidance (Helios-Mid)")
    if scale <= 1.0:
        if negative_prompt is not None:
            raise UserError("negative_prompt needs guidance", found=f"guidance_scale {scale}",
                            expected="guidance_scale > 1 with a negative prompt", fix="raise guidance_scale or drop the negative prompt")
        return scale, None
    d = variant.defaults
    zero_steps = d.get("zero_steps", 1) if zero_steps is None else zero_steps
    if not isinstance(zero_steps, int) or zero_steps < 0:
        raise UserError(f"zero_steps {zero_steps!r} invalid", expected="an integer >= 0")
    return scale, Guidance(scale, zero_star, d.get("use_zero_init", True) if use_zero_init is None
                           else bool(use_zero_init), zero_steps)


def resolve_sampling(variant: Variant, scheduler_type: str, *, pyramid_steps=None, num_inference_steps=None,
                     guidance_scale=None, negative_prompt=None, amplify_first_chunk=None, cfg_zero_star=None,
                     use_zero_init=None, zero_steps=None, sampler=None) -> Sampling:
    """The settings of one request (None: the variant's default); ``scheduler_type`` is the checkpoint's."""
    steps = _steps(variant, pyramid_steps, num_inference_steps)
    if amplify_first_chunk and variant.name != "distilled":
        raise _not_for(variant, "amplify_first_chunk", "leave --amplify-first-chunk out (a distilled-model setting)")
    allowed = ("dmd",) if variant.name == "distilled" else ("unipc", "euler")
    if sampler is not None and sampler not in allowed:
        raise UserError(f"sampler {sampler!r} is not available for {_NAMES[variant.name]}", expected=" or ".join(allowed))
    scale, guidance = _guidance(variant, guidance_scale, negative_prompt, cfg_zero_star, use_zero_init, zero_steps)
    negative = None if guidance is None else (negative_prompt if negative_prompt is not None else
                                              variant.defaults.get("negative_prompt", ""))
    return Sampling(steps, sampler or ("dmd" if variant.name == "distilled" else scheduler_type), scale, negative,
                    bool(amplify_first_chunk), guidance)
