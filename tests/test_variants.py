"""Helios-Base and Helios-Mid beside Helios-Distilled: tiny checkpoints of each variant, the variant recorded in
the manifest, the transformer specs (Base's float timestep, batch-2 operating points and TensorRT profiles for
guided variants), the graphs against the reference modules, each variant's whole loop against its diffusers
pipeline (HeliosPipeline / HeliosPyramidPipeline), request defaults against the reference's and settings a
variant does not have."""

import inspect
import json
from pathlib import Path

import numpy as np
import pytest

from helios_deploy.errors import UserError
from helios_deploy.runtime import Pipeline
from helios_deploy.model.variants import Variant, variant_of

from .conftest import run_cli

pytestmark = pytest.mark.slow  # two more exports (Base, Mid) and reference pipelines on CPU

PROMPT = "A cat and a dog baking a cake together in a kitchen."


@pytest.fixture(scope="module")
def base(base_artifacts):
    return Pipeline.from_artifacts(base_artifacts)


@pytest.fixture(scope="module")
def mid(mid_artifacts):
    return Pipeline.from_artifacts(mid_artifacts)


@pytest.fixture(scope="module")
def distilled(artifacts):
    return Pipeline.from_artifacts(artifacts)


# -- checkpoints and manifests ---------------------------------------------------------------------------


@pytest.mark.parametrize("which,cls,scheduler,flags", [
    ("base_ckpt", "HeliosPipeline", "HeliosScheduler", {}),
    ("mid_ckpt", "HeliosPyramidPipeline", "HeliosScheduler", {"is_distilled": False, "is_cfg_zero_star": True}),
    ("tiny_ckpt", "HeliosPyramidPipeline", "HeliosDMDScheduler", {"is_distilled": True, "is_cfg_zero_star": False}),
])
def test_tiny_checkpoint_of_each_variant_is_what_diffusers_saves(request, which, cls, scheduler, flags):
    import diffusers

    ckpt = request.getfixturevalue(which)
    index = json.loads((ckpt / "model_index.json").read_text())
    assert index["_class_name"] == cls and index["scheduler"] == ["diffusers", scheduler]
    assert {k: index[k] for k in flags} == flags
    cfg = json.loads((ckpt / "scheduler" / "scheduler_config.json").read_text())
    assert getattr(diffusers, scheduler).from_config(cfg).config.stages == (1 if cls == "HeliosPipeline" else 3)


def test_tiny_checkpoint_cli_variant_options(tmp_path, capsys):
    from helios_deploy.checkpoints.tiny import build_pipeline

    assert build_pipeline(variant="mid", cfg_zero_star=False).config.is_cfg_zero_star is False
    code, _, err = run_cli(["tiny-checkpoint", tmp_path / "x", "--variant", "base", "--cfg-zero-star"], capsys)
    assert code == 1 and "CFG-Zero* is a setting of Helios-Mid" in err and not (tmp_path / "x").exists()


def test_manifest_records_the_variant(artifacts, base_artifacts, mid_artifacts):
    expected = {
        artifacts: Variant("distilled", "HeliosPyramidPipeline", True, False, "HeliosDMDScheduler"),
        base_artifacts: Variant("base", "HeliosPipeline", False, False, "HeliosScheduler"),
        mid_artifacts: Variant("mid", "HeliosPyramidPipeline", False, True, "HeliosScheduler"),
    }
    for arts, variant in expected.items():
        manifest = json.loads((arts / "manifest.json").read_text())
        assert Variant.from_json(manifest["variant"]) == variant
        # artifacts exported before the record: the checkpoint's model_index and scheduler config decide
        del manifest["variant"]
        assert Variant.from_manifest(manifest) == variant


@pytest.mark.parametrize("index,scheduler,needle", [
    ({"_class_name": "WanPipeline"}, {}, "wrong pipeline class"),
    ({"_class_name": "HeliosPipeline", "scheduler": ["diffusers", "HeliosScheduler"]}, {"stages": 3}, "stages=1"),
    ({"_class_name": "HeliosPyramidPipeline", "is_distilled": True, "scheduler": ["diffusers", "HeliosScheduler"]},
     {"stages": 3}, "HeliosDMDScheduler"),
    ({"_class_name": "HeliosPyramidPipeline", "scheduler": ["diffusers", "HeliosScheduler"]},
     {"stages": 3, "scheduler_type": "dmd"}, "scheduler_type"),
])
def test_a_scheduler_the_pipeline_cannot_run_is_refused(index, scheduler, needle):
    with pytest.raises(UserError, match=needle):
        variant_of(index, scheduler)


def test_transformer_specs_per_variant(artifacts, base_artifacts, mid_artifacts):
    from helios_deploy.artifacts import Artifacts
    from helios_deploy.export.tensorrt.engines import profiles

    graph = {a: Artifacts.open(a).spec("transformer").graph("model") for a in (artifacts, base_artifacts, mid_artifacts)}
    points = {a: [(p.name, p.dims["batch"], p.dims["stage_height"]) for p in g.operating_points] for a, g in graph.items()}
    assert points[artifacts] == [("stage0", 1, 1), ("stage1", 1, 2), ("stage2", 1, 4)]
    assert points[base_artifacts] == [("full", 2, 4), ("full_unguided", 1, 4)]
    assert points[mid_artifacts] == [("stage0", 2, 1), ("stage1", 2, 2), ("stage2", 2, 4),
                                     ("stage0_unguided", 1, 1), ("stage1_unguided", 1, 2), ("stage2_unguided", 1, 4)]
    # HeliosPipeline passes the float timestep; the pyramid pipeline truncates it to int64
    assert graph[base_artifacts].tensor("timestep").dtype == "float32"
    assert graph[mid_artifacts].tensor("timestep").dtype == graph[artifacts].tensor("timestep").dtype == "int64"
    # TensorRT: one exact profile per point, so guided variants get batch-2 profiles
    for arts in (base_artifacts, mid_artifacts):
        first = profiles(graph[arts])[0]
        assert first["hidden_states"][0][0] == first["hidden_states"][2][0] == 2
        assert first["encoder_hidden_states"][1][0] == 2
    assert all(p["hidden_states"][1][0] == 1 for p in profiles(graph[artifacts]))


def test_build_plan_has_batch_2_profiles_for_base(base_artifacts, capsys):
    code, out, err = run_cli(["build", base_artifacts, "--dry-run", "--precision", "fp32", "--components",
                              "transformer"], capsys)
    assert code == 0, err
    plan = json.loads(out)
    profs = plan["components"]["transformer"]["model"]["profiles"]
    assert [p["operating_point"] for p in profs] == ["full", "full_unguided"]
    assert profs[0]["inputs"]["hidden_states"]["opt"][0] == 2 and profs[1]["inputs"]["hidden_states"]["opt"][0] == 1


@pytest.mark.parametrize("which", ["base", "mid"])
def test_transformer_graph_equals_reference_module(request, which):
    """Every operating point (batch 2 included) of the Base (float timestep) and Mid graphs against
    HeliosTransformer3DModel."""
    from helios_deploy.export.parity.report import parity_report

    report = parity_report(request.getfixturevalue(f"{which}_ckpt"), request.getfixturevalue(f"{which}_artifacts"),
                           components=["transformer"])
    cases = report["components"]["transformer"]["cases"]
    assert report["passed"], report.get("table") or cases
    assert all(c["rel_l2"] <= 1e-4 for c in cases) and len(cases) >= 4


# -- each variant's loop against its diffusers pipeline ---------------------------------------------------

# Base: every level of sampler x guidance x conditioning, each pair of levels once (the CLI runs all 8)
BASE_TESTED = ("unipc_cfg_t2v", "unipc_nocfg_i2v", "euler_cfg_i2v", "euler_nocfg_t2v")
MID_TESTED = ("cfg_zero_star_222", "cfg_222")


@pytest.fixture(scope="module")
def base_parity(base_ckpt, base):
    from helios_deploy.export.parity.pipeline import BASE_CASES, run_pipeline_parity

    return run_pipeline_parity(base_ckpt, base, cases=[c for c in BASE_CASES if c.name in BASE_TESTED])


@pytest.fixture(scope="module")
def mid_parity(mid_ckpt, mid):
    from helios_deploy.export.parity.pipeline import MID_CASES, run_pipeline_parity

    return run_pipeline_parity(mid_ckpt, mid, cases=[c for c in MID_CASES if c.name in MID_TESTED])


@pytest.mark.parametrize("case", BASE_TESTED)
def test_base_pipeline_equals_helios_pipeline(base_parity, case):
    """Two chunks of HeliosPipeline (4 steps: UniPC reaches order 2, its corrector and the lower-order final
    step), guidance 5 with a negative prompt or off, T2V / I2V: max abs error <= 1e-3 in [0, 1] pixels."""
    result = {c["name"]: c for c in base_parity["cases"]}[case]
    assert base_parity["variant"] == "base" and result["frames"] == 65
    assert result["max_abs_err"] <= 1e-3 and result["passed"], result


@pytest.mark.parametrize("case", MID_TESTED)
def test_mid_pipeline_equals_helios_pyramid_pipeline(mid_parity, case):
    """Two chunks of HeliosPyramidPipeline with HeliosScheduler, steps 2,2,2, guidance 5, CFG-Zero* on (the
    checkpoint's is_cfg_zero_star, zero-init on stage 0's first two steps) and off."""
    result = {c["name"]: c for c in mid_parity["cases"]}[case]
    assert mid_parity["variant"] == "mid" and result["frames"] == 65
    assert result["max_abs_err"] <= 1e-3 and result["passed"], result


def test_guidance_settings_change_the_video(base, mid):
    """The settings the parity cases cover are not inert: guidance, the negative prompt and CFG-Zero* each
    change the video well beyond the 1e-3 parity threshold."""
    def video(pipe, **kw):
        return pipe.generate(PROMPT, num_frames=33, seed=0, output="float", **kw)

    cfg = video(base, num_inference_steps=2)
    assert np.abs(cfg - video(base, num_inference_steps=2, guidance_scale=1.0)).max() > 1e-2
    assert np.abs(cfg - video(base, num_inference_steps=2, negative_prompt="blurry")).max() > 1e-2
    zero_star = video(mid, pyramid_steps=(1, 1, 1))
    assert np.abs(zero_star - video(mid, pyramid_steps=(1, 1, 1), cfg_zero_star=False)).max() > 1e-2


# -- request settings -----------------------------------------------------------------------------------


def test_defaults_are_the_reference_pipelines_defaults(base, mid, distilled):
    from diffusers import HeliosPipeline, HeliosPyramidPipeline

    base_ref = inspect.signature(HeliosPipeline.__call__).parameters
    pyr_ref = inspect.signature(HeliosPyramidPipeline.__call__).parameters
    s = base.sampling()
    assert s.steps == (base_ref["num_inference_steps"].default,) and s.guidance_scale == base_ref["guidance_scale"].default
    assert s.negative_prompt == "" and s.sampler == "unipc" and s.guidance and not s.guidance.cfg_zero_star
    s = mid.sampling()
    assert list(s.steps) == pyr_ref["pyramid_num_inference_steps_list"].default
    assert s.guidance_scale == pyr_ref["guidance_scale"].default and s.guidance.cfg_zero_star
    assert s.guidance.use_zero_init == pyr_ref["use_zero_init"].default
    assert s.guidance.zero_steps == pyr_ref["zero_steps"].default
    s = distilled.sampling()  # distilled: guidance 1.0 as the official scripts run it; 1,1,1 this project's default
    assert s.steps == (1, 1, 1) and s.guidance is None and s.sampler == "dmd"


@pytest.mark.parametrize("which,kwargs,needle", [
    ("distilled", {"guidance_scale": 5.0}, "Helios-Distilled has no setting guidance_scale"),
    ("distilled", {"negative_prompt": "blurry"}, "Helios-Distilled has no setting negative_prompt"),
    ("distilled", {"num_inference_steps": 4}, "has no setting num_inference_steps"),
    ("distilled", {"sampler": "euler"}, "not available for Helios-Distilled"),
    ("base", {"pyramid_steps": (1, 1, 1)}, "Helios-Base has no setting pyramid_steps"),
    ("base", {"amplify_first_chunk": True}, "has no setting amplify_first_chunk"),
    ("base", {"cfg_zero_star": True}, "has no setting cfg_zero_star"),
    ("base", {"num_inference_steps": 0}, "num_inference_steps 0 invalid"),
    ("base", {"guidance_scale": 0.5}, "guidance_scale 0.5 invalid"),
    ("base", {"guidance_scale": 1.0, "negative_prompt": "blurry"}, "negative_prompt needs guidance"),
    ("mid", {"num_inference_steps": 10}, "Helios-Mid has no setting num_inference_steps"),
    ("mid", {"pyramid_steps": (1, 1)}, "pyramid steps (1, 1) invalid"),
    ("mid", {"cfg_zero_star": False, "zero_steps": 2}, "without CFG-Zero*"),
])
def test_a_setting_the_variant_does_not_have_is_a_clear_error(request, which, kwargs, needle):
    pipe = request.getfixturevalue(which)
    runner_calls = {k: r.calls for k, r in pipe._runners.items()}
    with pytest.raises(UserError) as e:
        pipe.stream(PROMPT, num_frames=33, **kwargs)  # raised before anything runs
    assert needle in e.value.render()
    assert {k: r.calls for k, r in pipe._runners.items()} == runner_calls


def test_generate_cli_per_variant(artifacts, base_artifacts, tmp_path, capsys):
    from helios_deploy.runtime.video_io import read_video

    out = tmp_path / "base.mp4"
    code, _, err = run_cli(["generate", base_artifacts, "--prompt", PROMPT, "--negative-prompt", "blurry",
                            "--num-inference-steps", 2, "--sampler", "euler", "-o", out], capsys)
    assert code == 0, err
    assert read_video(out).shape[0] == 33
    code, _, err = run_cli(["generate", artifacts, "--prompt", PROMPT, "--guidance-scale", 5, "-o", tmp_path / "d.mp4"],
                           capsys)
    assert code == 1 and "Helios-Distilled has no setting guidance_scale" in err and "Traceback" not in err
    code, _, err = run_cli(["generate", base_artifacts, "--prompt", PROMPT, "--steps", "1,1,1", "-o", tmp_path / "b.mp4"],
                           capsys)
    assert code == 1 and "--num-inference-steps" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.mp4"]


def test_bench_against_helios_pipeline(base_artifacts, base_ckpt, tmp_path, capsys):
    """bench --against-reference times the variant's own diffusers pipeline with the same settings."""
    out = tmp_path / "bench.json"
    code, stdout, err = run_cli(["bench", base_artifacts, "--against-reference", base_ckpt, "--frames", 33,
                                 "--num-inference-steps", 2, "--repeats", 1, "--json", out], capsys)
    assert code == 0, err
    r = json.loads(out.read_text())
    assert (r["variant"], r["sampler"], r["steps"], r["guidance_scale"]) == ("base", "unipc", [2], 5.0)
    assert r["backend_calls"]["transformer/model"] == 2 and r["transformer_batch"] == 2
    assert set(r["transformer_per_stage_s"]) == {"full"}
    assert r["speedup_vs_reference"] == pytest.approx(r["reference_total_s"] / r["total_s"])
    assert set(r["predicted"]["bf16_s"]) >= {"transformer/full", "vae_decoder/chunk"}
    assert "reference (diffusers, base)" in stdout


def test_fp8_calibration_runs_the_variants_own_loop(base_artifacts, tmp_path):
    """Base calibrates on its own sampler with its defaults: 50 UniPC steps per chunk, each one transformer
    call at batch 2 (conditional and unconditional), not the distilled pyramid (whose settings Base refuses)."""
    import shutil

    from helios_deploy.export.transforms.quantize import quantize_artifacts

    root = Path(shutil.copytree(base_artifacts, tmp_path / "arts"))
    quantize_artifacts(root, ["transformer"], prompts=["a cat in a kitchen"], chunks=1, seed=0,
                       keep=[r"^patch_", r"^condition_embedder\.", r"^proj_out/"], log=lambda m: None)
    calibration = json.loads((root / "manifest.json").read_text())["components"]["transformer"]["fp8"]["calibration"]
    assert calibration["calls"] == 50 and calibration["variant"] == "base"
    assert calibration["sampling"]["num_inference_steps"] == 50
    assert all(shape.startswith("2x") for shape in calibration["shapes"]), calibration["shapes"]
