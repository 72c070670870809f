"""Whole-pipeline parity: our runtime over the exported artifacts against the diffusers pipeline of the
checkpoint's variant (HeliosPipeline for Helios-Base, HeliosPyramidPipeline for Mid and Distilled) on the
same checkpoint, inputs and seed (the `parity --pipeline` section), over any number of 33-frame chunks,
with the error (or, for FP8, the PSNR and its trend) per chunk.

Interactive prompts: a case may change the prompt every chunk. The runtime takes the schedule
{chunk: prompt}; the reference is given each chunk's prompt embeddings (its own encode_prompt) at the
chunk boundary, as the official interactive mode does, through its step-end callback.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ...checkpoints.checkpoint import Checkpoint
from ..exporter.patches import cholesky_float64, contiguous_transformer_output

PIXEL_THRESHOLD = 1e-3  # max abs error of the final float video, in [0, 1] pixel units
PROMPT = "A cat and a dog baking a cake together in a kitchen."
NEGATIVE_PROMPT = "blurry, low quality, static"
# an interactive stream: the prompt changes every chunk, cycling through these
INTERACTIVE_PROMPTS = (PROMPT, "The dog jumps onto the table and knocks over the flour.",
                       "A red car drives along a coastal road at sunset.",
                       "A drone shot over a snowy mountain ridge at sunrise.")
CHUNK_FRAMES = 33
DEFAULT_CHUNKS = 2


@dataclass(frozen=True)
class PipelineCase:
    name: str
    steps: tuple[int, ...] = (1, 1, 1)  # per pyramid stage; Base: (num_inference_steps,)
    amplify: bool = False
    condition: str | None = None  # None, "image" or "video"
    frames: int = DEFAULT_CHUNKS * CHUNK_FRAMES
    interactive: bool = False  # a new prompt every chunk
    extra: dict = field(default_factory=dict)
    guidance_scale: float = 1.0  # > 1: classifier-free guidance (Base, Mid)
    negative_prompt: str | None = None  # with guidance; None: the reference's default ""
    sampler: str | None = None  # Base / Mid: unipc | euler (None: the checkpoint's scheduler_type)
    cfg_zero_star: bool | None = None  # Mid: None keeps the checkpoint's is_cfg_zero_star
    size: tuple[int, int] | None = None  # (height, width), one of the exported sizes; None: the default (first)

    @property
    def chunks(self) -> int:
        return max(1, (self.frames + CHUNK_FRAMES - 1) // CHUNK_FRAMES)

    def prompts(self) -> list[str]:
        """The prompt in force at each chunk."""
        if not self.interactive:
            return [PROMPT] * self.chunks
        return [INTERACTIVE_PROMPTS[k % len(INTERACTIVE_PROMPTS)] for k in range(self.chunks)]


CASES = (
    PipelineCase("t2v_111"), PipelineCase("t2v_111_amplify", amplify=True),
    PipelineCase("t2v_222", steps=(2, 2, 2)), PipelineCase("t2v_222_amplify", steps=(2, 2, 2), amplify=True),
    PipelineCase("i2v_111", condition="image"), PipelineCase("v2v_111", condition="video"),
    PipelineCase("t2v_111_interactive", interactive=True),
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


def with_chunks(cases, chunks: int | None, sizes=()):
    """The cases over ``chunks`` chunks of 33 frames (None: as they are), and with several exported ``sizes``
    each case at every size (named ``case@HxW``)."""
    cases = tuple(cases) if chunks is None else tuple(replace(c, frames=chunks * CHUNK_FRAMES) for c in cases)
    if len(sizes) < 2:
        return cases
    return tuple(replace(c, name=f"{c.name}@{h}x{w}", size=(h, w)) for h, w in sizes for c in cases if c.size is None)


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


def reference_pipeline(checkpoint, variant: str, adapters=()):
    """The diffusers pipeline of the checkpoint's variant, float32 on CPU (with LoRA ``adapters`` fused)."""
    from ..exporter.lora import fuse_into_pipeline
    from diffusers import HeliosPipeline, HeliosPyramidPipeline

    cls = HeliosPipeline if variant == "base" else HeliosPyramidPipeline
    ref = cls.from_pretrained(Checkpoint(checkpoint).path, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return fuse_into_pipeline(ref, adapters)


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


class PromptPerChunk:
    """The reference's step-end callback that hands it the next chunk's prompt embeddings once a chunk's
    last pyramid stage has taken its last step (the callback sees each stage's step index ``i`` and the
    scheduler holds that stage's timesteps)."""

    def __init__(self, embeds: list[torch.Tensor], stages: int):
        self.embeds, self.stages, self.stages_done = embeds, stages, 0

    def __call__(self, pipe, i: int, t, kwargs: dict) -> dict:
        if i < len(pipe.scheduler.timesteps) - 1:
            return {}
        self.stages_done += 1
        chunk, stage = divmod(self.stages_done, self.stages)
        if stage or chunk >= len(self.embeds):
            return {}
        return {"prompt_embeds": self.embeds[chunk]}


def reference_video(ref, case: PipelineCase, variant: str, height: int, width: int, text_length: int,
                    seed: int = 0, prompts: list[str] | None = None) -> np.ndarray:
    """The reference pipeline's video for ``case``: float [T, H, W, 3] in [0, 1]; ``prompts``: the prompt in
    force at each chunk instead of the case's (a live stream's prompt changes)."""
    prompts = prompts or case.prompts()
    if len(set(prompts)) == 1:
        text = {"prompt": prompts[0]}
    else:  # interactive: each chunk's embeddings, the first ones passed in, the next at each chunk boundary
        embeds = [ref.encode_prompt(p, do_classifier_free_guidance=False, max_sequence_length=text_length)[0]
                  for p in prompts]
        text = {"prompt_embeds": embeds[0], "callback_on_step_end": PromptPerChunk(embeds, len(case.steps)),
                "callback_on_step_end_tensor_inputs": ["prompt_embeds"]}
    with configured(ref, case):
        return ref(height=height, width=width, num_frames=case.frames, generator=torch.Generator().manual_seed(seed),
                   output_type="np", max_sequence_length=text_length, **text,
                   **_reference_kwargs(case, conditioning_inputs(height, width, seed), variant)).frames[0]


def runtime_video(pipe, case: PipelineCase, seed: int = 0) -> np.ndarray:
    """Our runtime's video for ``case`` (a prompt schedule {chunk: prompt} when it is interactive)."""
    prompts = case.prompts()
    prompt = prompts[0] if len(set(prompts)) == 1 else dict(enumerate(prompts))
    height, width = case.size or (pipe.height, pipe.width)
    inputs = conditioning_inputs(height, width, seed)
    return pipe.generate(prompt, num_frames=case.frames, seed=seed, output="float", height=height, width=width,
                         **_runtime_kwargs(case, inputs, pipe.variant.name))


def _videos(checkpoint, pipe, cases, seed: int, adapters=()):
    """(case, reference video, our video) per case: float [T, H, W, 3] in [0, 1], same prompt/seed/inputs."""
    variant = pipe.variant.name
    ref = reference_pipeline(checkpoint, variant, adapters)
    for case in cases:
        expected = reference_video(ref, case, variant, *(case.size or (pipe.height, pipe.width)), pipe.text_length,
                                   seed)
        yield case, expected, runtime_video(pipe, case, seed)


def chunk_max_abs(ours: np.ndarray, ref: np.ndarray) -> list[float]:
    """Max abs error per 33-frame chunk; [inf] when the videos' shapes differ."""
    if ours.shape != ref.shape:
        return [float("inf")]
    return [float(np.abs(ours[k:k + CHUNK_FRAMES] - ref[k:k + CHUNK_FRAMES]).max())
            for k in range(0, ref.shape[0], CHUNK_FRAMES)]


def compare_fp32(case: PipelineCase, expected: np.ndarray, got: np.ndarray) -> dict:
    per_chunk = chunk_max_abs(got, expected)
    return {"name": case.name, "frames": int(expected.shape[0]), "chunks": len(per_chunk),
            "max_abs_err": max(per_chunk), "max_abs_err_per_chunk": per_chunk,
            "passed": max(per_chunk) <= PIXEL_THRESHOLD}


def run_pipeline_parity(checkpoint, pipe, cases=None, seed: int = 0, chunks: int | None = None, adapters=()) -> dict:
    """``pipe`` is a helios_deploy.runtime.Pipeline over artifacts of ``checkpoint``; ``cases`` default to
    its variant's (VARIANT_CASES), at every exported size; ``chunks`` overrides their length (2 chunks)."""
    cases = with_chunks(VARIANT_CASES[pipe.variant.name] if cases is None else cases, chunks, pipe.sizes)
    results = [compare_fp32(case, expected, got) for case, expected, got in _videos(checkpoint, pipe, cases, seed, adapters)]
    return {"threshold_max_abs_err": PIXEL_THRESHOLD, "variant": pipe.variant.name,
            "passed": all(r["passed"] for r in results), "cases": results}


# FP8: the video cannot match to 1e-3, so it is scored by PSNR (dB, peak 1.0) per 33-frame chunk.
# Measured on the tiny checkpoint (2 chunks, seed 0, default FP8 test recipe): FP8 runtime vs the fp32
# reference 35.0-40.5 dB per chunk (t2v 37.0/36.1, t2v 2,2,2 amplify 40.5/38.6, i2v 35.1/35.0); for scale,
# the fp32 runtime with another prompt scores 16.9/17.4 dB and with another seed 10.6/10.1 dB. 30 dB
# leaves 5 dB (about 3x the MSE) below the worst FP8 chunk and is far above a different video.
# Over a long stream the error must not build up: the last chunk's PSNR within DRIFT_DB of the first's
# (12 chunks measured: slopes -0.04 to -0.07 dB per chunk, last - first -0.2 to -2.2 dB; docs/reliability.md, Long streams).
FP8_CASES = (PipelineCase("t2v_111"), PipelineCase("t2v_222_amplify", steps=(2, 2, 2), amplify=True),
             PipelineCase("i2v_111", condition="image"))
FP8_VARIANT_CASES = {"distilled": FP8_CASES, "base": (BASE_CASES[0], BASE_CASES[1]), "mid": (MID_CASES[0],)}
PSNR_THRESHOLD = 30.0
DRIFT_DB = 3.0


def psnr(ours: np.ndarray, ref: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(ours, np.float64) - np.asarray(ref, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def chunk_psnr(ours: np.ndarray, ref: np.ndarray) -> list[float]:
    """PSNR per 33-frame chunk of two videos [T, H, W, 3] in [0, 1]; [-inf] when their shapes differ."""
    if ours.shape != ref.shape:
        return [float("-inf")]
    return [psnr(ours[k:k + CHUNK_FRAMES], ref[k:k + CHUNK_FRAMES]) for k in range(0, ref.shape[0], CHUNK_FRAMES)]


def psnr_trend(values: list[float]) -> dict:
    """How PSNR moves along the stream: least-squares slope (dB per chunk) and last minus first chunk."""
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return {"slope_db_per_chunk": 0.0, "drift_db": 0.0}
    if not np.all(np.isfinite(v)):  # a chunk equal to the reference (inf) or of another shape (-inf)
        return {"slope_db_per_chunk": float("nan"), "drift_db": float("nan")}
    return {"slope_db_per_chunk": float(np.polyfit(np.arange(len(v)), v, 1)[0]), "drift_db": float(v[-1] - v[0])}


def compare_psnr(case: PipelineCase, expected: np.ndarray, got: np.ndarray, threshold: float = PSNR_THRESHOLD) -> dict:
    chunks = chunk_psnr(got, expected)
    trend = psnr_trend(chunks)
    drift_ok = not trend["drift_db"] < -DRIFT_DB  # NaN (identical chunks) is no drift
    return {"name": case.name, "frames": int(expected.shape[0]), "psnr_db": chunks, **trend,
            "max_abs_err": float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf"),
            "passed": min(chunks) >= threshold and drift_ok}


def run_pipeline_psnr(checkpoint, pipe, cases=None, seed: int = 0, threshold: float = PSNR_THRESHOLD,
                      chunks: int | None = None, adapters=()) -> dict:
    """PSNR of our (FP8) runtime's video against the fp32 reference pipeline, per chunk of 33 frames, and
    its trend over the stream (``cases`` default to the variant's FP8_VARIANT_CASES)."""
    cases = with_chunks(FP8_VARIANT_CASES[pipe.variant.name] if cases is None else cases, chunks, pipe.sizes)
    results = [compare_psnr(case, expected, got, threshold)
               for case, expected, got in _videos(checkpoint, pipe, cases, seed, adapters)]
    return {"metric": "psnr", "threshold_psnr_db": threshold, "max_drift_db": DRIFT_DB, "variant": pipe.variant.name,
            "passed": all(r["passed"] for r in results), "cases": results}
