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


@pytest.mark.parametrize("steps,amplify,frames", [((1, 1, 1), False, 66), ((1, 1, 1), True, 66),
                                                  ((2, 2, 2), False, 40), ((2, 2, 2), True, 34)])
def test_t2v_equals_reference_pipeline(reference_pipe, ours, cholesky_float64, steps, amplify, frames):
    """Two chunks, the whole distilled loop, same seed: max abs error <= 1e-3 in [0, 1] pixel units."""
    ref = reference_pipe(prompt=PROMPT, height=HEIGHT, width=WIDTH, num_frames=frames, guidance_scale=1.0,
                         pyramid_num_inference_steps_list=list(steps), is_amplify_first_chunk=amplify,
                         generator=torch.Generator().manual_seed(3), output_type="np",
                         max_sequence_length=TEXT_LENGTH).frames[0]
    got = ours.generate(PROMPT, num_frames=frames, seed=3, pyramid_steps=steps, amplify_first_chunk=amplify,
                        output="float")
    assert got.shape == ref.shape == (65, HEIGHT, WIDTH, 3)
    assert np.abs(got - ref).max() <= 1e-3


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


def test_torch_backend_runs_reference_modules(artifacts, ours):
    mixed = Pipeline.from_artifacts(artifacts, backend="transformer=torch,vae_decoder=torch")
    a = mixed.generate(PROMPT, num_frames=33, seed=4, output="float")
    b = ours.generate(PROMPT, num_frames=33, seed=4, output="float")
    assert mixed.runner("transformer").backend == "torch"
    assert np.abs(a - b).max() <= 1e-3


@pytest.mark.parametrize("kwargs,needle", [
    ({"prompt": ""}, "empty prompt"),
    ({"prompt": "x", "num_frames": 0}, "must be positive"),
    ({"prompt": "x", "height": 128}, "exported for 64x128"),
    ({"prompt": "x", "pyramid_steps": (1, 0, 1)}, "pyramid steps"),
])
def test_bad_requests(ours, kwargs, needle):
    from helios_deploy.errors import UserError

    with pytest.raises(UserError, match=needle):
        next(ours.stream(**kwargs))


def test_runtime_does_not_import_diffusers_or_transformers(artifacts):
    import subprocess
    import sys

    code = ("import sys; from helios_deploy.runtime import Pipeline; "
            f"p = Pipeline.from_artifacts({str(artifacts)!r}); p.generate('a cat', num_frames=33); "
            "bad = [m for m in ('diffusers', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
