"""The runtime against the diffusers reference: scheduler, tokenizer, prompt embeddings, runners and
the whole distilled loop (HeliosPyramidPipeline) on the tiny checkpoint."""

import json

import numpy as np
import pytest
import torch

from helios_deploy.runtime import Pipeline
from helios_deploy.runtime.scheduler import DMDScheduler, calculate_shift
from helios_deploy.runtime.text import PromptTokenizer

from .conftest import HEIGHT, TEXT_LENGTH, WIDTH, run_cli

PROMPT = "A cat and a dog baking a cake together in a kitchen."


@pytest.fixture(scope="module")
def reference_pipe(tiny_ckpt):
    from diffusers import HeliosPyramidPipeline

    pipe = HeliosPyramidPipeline.from_pretrained(tiny_ckpt)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(artifacts):
    return Pipeline.from_artifacts(artifacts, backend="onnxruntime", device="cpu")


def test_scheduler_equals_reference(tiny_ckpt):
    from diffusers import HeliosDMDScheduler

    cfg = json.loads((tiny_ckpt / "scheduler" / "scheduler_config.json").read_text())
    ref, ours = HeliosDMDScheduler.from_config(cfg), DMDScheduler(cfg)
    for amplify in (False, True):
        for stage in range(3):
            for n in (1, 2, 4):
                mu = calculate_shift(37 * (stage + 1))
                ref.set_timesteps(n, stage, mu=mu, is_amplify_first_chunk=amplify)
                s = ours.stage_schedule(n, stage, mu, amplify)
                assert torch.equal(ref.timesteps, s.timesteps) and torch.equal(ref.sigmas, s.sigmas)
    assert ours.ori_start_sigmas == ref.ori_start_sigmas


@pytest.mark.parametrize("prompt", ["a cat", "  Two   dogs &amp; a   ball \n", "x " * 60, "ünïcödé ☃ Straße"])
def test_tokenizer_equals_reference(tiny_ckpt, prompt):
    from diffusers.pipelines.helios.pipeline_helios_pyramid import prompt_clean
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tiny_ckpt / "tokenizer")(
        [prompt_clean(prompt)], padding="max_length", max_length=TEXT_LENGTH, truncation=True,
        add_special_tokens=True, return_attention_mask=True)
    ids, mask = PromptTokenizer(tiny_ckpt / "tokenizer", TEXT_LENGTH)([prompt])
    assert ids.tolist() == ref.input_ids and mask.tolist() == ref.attention_mask


def test_prompt_embeddings_equal_reference(reference_pipe, ours):
    ref, _ = reference_pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=TEXT_LENGTH)
    got = ours.encode_prompt(PROMPT)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)
    n = int((ours.tokenizer([PROMPT])[1]).sum())
    assert torch.count_nonzero(got[:, n:]) == 0


@pytest.fixture(scope="module")
def pipeline_parity(tiny_ckpt, ours):
    """Every pipeline case run once through both our runtime and HeliosPyramidPipeline."""
    from helios_deploy.export.parity.pipeline import run_pipeline_parity

    return run_pipeline_parity(tiny_ckpt, ours)


@pytest.mark.parametrize("case", ["t2v_111", "t2v_111_amplify", "t2v_222", "t2v_222_amplify", "i2v_111", "v2v_111",
                                  "t2v_111_interactive"])
def test_pipeline_equals_reference(pipeline_parity, case):
    """Two chunks of the whole distilled loop, same seed: max abs error <= 1e-3 in [0, 1] pixel units."""
    result = {c["name"]: c for c in pipeline_parity["cases"]}[case]
    assert result["frames"] == 65
    assert result["max_abs_err"] <= 1e-3, result
    assert result["passed"]


def test_stream_yields_decoded_chunks_in_order(ours):
    chunks = list(ours.stream(PROMPT, num_frames=66, seed=1))
    assert [c.index for c in chunks] == [0, 1]
    assert [c.frames.shape[0] for c in chunks] == [33, 32]  # 66 -> 65 frames after the final trim
    assert all(c.frames.dtype == np.uint8 and c.frames.shape[1:] == (HEIGHT, WIDTH, 3) for c in chunks)
    whole = ours.generate(PROMPT, num_frames=66, seed=1)
    assert np.array_equal(whole, np.concatenate([c.frames for c in chunks]))


def test_prompt_schedule_changes_the_prompt_between_chunks(ours):
    fixed = list(ours.stream(PROMPT, num_frames=66, seed=2, output="float"))
    switched = list(ours.stream({0: PROMPT, 1: "a red car on a coastal road"}, num_frames=66, seed=2, output="float"))
    assert np.array_equal(fixed[0].frames, switched[0].frames)
    assert np.abs(fixed[1].frames - switched[1].frames).max() > 1e-3


def test_prompt_embeddings_are_cached_and_bounded(ours, monkeypatch):
    import helios_deploy.runtime.pipeline as P

    monkeypatch.setattr(P, "PROMPT_CACHE_SIZE", 2)
    ours._prompt_cache.clear()
    encoder = ours.runner("text_encoder")
    calls = encoder.calls
    first = ours.encode_prompt("one")
    assert ours.encode_prompt("one") is first and encoder.calls == calls + 1  # cached: no second encoder call
    ours.encode_prompt("two")
    ours.encode_prompt("one")  # most recently used again
    ours.encode_prompt("three")  # evicts "two", the least recently used
    assert list(ours._prompt_cache) == ["one", "three"] and encoder.calls == calls + 3


def test_torch_backend_runs_reference_modules(artifacts, ours):
    mixed = Pipeline.from_artifacts(artifacts, backend="transformer=torch,vae_decoder=torch")
    a = mixed.generate(PROMPT, num_frames=33, seed=4, output="float")
    b = ours.generate(PROMPT, num_frames=33, seed=4, output="float")
    assert mixed.runner("transformer").backend == "torch"
    assert np.abs(a - b).max() <= 1e-3


@pytest.mark.parametrize("kwargs,needle", [
    ({"prompt": ""}, "empty prompt"),
    ({"prompt": "x", "num_frames": 0}, "must be positive"),
    ({"prompt": "x", "height": 128}, "(?s)128x128 was not exported.*exported sizes: 64x128"),
    ({"prompt": "x", "pyramid_steps": (1, 0, 1)}, "pyramid steps"),
])
def test_bad_requests(ours, kwargs, needle):
    from helios_deploy.errors import UserError

    with pytest.raises(UserError, match=needle):
        ours.stream(**kwargs)  # checked before anything runs


def test_bad_conditioning(ours, tmp_path):
    from helios_deploy.errors import UserError

    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    with pytest.raises(UserError, match="cannot read image"):
        ours.generate("x", image=bad)
    with pytest.raises(UserError, match="video too short"):
        ours.generate("x", video=np.zeros((20, HEIGHT, WIDTH, 3), np.uint8))
    with pytest.raises(UserError, match="not both"):
        ours.stream("x", image=np.zeros((HEIGHT, WIDTH, 3), np.uint8), video=np.zeros((40, HEIGHT, WIDTH, 3), np.uint8))


def test_request_needing_a_missing_component(artifacts, tmp_path):
    import shutil

    from helios_deploy.errors import UserError

    arts = tmp_path / "arts"
    shutil.copytree(artifacts, arts)
    manifest = json.loads((arts / "manifest.json").read_text())
    del manifest["components"]["vae_encoder"]
    (arts / "manifest.json").write_text(json.dumps(manifest))
    pipe = Pipeline.from_artifacts(arts)
    with pytest.raises(UserError, match="have no vae_encoder"):
        pipe.generate("x", image=np.zeros((HEIGHT, WIDTH, 3), np.uint8))


def test_generate_cli_writes_mp4(artifacts, tmp_path, capsys):
    from helios_deploy.runtime.video_io import read_video

    out = tmp_path / "video.mp4"
    code, stdout, err = run_cli(["generate", artifacts, "--prompt", PROMPT, "--frames", 66, "--steps", "1,1,1",
                                 "-o", out], capsys)
    assert code == 0, err
    frames = read_video(out)
    assert frames.shape == (65, HEIGHT, WIDTH, 3)
    # lossy H.264 of near-noise content (random weights): the mp4 must carry the runtime's frames,
    # i.e. correlate strongly with them and far more than with another seed's video (0.94 vs 0.35 seen)
    pipe = Pipeline.from_artifacts(artifacts)
    corr = lambda a, b: np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1]  # noqa: E731
    same = corr(frames, pipe.generate(PROMPT, num_frames=66, seed=0))
    other = corr(frames, pipe.generate(PROMPT, num_frames=66, seed=5))
    assert same > 0.85 and same > other + 0.3
    # V2V from the mp4 we just wrote, and a bad --steps value
    code, _, err = run_cli(["generate", artifacts, "--prompt", "x", "--video", out, "-o", tmp_path / "v2v.mp4"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["generate", artifacts, "--prompt", "x", "--steps", "1,x", "-o", tmp_path / "b.mp4"], capsys)
    assert code == 1 and "1,x" in err and not (tmp_path / "b.mp4").exists()


def test_generate_low_memory_makes_the_same_video(artifacts, tmp_path, capsys):
    """--low-memory turns ONNX Runtime's weight prepacking off (one copy of the weights): another GEMM path,
    the same video up to float rounding (compared on the float output, and the mp4 is written)."""
    low = Pipeline.from_artifacts(artifacts, low_memory=True)
    ref = Pipeline.from_artifacts(artifacts)
    a, b = (p.generate(PROMPT, num_frames=33, seed=0, output="float") for p in (low, ref))
    assert a.shape == b.shape and float(np.abs(a - b).max()) < 1e-4
    code, _, err = run_cli(["generate", artifacts, "--prompt", PROMPT, "--frames", 33, "--low-memory", "-o",
                            tmp_path / "low.mp4"], capsys)
    assert code == 0 and (tmp_path / "low.mp4").stat().st_size > 0, err


def test_runtime_does_not_import_diffusers_or_transformers(artifacts):
    import subprocess
    import sys

    code = ("import sys; from helios_deploy.runtime import Pipeline; "
            f"p = Pipeline.from_artifacts({str(artifacts)!r}); p.generate('a cat', num_frames=33); "
            "bad = [m for m in ('diffusers', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_reports_consistent_numbers(artifacts, tiny_ckpt, tmp_path, capsys):
    """The bench command runs ours and the reference in one run; numbers are printed, not asserted
    against targets here (speed targets belong to the benchmark, not to timed tests)."""
    out = tmp_path / "bench.json"
    code, stdout, err = run_cli(["bench", artifacts, "--against-reference", tiny_ckpt, "--repeats", 1,
                                 "--json", out], capsys)
    assert code == 0, err
    r = json.loads(out.read_text())
    assert r["chunks"] == 2 and r["frames"] == 65
    assert set(r["transformer_per_stage_s"]) == {"stage0", "stage1", "stage2"}
    assert sum(r["per_component_s"].values()) <= r["total_s"]
    assert r["first_chunk_latency_s"] <= r["total_s"] and r["host_overhead_per_chunk_ms"] >= 0
    assert r["backend_calls"]["transformer/model"] == 6
    assert r["backend_calls"]["vae_decoder/model"] == 2  # one call of the chunk graph per chunk
    assert r["reference_total_s"] > 0 and r["speedup_vs_reference"] == pytest.approx(r["reference_total_s"] / r["total_s"])
    assert set(r["predicted"]["bf16_s"]) >= {"transformer/stage0", "vae_decoder/chunk"}
    assert "speedup_vs_reference" in stdout


def test_torch_backend_refuses_a_changed_checkpoint(tiny_ckpt, artifacts, tmp_path):
    import shutil

    from helios_deploy.errors import UserError
    from helios_deploy.checkpoints.tiny import write_tiny_checkpoint

    arts = tmp_path / "arts"
    shutil.copytree(artifacts, arts)
    other = write_tiny_checkpoint(tmp_path / "other", seed=9)
    manifest = json.loads((arts / "manifest.json").read_text())
    manifest["checkpoint"]["path"] = str(other)  # the manifest now points at different weights
    (arts / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="another checkpoint"):
        Pipeline.from_artifacts(arts, backend="torch").generate("x")


def test_runner_checks_feeds_against_the_spec(ours):
    from helios_deploy.errors import UserError

    runner = ours.runner("text_encoder")
    ids = torch.zeros(1, TEXT_LENGTH, dtype=torch.int64)
    with pytest.raises(UserError, match="wrong inputs"):
        runner.infer({"input_ids": ids, "mask": ids})
    with pytest.raises(UserError, match="wrong input dtypes"):
        runner.infer({"input_ids": ids, "attention_mask": ids.float()})


def test_write_mp4_without_frames_is_a_user_error_and_writes_nothing(tmp_path):
    from helios_deploy.errors import UserError
    from helios_deploy.runtime.video_io import write_mp4

    with pytest.raises(UserError, match="no frames"):
        write_mp4(tmp_path / "empty.mp4", iter([]))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("steps,amplify", [(1, False), (2, False), (2, True)])
def test_dmd_step_equals_reference_scheduler_step(tiny_ckpt, steps, amplify):
    """Our float32 step against HeliosDMDScheduler.step (float64 inside) on the schedules the pipeline
    uses: every step of every stage, within float32 rounding."""
    from diffusers import HeliosDMDScheduler

    from helios_deploy.runtime.scheduler import dmd_step

    cfg = json.loads((tiny_ckpt / "scheduler" / "scheduler_config.json").read_text())
    ref, ours = HeliosDMDScheduler.from_config(cfg), DMDScheduler(cfg)
    g = torch.Generator().manual_seed(0)
    for stage in range(3):
        mu = calculate_shift(64 * 4 ** stage)
        ref.set_timesteps(steps, stage, mu=mu, is_amplify_first_chunk=amplify)
        schedule = ours.stage_schedule(steps, stage, mu, amplify)
        sample, start = torch.randn(2, 1, 4, 9, 8, 16, generator=g)
        for i, t in enumerate(ref.timesteps):
            flow = torch.randn(1, 4, 9, 8, 16, generator=g)
            want = ref.step(flow, t, sample, return_dict=False, cur_sampling_step=i, dmd_noisy_tensor=start,
                            dmd_sigmas=ref.sigmas, dmd_timesteps=ref.timesteps, all_timesteps=ref.timesteps)[0]
            got = dmd_step(flow, sample, schedule, i, start)
            assert got.dtype == want.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            assert not torch.equal(got, sample)
            sample = got


@pytest.mark.parametrize("shape", [(1, 16, 9, 4, 8), (2, 3, 2, 3, 5)])
def test_block_renoise_equals_reference(shape):
    """Nearest 2x upsampling plus block noise (BlockNoise.renoise, two GEMMs) against the reference:
    HeliosPyramidPipeline.sample_block_noise (with the float64 Cholesky it needs on CPU),
    F.interpolate(nearest) per frame, alpha * latents + beta * noise; the same generator state."""
    from types import SimpleNamespace

    import torch.nn.functional as F
    from diffusers import HeliosPyramidPipeline

    from helios_deploy.export.exporter.patches import cholesky_float64
    from helios_deploy.runtime.sampler import BlockNoise

    b, c, t, h, w = shape
    low = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    alpha, beta = 0.8165, 0.4714
    fake = SimpleNamespace(scheduler=SimpleNamespace(config=SimpleNamespace(gamma=1 / 3)))
    with cholesky_float64():
        noise = HeliosPyramidPipeline.sample_block_noise(fake, b, c, t, 2 * h, 2 * w, (1, 2, 2), "cpu",
                                                         torch.Generator().manual_seed(7))
    up = F.interpolate(low.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w), size=(2 * h, 2 * w), mode="nearest")
    up = up.reshape(b, t, c, 2 * h, 2 * w).permute(0, 2, 1, 3, 4)
    want = alpha * up + beta * noise
    got = BlockNoise(1 / 3).renoise(low, alpha, beta, torch.Generator().manual_seed(7))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_block_noise_refuses_other_patch_sizes():
    from helios_deploy.errors import UserError
    from helios_deploy.runtime.sampler import BlockNoise

    with pytest.raises(UserError, match="patch size"):
        BlockNoise(1 / 3, (1, 1))


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_downsample_to_stage0_equals_reference_bit_for_bit(stages):
    """The reference's lines (HeliosPyramidPipeline.__call__, before the stage loop): frames next to
    batch, bilinear halving x2 per extra stage; ours resizes [B, C*T, H, W] views and scales once."""
    import torch.nn.functional as F

    from helios_deploy.runtime.sampler import downsample_to_stage0

    b, c, t, h, w = 2, 16, 9, 32, 48
    x = torch.randn(b, c, t, h, w, generator=torch.Generator().manual_seed(0))
    ref = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    for _ in range(stages - 1):
        h, w = h // 2, w // 2
        ref = F.interpolate(ref, size=(h, w), mode="bilinear") * 2
    ref = ref.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)
    assert torch.equal(downsample_to_stage0(x.clone(), stages), ref)
