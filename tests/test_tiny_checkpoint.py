import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from helios_deploy.checkpoints.tiny import write_tiny_checkpoint

from .conftest import HEIGHT, WIDTH


def _all_weights(path):
    out = {}
    for f in sorted(path.glob("*/*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                out[f"{f.parent.name}/{k}"] = st.get_tensor(k)
    return out


def test_layout_is_diffusers_and_sharded(tiny_ckpt):
    index = json.loads((tiny_ckpt / "model_index.json").read_text())
    assert index["_class_name"] == "HeliosPyramidPipeline"
    assert index["is_distilled"] is True
    for folder in ("transformer", "text_encoder", "vae"):
        shards = list((tiny_ckpt / folder).glob("*.safetensors"))
        assert len(shards) >= 2, folder
        assert list((tiny_ckpt / folder).glob("*.safetensors.index.json")), folder
    assert (tiny_ckpt / "tokenizer" / "tokenizer.json").is_file()
    cfg = json.loads((tiny_ckpt / "transformer" / "config.json").read_text())
    assert cfg["has_multi_term_memory_patch"] and cfg["guidance_cross_attn"] and cfg["zero_history_timestep"]
    assert cfg["is_amplify_history"] is True


def test_deterministic_by_seed(tiny_ckpt, tmp_path):
    again = _all_weights(write_tiny_checkpoint(tmp_path / "same", seed=0))
    other = _all_weights(write_tiny_checkpoint(tmp_path / "other", seed=1))
    first = _all_weights(tiny_ckpt)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_reference_pipeline_loads_and_runs(tiny_ckpt, cholesky_float64):
    from diffusers import HeliosPyramidPipeline

    pipe = HeliosPyramidPipeline.from_pretrained(tiny_ckpt)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt="a cat in a kitchen", height=HEIGHT, width=WIDTH, num_frames=33, guidance_scale=1.0,
               pyramid_num_inference_steps_list=[1, 1, 1], generator=torch.Generator().manual_seed(0),
               output_type="np", max_sequence_length=32).frames
    assert out.shape == (1, 33, HEIGHT, WIDTH, 3)
    assert np.isfinite(out).all() and out.std() > 0.01


@pytest.mark.parametrize("amplify", [False])
def test_amplify_history_is_a_choice(tmp_path, amplify):
    path = write_tiny_checkpoint(tmp_path / "c", amplify_history=amplify)
    assert json.loads((path / "transformer" / "config.json").read_text())["is_amplify_history"] is amplify
