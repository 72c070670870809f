"""`bench`: time the runtime over artifacts (total, first-chunk latency, steady-state FPS, per
component and per pyramid stage, host overhead, peak memory), optionally against the diffusers
pipeline of the checkpoint's variant (HeliosPipeline or HeliosPyramidPipeline, same settings) in the same
run, and next to the cost model's prediction."""

from __future__ import annotations

import resource
import time
from pathlib import Path

from ..errors import UserError

PROMPT = "A cat and a dog baking a cake together in a kitchen."


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _stage_of(pipe, shape: tuple) -> str:
    g = pipe.artifacts.spec("transformer").graphs[0]
    for p in g.operating_points:
        if shape[-2:] == (p.dims["stage_height"] * 2, p.dims["stage_width"] * 2):
            return p.name
    return "x".join(map(str, shape[-2:]))


def _measure(pipe, prompt, frames, seed, settings: dict) -> dict:
    """One timed run; ``settings`` are Pipeline.stream keywords (the size among them)."""
    runners = list(pipe._runners.values())
    for r in runners:
        r.reset_stats()
    pipe._prompt_cache.clear()  # text encoding is part of a request
    t0 = time.perf_counter()
    stamps = []
    n_frames = []
    for chunk in pipe.stream(prompt, num_frames=frames, seed=seed, **settings):
        stamps.append(time.perf_counter())
        n_frames.append(chunk.frames.shape[0])
    total = stamps[-1] - t0
    runners = list(pipe._runners.values())  # sessions opened lazily during the run count too
    per_component: dict[str, float] = {}
    for r in runners:
        per_component[r.component] = per_component.get(r.component, 0.0) + r.seconds
    transformer = pipe._runners[("transformer", "model")]
    per_stage: dict[str, float] = {}
    stage_calls: dict[str, int] = {}
    for shape, sec in transformer.seconds_by_shape.items():
        stage = _stage_of(pipe, shape)
        per_stage[stage] = per_stage.get(stage, 0.0) + sec
        stage_calls[stage] = stage_calls.get(stage, 0) + transformer.calls_by_shape[shape]
    backend = sum(per_component.values())
    steady = (sum(n_frames[1:]) / (stamps[-1] - stamps[0])) if len(stamps) > 1 else None
    return {"total_s": total, "first_chunk_latency_s": stamps[0] - t0, "chunks": len(stamps),
            "frames": sum(n_frames), "fps": sum(n_frames) / total, "steady_state_fps": steady,
            "per_component_s": per_component, "transformer_per_stage_s": per_stage,
            "transformer_per_stage_calls": stage_calls,
            "host_overhead_per_chunk_ms": 1000 * (total - backend) / len(stamps),
            "backend_calls": {f"{r.component}/{r.graph.name}": r.calls for r in runners}}


def _reference_seconds(checkpoint, pipe, prompt, frames, seed, sampling, settings: dict, repeats: int) -> float:
    """Best of ``repeats`` runs (after a warm-up) of the variant's diffusers pipeline with the same settings."""
    import torch

    from ..export.parity.pipeline import PipelineCase, _reference_kwargs, configured, reference_pipeline

    variant = pipe.variant.name
    ref = reference_pipeline(checkpoint, variant)
    case = PipelineCase("bench", steps=sampling.steps, amplify=sampling.amplify_first_chunk, frames=frames,
                        guidance_scale=sampling.guidance_scale, negative_prompt=sampling.negative_prompt,
                        sampler=settings.get("sampler"), cfg_zero_star=settings.get("cfg_zero_star"))
    kwargs = _reference_kwargs(case, {}, variant)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up, like ours
        t0 = time.perf_counter()
        with configured(ref, case):
            ref(prompt=prompt, height=settings["height"], width=settings["width"], num_frames=frames,
                generator=torch.Generator().manual_seed(seed), output_type="np", max_sequence_length=pipe.text_length,
                **kwargs)
        best = min(best, time.perf_counter() - t0)
    return best


def _prediction(pipe, sampling, gpu: str, height: int, width: int) -> dict | None:
    """The cost model's FLOPs and roofline seconds for the same workload (None without the checkpoint)."""
    ckpt = Path(pipe.artifacts.manifest["checkpoint"]["path"])
    if not ckpt.is_dir():
        return None
    from ..cost import estimate

    est = estimate(ckpt, height=height, width=width, steps=sampling.steps, text_length=pipe.text_length,
                   meta_count=False, guidance_scale=sampling.guidance_scale)
    flops = {c.key: sum(c.flops.values()) for c in est.calls}
    return {"gpu": gpu, "flops": flops, "bf16_s": est.predicted_seconds(gpu, "bf16"),
            "fp8_s": est.predicted_seconds(gpu, "fp8")}


def run_bench(artifacts, *, prompt: str = PROMPT, frames: int = 66, seed: int = 0, backend: str = "onnxruntime",
              device: str = "cpu", repeats: int = 3, reference: str | Path | None = None, gpu: str = "H100 SXM",
              height: int | None = None, width: int | None = None, **settings) -> dict:
    """``settings``: the sampler settings of Pipeline.stream (pyramid_steps, num_inference_steps,
    guidance_scale, negative_prompt, amplify_first_chunk, sampler, cfg_zero_star); unset ones take the
    checkpoint variant's defaults. ``height`` x ``width``: one of the exported sizes (default the first)."""
    from ..runtime import Pipeline

    if repeats < 1:
        raise UserError("--repeats must be at least 1")
    pipe = Pipeline.from_artifacts(artifacts, backend=backend, device=device)
    sampling = pipe.sampling(**settings)  # checked before anything runs
    height, width = pipe.check_size(height, width)
    settings = {**settings, "height": height, "width": width}
    pipe.generate(prompt, num_frames=33, seed=seed, **settings)  # warm-up: sessions, allocations
    runs = [_measure(pipe, prompt, frames, seed, settings) for _ in range(repeats)]
    best = min(runs, key=lambda r: r["total_s"])
    result = {"artifacts": str(artifacts), "backend": backend, "device": device, "frames_requested": frames,
              "variant": pipe.variant.name, "sampler": sampling.sampler, "steps": list(sampling.steps),
              "guidance_scale": sampling.guidance_scale, "amplify_first_chunk": sampling.amplify_first_chunk,
              "transformer_calls_per_chunk": sum(sampling.steps), "transformer_batch": 2 if sampling.guidance else 1,
              "repeats": repeats, "video": {"height": height, "width": width}, **best,
              "total_s_all_runs": [r["total_s"] for r in runs], "peak_rss_mb": _peak_rss_mb()}
    import torch

    if torch.cuda.is_available() and pipe.device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["predicted"] = _prediction(pipe, sampling, gpu, height, width)
    if reference is not None:
        ref_s = _reference_seconds(reference, pipe, prompt, frames, seed, sampling, settings, repeats)
        result["reference_total_s"] = ref_s
        result["speedup_vs_reference"] = ref_s / best["total_s"]
    return result
