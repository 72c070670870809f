"""Whole-pipeline parity: our runtime over the exported artifacts against the diffusers pipeline of the
checkpoint's variant (HeliosPipeline for Helios-Base, HeliosPyramidPipeline for Mid and Distilled) on the
same checkpoint, inputs and seed (the `parity --pipeline` section)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ...checkpoint import Checkpoint
from ..exporter.patches import cholesky_float64, contiguous_transformer_output

PIXEL_THRESHOLD = 1e-3  # max abs error of the final float video, in [0, 1] pixel units
PROMPT = "A cat and a dog baking a cake together in a kitchen."
NEGATIVE_PROMPT = "blurry, low quality, static"


@dataclass(frozen=True)
class PipelineCase:
    name: str
    steps: tuple[int, ...] = (1, 1, 1)  # per pyramid stage; Base: (num_inference_steps,)
    amplify: bool = False
    condition: str | None = None  # None, "image" or "video"
    frames: int = 66  # two chunks
    extra: dict = field(default_factory=dict)
    guidance_scale: float = 1.0  # > 1: classifier-free guidance (Base, Mid)
    negative_prompt: str | None = None  # with guidance; None: the reference's default ""
    sampler: str | None = None  # Base / Mid: unipc | euler (None: the checkpoint's scheduler_type)
    cfg_zero_star: bool | None = None  # Mid: None keeps the checkpoint's is_cfg_zero_star


CASES = (
    PipelineCase("t2v_111"), PipelineCase("t2v_111_amplify", amplify=True),
    PipelineCase("t2v_222", steps=(2, 2, 2)), PipelineCase("t2v_222_amplify", steps=(2, 2, 2), amplify=True),
    PipelineCase("i2v_111", condition="image"), PipelineCase("v2v_111", condition="video"),
)
# Helios-Base: UniPC and Euler, guidance on (scale 5, with a negative prompt or the default "") and off, T2V
# and I2V; 4 steps reach UniPC's order 2, its corrector and the lower-order final step.
BASE_CASES = tuple(
    PipelineCase(f"{sampler}_{'cfg' if cfg else 'nocfg'}_{'i2v' if cond else 't2v'}", steps=(4,), condition=cond,
                 guidance_scale=5.0 if cfg else 1.0, sampler=sampler,
                 negative_prompt=NEGATIVE_PROMPT if cfg and cond is None else None)
    for sampler in ("unipc", "euler") for cfg in (True, False) for cond in (None, "image"))
# Helios-Mid: CFG-Zero* on (the checkpoint's) and off, guidance 5, steps 2,2,2; plus I2V and Euler.
MID_CASES = (
    PipelineCase("cfg_zero_star_222", steps=(2, 2, 2), guidance_scale=5.0, negative_prompt=NEGATIVE_PROMPT),
    PipelineCase("cfg_222", steps=(2, 2, 2), guidance_scale=5.0, negative_prompt=NEGATIVE_PROMPT, cfg_zero_star=False),
    PipelineCase("cfg_zero_star_222_i2v", steps=(2, 2, 2), guidance_scale=5.0, condition="image"),
    PipelineCase("euler_cfg_zero_star_222", steps=(2, 2, 2), guidance_scale=5.0, sampler="euler"),
)
VARIANT_CASES = {"distilled": CASES, "base": BASE_CASES, "mid": MID_CASES}


def conditioning_inputs(height: int, width: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded image of another size (so it is resized) and a 40-frame video (so it is offset)."""
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (height + 16, width - 16, 3), dtype=np.uint8),
            "video": rng.integers(0, 256, (40, height, width, 3), dtype=np.uint8)}


def _reference_kwargs(case: PipelineCase, inputs: dict, variant: str) -> dict:
    """The reference pipeline's call for ``case`` (the same settings, in its argument names)."""
    from PIL import Image

    kwargs = {"guidance_scale": case.guidance_scale}
    if case.guidance_scale > 1.0:
        kwargs["negative_prompt"] = case.negative_prompt
    if variant == "base":
        kwargs["num_inference_steps"] = case.steps[0]
    else:
        kwargs.update(pyramid_num_inference_steps_list=list(case.steps), is_amplify_first_chunk=case.amplify)
    if case.condition == "image":
        kwargs["image"] = Image.fromarray(inputs["image"])
    elif case.condition == "video":
        kwargs["video"] = [Image.fromarray(f) for f in inputs["video"]]
    return kwargs


def _runtime_kwargs(case: PipelineCase, inputs: dict, variant: str) -> dict:
    """Our runtime's call for ``case``: only the settings the variant has."""
    kwargs = {case.condition: inputs[case.condition]} if case.condition else {}
    if variant == "base":
        kwargs["num_inference_steps"] = case.steps[0]
    else:
        kwargs["pyramid_steps"] = case.steps
    if variant == "distilled":
        return {**kwargs, "amplify_first_chunk": case.amplify}
    kwargs.update(guidance_scale=case.guidance_scale, sampler=case.sampler)
    if case.guidance_scale > 1.0 and case.negative_prompt is not None:
        kwargs["negative_prompt"] = case.negative_prompt
    if case.cfg_zero_star is not None:
        kwargs["cfg_zero_star"] = case.cfg_zero_star
    return kwargs


def reference_pipeline(checkpoint, variant: str):
    """The diffusers pipeline of the checkpoint's variant, float32 on CPU."""
    from diffusers import HeliosPipeline, HeliosPyramidPipeline

    cls = HeliosPipeline if variant == "base" else HeliosPyramidPipeline
    ref = cls.from_pretrained(Checkpoint(checkpoint).path, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return ref


@contextmanager
def configured(ref, case: PipelineCase):
    """The reference set up for ``case``: its scheduler's type swapped (Euler / UniPC) and CFG-Zero*
    switched as asked, the float64 block-noise Cholesky, and the transformer's output made contiguous for
    diffusers' CFG-Zero* ``.view()``; everything restored afterwards."""
    from diffusers import HeliosScheduler

    scheduler, zero_star = ref.scheduler, ref.config.get("is_cfg_zero_star")
    if case.sampler is not None and isinstance(scheduler, HeliosScheduler):
        ref.scheduler = HeliosScheduler.from_config(scheduler.config, scheduler_type=case.sampler)
    if case.cfg_zero_star is not None:
        ref.register_to_config(is_cfg_zero_star=case.cfg_zero_star)
    try:
        with cholesky_float64(), contiguous_transformer_output(ref.transformer):
            yield ref
    finally:
        ref.scheduler = scheduler
        if case.cfg_zero_star is not None:
            ref.register_to_config(is_cfg_zero_star=zero_star)


def _videos(checkpoint, pipe, cases, seed: int):
    """(case, reference video, our video) per case: float [T, H, W, 3] in [0, 1], same prompt/seed/inputs."""
    variant = pipe.variant.name
    ref = reference_pipeline(checkpoint, variant)
    inputs = conditioning_inputs(pipe.height, pipe.width, seed)
    for case in cases:
        with configured(ref, case):
            expected = ref(prompt=PROMPT, height=pipe.height, width=pipe.width, num_frames=case.frames,
                           generator=torch.Generator().manual_seed(seed), output_type="np",
                           max_sequence_length=pipe.text_length, **_reference_kwargs(case, inputs, variant)).frames[0]
        got = pipe.generate(PROMPT, num_frames=case.frames, seed=seed, output="float",
                            **_runtime_kwargs(case, inputs, variant))
        yield case, expected, got


def run_pipeline_parity(checkpoint, pipe, cases=None, seed: int = 0) -> dict:
    """``pipe`` is a helios_deploy.runtime.Pipeline over artifacts of ``checkpoint``; ``cases`` default to
    its variant's (VARIANT_CASES)."""
    results = []
    cases = VARIANT_CASES[pipe.variant.name] if cases is None else cases
    for case, expected, got in _videos(checkpoint, pipe, cases, seed):
        err = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
        results.append({"name": case.name, "frames": int(expected.shape[0]), "max_abs_err": err,
                        "passed": err <= PIXEL_THRESHOLD})
    return {"threshold_max_abs_err": PIXEL_THRESHOLD, "variant": pipe.variant.name,
            "passed": all(r["passed"] for r in results), "cases": results}


# FP8: the video cannot match to 1e-3, so it is scored by PSNR (dB, peak 1.0) per 33-frame chunk.
# Measured on the tiny checkpoint (2 chunks, seed 0, default FP8 test recipe): FP8 runtime vs the fp32
# reference 35.0-40.5 dB per chunk (t2v 37.0/36.1, t2v 2,2,2 amplify 40.5/38.6, i2v 35.1/35.0); for scale,
# the fp32 runtime with another prompt scores 16.9/17.4 dB and with another seed 10.6/10.1 dB. 30 dB
# leaves 5 dB (about 3x the MSE) below the worst FP8 chunk and is far above a different video.
FP8_CASES = (PipelineCase("t2v_111"), PipelineCase("t2v_222_amplify", steps=(2, 2, 2), amplify=True),
             PipelineCase("i2v_111", condition="image"))
FP8_VARIANT_CASES = {"distilled": FP8_CASES, "base": (BASE_CASES[0], BASE_CASES[1]), "mid": (MID_CASES[0],)}
PSNR_THRESHOLD = 30.0
CHUNK_FRAMES = 33


def psnr(ours: np.ndarray, ref: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(ours, np.float64) - np.asarray(ref, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def chunk_psnr(ours: np.ndarray, ref: np.ndarray) -> list[float]:
    """PSNR per 33-frame chunk of two videos [T, H, W, 3] in [0, 1]; [-inf] when their shapes differ."""
    if ours.shape != ref.shape:
        return [float("-inf")]
    return [psnr(ours[k:k + CHUNK_FRAMES], ref[k:k + CHUNK_FRAMES]) for k in range(0, ref.shape[0], CHUNK_FRAMES)]


def run_pipeline_psnr(checkpoint, pipe, cases=None, seed: int = 0, threshold: float = PSNR_THRESHOLD) -> dict:
    """PSNR of our (FP8) runtime's video against the fp32 reference pipeline, per chunk of 33 frames."""
    results = []
    cases = FP8_VARIANT_CASES[pipe.variant.name] if cases is None else cases
    for case, expected, got in _videos(checkpoint, pipe, cases, seed):
        chunks = chunk_psnr(got, expected)
        results.append({"name": case.name, "frames": int(expected.shape[0]), "psnr_db": chunks,
                        "max_abs_err": float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf"),
                        "passed": min(chunks) >= threshold})
    return {"metric": "psnr", "threshold_psnr_db": threshold, "passed": all(r["passed"] for r in results),
            "cases": results}
