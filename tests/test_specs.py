import pytest
import torch

from helios_deploy.model import specs
from helios_deploy.errors import UserError


def _configs(tiny_ckpt):
    from helios_deploy.checkpoints.checkpoint import Checkpoint

    return Checkpoint(tiny_ckpt).configs


def test_transformer_operating_points_follow_the_pyramid(tiny_ckpt):
    spec = specs.build_specs(_configs(tiny_ckpt), 384, 640, 226, 512, ["transformer"])["transformer"]
    g = spec.graphs[0]
    shapes = [specs.shapes_at(g, p.dims) for p in g.operating_points]
    # noisy latents at 1/4, 1/2, 1 of the 48x80 latent; history always at full size
    assert [s["hidden_states"][-2:] for s in shapes] == [(12, 20), (24, 40), (48, 80)]
    assert all(s["latents_history_long"] == (1, 16, 16, 48, 80) for s in shapes)
    assert all(s["latents_history_short"][2] == 2 and s["latents_history_mid"][2] == 2 for s in shapes)
    assert shapes[0]["encoder_hidden_states"] == (1, 226, 4096) or shapes[0]["encoder_hidden_states"][1] == 226
    # the pipeline's rotary frame indices: prefix 0, long 1-16, mid 17-18, short 19, noisy 20-28
    idx = spec.attrs["frame_indices"]
    assert idx["indices_latents_history_short"] == [0, 19]
    assert idx["indices_latents_history_long"] == list(range(1, 17))
    assert idx["indices_hidden_states"] == list(range(20, 29))


def test_bind_symbols_reports_every_mismatch(tiny_ckpt):
    g = specs.build_specs(_configs(tiny_ckpt), 384, 640, 226, 512, ["transformer"])["transformer"].graphs[0]
    shapes = specs.shapes_at(g, g.operating_points[1].dims)
    assert specs.bind_symbols(g, shapes)["stage_height"] == 12
    shapes["latents_history_mid"] = (1, 16, 2, 40, 80)  # disagrees with the other history tensors
    shapes["timestep"] = (1, 1)
    with pytest.raises(UserError) as e:
        specs.bind_symbols(g, shapes)
    assert "latents_history_mid[3]" in str(e.value) and "timestep: rank 2" in str(e.value)


def test_spec_json_round_trip(tiny_ckpt):
    for spec in specs.build_specs(_configs(tiny_ckpt), 128, 128, 8, 16, ["transformer", "text_encoder"]).values():
        assert specs.spec_from_json(specs.spec_to_json(spec)) == spec


@pytest.mark.parametrize("height,width", [(64, 128), (96, 128), (64, 160), (128, 192), (80, 128)])
def test_size_constraint_matches_the_reference_pipeline(tiny_ckpt, cholesky_float64, height, width):
    """Our size check accepts exactly the sizes the reference pipeline can generate."""
    from diffusers import HeliosPyramidPipeline

    pipe = HeliosPyramidPipeline.from_pretrained(tiny_ckpt)
    pipe.set_progress_bar_config(disable=True)
    try:
        pipe(prompt="x", height=height, width=width, num_frames=1, guidance_scale=1.0, output_type="latent",
             pyramid_num_inference_steps_list=[1, 1, 1], generator=torch.Generator().manual_seed(0),
             max_sequence_length=8)
        reference_ok = True
    except (RuntimeError, ValueError):
        reference_ok = False
    try:
        specs.build_specs(_configs(tiny_ckpt), height, width, 8, 16, ["transformer"])
        ours_ok = True
    except UserError as e:
        assert "multiples of 64" in str(e)
        ours_ok = False
    assert ours_ok == reference_ok
