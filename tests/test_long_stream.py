"""Long streams stay correct and flat: 12 chunks of the runtime against diffusers' HeliosPyramidPipeline at
every chunk (fp32, and a prompt that changes every chunk), the FP8 runtime's PSNR over 12 chunks against
the fp32 reference, and memory over a stream of 20 chunks through the Python API and through Triton.
The 100-chunk figures come from `helios-deploy long-stream ARTIFACTS --chunks 100` (numbers, not asserted)."""

from __future__ import annotations

import gc

import pytest
import torch

from .conftest import run_cli

pytestmark = pytest.mark.slow

LONG = 12  # chunks: 396 frames, trimmed to 393


@pytest.fixture(scope="module")
def long_cases():
    from helios_deploy.export.parity.pipeline import PipelineCase, with_chunks

    return {c.name: c for c in with_chunks([PipelineCase("t2v_111"), PipelineCase("t2v_111_interactive",
                                                                                    interactive=True)], LONG)}


@pytest.fixture(scope="module")
def long_reference(tiny_ckpt, artifacts, long_cases):
    """The reference pipeline's 12-chunk videos, computed once."""
    from helios_deploy.export.parity.pipeline import reference_pipeline, reference_video
    from helios_deploy.runtime import Pipeline

    pipe = Pipeline.from_artifacts(artifacts)
    ref = reference_pipeline(tiny_ckpt, pipe.variant.name)
    return {name: reference_video(ref, case, pipe.variant.name, pipe.height, pipe.width, pipe.text_length)
            for name, case in long_cases.items()}


@pytest.fixture(scope="module")
def ours(artifacts):
    from helios_deploy.runtime import Pipeline

    return Pipeline.from_artifacts(artifacts)


def test_fp32_stream_equals_reference_at_every_chunk_of_12(ours, long_cases, long_reference):
    from helios_deploy.export.parity.pipeline import compare_fp32, runtime_video

    case = long_cases["t2v_111"]
    r = compare_fp32(case, long_reference[case.name], runtime_video(ours, case))
    print("fp32 max abs error per chunk:", ", ".join(f"{e:.1e}" for e in r["max_abs_err_per_chunk"]))
    assert r["frames"] == 393 and r["chunks"] == LONG
    assert all(e <= 1e-3 for e in r["max_abs_err_per_chunk"]), r


def test_prompt_changing_every_chunk_equals_reference_chunk_by_chunk(ours, long_cases, long_reference):
    """The runtime's schedule {k: prompt_k} against the reference given each chunk's prompt embeddings."""
    from helios_deploy.export.parity.pipeline import chunk_max_abs, compare_fp32, runtime_video

    case = long_cases["t2v_111_interactive"]
    prompts = case.prompts()
    assert all(a != b for a, b in zip(prompts, prompts[1:]))  # a new prompt at every chunk
    r = compare_fp32(case, long_reference[case.name], runtime_video(ours, case))
    print("interactive max abs error per chunk:", ", ".join(f"{e:.1e}" for e in r["max_abs_err_per_chunk"]))
    assert r["chunks"] == LONG and all(e <= 1e-3 for e in r["max_abs_err_per_chunk"]), r
    # the reference really switched prompts: same first chunk as the fixed-prompt run, then another video
    apart = chunk_max_abs(long_reference[case.name], long_reference["t2v_111"])
    assert apart[0] <= 1e-4 and min(apart[1:]) > 0.1, apart


def test_fp8_psnr_holds_over_12_chunks(quantized, long_cases, long_reference):
    from helios_deploy.export.parity.pipeline import DRIFT_DB, PSNR_THRESHOLD, compare_psnr, runtime_video
    from helios_deploy.runtime import Pipeline

    case = long_cases["t2v_111"]
    fp8 = Pipeline.from_artifacts(quantized, precision="fp8")
    r = compare_psnr(case, long_reference[case.name], runtime_video(fp8, case))
    print(f"fp8 PSNR per chunk (dB): {', '.join(f'{v:.2f}' for v in r['psnr_db'])}; slope "
          f"{r['slope_db_per_chunk']:+.3f} dB/chunk; chunk 12 - chunk 1 {r['drift_db']:+.2f} dB")
    assert len(r["psnr_db"]) == LONG and min(r["psnr_db"]) >= PSNR_THRESHOLD, r
    assert r["psnr_db"][-1] >= r["psnr_db"][0] - DRIFT_DB and r["passed"], r
    assert r["max_abs_err"] > 1e-3  # really the FP8 graph


def test_fp8_attention_psnr_holds_over_12_chunks(quantized_attention, long_cases, long_reference):
    """Issue 30: FP8 attention's drift audit, on the same targets as the FP8 linears (>= 30 dB every chunk, the
    last chunk within DRIFT_DB of the first)."""
    from helios_deploy.export.parity.pipeline import DRIFT_DB, PSNR_THRESHOLD, compare_psnr, runtime_video
    from helios_deploy.runtime import Pipeline

    case = long_cases["t2v_111"]
    fp8 = Pipeline.from_artifacts(quantized_attention, precision="fp8")
    r = compare_psnr(case, long_reference[case.name], runtime_video(fp8, case))
    print(f"fp8 attention PSNR per chunk (dB): {', '.join(f'{v:.2f}' for v in r['psnr_db'])}; slope "
          f"{r['slope_db_per_chunk']:+.3f} dB/chunk; chunk 12 - chunk 1 {r['drift_db']:+.2f} dB")
    assert len(r["psnr_db"]) == LONG and min(r["psnr_db"]) >= PSNR_THRESHOLD, r
    assert r["psnr_db"][-1] >= r["psnr_db"][0] - DRIFT_DB and r["passed"], r


def test_parity_cli_reports_each_chunk(tiny_ckpt, artifacts, monkeypatch, capsys):
    import helios_deploy.export.parity.pipeline as P

    monkeypatch.setattr(P, "CASES", (P.PipelineCase("t2v_111_interactive", interactive=True),))  # one case, cheap
    code, out, err = run_cli(["parity", tiny_ckpt, artifacts, "--components", "text_encoder", "--pipeline",
                              "--chunks", 3], capsys)
    assert code == 0, err
    line = next(x for x in out.splitlines() if "max_abs_err per chunk" in x)
    assert len(line.split(":")[1].split(",")) == 3 and "t2v_111_interactive  frames 97" in out
    code, _, err = run_cli(["parity", tiny_ckpt, artifacts, "--chunks", 3], capsys)
    assert code == 1 and "--chunks is for the pipeline comparison" in err


# ---------------------------------------------------------------------------------------------------
# Memory over a stream (targets: RSS after chunk 5 and after chunk 20 within 5%)


def live_tensor_bytes() -> int:
    """Bytes of every torch storage reachable from Python objects now (each storage counted once)."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.Tensor):  # type(), not isinstance: no __class__ lookups on proxies
            continue
        try:
            s = obj.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        except (RuntimeError, NotImplementedError):  # fake or functional tensors the exporter left behind
            continue
    return sum(storages.values())


def chunk_kb(pipe) -> float:
    """One chunk's uint8 frames, in KB: what a stream that kept its output would add per chunk."""
    return 33 * pipe.height * pipe.width * 3 / 1024


def test_api_stream_memory_stays_flat(ours):
    from helios_deploy.measure.longstream import rss_bytes

    list(ours.stream("a quiet lake at dawn", num_frames=33, seed=3))  # warm-up: sessions, buffers, prompt
    rss, tensors = [], []
    for chunk in ours.stream("a quiet lake at dawn", num_frames=33 * 20, seed=3):
        del chunk
        tensors.append(live_tensor_bytes())
        rss.append(rss_bytes())
    print(f"API: RSS after chunk 5 {rss[4] / 2**20:.1f} MB, after chunk 20 {rss[-1] / 2**20:.1f} MB; "
          f"live tensors {tensors[1] / 2**20:.2f} MB")
    assert abs(rss[-1] - rss[4]) <= 0.05 * rss[4], (rss[4], rss[-1])
    # at this size 5% is 30+ chunks of frames: also nothing chunk-sized may be kept per chunk
    assert (rss[-1] - rss[4]) / 15 / 1024 < chunk_kb(ours) / 4, (rss[4], rss[-1])
    # what the stream holds (history, prompt embeddings, work buffers) is the same from the second chunk on
    assert tensors[1:] == [tensors[1]] * (len(tensors) - 1), tensors


def test_triton_stream_memory_stays_flat(artifacts, ours):
    """Through a real tritonserver: the runtime (in the Python backend stub) and the client stay flat.
    tritonserver 2.51 itself (nvidia-pytriton 0.7.0) is not: its gRPC frontend keeps every response of a
    streamed request allocated until the request ends (a response queue that grows by one response per
    chunk; later releases bound it with --grpc-max-response-pool-size), so its RSS grows by about one
    chunk's frames per chunk. That is printed, not asserted: it is Triton's, and docs/serving.md says so."""
    from helios_deploy.measure.longstream import format_summary, triton_stream

    r = triton_stream(artifacts, 20, early=5)
    print(format_summary(r))
    m = r["memory"]
    for name in ("backend stub (runtime)", "client (this process)"):
        assert abs(m[name]["rss_growth_pct"]) <= 5.0, (name, m[name])
    assert m["backend stub (runtime)"]["rss_growth_kb_per_chunk"] < chunk_kb(ours) / 4, m["backend stub (runtime)"]


def test_drift_audit_cli(tiny_ckpt, quantized_attention, tmp_path, capsys):
    """`long-stream --drift-against CHECKPOINT`: the FP8 graphs' PSNR per chunk against diffusers' fp32 pipeline,
    beside the per-chunk adherence verdicts (meaningful on the trained checkpoint)."""
    import json

    out = tmp_path / "drift.json"
    code, stdout, err = run_cli(["long-stream", quantized_attention, "--chunks", 3, "--drift-against", tiny_ckpt,
                                 "--json", out], capsys)
    assert code == 0, err
    r = json.loads(out.read_text())
    assert r["chunks"] == 3 and len(r["adherence_per_chunk"]) == 3 and r["precision"] == "fp8"
    assert min(r["psnr_db"]) >= r["threshold_psnr_db"], r
    # the verdict is the targets' (measured: 36.5, 35.5, 33.5 dB, last - first -3.05 dB, a miss; linears only on this
    # prompt: 37.2, 36.0, 34.2 dB, -3.07 dB: FP8 linears' own drift, documented in docs/quantize-and-build.md)
    assert r["psnr_passed"] == (r["drift_db"] >= -r["max_drift_db"]), r
    assert "fp8 drift over 3 chunks" in stdout and "adherence:" in stdout
