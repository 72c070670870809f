"""The trained tiny checkpoint (`tiny-checkpoint DIR --trained`): it goes through the same chain as every
checkpoint (export, whole-pipeline parity against diffusers' HeliosPyramidPipeline), its training is seeded,
and its videos show what their prompts ask: colour and direction in at least 90% of 20 prompts x 2 seeds
through the runtime (ONNX Runtime, fp32), and as many with the FP8 transformer; a prompt's colour change shows
from the chunk it lands on."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from tests.trained_fixture import trained_fp8  # noqa: F401 - only this module quantizes the trained export


def test_cli_writes_the_trained_checkpoint(tmp_path, capsys):
    out = tmp_path / "trained"
    code, stdout, err = run_cli(["tiny-checkpoint", out, "--trained"], capsys)
    assert code == 0, err
    marker = json.loads((out / "helios_deploy_tiny.json").read_text())
    assert marker["trained"] and marker["variant"] == "distilled"
    record = json.loads((out / "training.json").read_text())
    assert record["vae"]["steps"] > 0 and record["transformer"]["steps"] > 0
    for component in ("transformer", "text_encoder", "vae"):  # sharded like every tiny checkpoint
        assert len(list((out / component).glob("*.safetensors"))) > 1
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "HeliosPyramidPipeline" and index["is_distilled"] is True
    code, _, err = run_cli(["tiny-checkpoint", out, "--trained"], capsys)  # not empty: refused, untouched
    assert code == 1 and "--force" in err


@pytest.mark.parametrize("args, message", [(["--retrain"], "--retrain goes with --trained"),
                                           (["--trained", "--variant", "base"], "trained tiny Helios-Distilled only")])
def test_cli_bad_combinations(tmp_path, capsys, args, message):
    code, _, err = run_cli(["tiny-checkpoint", tmp_path / "x", *args], capsys)
    assert code == 1 and message in err, err
    assert not (tmp_path / "x").exists()


def test_shipped_weights_are_small():
    from helios_deploy.checkpoints.trained import PACKAGE_DIR

    size = sum(p.stat().st_size for p in PACKAGE_DIR.rglob("*") if p.is_file())
    assert 0 < size <= 10 * 2 ** 20, size


@pytest.mark.slow
def test_parity_against_diffusers(trained_demo):
    """The whole pipeline of the trained checkpoint against diffusers, as for every other checkpoint: the demo's
    run_pipeline_parity(checkpoint, Pipeline.from_artifacts(trained_artifacts)) (every case of the variant, two
    chunks each), computed once in the session and asserted here."""
    from helios_deploy.export.parity.pipeline import PIXEL_THRESHOLD, VARIANT_CASES

    report = trained_demo["report"]["pipeline"]
    assert report["variant"] == "distilled" and report["threshold_max_abs_err"] == PIXEL_THRESHOLD, report
    assert [c["name"] for c in report["cases"]] == [c.name for c in VARIANT_CASES["distilled"]], report["cases"]
    assert all(len(c["max_abs_err_per_chunk"]) == 2 for c in report["cases"]), report["cases"]
    assert report["passed"], report["cases"]


def test_training_is_seeded(tmp_path):
    """Two short trainings from the same seed give the same weights (a few steps of each stage)."""
    import torch

    from helios_deploy.checkpoints.train_tiny import build_trained_pipeline

    torch.set_num_threads(1)
    runs = [build_trained_pipeline(seed=3, vae_steps=2, transformer_steps=2, pool=8, log=lambda m: None)
            for _ in range(2)]
    for name in ("vae", "transformer"):
        a, b = (getattr(pipe, name).state_dict() for pipe, _ in runs)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    other, _ = build_trained_pipeline(seed=4, vae_steps=2, transformer_steps=2, pool=8, log=lambda m: None)
    a, b = runs[0][0].transformer.state_dict(), other.transformer.state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_adherence_fp32_and_fp8(trained_fp8):
    """20 prompts x 2 seeds, one 33-frame video each, fp32 and FP8 runtimes (the FP8 report's adherence_report):
    fp32 shows the prompt's colour and direction in >= 90% of them, FP8 in exactly as many."""
    from helios_deploy.artifacts import Artifacts
    from helios_deploy.export.parity.fp8 import adherence_report

    report = adherence_report(Artifacts.open(trained_fp8), seeds=(0, 1))
    fp32, fp8 = report["share"]["fp32"], report["share"]["fp8"]
    assert fp32["videos"] == 40 and fp32["share"] >= 0.9, (fp32, report["flips"])
    assert fp8["matched"] == fp32["matched"], (fp32, fp8, report["flips"])


@pytest.mark.slow
@pytest.mark.parametrize("at", [1, 2])
def test_a_prompt_change_shows_from_the_next_chunk(trained_artifacts, at):
    """A stream's prompt changes colour at chunk ``at`` (a prompt schedule, as a live change lands): every chunk
    before shows the old colour, every chunk from it the new one (the runtime's frames, 3 chunks)."""
    from helios_deploy.measure.adherence import analyse
    from helios_deploy.runtime import Pipeline

    pipe = Pipeline.from_artifacts(trained_artifacts)
    for seed, (old, new, direction) in enumerate([("red", "blue", "right"), ("white", "green", "down")]):
        schedule = {0: f"a {old} square moving {direction}", at: f"a {new} square moving {direction}"}
        seen = analyse(pipe.generate(schedule, num_frames=99, seed=seed))
        assert seen["chunk_colours"] == [old] * at + [new] * (3 - at), (schedule, seen)
