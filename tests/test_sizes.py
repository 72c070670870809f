"""Several video sizes from one export (SIZES: 64x128 and 128x64, the session's `sizes_artifacts`): operating
points per size in the specs and the manifest, every point of every size against the reference modules, the
runtime at each size against the diffusers pipeline at that size, a third size refused (Python API and CLIs;
Triton in test_triton.py), the build plan's profiles per size, calibration at every size, and cost per size."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from helios_deploy.errors import UserError

from .conftest import SIZES, run_cli

PROMPT = "A cat and a dog baking a cake together in a kitchen."
THIRD = (128, 128)  # inside the graphs' symbol ranges, but not an exported size


def _names(points) -> list[str]:
    return [p.name for p in points]


def test_specs_have_every_sizes_points_and_ranges_reach_the_largest(tiny_ckpt):
    from helios_deploy.checkpoints.checkpoint import Checkpoint
    from helios_deploy.model.specs import build_specs

    configs = Checkpoint(tiny_ckpt).configs
    sizes = ((64, 128), (128, 64), (128, 192))
    for variant, per_size in (("distilled", ["stage0", "stage1", "stage2"]),
                              ("mid", ["stage0", "stage1", "stage2", "stage0_unguided", "stage1_unguided",
                                       "stage2_unguided"]),
                              ("base", ["full", "full_unguided"])):
        g = build_specs(configs, 64, 128, 8, 16, ["transformer"], variant=variant, sizes=sizes)["transformer"].graphs[0]
        assert _names(g.operating_points) == [f"{p}@{h}x{w}" for h, w in sizes for p in per_size], variant
        if variant != "distilled":  # guided: batch 2 and batch 1 at every size
            assert {p.dims["batch"] for p in g.operating_points} == {1, 2}
        assert g.ranges["latent_height"][1] == 128 // 64 and g.ranges["latent_width"][1] == 192 // 64
        assert g.ranges["stage_height"][1] == 128 // 16 and g.ranges["stage_width"][1] == 192 // 16
    # one size keeps the plain names (existing single-size artifacts and their engines stay valid)
    one = build_specs(configs, 64, 128, 8, 16, ["transformer"])["transformer"].graphs[0]
    assert _names(one.operating_points) == ["stage0", "stage1", "stage2"]
    with pytest.raises(UserError, match="unsupported video size 96x128"):
        build_specs(configs, 64, 128, 8, 16, ["transformer"], sizes=((64, 128), (96, 128)))


def test_manifest_records_the_sizes_and_each_components_points(sizes_artifacts):
    from helios_deploy.artifacts import Artifacts

    arts = Artifacts.open(sizes_artifacts)
    assert arts.manifest["video"] == {"height": 64, "width": 128, "sizes": [[64, 128], [128, 64]]}
    stages = arts.spec("transformer").graphs[0].operating_points
    assert _names(stages) == [f"stage{s}@{h}x{w}" for h, w in SIZES for s in range(3)]
    assert [(p.dims["stage_height"], p.dims["stage_width"]) for p in stages] == [(1, 2), (2, 4), (4, 8),
                                                                                  (2, 1), (4, 2), (8, 4)]
    for component in ("vae_decoder", "vae_encoder"):
        for g in arts.spec(component).graphs:
            assert [(p.name, p.dims["latent_height"], p.dims["latent_width"]) for p in g.operating_points] == [
                ("chunk@64x128", 8, 16), ("chunk@128x64", 16, 8)]


@pytest.fixture(scope="module")
def sizes_parity(tiny_ckpt, sizes_artifacts, tmp_path_factory):
    """The parity CLI's JSON report of the transformer and the VAE decoder (the components with points per size)."""
    from helios_deploy.cli import main

    out = tmp_path_factory.mktemp("sizes") / "parity.json"
    assert main(["parity", str(tiny_ckpt), str(sizes_artifacts), "--components", "transformer,vae_decoder",
                 "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_parity_covers_every_point_of_both_sizes(sizes_parity):
    assert sizes_parity["passed"] and sizes_parity["sizes"] == [[64, 128], [128, 64]]
    for component, points in (("transformer", ["stage0", "stage1", "stage2"]), ("vae_decoder", ["chunk"])):
        cases = {c["name"]: c for c in sizes_parity["components"][component]["cases"]}
        for h, w in SIZES:
            for p in points:
                assert cases[f"{p}@{h}x{w}"]["rel_l2"] <= 1e-4, (component, p, h, w)


@pytest.fixture(scope="module")
def pipeline_at_each_size(tiny_ckpt, sizes_artifacts):
    """Our runtime against diffusers' HeliosPyramidPipeline at each size (one chunk, T2V and I2V)."""
    from helios_deploy.export.parity.pipeline import PipelineCase, run_pipeline_parity
    from helios_deploy.runtime import Pipeline

    pipe = Pipeline.from_artifacts(sizes_artifacts)
    cases = [PipelineCase("t2v_111"), PipelineCase("i2v_111", condition="image")]
    return run_pipeline_parity(tiny_ckpt, pipe, cases=cases, chunks=1)


def test_generation_at_each_size_equals_the_reference_at_that_size(pipeline_at_each_size):
    cases = {c["name"]: c for c in pipeline_at_each_size["cases"]}
    assert sorted(cases) == sorted(f"{n}@{h}x{w}" for h, w in SIZES for n in ("t2v_111", "i2v_111"))
    for name, c in cases.items():
        assert c["frames"] == 33 and c["max_abs_err"] <= 1e-3, (name, c["max_abs_err"])


def test_third_size_is_refused_by_the_python_api(sizes_artifacts):
    from helios_deploy.runtime import Pipeline

    pipe = Pipeline.from_artifacts(sizes_artifacts)
    assert pipe.sizes == SIZES and (pipe.height, pipe.width) == SIZES[0]
    for kwargs in ({"height": THIRD[0], "width": THIRD[1]}, {"height": 128}):  # a lone height keeps the default width
        with pytest.raises(UserError) as e:
            pipe.stream(PROMPT, **kwargs)  # refused before anything runs
        assert "128x128 was not exported" in e.value.what and "64x128, 128x64" in e.value.expected
    frames = pipe.generate(PROMPT, num_frames=33, height=128, width=64)
    assert frames.shape == (33, 128, 64, 3) and frames.dtype == np.uint8


def test_generate_cli_takes_an_exported_size_and_refuses_another(sizes_artifacts, tmp_path, capsys):
    from helios_deploy.runtime.video_io import read_video

    out = tmp_path / "portrait.mp4"
    code, stdout, err = run_cli(["generate", sizes_artifacts, "--prompt", PROMPT, "--height", 128, "--width", 64,
                                 "-o", out], capsys)
    assert code == 0, err
    assert read_video(out).shape == (33, 128, 64, 3) and "at 128x64" in stdout
    bad = tmp_path / "third.mp4"
    code, stdout, err = run_cli(["generate", sizes_artifacts, "--prompt", PROMPT, "--height", THIRD[0], "--width",
                                 THIRD[1], "-o", bad], capsys)
    assert code == 1 and err.count("error:") == 1 and "Traceback" not in err
    assert "128x128 was not exported" in err and "64x128, 128x64" in err and not bad.exists()
    code, _, err = run_cli(["bench", sizes_artifacts, "--height", THIRD[0], "--width", THIRD[1], "--repeats", 1],
                           capsys)
    assert code == 1 and "128x128 was not exported" in err


def test_build_dry_run_lists_profiles_per_size(sizes_artifacts, capsys):
    code, out, err = run_cli(["build", sizes_artifacts, "--dry-run", "--precision", "fp32"], capsys)
    assert code == 0, err
    plan = json.loads(out)
    assert plan["sizes"] == ["64x128", "128x64"] and "one engine per size" in plan["split_advice"]
    transformer = plan["components"]["transformer"]["model"]
    assert [p["operating_point"] for p in transformer["profiles"]] == [f"stage{s}@{h}x{w}" for h, w in SIZES
                                                                       for s in range(3)]
    assert transformer["profiles_per_size"] == {"64x128": 3, "128x64": 3}
    est = transformer["estimate"]
    assert "estimate" in est["basis"] and est["build_time_vs_one_profile"] == 6
    assert est["engine_weights_bytes_one_engine_per_size"] == 2 * est["engine_weights_bytes"] > 0
    assert plan["components"]["vae_decoder"]["model"]["profiles_per_size"] == {"64x128": 1, "128x64": 1}
    assert plan["components"]["text_encoder"]["model"]["profiles_per_size"] == {"any size": 1}
    assert plan["profiles"] == 6 + 1 + 2 + 2 + 2  # transformer, text encoder, decoder, encoder first + step
    stage0 = {json.dumps(p["inputs"]["hidden_states"]["opt"]) for p in transformer["profiles"]}
    assert len(stage0) == 6  # every profile its own shape


def test_calibration_runs_at_every_size(sizes_artifacts, tmp_path):
    """FP8 calibration sees every size's stage shapes (one prompt, one chunk per size)."""
    from helios_deploy.export.transforms.quantize import quantize_artifacts

    from .conftest import FP8_KEEP

    root = shutil.copytree(sizes_artifacts, tmp_path / "arts")
    result = quantize_artifacts(root, ["transformer"], prompts=[PROMPT], keep=FP8_KEEP, chunks=1, seed=0,
                                log=lambda m: None)
    shapes = result["components"]["transformer"]["calibration"]["shapes"]
    for h, w in SIZES:
        for s in range(3):
            f = 2 ** (2 - s)
            assert f"1x16x9x{h // 8 // f}x{w // 8 // f}" in shapes, (h, w, s, sorted(shapes))
    shutil.rmtree(root)


def test_cost_prints_each_size(capsys):
    code, out, err = run_cli(["cost", "--config", "helios-14b", "--sizes", "384x640,640x384,512x832",
                              "--no-meta-count"], capsys)
    assert code == 0, err
    for size in ("384x640", "640x384", "512x832"):
        assert f"at {size}," in out and f"\n{size} " in out
    code, _, err = run_cli(["cost", "--config", "helios-14b", "--sizes", "384x640,foo"], capsys)
    assert code == 1 and "bad video size 'foo'" in err



def test_verify_scores_the_pipeline_at_every_size(sizes_artifacts):
    """`verify`'s pipeline step generates at each exported size (bookkeeping only: ONNX Runtime stands in for the
    engines here, so both sides are the same runtime; the GPU tests score real engines)."""
    from helios_deploy.export.tensorrt.verify import verify_pipeline

    report = verify_pipeline(sizes_artifacts, "onnxruntime", "cpu", "fp32", frames=33)
    assert list(report["per_size"]) == ["64x128", "128x64"] and len(report["psnr_db_per_chunk"]) == 2
    assert report["passed"]
